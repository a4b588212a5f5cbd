"""A first `dinoseek index` that fails (no weights, a file that is not a checkpoint, bad settings, or an
error before any model was recorded) leaves the photo folder exactly as it was: no half-made library."""

from __future__ import annotations

import os

import huggingface_hub.constants
import pytest
from click.testing import CliRunner
from conftest import synthetic_photo

from dinoseek.indexer import pipeline
from dinoseek.indexer.library import Library
from dinoseek.retrieval.cli import main


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def tree(folder) -> dict[str, bytes | None]:
    """Every path under `folder` (hidden ones too), with a file's bytes."""
    out = {}
    for here, dirs, files in os.walk(folder):
        for name in dirs:
            out[os.path.relpath(os.path.join(here, name), folder)] = None
        for name in files:
            path = os.path.join(here, name)
            out[os.path.relpath(path, folder)] = open(path, "rb").read()
    return out


@pytest.fixture(autouse=True)
def empty_offline_hub(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    synthetic_photo(320, 240, seed=0).save(root / "p0.jpg")
    synthetic_photo(320, 240, seed=1).save(root / "sub" / "p1.jpg")
    (root / "notes.txt").write_text("not a checkpoint")
    return root


def failed_index(root, *args, exit_code=1) -> str:
    result = invoke("index", root, "--workers", 0, *args)
    assert result.exit_code == exit_code and "Traceback" not in result.output, result.output
    return result.output


@pytest.mark.parametrize(("args", "expected"), [
    ([], "Error: facebook/dinov2-small is not in the Hugging Face cache and HF_HUB_OFFLINE is set"),
    (["--model", "base-reg"], "Error: facebook/dinov2-with-registers-base is not in the Hugging Face cache"),
    (["--weights", "{root}/p0.jpg"], "Error: {root}/p0.jpg is not a DINOv2 checkpoint"),
    (["--weights", "{root}/notes.txt"], "Error: {root}/notes.txt is not a DINOv2 checkpoint"),
    (["--weights", "{root}/sub"], "Error: {root}/sub"),
], ids=["no-weights", "preset-not-cached", "photo-as-weights", "text-as-weights", "folder-without-checkpoint"])
def test_first_run_whose_model_cannot_be_loaded_leaves_no_library(root, args, expected):
    before = tree(root)
    output = failed_index(root, *[a.format(root=root) for a in args])
    assert output.startswith(expected.format(root=root)), output
    assert tree(root) == before and not (root / ".dinoseek").exists()


def test_first_run_with_a_missing_weights_path_leaves_no_library(root):
    before = tree(root)
    assert "does not exist" in failed_index(root, "--weights", root / "gone.safetensors", exit_code=2)
    assert tree(root) == before


@pytest.mark.parametrize(("args", "expected"), [
    (["--mode", "full", "--size", "300"], "size for mode 'full' must be a multiple of 14, got 300"),
    (["--index", "Flat,nonsense"], "Flat,nonsense"),
], ids=["bad-size", "bad-index"])
def test_first_run_with_bad_settings_leaves_no_library(root, tiny_folder, args, expected):
    before = tree(root)
    assert expected in failed_index(root, "--weights", tiny_folder, *args)
    assert tree(root) == before


def test_failed_first_run_removes_the_library_folders_it_made_elsewhere(root, tmp_path):
    failed_index(root, "--library", tmp_path / "a" / "b" / "library")
    assert not (tmp_path / "a").exists()


@pytest.fixture
def fails_before_any_model_is_recorded(monkeypatch):
    """run_index fails after the library was created, before it recorded a model (a full disk, say)."""

    def full_disk(library, *args, **kwargs):
        raise OSError(28, "No space left on device", str(library.folder / "catalog.sqlite"))

    monkeypatch.setattr(pipeline, "run_index", full_disk)


def test_first_run_failing_after_the_library_was_created_removes_it(root, tiny_folder,
                                                                     fails_before_any_model_is_recorded):
    before = tree(root)
    output = failed_index(root, "--weights", tiny_folder)
    assert output == f"Error: {root}/.dinoseek/catalog.sqlite: No space left on device\n"
    assert tree(root) == before


def test_first_run_interrupted_before_anything_was_recorded_removes_the_library(root, tiny_folder, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_index", interrupted)
    before = tree(root)
    failed_index(root, "--weights", tiny_folder, exit_code=130)
    assert tree(root) == before


def test_failed_first_run_keeps_what_was_in_a_library_folder_the_user_made(root, tmp_path, tiny_folder,
                                                                          fails_before_any_model_is_recorded):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "readme.txt").write_text("my notes")
    before = tree(mine)
    failed_index(root, "--weights", tiny_folder, "--library", mine)
    assert tree(mine) == before


def test_a_failed_run_on_an_existing_library_keeps_it(root, tiny_folder, monkeypatch):
    result = invoke("index", root, "--weights", tiny_folder, "--workers", 0)
    assert result.exit_code == 0, result.output

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline, "run_index", full_disk)
    failed_index(root, "--weights", tiny_folder)
    with Library.open(root) as library:
        assert library.manifest() is not None and len(library.catalog.embedded_ids()) == 2


def test_library_opened_with_create_and_left_by_an_error_is_removed(root):
    """The Python API: a `with Library.open(..., create=True)` block that fails before a model is
    recorded removes the new library; one that succeeds keeps it (the next run records the model)."""
    before = tree(root)
    with pytest.raises(RuntimeError), Library.open(root, write=True, create=True):
        raise RuntimeError("failed before the first batch")
    assert tree(root) == before
    with Library.open(root, write=True, create=True):
        pass
    assert (root / ".dinoseek" / "catalog.sqlite").is_file()
