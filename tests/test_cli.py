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


def test_embed_json_prints_one_object_per_image(tiny_folder, images):
    result = CliRunner().invoke(main, ["embed", "--weights", str(tiny_folder), "--precision", "fp32", "--json", *images])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]  # JSON Lines: each line parses alone
    assert [r["path"] for r in rows] == images
    for row in rows:
        assert set(row) == {"path", "cls", "patch"}
        for kind in ("cls", "patch"):
            assert len(row[kind]) == 128 and np.isclose(np.linalg.norm(row[kind]), 1, atol=1e-5)
    assert result.stderr == "2 embedded (dim 128, fp32), 0 skipped\n"


def test_embed_out_folder_holds_npy_arrays_and_the_paths(tiny_folder, images, tmp_path):
    out = tmp_path / "vectors"
    args = ["embed", "--weights", str(tiny_folder), "--precision", "fp32"]
    result = CliRunner().invoke(main, [*args, "--out", str(out), *images])
    assert result.exit_code == 0, result.output
    assert result.stdout == "" and result.stderr == f"2 embedded (dim 128, fp32), 0 skipped; written to {out}\n"
    assert sorted(p.name for p in out.iterdir()) == ["cls.npy", "patch.npy", "paths.jsonl"]
    paths = [json.loads(line)["path"] for line in (out / "paths.jsonl").read_text().splitlines()]
    assert paths == images
    printed = [json.loads(line) for line in CliRunner().invoke(main, [*args, "--json", *images]).stdout.splitlines()]
    for kind in ("cls", "patch"):  # row i is the vector --json prints for path i
        rows = np.load(out / f"{kind}.npy")
        assert rows.dtype == np.float32 and rows.shape == (2, 128)
        np.testing.assert_allclose(rows, [p[kind] for p in printed], atol=1e-6)


def test_embed_refuses_an_npz_out(tiny_folder, images, tmp_path):
    out = tmp_path / "vectors.npz"
    result = CliRunner().invoke(main, ["embed", "--weights", str(tiny_folder), "--out", str(out), *images])
    assert result.exit_code == 1
    assert result.output == (f"Error: --out must be a folder (cls.npy, patch.npy and paths.jsonl are written into "
                             f"it), not a .npz file: {out}\n")
    assert not out.exists()


def test_missing_preset_weights_is_one_line(images, monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(main, ["embed", "--model", "small", images[0]])
    assert result.exit_code == 1
    assert result.output.startswith("Error: facebook/dinov2-small is not in the Hugging Face cache")
    assert "--weights PATH" in result.output and "Traceback" not in result.output


def test_undecodable_image_is_skipped_with_one_line(tiny_folder, images, tmp_path):
    bad = tmp_path / "page.jpg"
    bad.write_text("<html>not a photo</html>")
    args = ["embed", "--weights", str(tiny_folder), "--precision", "fp32"]
    result = CliRunner().invoke(main, [*args, str(bad)])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == (f"skipped {bad}: not an image Pillow recognises\n"
                             "Error: nothing embedded: 1 file(s) skipped (see above)\n")
    # Beside a good image: the run goes on, the bad file is named once, exit 0.
    result = CliRunner().invoke(main, [*args, "--json", str(bad), images[0]])
    assert result.exit_code == 0, result.output
    skipped, embedded = [json.loads(line) for line in result.stdout.splitlines()]
    assert skipped == {"path": str(bad), "status": "unidentified", "error": "not an image Pillow recognises"}
    assert embedded["path"] == images[0]
    assert result.stderr == (f"skipped {bad}: not an image Pillow recognises\n"
                             "1 embedded (dim 128, fp32), 1 skipped\n")


def test_help_has_an_example():
    result = CliRunner().invoke(main, ["embed", "--help"])
    assert result.exit_code == 0 and "dinoseek embed --weights" in result.output
