"""dedup --exit-code, byte copies at any threshold, scores within [-1, 1], hints that name ROOT."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_retrieval import THRESHOLD, index_with_cli, make_library_photos, tree_hashes

from dinoseek.indexer.errors import NeedsRepairError
from dinoseek.indexer.library import Library
from dinoseek.retrieval.cli import _hint, main
from dinoseek.retrieval.dedup import find_duplicates
from dinoseek.retrieval.errors import ActionError


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def build(root: Path, weights: Path) -> Path:
    make_library_photos(root)
    for name in ("p3-copy.jpg", "p3-copy2.jpg"):  # a byte copy three times over, in another folder
        shutil.copyfile(root / "a" / "p3.jpg", root / "b" / name)
    index_with_cli(root, weights)
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_folder):
    """A library whose root has a space in its name (hints must quote it)."""
    return build(tmp_path_factory.mktemp("polish") / "my photos", tiny_folder)


def test_exit_code_when_duplicates_found(root):
    result = invoke("dedup", root, "--threshold", THRESHOLD, "--exit-code")
    assert result.exit_code == 1, result.output
    assert "4 groups" in result.output and "Error" not in result.output
    result = invoke("dedup", root, "--threshold", THRESHOLD, "--exit-code", "--json")
    assert result.exit_code == 1 and len(json.loads(result.output)["groups"]) == 4
    assert invoke("dedup", root, "--threshold", THRESHOLD).exit_code == 0  # without the flag: 0 as before


def test_exit_code_zero_when_none_and_errors_keep_theirs(root):
    # every copy protected: nothing to act on, so no groups
    result = invoke("dedup", root, "--protect", "a", "--protect", "b", "--exact", "--exit-code", "--json")
    assert result.exit_code == 0 and json.loads(result.output)["groups"] == []
    assert invoke("dedup", root, "--threshold", 2, "--exit-code").exit_code == 2  # click usage error
    result = invoke("dedup", root / "nowhere", "--exit-code")
    assert result.exit_code == 1 and result.output.startswith("Error: ")
    assert "--exit-code" in invoke("dedup", "--help").output


def test_byte_copies_group_at_threshold_one(root):
    """All byte copies group at --threshold 1, whatever their float16 vectors score (e.g. 0.9999)."""
    with Library.open(root) as library:
        hashes = library.catalog.exact_hash_groups()
        groups = find_duplicates(library, threshold=1.0)
        exact = sorted(sorted(m.id for m in g.members) for g in groups if g.kind == "exact")
        assert len(hashes) == 2 and exact == sorted(sorted(ids) for ids in hashes)
        assert all(g.min_similarity == 1.0 for g in groups)
        near = find_duplicates(library, threshold=0.9999)
        assert {frozenset(ids) for ids in hashes} <= {frozenset(m.id for m in g.members) for g in near}
    result = invoke("dedup", root, "--threshold", 1, "--json")
    members = [{m["path"] for m in g["members"]} for g in json.loads(result.output)["groups"]]
    assert {"a/p3.jpg", "b/p3-copy.jpg", "b/p3-copy2.jpg"} in members and {"a/p0.jpg", "b/p0-copy.jpg"} in members


def test_scores_never_exceed_one(root, tiny_folder):
    for p in ("a/p0.jpg", "a/p3.jpg"):
        hits = json.loads(invoke("similar", root / p, "--root", root, "-k", 5, "--json").output)
        assert hits and all(-1 <= h["score"] <= 1 for h in hits)
    hits = json.loads(invoke("search", root / "a/p3.jpg", "--root", root, "--weights", tiny_folder,
                             "--precision", "fp32", "-k", 5, "--json").output)
    assert hits[0]["score"] <= 1 and hits[0]["score"] > 0.999
    groups = json.loads(invoke("dedup", root, "--threshold", THRESHOLD, "--json").output)["groups"]
    assert all(-1 <= g["min_similarity"] <= 1 for g in groups)


def test_hints_name_the_quoted_root(tmp_path, tiny_folder):
    root = build(tmp_path / "my photos", tiny_folder)
    before = tree_hashes(root)
    result = invoke("dedup", root, "--threshold", THRESHOLD, "--action", "move", "--apply", "--exit-code")
    assert result.exit_code == 1, result.output  # found (and set aside) duplicates
    assert f"(undo: `dinoseek undo '{root}'`)" in result.output
    assert tree_hashes(root) != before
    assert invoke("undo", root).exit_code == 0 and tree_hashes(root) == before

    empty = tmp_path / "not indexed"
    empty.mkdir()
    result = invoke("dedup", empty)
    assert result.exit_code == 1 and f"run `dinoseek index '{empty}'` first" in result.output
    assert _hint(NeedsRepairError("old catalog"), Path("my photos")) == "run `dinoseek verify 'my photos' --repair`"
    assert _hint(NeedsRepairError("old catalog", Path("/p")), None) == "run `dinoseek verify /p --repair`"
    assert _hint(ActionError("stopped"), Path("my photos")) == "`dinoseek undo 'my photos'` restores them"


def test_every_protected_copy_of_a_group_is_listed(tmp_path, tiny_folder):
    root = tmp_path / "photos"
    make_library_photos(root)
    (root / "c").mkdir()
    shutil.copyfile(root / "a" / "p3.jpg", root / "b" / "p3-copy.jpg")
    shutil.copyfile(root / "a" / "p3.jpg", root / "c" / "p3-third.jpg")
    index_with_cli(root, tiny_folder)
    lines = invoke("dedup", root, "--exact", "--protect", "a", "--protect", "b").output.splitlines()
    group = next(i for i, line in enumerate(lines) if "p3" in line)
    assert lines[group].startswith("group ") and "keep a/p3.jpg" in lines[group]
    assert lines[group + 1] == "    also kept: b/p3-copy.jpg — in a protected folder"
    assert lines[group + 2].startswith("    duplicate: c/p3-third.jpg — similarity 1.000")
