"""One place builds the encoder for a library: a new one takes the mode asked for, an existing one its own."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from conftest import synthetic_photo

from dinoseek.model import InvalidArgumentError, encoder_for_library, load_weights
from dinoseek.retrieval.api import open_library
from dinoseek.retrieval.cli import main

FULL = {"preprocess": {"mode": "full", "size": 112}}


def test_new_library_takes_the_mode_asked_for(tiny_folder):
    assert encoder_for_library(None, tiny_folder, precision="fp32").input_spec.as_dict() == {"mode": "crop", "size": 224}
    made = encoder_for_library(None, tiny_folder, precision="fp32", mode="full", size=112)
    assert made.input_spec.as_dict() == {"mode": "full", "size": 112}


def test_existing_library_keeps_its_preprocessing(tiny_folder):
    for kwargs in ({}, {"mode": "full"}, {"size": 112}, {"mode": "full", "size": 112}):
        encoder = encoder_for_library(FULL, tiny_folder, precision="fp32", **kwargs)
        assert encoder.input_spec.as_dict() == FULL["preprocess"]
    loaded = encoder_for_library(FULL, load_weights(tiny_folder), precision="fp32")  # weights already read
    assert loaded.input_spec.as_dict() == FULL["preprocess"]


@pytest.mark.parametrize("kwargs", [{"mode": "crop"}, {"size": 224}, {"mode": "crop", "size": 224}])
def test_another_input_for_an_existing_library_is_refused(tiny_folder, kwargs):
    with pytest.raises(InvalidArgumentError, match="this library was made with mode 'full' at size 112, not"):
        encoder_for_library(FULL, tiny_folder, precision="fp32", **kwargs)


@pytest.fixture
def full_library(tmp_path, tiny_folder):
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(3):
        synthetic_photo(320, 240, seed=i).save(root / f"p{i}.jpg", quality=90)
    weights = ["--weights", str(tiny_folder), "--precision", "fp32", "--workers", "0"]
    first = CliRunner().invoke(main, ["index", str(root), "--mode", "full", *weights])
    assert first.exit_code == 0, first.output
    return root, weights


def test_reindexing_a_full_mode_library_without_mode_works(full_library):
    """The bug: `--mode` defaulted to crop, so a second run failed with "another model (preprocess differ)"."""
    root, weights = full_library
    again = CliRunner().invoke(main, ["index", str(root), *weights])
    assert again.exit_code == 0, again.output
    assert again.output.startswith("0 embedded")
    assert CliRunner().invoke(main, ["index", str(root), "--mode", "full", *weights]).exit_code == 0


def test_reindexing_with_another_mode_is_one_line(full_library):
    root, weights = full_library
    result = CliRunner().invoke(main, ["index", str(root), "--mode", "crop", *weights])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output == ("Error: this library was made with mode 'full' at size 224, not mode 'crop'; leave it "
                             "unset to use the library's, or make a new library\n")


def test_every_command_uses_the_library_encoder(full_library, tiny_folder, monkeypatch):
    from dinoseek.model import encoder as encoder_module

    root, weights = full_library
    made = []
    real = encoder_module.Encoder.from_weights.__func__

    def recording(cls, *args, **kwargs):
        encoder = real(cls, *args, **kwargs)
        made.append(encoder.input_spec.mode)
        return encoder

    monkeypatch.setattr(encoder_module.Encoder, "from_weights", classmethod(recording))
    with open_library(root, weights=tiny_folder, precision="fp32") as lib:
        assert lib.encoder.input_spec.mode == "full"
    cli = ["--weights", str(tiny_folder), "--precision", "fp32"]
    for command in (["search", str(root / "p0.jpg"), "--root", str(root), *cli],
                    ["dedup", str(root), "--crops", *cli],
                    ["calibrate", str(root), "--sample", "2", *cli]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 0, (command, result.output)
    assert made == ["full"] * 4
