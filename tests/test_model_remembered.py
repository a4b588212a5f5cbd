"""A library remembers the model it was built with (weights path or Hub repo, checked by sha256) and its
preprocessing: later commands need no --weights/--mode/--size, moved weights are found again or named."""

from __future__ import annotations

import shutil

import huggingface_hub.constants
import pytest
from click.testing import CliRunner
from conftest import random_hf_model, save_hf, synthetic_photo
from test_hub import fake_hub_cache

from dinoseek.indexer.catalog import ManifestRow
from dinoseek.indexer.catalog_gateway import MANIFEST_DIGEST, _digest
from dinoseek.indexer.library import Library
from dinoseek.model import encoder as encoder_module
from dinoseek.model.encoder import WEIGHTS_SOURCE
from dinoseek.retrieval.api import open_library
from dinoseek.retrieval.cli import main

FULL_112 = {"mode": "full", "size": 112}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(result):
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    return result


def error_line(result) -> str:
    """The one `Error:` line of a failed command (and no traceback)."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def manifest(root):
    with Library.open(root) as library:
        return library.manifest()


def add_photos(root, seeds):
    root.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        synthetic_photo(320, 240, seed=seed).save(root / f"p{seed}.jpg", quality=90)


@pytest.fixture(autouse=True)
def no_default_model(tmp_path, monkeypatch):
    """An empty, offline Hugging Face cache: a command that fell back to the default preset instead of
    the library's model would fail, so every passing command below used the recorded one."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def place(tmp_path, tiny_folder):
    """photos/ and weights/ side by side in one folder (so they can be moved together)."""
    base = tmp_path / "place"
    add_photos(base / "photos", range(4))
    shutil.copytree(tiny_folder, base / "weights")
    return base


@pytest.fixture
def library(place):
    """A library indexed with --weights, --mode full and --size 112: the only time they are given."""
    root, weights = place / "photos", place / "weights"
    ok(invoke("index", root, "--weights", weights, "--mode", "full", "--size", 112, "--precision", "fp32",
              "--workers", 0))
    return root, weights


@pytest.fixture
def encoders_made(monkeypatch):
    """The input spec of every encoder built, in order."""
    made = []
    real = encoder_module.Encoder.from_weights.__func__

    def recording(cls, *args, **kwargs):
        encoder = real(cls, *args, **kwargs)
        made.append(encoder.input_spec.as_dict())
        return encoder

    monkeypatch.setattr(encoder_module.Encoder, "from_weights", classmethod(recording))
    return made


def test_manifest_records_the_weights_path_relative_path_mode_and_size(library):
    root, weights = library
    recorded = manifest(root)
    assert recorded["preprocess"] == FULL_112
    assert recorded[WEIGHTS_SOURCE] == {"path": str(weights), "relative": "../weights"}


def test_reindex_without_flags_uses_the_recorded_model_mode_and_size(library, encoders_made):
    root, _ = library
    add_photos(root, [7])
    result = ok(invoke("index", root, "--workers", 0))
    assert result.stdout.startswith("1 embedded")
    assert encoders_made == [FULL_112]
    assert manifest(root)["preprocess"] == FULL_112


def test_search_similar_calibrate_and_dedup_crops_without_flags(library, encoders_made, monkeypatch):
    root, _ = library
    result = ok(invoke("search", root / "p1.jpg", "--root", root, "-k", 1))
    assert result.stdout.startswith("1.0000  p1.jpg")
    assert ok(invoke("similar", root / "p1.jpg", "--root", root, "-k", 1)).stdout.count("\n") == 1
    ok(invoke("calibrate", root, "--sample", 2))
    ok(invoke("dedup", root, "--crops"))
    monkeypatch.chdir(root)  # and with ROOT found from the current folder
    assert ok(invoke("search", "p2.jpg", "-k", 1)).stdout.startswith("1.0000  p2.jpg")
    assert encoders_made == [FULL_112] * 4  # similar needs no model


def test_open_library_loads_the_recorded_model_when_asked(library):
    root, _ = library
    with open_library(root) as lib:
        assert lib.encoder is None  # vectors and `similar` need no model: none is loaded
    with open_library(root, load_model=True, precision="fp32") as lib:
        assert lib.encoder.input_spec.as_dict() == FULL_112
        assert lib.search(root / "p3.jpg", k=1)[0].path == "p3.jpg"


def test_explicit_same_weights_and_mode_are_accepted(library):
    root, weights = library
    ok(invoke("index", root, "--weights", weights, "--mode", "full", "--size", 112, "--workers", 0))


@pytest.mark.parametrize(("flags", "asked"), [(["--mode", "crop"], "mode 'crop'"), (["--size", 224], "size 224"),
                                              (["--mode", "crop", "--size", 224], "mode 'crop' at size 224")])
def test_another_mode_or_size_says_what_the_library_uses(library, flags, asked):
    root, _ = library
    assert error_line(invoke("index", root, *flags, "--workers", 0)) == (
        f"Error: this library was made with mode 'full' at size 112, not {asked}; leave it unset to use the "
        f"library's, or make a new library")


def test_other_weights_are_another_model(library, tmp_path):
    root, weights = library
    other = save_hf(random_hf_model(seed=5), tmp_path / "other")
    for command in (["index", root, "--workers", 0], ["search", root / "p0.jpg", "--root", root]):
        assert error_line(invoke(*command, "--weights", other)) == (
            f"Error: this library was built with another model ({weights}); weights_sha256 differ; use the same "
            "--model/--weights, or a new --library")
    assert manifest(root)[WEIGHTS_SOURCE]["path"] == str(weights)  # the record is not touched


