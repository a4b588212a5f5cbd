"""Inputs are validated, nothing silently wrong: --after/--before dates (CLI and Filters), --weights
that is not a checkpoint, and a reader that closes the pipe early (`dinoseek dedup | head`)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from datetime import date, datetime

import pytest
from click.testing import CliRunner
from conftest import synthetic_photo
from safetensors.torch import save_file
from test_retrieval import index_with_cli, make_library_photos

from dinoseek.indexer.errors import InvalidArgumentError
from dinoseek.model import CheckpointError
from dinoseek.model.checkpoint import read_checkpoint
from dinoseek.retrieval.api import Filters, parse_capture_time
from dinoseek.retrieval.cli import main

DATE_FORMS = "use YYYY-MM-DD, YYYY/MM/DD or YYYY-MM-DDTHH:MM[:SS]"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_folder):
    """make_library_photos indexed: photos captured 2020..2023, the 2023 ones a/p3.jpg (05-04) and b/p7.jpg (05-08)."""
    root = tmp_path_factory.mktemp("dates") / "photos"
    make_library_photos(root)
    index_with_cli(root, tiny_folder)
    return root


# --- dates -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("2023-01-01", "2023-01-01 00:00:00"),
    ("2023/01/01", "2023-01-01 00:00:00"),
    ("2023-01-01T10:00", "2023-01-01 10:00:00"),
    ("2023-01-01 10:00", "2023-01-01 10:00:00"),
    ("2023-01-01T10:00:30", "2023-01-01 10:00:30"),
    ("2023-01-01 10:00:30", "2023-01-01 10:00:30"),
    (" 2024-02-29 ", "2024-02-29 00:00:00"),
    (date(2023, 6, 30), "2023-06-30 00:00:00"),
    (datetime(2023, 6, 30, 18, 5, 1), "2023-06-30 18:05:01"),
])
def test_accepted_dates(text, expected):
    assert parse_capture_time(text) == expected


@pytest.mark.parametrize("text", [
    "01-06-2023", "yesterday", "2023-13-45", "2023-02-30", "2023-1-1", "20230101", "2023-01-01T25:00",
    "2023-01-01T10", "2023-01-01T10:00+02:00", "2023/01/01 10:00", "", "2023-W01",
])
def test_rejected_dates(text):
    with pytest.raises(InvalidArgumentError) as info:
        parse_capture_time(text)
    assert str(info.value) == f"{text!r} is not a date: {DATE_FORMS}"


def test_filters_validate_and_normalise():
    f = Filters(captured_after="2023/01/01", captured_before="2023-06-30T18:00")
    assert (f.captured_after, f.captured_before) == ("2023-01-01 00:00:00", "2023-06-30 18:00:00")
    assert Filters() == Filters(captured_after=None) and not Filters().active()
    with pytest.raises(InvalidArgumentError, match="'yesterday' is not a date"):
        Filters(captured_before="yesterday")
    with pytest.raises(ValueError, match="expected a date string like 2023-06-30, got int"):
        Filters(captured_after=20230101)


@pytest.mark.parametrize("text", ["01-06-2023", "yesterday", "2023-13-45", "2023-02-30"])
@pytest.mark.parametrize("option", ["--after", "--before"])
def test_cli_rejects_dates(tmp_path, option, text):
    """A usage error (exit 2) before anything is opened: the folder does not even need a library."""
    photo = tmp_path / "q.jpg"
    synthetic_photo(32, 32).save(photo)
    result = invoke("search", photo, "--root", tmp_path, option, text)
    assert result.exit_code == 2
    assert result.output.splitlines()[-1] == f"Error: Invalid value for '{option}': {text!r} is not a date: {DATE_FORMS}"


def _dated(root, *args):
    result = invoke("similar", "a/p0.jpg", "--root", root, "-k", 20, "--json", *args)
    assert result.exit_code == 0, result.output
    return {h["path"] for h in json.loads(result.output)} - {"a/p0.jpg"}


def test_cli_date_forms_filter(root):
    assert _dated(root, "--after", "2023/01/01") == {"a/p3.jpg", "b/p7.jpg"}
    assert _dated(root, "--after", "2023-01-01") == {"a/p3.jpg", "b/p7.jpg"}
    assert _dated(root, "--after", "2023-05-04T10:00:01") == {"b/p7.jpg"}
    assert _dated(root, "--after", "2023-05-04 10:00") == {"a/p3.jpg", "b/p7.jpg"}
    assert _dated(root, "--after", "2023-05-04T10:00:00", "--before", "2023-05-08T10:00") == {"a/p3.jpg"}


def test_api_date_forms_filter(root):
    from dinoseek.retrieval.api import open_library

    with open_library(root) as lib:
        hits = lib.similar("a/p0.jpg", k=20, captured_after="2023/01/01")
        assert {h.path for h in hits} == {"a/p3.jpg", "b/p7.jpg"}
        with pytest.raises(InvalidArgumentError, match="'01-06-2023' is not a date"):
            lib.similar("a/p0.jpg", captured_after="01-06-2023")


# --- weights that are not a checkpoint ---------------------------------------------------------

def _not_checkpoints(tmp_path):
    synthetic_photo(32, 32).save(tmp_path / "photo.jpg")
    (tmp_path / "notes.txt").write_text("hello\nworld\n")
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "random.pth").write_bytes(os.urandom(4096))
    (tmp_path / "pickle-like.pth").write_bytes(b"\x80" + os.urandom(4096))
    (tmp_path / "zip-like.pth").write_bytes(b"PK\x03\x04" + bytes(4096))
    (tmp_path / "truncated.pth").write_bytes(pickle.dumps({"a": 1}, protocol=2)[:-3])
    (tmp_path / "random.safetensors").write_bytes(os.urandom(4096))
    (tmp_path / "text.safetensors").write_text("not safetensors at all")
    return sorted(p for p in tmp_path.iterdir() if p.is_file())


def test_not_a_checkpoint_is_one_line(tmp_path):
    files = _not_checkpoints(tmp_path)
    assert len(files) == 9
    for path in files:
        with pytest.raises(CheckpointError) as info:
            read_checkpoint(path)
        message = str(info.value)
        assert message.startswith(f"{path} is not a DINOv2 checkpoint: "), message
        assert "\n" not in message and len(message) < 250 and "weights_only" not in message, message


def test_not_a_checkpoint_messages(tmp_path):
    _not_checkpoints(tmp_path)
    cases = {
        "photo.jpg": "neither a PyTorch file (zip or pickle) nor .safetensors (starts with b'\\xff\\xd8\\xff\\xe0')",
        "notes.txt": "neither a PyTorch file (zip or pickle) nor .safetensors (starts with b'hell')",
        "empty.pth": "the file is empty",
    }
    for name, reason in cases.items():
        with pytest.raises(CheckpointError) as info:
            read_checkpoint(tmp_path / name)
        assert str(info.value) == f"{tmp_path / name} is not a DINOv2 checkpoint: {reason}"
    with pytest.raises(CheckpointError, match=r"zip-like\.pth is not a DINOv2 checkpoint: not a readable PyTorch checkpoint \("):
        read_checkpoint(tmp_path / "zip-like.pth")


def test_a_state_dict_of_other_things_is_refused(tmp_path):
    import torch

    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match=r"list\.pth is not a DINOv2 checkpoint: expected a dict of tensors"):
        read_checkpoint(tmp_path / "list.pth")
    save_file({"weight": torch.zeros(2)}, tmp_path / "ok.safetensors")
    assert set(read_checkpoint(tmp_path / "ok.safetensors").tensors) == {"weight"}


def test_cli_weights_photo(root):
    """The library exists, so it is the weights that fail: exit 1 and exactly one Error line."""
    result = invoke("search", root / "a/p0.jpg", "--root", root, "--weights", root / "a/p1.jpg")
    assert result.exit_code == 1
    assert result.output == (f"Error: {root / 'a/p1.jpg'} is not a DINOv2 checkpoint: neither a PyTorch file "
                             f"(zip or pickle) nor .safetensors (starts with b'\\xff\\xd8\\xff\\xe0')\n")


# --- a reader that stops early -----------------------------------------------------------------

def _dinoseek(*args):
    return [sys.executable, "-m", "dinoseek.retrieval.cli", *map(str, args)]


@pytest.mark.parametrize("args", [("dedup", "{root}", "--threshold", "0.5"),
                                  ("similar", "a/p0.jpg", "--root", "{root}", "-k", "20"),
                                  ("info", "{root}")])
def test_closed_pipe_exits_quietly(root, args):
    """The reader is gone before the first write (the worst case of `| head`): exit 0, no message."""
    args = [str(a).format(root=root) for a in args]
    read, write = os.pipe()
    os.close(read)
    try:
        out = subprocess.run(_dinoseek(*args), stdout=write, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write)
    assert (out.returncode, out.stderr) == (0, "")


@pytest.mark.parametrize("command", ["dedup {root} --threshold 0.5", "similar a/p0.jpg --root {root} -k 20"])
def test_head_exits_quietly(root, command):
    """As a user types it: `dinoseek dedup ROOT | head -1`."""
    line = f"{sys.executable} -m retrieval.cli {command.format(root=root)}"
    out = subprocess.run(["bash", "-c", f'{line} | head -1; exit "${{PIPESTATUS[0]}}"'], capture_output=True,
                         text=True, timeout=300)
    assert (out.returncode, out.stderr, len(out.stdout.splitlines())) == (0, "", 1)
