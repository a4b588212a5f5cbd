"""Output built from file names cannot be turned into an attack: CSV cells are not formulas, and
terminal lines cannot be forged or carry control sequences."""

from __future__ import annotations

import csv
import io
import json
import os
from datetime import datetime

import pytest
from click.testing import CliRunner
from conftest import synthetic_photo

from dinoseek.retrieval.cli import _shown, main
from dinoseek.retrieval.dedup import Group
from dinoseek.retrieval.keep import Member
from dinoseek.retrieval.report import to_csv

# File names an attacker can leave in a photo folder (anything but "/" and NUL is allowed).
FORGED_LINE = "x.jpg\nkeep c.jpg — forged.jpg"  # would print a plan line of its own
CLEAR_SCREEN = "\x1b[2J\x1b[Hclear.jpg"
TITLE = "\x1b]0;owned\x07title.jpg"
BIDI = "gpj.\u202eexe.jpg"  # shown right-to-left: "jpg.exe"
CRAFTED = [FORGED_LINE, CLEAR_SCREEN, TITLE, BIDI]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_safe(text: str) -> None:
    """No character a terminal would act on, other than the newlines between lines (and the tabs
    `embed` puts between columns)."""
    for ch in text:
        assert ch in "\n\t" or _shown(ch) == ch, f"unescaped {ch!r} in {text!r}"


# ---- the helper -----------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, shown", [
    ("a\nb", "a\\x0ab"),
    ("a\rb\tc", "a\\x0db\\x09c"),
    ("\x1b[2J", "\\x1b[2J"),
    ("\x00\x7f\x85\x9b", "\\x00\\x7f\\x85\\x9b"),
    ("a\u2028b\u2029c", "a\\u2028b\\u2029c"),
    ("\u202eexe\u202c \u2066x\u2069 \u200f\u061c", "\\u202eexe\\u202c \\u2066x\\u2069 \\u200f\\u061c"),
    ("bad\udcff.jpg", "bad\\udcff.jpg"),  # surrogate escape of an undecodable byte
    ("été/日本/photo 1.jpg", "été/日本/photo 1.jpg"),  # ordinary text is left alone
    ("C:\\photos\\x0a.jpg", "C:\\photos\\x0a.jpg"),  # backslashes too
])
def test_shown(raw, shown):
    assert _shown(raw) == shown


def test_shown_takes_any_object():
    from pathlib import Path

    assert _shown(Path("a\nb")) == "a\\x0ab" and _shown(3) == "3"


# ---- CSV reports ------------------------------------------------------------------------------------
def member(i: int, path: str, fmt: str = "JPEG", captured_at: str | None = None) -> Member:
    return Member(id=i, path=path, raw_path=path.encode(), size=1000 + i, width=640, height=-480 if i else 480,
                  format=fmt, captured_at=captured_at, sha256="ab" * 32, mtime_ns=0)


@pytest.mark.parametrize("prefix", ["=", "+", "-", "@", "\t", "\r"])
def test_csv_cells_are_never_formulas(prefix):
    evil = f"{prefix}HYPERLINK(\"http://x\",\"click\")"
    members = [member(0, "a/keep.jpg"), member(1, evil + ".jpg", fmt=evil, captured_at=evil)]
    group = Group(kind="near", members=members, min_similarity=0.97, keeper=members[0], reason=evil)
    rows = list(csv.reader(io.StringIO(to_csv([group]))))
    header, keep, other = rows
    cells = dict(zip(header, other))
    for column in ("path", "format", "captured_at", "reason"):
        assert cells[column] == "'" + (evil + ".jpg" if column == "path" else evil), column
    assert dict(zip(header, keep))["reason"] == "'" + evil
    # Numbers stay numbers, even a negative one; ordinary text is untouched.
    assert cells["height"] == "-480" and cells["bytes"] == "1001" and cells["keep"] == "0"
    assert dict(zip(header, keep))["path"] == "a/keep.jpg" and cells["min_similarity"] == "0.9700"


def test_csv_empty_capture_date_stays_empty():
    members = [member(0, "a.jpg"), member(1, "b.jpg")]
    group = Group(kind="exact", members=members, min_similarity=1.0, keeper=members[0], reason="oldest")
    header, first, _ = list(csv.reader(io.StringIO(to_csv([group]))))
    assert dict(zip(header, first))["captured_at"] == ""


# ---- the terminal -----------------------------------------------------------------------------------
ORIGINAL_MTIME = 1_600_000_000  # a.jpg; copy i of CRAFTED is i + 1 minutes younger, so a.jpg is kept


def copied_at(name: str) -> int:
    return ORIGINAL_MTIME + 60 * (CRAFTED.index(name) + 1)


def local_time(seconds: int) -> str:
    """How a keep reason shows a modification time: local time, to the second."""
    return datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S")


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_folder):
    root = tmp_path_factory.mktemp("escaping") / "photos"
    root.mkdir()
    original = root / "a.jpg"
    synthetic_photo(160, 120, seed=0).save(original, quality=90)
    os.utime(original, (ORIGINAL_MTIME, ORIGINAL_MTIME))
    for name in CRAFTED:  # exact copies: each is a duplicate of a.jpg
        (root / name).write_bytes(original.read_bytes())
        os.utime(root / name, (copied_at(name), copied_at(name)))
    (root / ("broken\x1b[31m\nkeep me.jpg")).write_bytes(b"<html>not a photo</html>")
    result = invoke("index", root, "--weights", tiny_folder, "--precision", "fp32", "--workers", 0)
    assert result.exit_code == 0, result.output
    return root


