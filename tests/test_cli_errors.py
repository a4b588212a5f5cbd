"""Library code raises typed errors in neutral words; the CLI turns only those into one line, adding the flags."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import synthetic_photo

from dinoseek.indexer.errors import (ModelMismatchError, NeedsRepairError, NeedsUpgradeError, NotIndexedError,
                                      SweepRefusedError)
from dinoseek.model import DeviceUnavailableError, PrecisionUnsupportedError, WeightsNotFoundError
from dinoseek.retrieval.cli import _message, main
from dinoseek.retrieval.errors import ActionError

REPO = Path(__file__).resolve().parents[1]
# A flag (`--weights`) or a command line (`dinoseek index ...`); "dinoseek catalog" is just the product's name.
CLI_WORDS = re.compile(r"(?<![\w-])--[a-z]|`dinoseek ")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def indexed(tmp_path, tiny_folder):
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    for i in range(2):
        synthetic_photo(120, 90, seed=i).save(root / f"p{i}.jpg")
    result = invoke("index", root, "--weights", tiny_folder, "--precision", "fp32", "--workers", 0)
    assert result.exit_code == 0, result.output
    return root


@pytest.mark.parametrize(("error", "line"), [
    (DeviceUnavailableError("device 'cuda' requested but CUDA is not available"),
     "device 'cuda' requested but CUDA is not available; use --device cpu"),
    (PrecisionUnsupportedError("bf16 needs an Ampere or newer GPU"), "bf16 needs an Ampere or newer GPU; use --precision fp16"),
    (WeightsNotFoundError("facebook/dinov2-small is not in the Hugging Face cache and HF_HUB_OFFLINE is set"),
     "facebook/dinov2-small is not in the Hugging Face cache and HF_HUB_OFFLINE is set; pass a local copy with "
     "--weights PATH (a Hugging Face folder, .safetensors or .pth file)"),
    (ModelMismatchError("this library was built with another model (/w/dinov2-small); weights_sha256 differ"),
     "this library was built with another model (/w/dinov2-small); weights_sha256 differ; use the same --model/--weights, or a new "
     "--library"),
    (NotIndexedError("no library at /p/.dinoseek", Path("/p")), "no library at /p/.dinoseek; run `dinoseek index /p` first"),
    (NeedsRepairError("an embedded image has no usable vectors in the catalog", Path("/p")),
     "an embedded image has no usable vectors in the catalog; run `dinoseek verify /p --repair`"),
    (NeedsUpgradeError("the catalog in /p/.dinoseek needs an upgrade", Path("/p")),
     "the catalog in /p/.dinoseek needs an upgrade; run `dinoseek index /p` (or `dinoseek verify /p --repair`) "
     "once to upgrade it"),
    (NeedsRepairError("an embedded image has no usable vectors in the catalog"),
     "an embedded image has no usable vectors in the catalog; run `dinoseek verify . --repair`"),
    (SweepRefusedError("/p is empty but the library knows 3 files; is the disk mounted? Nothing was changed"),
     "/p is empty but the library knows 3 files; is the disk mounted? Nothing was changed; pass --allow-mass-delete "
     "if they really were removed"),
    (ActionError("stopped at b.jpg (Operation not supported); 1 files were set aside, journal j.jsonl records them"),
     "stopped at b.jpg (Operation not supported); 1 files were set aside, journal j.jsonl records them; "
     "`dinoseek undo .` restores them"),
])
def test_the_cli_adds_the_flags_that_fix_an_error(error, line):
    assert _message(error) == line


def test_a_plain_value_error_is_a_bug_with_a_traceback(indexed, monkeypatch):
    from dinoseek.indexer import library

    def broken(self):
        raise ValueError("operands could not be broadcast together")  # what numpy raises on a real bug

    monkeypatch.setattr(library.Library, "info", broken)
    result = invoke("info", indexed)
    assert isinstance(result.exception, ValueError)  # not swallowed into "Error: ..."
    assert "Error: operands" not in result.output


def test_sweep_refusal_names_the_flag(indexed, tiny_folder):
    for photo in indexed.glob("*.jpg"):
        photo.unlink()
    result = invoke("index", indexed, "--weights", tiny_folder, "--precision", "fp32", "--workers", 0)
    assert result.exit_code == 1 and len(result.output.splitlines()) == 1
    assert result.output.startswith(f"Error: {indexed} is empty but the library knows 2 files")
    assert result.output.rstrip().endswith("; pass --allow-mass-delete if they really were removed")


def test_argument_errors_name_the_option_typed(indexed, tmp_path):
    result = invoke("dedup", indexed, "--exact", "--protect", "nope")
    assert result.exit_code == 1
    assert result.output == f"Error: --protect nope: no such folder under {indexed}\n"
    result = invoke("dedup", indexed, "--exact", "--in-folder", tmp_path)
    assert result.output == f"Error: --in-folder {tmp_path}: not inside {indexed}\n"
    result = invoke("dedup", indexed, "--exact", "--action", "move", "--apply", "--quarantine", indexed / "sub")
    assert result.exit_code == 1
    assert result.output.splitlines()[-1].startswith(f"Error: --quarantine {indexed / 'sub'} is inside the photo folder")


def _raised_strings(path: Path):
    """Every string constant inside a `raise` statement of a module (f-string parts included)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) and node.exc is not None:
            for part in ast.walk(node.exc):
                if isinstance(part, ast.Constant) and isinstance(part.value, str):
                    yield node.lineno, part.value


def test_library_messages_name_no_cli_flags():
    """Flags are the CLI's to name: Python callers pass `weights=`, not `--weights`."""
    offenders = []
    for package in ("model", "indexer", "retrieval"):
        for path in sorted((REPO / package).rglob("*.py")):
            if path.name == "cli.py":
                continue
            for line, text in _raised_strings(path):
                if CLI_WORDS.search(text):
                    offenders.append(f"{path.relative_to(REPO)}:{line}: {text!r}")
    assert offenders == []
