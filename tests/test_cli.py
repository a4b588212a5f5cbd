"""The `dinoseek embed` command through click's CliRunner."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import synthetic_photo

from dinoseek.retrieval.cli import main


@pytest.fixture
def images(tmp_path):
    paths = []
    for i, (w, h) in enumerate([(300, 200), (180, 260)]):
        path = tmp_path / f"photo{i}.jpg"
        synthetic_photo(w, h, seed=i).save(path, quality=90)
        paths.append(str(path))
    return paths


def test_embed_json(tiny_folder, images):
    result = CliRunner().invoke(main, ["embed", "--weights", str(tiny_folder), "--precision", "fp32", "--json", *images])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["path"] for r in rows] == images
    assert np.isclose(np.linalg.norm(rows[0]["cls"]), 1, atol=1e-5) and len(rows[0]["patch"]) == 128


def test_embed_to_npz(tiny_folder, images, tmp_path):
    out = tmp_path / "vectors.npz"
    result = CliRunner().invoke(main, ["embed", "--weights", str(tiny_folder), "--out", str(out), *images])
    assert result.exit_code == 0, result.output
    assert "wrote 2 vectors of dim 128" in result.output
    data = np.load(out)
    assert data["cls"].shape == data["patch"].shape == (2, 128)


def test_missing_preset_weights_is_one_line(images, monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(main, ["embed", "--model", "small", images[0]])
    assert result.exit_code == 1
    assert result.output.startswith("Error: facebook/dinov2-small is not in the Hugging Face cache")
    assert "--weights PATH" in result.output and "Traceback" not in result.output


def test_undecodable_image(tiny_folder, tmp_path):
    bad = tmp_path / "page.jpg"
    bad.write_text("<html>not a photo</html>")
    result = CliRunner().invoke(main, ["embed", "--weights", str(tiny_folder), str(bad)])
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: cannot decode {bad}")


def test_help_has_an_example():
    result = CliRunner().invoke(main, ["embed", "--help"])
    assert result.exit_code == 0 and "dinoseek embed --weights" in result.output