def test_dedup_plan_cannot_be_forged(root):
    result = invoke("dedup", root, "--action", "move")
    assert result.exit_code == 0, result.output
    assert_safe(result.output)
    lines = result.output.splitlines()
    # One header, one line per copy, the count and the summary: a name cannot add a line of its own.
    assert len(lines) == 1 + len(CRAFTED) + 2, lines
    assert not any(line.startswith("keep c.jpg") for line in lines)

    def moved(shown: str, name: str) -> str:
        return (f"    move: {shown} — similarity 1.000: identical bytes, modified later "
                f"({local_time(copied_at(name))} vs {local_time(ORIGINAL_MTIME)})")

    size = (root / "a.jpg").stat().st_size * len(CRAFTED)
    kept = f"keep a.jpg — earliest modification time ({local_time(ORIGINAL_MTIME)})"
    assert lines == [
        f"group 1 (exact, min similarity 1.000): {kept}",
        moved("\\x1b[2J\\x1b[Hclear.jpg", CLEAR_SCREEN),  # members in scan order: by the name's bytes
        moved("\\x1b]0;owned\\x07title.jpg", TITLE),
        moved("gpj.\\u202eexe.jpg", BIDI),
        moved("x.jpg\\x0akeep c.jpg — forged.jpg", FORGED_LINE),
        "1 groups, 4 files to act on (dry run: add --apply)",
        (f"4 files ({size / 1000:.1f} kB) would leave the photo folder for {root.resolve()}/.dinoseek/quarantine "
         "(the same filesystem as the photos: no space is freed until `dinoseek purge`)"),
    ]


def test_dedup_json_keeps_names_exact(root):
    data = json.loads(invoke("dedup", root, "--json").output)
    assert {m["path"] for m in data["groups"][0]["members"]} == {"a.jpg", *CRAFTED}


def test_search_hits_are_escaped(root, tiny_folder):
    result = invoke("search", root / CLEAR_SCREEN, "--root", root, "--weights", tiny_folder, "--precision", "fp32")
    assert result.exit_code == 0, result.output
    assert_safe(result.output)
    assert len(result.output.splitlines()) == 1 + len(CRAFTED)
    result = invoke("similar", TITLE, "--root", root)  # every hit but the query itself
    assert result.exit_code == 0 and "1.0000  \\x1b[2J\\x1b[Hclear.jpg" in result.output.splitlines()
    assert_safe(result.output)


def test_info_errors_are_escaped(root):
    result = invoke("info", root)
    assert result.exit_code == 0, result.output
    assert_safe(result.output)
    assert ": broken\\x1b[31m\\x0akeep me.jpg: " in result.output


def test_error_messages_are_escaped(root, tiny_folder):
    result = invoke("similar", "nope\x1b[2J\n.jpg", "--root", root)
    assert result.exit_code == 1
    assert result.output == "Error: nope\\x1b[2J\\x0a.jpg is not an embedded image of this library\n"
    # A file embed cannot read: one escaped line for it, then one for the run, both on stderr.
    result = invoke("embed", "--weights", tiny_folder, root / "broken\x1b[31m\nkeep me.jpg")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == (f"skipped {root}/broken\\x1b[31m\\x0akeep me.jpg: not an image Pillow recognises\n"
                             "Error: nothing embedded: 1 file(s) skipped (see above)\n")
    assert_safe(result.output)
    result = invoke("index", root / "missing\x1b[2J", "--weights", tiny_folder)
    assert result.exit_code == 1 and "\\x1b[2J" in result.output
    assert_safe(result.output)


def test_embed_output_is_escaped(root, tiny_folder, tmp_path):
    result = invoke("embed", "--weights", tiny_folder, "--precision", "fp32", root / FORGED_LINE, root / BIDI)
    assert result.exit_code == 0, result.output
    assert_safe(result.output)
    lines = result.stdout.splitlines()  # one line per image: a name cannot add one
    assert [line.split("\t")[0] for line in lines] == [f"{root}/x.jpg\\x0akeep c.jpg — forged.jpg",
                                                       f"{root}/gpj.\\u202eexe.jpg"]
    assert result.stderr == "2 embedded (dim 128, fp32), 0 skipped\n"
    # JSON Lines: one object per image, the name escaped by JSON and exact once parsed.
    result = invoke("embed", "--weights", tiny_folder, "--precision", "fp32", "--json", root / FORGED_LINE,
                    root / TITLE)
    assert result.exit_code == 0, result.output
    assert_safe(result.output)
    assert [json.loads(line)["path"] for line in result.stdout.splitlines()] == [str(root / FORGED_LINE),
                                                                                str(root / TITLE)]
    out = tmp_path / "v\x1b[2J"
    result = invoke("embed", "--weights", tiny_folder, "--precision", "fp32", "--out", out, root / "a.jpg")
    assert result.exit_code == 0 and result.stdout == ""
    assert result.stderr == f"1 embedded (dim 128, fp32), 0 skipped; written to {tmp_path}/v\\x1b[2J\n"


def test_log_lines_are_escaped():
    import logging

    from dinoseek.retrieval.cli import _LogFormatter

    record = logging.LogRecord("dinoseek.indexer.store", logging.WARNING, __file__, 1, "%s: not read", ("x\x1b[2J\n.faiss",), None)
    line = _LogFormatter("%(levelname)s %(name)s: %(message)s").format(record)
    assert line == "WARNING dinoseek.indexer.store: x\\x1b[2J\\x0a.faiss: not read"
