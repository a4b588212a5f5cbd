"""CLI defaults: --device auto, and the library found from the current folder upwards."""

from __future__ import annotations

import os

import pytest
import torch
from click.testing import CliRunner

from dinoseek.model.precision import resolve_device, resolve_precision
from dinoseek.retrieval.cli import main


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# ---- --device auto -------------------------------------------------------------------------------
def test_device_defaults_to_auto_in_help():
    result = invoke("index", "--help")
    assert result.exit_code == 0 and "--device TEXT" in result.output
    assert "auto (CUDA, else Apple MPS, else cpu)" in result.output and "[default: auto]" in result.output


def test_auto_device_is_cpu_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_precision("auto", resolve_device("auto")) in ("bf16", "fp32")


def test_auto_device_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    device = resolve_device("auto")
    assert device == torch.device("cuda") and resolve_precision("auto", device) == "fp16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    device = resolve_device("auto")
    assert device == torch.device("mps") and resolve_precision("auto", device) == "fp32"


def test_mps_requested_without_mps(monkeypatch):
    from dinoseek.model.errors import DeviceUnavailableError

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(DeviceUnavailableError, match="Apple MPS is not available"):
        resolve_device("mps")


def test_embed_runs_with_the_default_device(tmp_path, tiny_folder, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    image = tmp_path / "p.png"
    Image.new("RGB", (64, 48), (200, 10, 10)).save(image)
    result = invoke("embed", "--weights", tiny_folder, image)
    assert result.exit_code == 0, result.output


# ---- the library found from the current folder upwards ------------------------------------------
@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_folder):
    """A library indexed with `index` and no ROOT, run from the photo folder."""
    from test_retrieval import make_library_photos

    root = tmp_path_factory.mktemp("lib") / "photos"
    make_library_photos(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        result = invoke("index", "--weights", tiny_folder, "--precision", "fp32", "--workers", 0)
    assert result.exit_code == 0, result.output
    assert (root / ".dinoseek" / "catalog.sqlite").is_file()
    return root


def test_find_library_root(indexed, tmp_path):
    from dinoseek.indexer.library import find_library_root

    assert find_library_root(indexed / "a") == indexed.resolve()
    assert find_library_root(indexed) == indexed.resolve()
    assert find_library_root(tmp_path) is None


def test_library_found_from_a_subfolder(indexed, monkeypatch):
    from test_retrieval import THRESHOLD

    nested = indexed / "a" / "deeper"
    nested.mkdir(exist_ok=True)
    monkeypatch.chdir(nested)
    result = invoke("info")
    assert result.exit_code == 0, result.output
    assert f"for {indexed.resolve()}: 11 files" in result.output
    result = invoke("similar", indexed / "a/p1.jpg", "-k", 2, "--folder", "b")
    assert result.exit_code == 0 and result.output.splitlines()[0].endswith("b/p1-small.jpg"), result.output
    result = invoke("dedup", "--threshold", THRESHOLD)
    assert result.exit_code == 0 and "3 groups" in result.output, result.output


def test_index_without_root_in_a_subfolder_updates_the_enclosing_library(indexed, monkeypatch):
    """No nested library, no model download: the library above remembers its weights."""
    monkeypatch.chdir(indexed / "a")
    result = invoke("index", "--workers", 0)
    assert result.exit_code == 0 and "0 embedded" in result.output, result.output
    assert not (indexed / "a" / ".dinoseek").exists()


def test_hints_name_the_found_root(indexed, monkeypatch):
    monkeypatch.chdir(indexed / "b")
    result = invoke("dedup", "--threshold", 0.98, "--action", "move", "--apply")
    assert result.exit_code == 0, result.output
    assert f"`dinoseek undo {indexed.resolve()}`" in result.output
    result = invoke("undo")
    assert result.exit_code == 0, result.output


def test_no_library_above_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for args in (["info"], ["dedup"], ["verify"], ["undo"], ["similar", "x.jpg"]):
        result = invoke(*args)
        name = "--root" if args[0] == "similar" else "ROOT"
        assert result.exit_code == 1 and result.output == (
            f"Error: no library in {tmp_path.resolve()} or any folder above it; "
            f"pass {name} or run `dinoseek index`\n"), result.output


def test_explicit_root_is_used_as_given(indexed, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("info", indexed)
    assert result.exit_code == 0 and "11 files" in result.output
    result = invoke("info", "--library", indexed / ".dinoseek")
    assert result.exit_code == 0 and "11 files" in result.output, result.output


# ---- paths typed relative to the current folder -------------------------------------------------
def test_paths_relative_to_the_current_folder(indexed, monkeypatch):
    """`similar photos/a/p1.jpg --root photos` and `--protect ./photos/b` from the folder above the
    photos read the paths from where the user is, as tab completion wrote them."""
    from test_retrieval import THRESHOLD

    monkeypatch.chdir(indexed.parent)
    result = invoke("similar", "photos/a/p1.jpg", "--root", "photos", "-k", 1, "--folder", "b")
    assert result.exit_code == 0 and result.output.splitlines()[0].endswith("b/p1-small.jpg"), result.output
    protected = invoke("dedup", "photos", "--threshold", THRESHOLD, "--protect", "./photos/b", "--json")
    assert protected.exit_code == 0, protected.output
    import json

    kept = {m["path"] for g in json.loads(protected.output)["groups"] for m in g["members"] if m["keep"]}
    assert kept and all(path.startswith("b/") for path in kept)
    monkeypatch.chdir(indexed / "b")  # inside the root, root-relative names still work
    assert invoke("similar", "a/p1.jpg", "-k", 1).exit_code == 0
    everything = invoke("dedup", "--threshold", THRESHOLD, "--in-folder", ".")
    assert everything.exit_code == 0 and "3 groups" in everything.output, everything.output


def test_search_folder_filter_takes_paths_as_in_folder_does_and_refuses_a_missing_one(indexed, monkeypatch):
    monkeypatch.chdir(indexed.parent)
    for folder in ("photos/b", str(indexed / "b"), "b"):  # from here, absolute, from ROOT
        result = invoke("similar", "photos/a/p1.jpg", "--root", "photos", "-k", 1, "--folder", folder)
        assert result.exit_code == 0 and result.output.splitlines()[0].endswith("b/p1-small.jpg"), (folder, result.output)
    result = invoke("similar", "photos/a/p1.jpg", "--root", "photos", "--folder", "trips")
    assert result.exit_code == 1 and "Error: --folder trips: no such folder under" in result.output, result.output
    result = invoke("similar", "photos/a/p1.jpg", "--root", "photos", "--after", "2099-01-01")
    assert result.exit_code == 0 and result.stdout == "" and result.stderr == "no matching photos\n"


# ---- -v after the subcommand ---------------------------------------------------------------------
@pytest.mark.parametrize("command", ["index", "search", "dedup", "undo", "info", "verify", "embed"])
def test_verbose_is_accepted_after_every_subcommand(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0 and "-v, --verbose" in result.output


def test_verbose_after_the_subcommand_turns_on_progress_logging(tmp_path, monkeypatch):
    import logging

    ours = logging.getLogger("dinoseek")
    monkeypatch.setattr(ours, "level", logging.NOTSET)
    invoke("info", tmp_path, "-v")  # no library here: the error does not matter, the flag does
    assert ours.level == logging.INFO and logging.getLogger("alembic").getEffectiveLevel() > logging.INFO


# ---- ~ in Python paths ---------------------------------------------------------------------------
def test_python_api_expands_the_home_folder(tmp_path, monkeypatch, tiny_folder):
    from test_retrieval import index_with_cli, make_library_photos

    from dinoseek.indexer.library import Library
    from dinoseek.retrieval import open_library

    monkeypatch.setenv("HOME", str(tmp_path))
    make_library_photos(tmp_path / "Pictures")
    index_with_cli(tmp_path / "Pictures", tiny_folder)
    with Library.open("~/Pictures") as library:
        assert library.root == (tmp_path / "Pictures").resolve()
    with open_library("~/Pictures", weights="~/" + os.path.relpath(tiny_folder, tmp_path)) as lib:
        assert lib.search(tmp_path / "Pictures" / "a" / "p3.jpg", k=1)[0].path == "a/p3.jpg"
