"""Every command with `--url`: a catalog in PostgreSQL (and the library's own SQLite file, the same
commands without it), checked against the catalog's rows and the files on disk."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner
from conftest import url_args
from sqlalchemy import create_engine, text
from test_retrieval import THRESHOLD, make_library_photos, tree_hashes

from dinoseek.indexer.identity import folder_library_id
from dinoseek.retrieval.cli import main

COMMANDS = ("index", "info", "verify", "search", "similar", "dedup", "mark-distinct", "undo", "purge", "calibrate")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(*args) -> str:
    result = invoke(*args)
    assert result.exit_code == 0, (args, result.output)
    return result.output


def statuses(root, url) -> dict[str, str]:
    """path -> status, read straight from the catalog database (not through dinoseek)."""
    engine = create_engine(url or f"sqlite:///{root / '.dinoseek/catalog.sqlite'}")
    try:
        with engine.connect() as connection:
            return {bytes(path).decode(): status
                    for path, status in connection.execute(text("SELECT path, status FROM images"))}
    finally:
        engine.dispose()


def test_every_command_on_the_catalog_under_test(tmp_path, tiny_folder, catalog_url):
    root = tmp_path / "photos"
    make_library_photos(root)
    before = tree_hashes(root)
    url = url_args(catalog_url)
    model = ("--weights", tiny_folder, "--precision", "fp32")
    used = set()

    def run(command, *args):
        used.add(command)
        return ok(command, *args)

    assert "11 embedded, 0 moved, 0 failed" in run("index", root, *url, *model, "--workers", 0)
    assert statuses(root, catalog_url) == {p: "embedded" for p in before}
    folder = sorted(os.listdir(root / ".dinoseek"))
    assert ("catalog.sqlite" in folder) == (catalog_url is None)  # with --url, no SQLite file is made
    assert {"library-id", "lock"} <= set(folder) and any(name.endswith(".faiss") for name in folder)

    info = json.loads(run("info", root, *url, "--json"))
    assert info["counts"] == {"embedded": 11} and info["library_id"] == folder_library_id(root / ".dinoseek")
    assert "ok: catalog and indexes agree" in run("verify", root, *url)

    hits = json.loads(run("search", root / "a/p2.jpg", "--root", root, *url, *model, "--json", "-k", 2))
    assert {h["path"] for h in hits} == {"a/p2.jpg", "b/p2-reencoded.jpg"}
    hits = json.loads(run("similar", "a/p0.jpg", "--root", root, *url, "--json", "-k", 1))
    assert hits[0]["path"] == "b/p0-copy.jpg" and hits[0]["score"] > 0.999

    plan = json.loads(run("dedup", root, *url, "--threshold", THRESHOLD, "--json"))
    assert plan["files_to_act_on"] == 3 and tree_hashes(root) == before  # a plan changes nothing
    assert "1 pairs marked not duplicates (1 new" in run("mark-distinct", "a/p1.jpg", "b/p1-small.jpg", "--root", root,
                                                         *url)
    plan = json.loads(run("dedup", root, *url, "--threshold", THRESHOLD, "--json"))
    assert plan["files_to_act_on"] == 2  # the marked pair is no longer grouped

    out = run("dedup", root, *url, "--threshold", THRESHOLD, "--protect", "a", "--action", "move", "--apply")
    assert "2 files moved" in out
    moved = {"b/p0-copy.jpg", "b/p2-reencoded.jpg"}
    assert {p for p, s in statuses(root, catalog_url).items() if s == "quarantined"} == moved
    assert not any((root / p).exists() for p in moved)
    assert "ok" in run("verify", root, *url)
    assert "restored 2 files" in run("undo", root, *url)
    assert tree_hashes(root) == before and set(statuses(root, catalog_url).values()) == {"embedded"}

    run("dedup", root, *url, "--threshold", THRESHOLD, "--protect", "a", "--action", "move", "--apply")
    dry = run("purge", root, *url, "--older-than", 0)
    assert "2 files" in dry and len(statuses(root, catalog_url)) == 11  # a dry run deletes nothing
    run("purge", root, *url, "--older-than", 0, "--apply")
    assert set(statuses(root, catalog_url)) == set(before) - moved  # their rows left the catalog
    assert not list((root / ".dinoseek/quarantine").rglob("*.jpg"))
    assert "ok" in run("verify", root, *url)

    table = json.loads(run("calibrate", root, *url, *model, "--sample", 3, "--json"))
    assert table["photos"] == 3 and table["rows"]
    assert used == set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_names_a_missing_library_folder_with_a_url(tmp_path, postgres_url, tiny_folder, command):
    """`--url` of an empty database, a photo folder without a library: one line, no traceback."""
    root = tmp_path / "photos"
    make_library_photos(root)
    args = {"index": (root, "--weights", tiny_folder, "--precision", "fp32", "--workers", 0),
            "search": (root / "a/p0.jpg", "--root", root, "--weights", tiny_folder),
            "similar": ("a/p0.jpg", "--root", root), "mark-distinct": ("a/p0.jpg", "a/p1.jpg", "--root", root),
            "calibrate": (root, "--weights", tiny_folder)}.get(command, (root,))
    result = invoke(command, *args, "--url", postgres_url)
    if command == "index":  # the one command that makes a library: it does, in the database
        assert result.exit_code == 0 and "11 embedded" in result.output, result.output
        assert len(statuses(root, postgres_url)) == 11
    else:
        assert result.exit_code == 1 and len(result.output.splitlines()) == 1, result.output
        assert result.output.startswith("Error: no library at") and "Traceback" not in result.output


def test_serve_with_a_url_answers_from_the_postgresql_catalog(tmp_path, tiny_folder, postgres_url):
    """`dinoseek serve --url`, as a user starts it: the page's API reads the PostgreSQL catalog (and
    the FAISS files in the library folder), and Ctrl-C stops it."""
    import re
    import signal
    import subprocess
    import sys

    import httpx
    from dinoseek.retrieval.api import open_library

    root = tmp_path / "photos"
    make_library_photos(root)
    model = ("--weights", tiny_folder, "--precision", "fp32")
    ok("index", root, "--url", postgres_url, *model, "--workers", 0)
    command = [sys.executable, "-m", "dinoseek.retrieval.cli", "serve", str(root), "--url", postgres_url, "--port", "0"]
    server = subprocess.Popen([*command, *map(str, model)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", "DINOSEEK_PROGRESS": "off"})
    try:
        first = server.stdout.readline()
        found = re.search(r"http://127\.0\.0\.1:\d+", first)
        assert found, first + server.stdout.read()
        base = found.group(0)
        info = httpx.get(f"{base}/api/info", timeout=30).json()
        assert info["total"] == 11 and info["counts"]["embedded"] == 11
        with open_library(root, url=postgres_url) as lib:
            row = lib.search(lib.row_vector(1, "cls")[1], k=3)
        hits = httpx.get(f"{base}/api/search", params={"id": 1, "k": 3}, timeout=30).json()["hits"]
        assert [(h["id"], h["path"]) for h in hits] == [(h.id, h.path) for h in row] and len(hits) == 3
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0 and "stopped" in server.stdout.read()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