def test_moved_weights_are_one_line_naming_the_recorded_path(library, tmp_path):
    root, weights = library
    weights.rename(tmp_path / "elsewhere")
    for command in (["index", root], ["search", root / "p0.jpg", "--root", root], ["calibrate", root],
                    ["dedup", root, "--crops"]):
        assert error_line(invoke(*command)) == (
            f"Error: the weights this library was built with are no longer at {weights}; pass a local copy with "
            f"--weights PATH (a Hugging Face folder, .safetensors or .pth file)")


def test_moved_weights_given_once_are_remembered(library, tmp_path):
    root, weights = library
    moved = weights.rename(tmp_path / "elsewhere")
    assert ok(invoke("search", root / "p0.jpg", "--root", root, "-k", 1, "--weights", moved)).stdout.startswith(
        "1.0000  p0.jpg")
    assert manifest(root)[WEIGHTS_SOURCE] == {"path": str(moved), "relative": "../../elsewhere"}
    ok(invoke("search", root / "p0.jpg", "--root", root))
    ok(invoke("index", root, "--workers", 0))


def test_moved_weights_replaced_by_other_weights_are_refused(library, tmp_path):
    root, weights = library
    weights.rename(tmp_path / "elsewhere")
    save_hf(random_hf_model(seed=5), weights)  # something else now at the recorded path
    assert f"another model ({weights}); weights_sha256 differ" in error_line(invoke("search", root / "p0.jpg",
                                                                                  "--root", root))
    other = save_hf(random_hf_model(seed=6), tmp_path / "other")
    assert "another model" in error_line(invoke("index", root, "--weights", other, "--workers", 0))
    assert manifest(root)[WEIGHTS_SOURCE]["path"] == str(weights)


def test_photos_and_weights_moved_together_are_found_again(library, place, tmp_path):
    moved = tmp_path / "moved"
    place.rename(moved)
    root = moved / "photos"
    assert ok(invoke("search", root / "p0.jpg", "--root", root, "-k", 1)).stdout.startswith("1.0000  p0.jpg")
    assert manifest(root)[WEIGHTS_SOURCE] == {"path": str(moved / "weights"), "relative": "../weights"}
    add_photos(root, [9])
    assert ok(invoke("index", root, "--workers", 0)).stdout.startswith("1 embedded")


def test_hub_model_is_remembered_by_repo_id(tmp_path, tiny_folder, encoders_made):
    cache = tmp_path / "hub"
    fake_hub_cache(cache, "facebook/dinov2-base", tiny_folder)
    huggingface_hub.constants.HF_HUB_CACHE = str(cache)  # restored by no_default_model's monkeypatch
    root = tmp_path / "photos"
    add_photos(root, range(3))
    ok(invoke("index", root, "--model", "base", "--workers", 0))
    assert manifest(root)[WEIGHTS_SOURCE] == {"hub": "facebook/dinov2-base"}
    ok(invoke("search", root / "p0.jpg", "--root", root))  # not the default preset (small): not cached
    assert "another model" in error_line(invoke("search", root / "p0.jpg", "--root", root, "--weights",
                                                save_hf(random_hf_model(seed=5), tmp_path / "other")))


@pytest.mark.parametrize("digest", [True, False], ids=["with-digest", "before-digests"])
def test_library_made_before_the_model_was_recorded_still_works(library, tmp_path, digest):
    """A manifest as the previous version wrote it (no weights_source): flags work as they did, and the
    library learns where its weights are the first time they are given."""
    root, weights = library
    with Library.open(root, write=True) as lib, lib.catalog.session() as s, s.begin():
        old = {k: v for k, v in lib.manifest().items() if k != WEIGHTS_SOURCE}
        s.get(ManifestRow, 1).data = {**old, MANIFEST_DIGEST: _digest(old)} if digest else old
    assert WEIGHTS_SOURCE not in manifest(root)
    assert "facebook/dinov2-small is not in the Hugging Face cache" in error_line(  # as before: the default
        invoke("search", root / "p0.jpg", "--root", root))
    ok(invoke("similar", root / "p0.jpg", "--root", root))
    assert ok(invoke("search", root / "p0.jpg", "--root", root, "--weights", weights, "-k", 1)).stdout.startswith(
        "1.0000  p0.jpg")
    assert manifest(root)[WEIGHTS_SOURCE] == {"path": str(weights), "relative": "../weights"}
    add_photos(root, [8])
    assert ok(invoke("index", root, "--workers", 0)).stdout.startswith("1 embedded")
    assert manifest(root)["preprocess"] == FULL_112


def test_auto_precision_is_the_librarys_own_where_the_device_runs_it(library, caplog):
    """Query vectors made at the library's precision match its stored ones: no 'made at fp32' warning."""
    root, _ = library
    recorded = manifest(root)
    assert recorded["precision"] == "fp32"
    assert encoder_module.encoder_for_library(recorded, root=root).manifest()["precision"] == "fp32"
    explicit = encoder_module.encoder_for_library(recorded, root=root, precision="bf16")
    assert explicit.manifest()["precision"] == "bf16"  # an explicit --precision still wins
    ok(invoke("search", root / "p1.jpg", "--root", root))
    assert "library vectors were made at" not in caplog.text
