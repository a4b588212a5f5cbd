"""`dinoseek serve`'s JSON API in process (FastAPI's TestClient), against the Python API and the CLI's functions."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import threading
import time
import zlib

import pytest
from conftest import synthetic_photo
from dinoseek.indexer.catalog import ImageRow
from dinoseek.indexer.library import Library
from dinoseek.retrieval.api import open_library
from dinoseek.retrieval.dedup import find_duplicates
from dinoseek.retrieval.server import create_app, library_access
from dinoseek.retrieval.server import groups as groups_module
from dinoseek.retrieval.server.thumbnails import Thumbnails
from fastapi.testclient import TestClient
from PIL import Image
from test_retrieval import THRESHOLD, index_with_cli, make_library_photos, tree_hashes

BASE = "http://127.0.0.1:8765"


def make_photos(root):
    """make_library_photos, plus a photo stored sideways with EXIF orientation 6 (shown upright: portrait)."""
    make_library_photos(root)
    exif = Image.Exif()
    exif[0x0112] = 6
    synthetic_photo(640, 480, seed=40).save(root / "a" / "sideways.jpg", quality=92, exif=exif)


@pytest.fixture(scope="module")
def shared_root(tmp_path_factory, tiny_folder):
    """One indexed library for the tests that only read."""
    root = tmp_path_factory.mktemp("serve") / "photos"
    make_photos(root)
    index_with_cli(root, tiny_folder)
    return root


@pytest.fixture
def root(tmp_path, tiny_folder):
    """A library of its own, for tests that change it."""
    root = tmp_path / "photos"
    make_photos(root)
    index_with_cli(root, tiny_folder)
    return root


def client_for(root, **kwargs) -> TestClient:
    app = create_app(root, port=8765, **kwargs)
    client = TestClient(app, base_url=BASE)
    client.headers["X-CSRF-Token"] = app.state.csrf_token
    return client


@pytest.fixture(scope="module")
def shared(shared_root):
    with client_for(shared_root) as client:
        yield client


def ids_by_name(root) -> dict[str, int]:
    with Library.open(root) as library, library.catalog.session() as s:
        return {os.fsdecode(r.path): r.id for r in s.query(ImageRow)}


def wait_for(client, job_id: str, seconds: float = 60) -> dict:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["state"] != "running":
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still running after {seconds} s")


def hits_of(python_hits) -> list[tuple[int, str, float]]:
    return [(h.id, h.path, round(h.score, 6)) for h in python_hits]


def hits_from(response) -> list[tuple[int, str, float]]:
    assert response.status_code == 200, response.text
    return [(h["id"], h["path"], h["score"]) for h in response.json()["hits"]]


# ---- pages, docs, info ---------------------------------------------------------------------------
def test_pages_carry_the_servers_csrf_token_and_load_nothing_from_elsewhere(shared):
    token = shared.app.state.csrf_token
    for path in ("/", "/search"):
        response = shared.get(path)
        assert response.status_code == 200
        assert f'<meta name="csrf-token" content="{token}">' in response.text
        assert "{{CSRF_TOKEN}}" not in response.text
        assert "default-src 'self'" in response.headers["content-security-policy"]


def test_openapi_schema_documents_every_endpoint(shared):
    assert shared.get("/docs").status_code == 200
    paths = shared.get("/openapi.json").json()["paths"]
    for path in ("/api/info", "/api/groups", "/api/marks", "/api/marks/remove", "/api/apply", "/api/undo",
                 "/api/jobs/{job_id}", "/api/search", "/api/similar/{row_id}", "/thumb/{row_id}", "/image/{row_id}"):
        assert path in paths, path


def test_info_is_what_dinoseek_info_reports(shared, shared_root):
    data = shared.get("/api/info").json()
    with Library.open(shared_root) as library:
        expected = library.info()
    assert data["counts"] == expected["counts"] and data["total"] == expected["total"]
    assert data["root"] == str(shared_root.resolve())


# ---- search --------------------------------------------------------------------------------------
def test_search_by_id_equals_the_python_api(shared, shared_root):
    row = ids_by_name(shared_root)["a/p3.jpg"]
    with open_library(shared_root) as lib:
        expected = hits_of(lib.search(lib.row_vector(row, "cls")[1], k=5))
        filtered = hits_of(lib.search(lib.row_vector(row, "patch")[1], k=5, kind="patch", folder="b",
                                      captured_after="2021-01-01"))
    assert hits_from(shared.get("/api/search", params={"id": row, "k": 5})) == expected
    assert expected[0][0] == row
    assert hits_from(shared.get("/api/search", params={"id": row, "k": 5, "kind": "patch", "folder": "b",
                                                       "after": "2021-01-01"})) == filtered


def test_similar_equals_the_python_api(shared, shared_root):
    row = ids_by_name(shared_root)["a/p1.jpg"]
    with open_library(shared_root) as lib:
        expected = hits_of(lib.similar(row, k=4))
        filtered = hits_of(lib.similar(row, k=4, camera="eos", min_bytes=1000))
    assert hits_from(shared.get(f"/api/similar/{row}", params={"k": 4})) == expected
    assert row not in [h[0] for h in expected]
    assert hits_from(shared.get(f"/api/similar/{row}", params={"k": 4, "camera": "eos", "min_bytes": 1000})) == filtered


def test_hits_carry_folder_and_metadata(shared, shared_root):
    row = ids_by_name(shared_root)["b/p4.jpg"]
    hit = shared.get("/api/search", params={"id": row, "k": 1}).json()["hits"][0]
    assert hit["path"] == "b/p4.jpg" and hit["folder"] == "b"
    assert hit["width"] == 640 and hit["height"] == 480 and hit["bytes"] > 0 and hit["captured_at"]


def test_search_by_upload_equals_the_python_api(shared, shared_root):
    photo = shared_root / "a" / "p2.jpg"
    with open_library(shared_root, load_model=True) as lib:
        expected = hits_of(lib.search(photo, k=5))
    response = shared.post("/api/search", params={"k": 5},
                           files={"image": ("holiday.jpg", photo.read_bytes(), "image/jpeg")})
    assert hits_from(response) == expected
    assert expected[0][1] == "a/p2.jpg"


def test_bad_date_filter_is_a_400_with_one_line(shared, shared_root):
    row = ids_by_name(shared_root)["a/p0.jpg"]
    response = shared.get("/api/search", params={"id": row, "after": "01-06-2023"})
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert "YYYY-MM-DD" in detail and "\n" not in detail


def test_a_folder_filter_names_a_folder_under_root_or_is_a_400(shared, shared_root):
    row = ids_by_name(shared_root)["a/p0.jpg"]
    hits = shared.get("/api/search", params={"id": row, "folder": "b"}).json()["hits"]
    assert hits and all(h["path"].startswith("b/") for h in hits)
    for folder in ("nosuch", "../", "/etc"):
        response = shared.get("/api/search", params={"id": row, "folder": folder})
        assert response.status_code == 400 and "no such folder" in response.json()["detail"], folder


def test_unknown_search_id_is_404(shared):
    assert shared.get("/api/search", params={"id": 999_999}).status_code == 404
    assert shared.get("/api/similar/999999").status_code == 404


def test_bad_query_parameters_are_400_with_one_line(shared):
    response = shared.get("/api/search", params={"id": 1, "k": 0})
    assert response.status_code == 400 and response.json()["detail"].startswith("k:")
    assert shared.get("/api/search", params={"id": 1, "kind": "nope"}).status_code == 400
    assert shared.get("/api/groups", params={"threshold": 1.5}).status_code == 400
    assert shared.get("/api/groups", params={"action": "delete"}).status_code == 400


def test_upload_that_is_not_an_image_is_a_400_with_one_line(shared):
    response = shared.post("/api/search", files={"image": ("notes.jpg", b"<html>not a photo</html>", "image/jpeg")})
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert detail.startswith("notes.jpg") and "\n" not in detail


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (no real pixel data needed to be refused)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_upload_over_the_pixel_cap_is_refused_before_decoding(shared):
    response = shared.post("/api/search", files={"image": ("bomb.png", _bomb_png(40_000, 40_000), "image/png")})
    assert response.status_code == 400
    assert "too many pixels" in response.json()["detail"]


def test_upload_over_the_size_cap_is_413(shared_root):
    with client_for(shared_root, upload_limit=10_000) as client:
        big = io.BytesIO()
        synthetic_photo(800, 800, seed=3).save(big, "PNG")
        assert len(big.getvalue()) > 10_000 + 64 * 1024
        response = client.post("/api/search", files={"image": ("big.png", big.getvalue(), "image/png")})
        assert response.status_code == 413
        small_but_over = client.post("/api/search", files={"image": ("p.jpg", b"x" * 20_000, "image/jpeg")})
        assert small_but_over.status_code == 413  # within the framing allowance: caught while copied


# ---- groups --------------------------------------------------------------------------------------
def _as_compared(groups) -> list[tuple]:
    return [(sorted(m.id for m in g.members), g.keeper.id, g.kind, round(g.min_similarity, 6),
             {m.id: (None if g.similarity_to_keeper(m) is None else round(g.similarity_to_keeper(m), 6),
                     g.reason_for(m)) for m in g.members}) for g in groups]


def _from_json(groups) -> list[tuple]:
    return [(sorted(m["id"] for m in g["members"]), g["keeper"], g["kind"], g["min_similarity"],
             {m["id"]: (m["similarity"], m["reason"]) for m in g["members"]}) for g in groups]


@pytest.mark.parametrize("threshold", [THRESHOLD, 0.99, 0.97, 0.999])
def test_groups_equal_find_duplicates_at_each_threshold(shared, shared_root, threshold):
    with Library.open(shared_root) as library:
        expected = find_duplicates(library, threshold=threshold)
    data = shared.get("/api/groups", params={"threshold": threshold, "limit": 500}).json()
    assert data["total_groups"] == len(expected)
    assert _from_json(data["groups"]) == _as_compared(expected)


def test_groups_list_keeper_first_with_what_happens_to_each_member(shared, shared_root):
    names = {v: k for k, v in ids_by_name(shared_root).items()}
    data = shared.get("/api/groups", params={"threshold": THRESHOLD, "action": "hardlink"}).json()
    assert data["groups"], "the test library has duplicates"
    for group in data["groups"]:
        first, *others = group["members"]
        assert first["id"] == group["keeper"] and first["role"] == "keep" and first["similarity"] == 1.0
        assert others and all(m["role"] == "hardlink" for m in others)
        assert group["key"] == group_key_of(group)
        for m in group["members"]:
            assert m["path"] == names[m["id"]] and m["folder"] == os.path.dirname(m["path"])
            assert m["bytes"] > 0 and m["width"] and m["height"] and m["reason"]
    summary = data["summary"]
    assert summary["files"] == sum(len(g["members"]) - 1 for g in data["groups"])
    assert summary["bytes"] == sum(m["bytes"] for g in data["groups"] for m in g["members"][1:])
    assert summary["quarantine"].endswith("quarantine")


def group_key_of(group_json) -> str:
    """The contract's group key: sha256 hex of the sorted member ids."""
    return hashlib.sha256(",".join(str(i) for i in sorted(m["id"] for m in group_json["members"])).encode()).hexdigest()


def test_groups_are_paginated(shared):
    whole = shared.get("/api/groups", params={"threshold": 0.97, "limit": 500}).json()
    assert whole["total_groups"] >= 2
    pages = [shared.get("/api/groups", params={"threshold": 0.97, "offset": i, "limit": 1}).json()
             for i in range(whole["total_groups"] + 1)]
    assert [p["groups"][0]["key"] for p in pages[:-1]] == [g["key"] for g in whole["groups"]]
    assert pages[-1]["groups"] == [] and pages[-1]["total_groups"] == whole["total_groups"]


def test_candidate_pairs_are_searched_once_until_the_catalog_changes(root, monkeypatch):
    monkeypatch.setattr(library_access, "READER_REFRESH_SECONDS", 0)  # see catalog changes at once
    searched = []
    real = groups_module.candidate_pairs
    monkeypatch.setattr(groups_module, "candidate_pairs", lambda library, floor: searched.append(floor) or
                        real(library, floor))
    with client_for(root) as client:
        for threshold in (0.99, THRESHOLD, 0.999, 0.99):
            assert client.get("/api/groups", params={"threshold": threshold}).status_code == 200
        assert len(searched) == 1  # 0.98 is within FLOOR_MARGIN of the first search's 0.99
        client.get("/api/groups", params={"threshold": 0.9})
        assert len(searched) == 2  # lower than any search so far
        with Library.open(root, write=True) as library:  # `dinoseek index` (or anything) writes the catalog
            library.catalog.set_status(ids_by_name(root)["b/p4.jpg"], "changed", "test")
        client.get("/api/groups", params={"threshold": 0.9})
        assert len(searched) == 3


def test_a_long_dedup_search_does_not_block_other_requests(root, monkeypatch):
    release, started = threading.Event(), threading.Event()
    real = groups_module.candidate_pairs

    def slow(library, floor):
        started.set()
        release.wait(30)
        return real(library, floor)

    monkeypatch.setattr(groups_module, "candidate_pairs", slow)
    with client_for(root) as client:
        waiting = threading.Thread(target=lambda: client.get("/api/groups", params={"threshold": THRESHOLD}))
        try:
            waiting.start()
            assert started.wait(30)
            assert client.get("/api/info").status_code == 200  # served while the search runs
            row = ids_by_name(root)["a/p3.jpg"]
            assert client.get("/api/search", params={"id": row}).status_code == 200
        finally:
            release.set()
            waiting.join(30)
        assert not waiting.is_alive()


def test_ten_thousand_groups_page_fast(shared, monkeypatch):
    """Grouping, summary and paging of 10,000 groups: one page answers quickly, the next from the cache."""
    from dinoseek.retrieval.server.groups import Plan

    with Library.open(shared.app.state.server.place.root) as library:
        one = find_duplicates(library, threshold=THRESHOLD)[0]
    plan = Plan(THRESHOLD, "move", [one] * 10_000, [f"{i:064x}" for i in range(10_000)], {"files": 10_000})
    monkeypatch.setattr(shared.app.state.server.groups, "plan", lambda *a, **k: plan)
    start = time.monotonic()
    data = shared.get("/api/groups", params={"offset": 9_950, "limit": 50}).json()
    assert time.monotonic() - start < 10  # generous: a shared CI machine
    assert data["total_groups"] == 10_000 and len(data["groups"]) == 50


# ---- files ---------------------------------------------------------------------------------------
def test_full_size_image_by_id_is_the_file(shared, shared_root):
    row = ids_by_name(shared_root)["a/p1.jpg"]
    response = shared.get(f"/image/{row}")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert response.content == (shared_root / "a" / "p1.jpg").read_bytes()


def test_thumbnail_is_upright_small_and_cached_by_content(shared, shared_root):
    row = ids_by_name(shared_root)["a/sideways.jpg"]
    response = shared.get(f"/thumb/{row}", params={"size": 128})
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(response.content))
    assert thumb.size == (96, 128)  # stored 640x480 with orientation 6: shown 480x640
    with Library.open(shared_root) as library:
        member = library.catalog.members([row])[0]
        cached = Thumbnails(library.folder).path_for(member.sha256, member.size, 128)
    assert cached.read_bytes() == response.content
    assert cached.is_relative_to(shared_root / ".dinoseek" / "thumbnails")


def test_unknown_ids_and_paths_are_404(shared):
    for url in ("/image/999999", "/thumb/999999", "/image/..%2F..%2Fetc%2Fpasswd", "/image/%2Fetc%2Fpasswd",
                "/thumb/-1", "/image/a%2Fp0.jpg"):
        assert shared.get(url).status_code == 404, url


def test_rows_whose_paths_leave_the_root_are_404(root, tmp_path):
    ids = ids_by_name(root)
    outside = tmp_path / "outside.jpg"
    outside.write_bytes((root / "a" / "p3.jpg").read_bytes())
    (root / "a" / "p3.jpg").unlink()
    (root / "a" / "p3.jpg").symlink_to(outside)  # a symlink out of ROOT where a photo was
    with Library.open(root, write=True) as library, library.catalog.session() as s, s.begin():
        s.get(ImageRow, ids["a/p5.jpg"] if "a/p5.jpg" in ids else ids["b/p5.jpg"]).path = b"../outside.jpg"
        s.get(ImageRow, ids["b/p6.jpg"]).path = os.fsencode(outside)
    with client_for(root) as client:
        for name in ("a/p3.jpg", "b/p5.jpg", "b/p6.jpg"):
            assert client.get(f"/image/{ids[name]}").status_code == 404, name
            assert client.get(f"/thumb/{ids[name]}").status_code == 404, name
        assert client.get(f"/image/{ids['a/p0.jpg']}").status_code == 200


# ---- apply, undo, jobs ---------------------------------------------------------------------------
def all_shown(client, threshold: float = THRESHOLD, **changes) -> dict:
    """An apply body for a page that showed every group at the threshold, with `changes` on top."""
    data = client.get("/api/groups", params={"threshold": threshold, "limit": 500}).json()
    return {"threshold": threshold, "version": data["version"], "groups": [g["key"] for g in data["groups"]],
            **changes}


def test_apply_a_reviewed_plan_then_undo_restores_every_file(root):
    before = tree_hashes(root)
    ids = ids_by_name(root)
    with client_for(root) as client:
        data = client.get("/api/groups", params={"threshold": THRESHOLD}).json()
        by_keeper = {g["keeper"]: g for g in data["groups"]}
        exact = next(g for g in data["groups"] if ids["a/p0.jpg"] in [m["id"] for m in g["members"]])
        small = next(g for g in data["groups"] if ids["a/p1.jpg"] in [m["id"] for m in g["members"]])
        skipped = [g for g in data["groups"] if g is not exact and g is not small]
        assert len(by_keeper) == len(data["groups"])
        # keep the copy in b/ instead of the original in a/; leave the rest alone
        keepers = {exact["key"]: ids["b/p0-copy.jpg"]}
        response = client.post("/api/apply", json={"threshold": THRESHOLD, "action": "move", "keepers": keepers,
                                                   "skip": [g["key"] for g in skipped], "version": data["version"],
                                                   "groups": [g["key"] for g in data["groups"]]})
        assert response.status_code == 202, response.text
        job = wait_for(client, response.json()["job"])
        assert job["state"] == "done", job
        assert job["kind"] == "apply" and job["done"] == job["total"] == 2
        moved = {f["path"] for f in job["result"]["files"]}
        assert moved == {"a/p0.jpg", "b/p1-small.jpg"}
        assert not (root / "a" / "p0.jpg").exists() and (root / "b" / "p0-copy.jpg").exists()
        assert set(tree_hashes(root)) == set(before) - moved
        assert client.get(f"/image/{ids['a/p0.jpg']}").status_code == 404  # quarantined rows are not served
        after = client.get("/api/groups", params={"threshold": THRESHOLD}).json()
        assert {g["key"] for g in after["groups"]} == {g["key"] for g in skipped}

        response = client.post("/api/undo", json={"journal": os.path.basename(job["result"]["journal"])})
        assert response.status_code == 202, response.text
        undone = wait_for(client, response.json()["job"])
        assert undone["state"] == "done", undone
        assert sorted(undone["result"]["restored"]) == sorted(moved)
        assert tree_hashes(root) == before
        assert client.get(f"/image/{ids['a/p0.jpg']}").status_code == 200


def test_apply_with_hardlinks_is_the_same_journaled_action_as_the_cli(root):
    with client_for(root) as client:
        response = client.post("/api/apply", json=all_shown(client, action="hardlink"))
        job = wait_for(client, response.json()["job"])
        assert job["state"] == "done", job
        for moved in job["result"]["files"]:
            assert os.stat(root / moved["path"]).st_nlink == 2  # a link to the kept copy where it was
        undone = wait_for(client, client.post("/api/undo", json={}).json()["job"])
        assert undone["state"] == "done", undone


def test_review_naming_groups_that_no_longer_exist_is_409(shared):
    body = all_shown(shared)
    response = shared.post("/api/apply", json={**body, "groups": [*body["groups"], "0" * 64], "skip": ["0" * 64]})
    assert response.status_code == 409 and "reload" in response.json()["detail"]
    response = shared.post("/api/apply", json={**body, "groups": [*body["groups"], "0" * 64]})
    assert response.status_code == 409 and "reload" in response.json()["detail"]


def test_apply_needs_the_version_and_the_groups_shown(shared):
    body = all_shown(shared)
    for field in ("version", "groups"):
        response = shared.post("/api/apply", json={k: v for k, v in body.items() if k != field})
        detail = response.json()["detail"]
        assert response.status_code == 400 and detail.startswith(field) and "\n" not in detail, detail


def test_apply_acts_only_on_the_groups_the_page_showed(root):
    before = tree_hashes(root)
    with client_for(root) as client:
        first_page = client.get("/api/groups", params={"threshold": THRESHOLD, "limit": 1}).json()
        assert first_page["total_groups"] >= 2  # the page never showed the others
        shown = first_page["groups"][0]
        response = client.post("/api/apply", json={"threshold": THRESHOLD, "version": first_page["version"],
                                                   "groups": [shown["key"]]})
        assert response.status_code == 202, response.text
        job = wait_for(client, response.json()["job"])
        assert job["state"] == "done" and job["total"] == len(shown["members"]) - 1, job
        moved = {f["path"] for f in job["result"]["files"]}
        assert moved == {m["path"] for m in shown["members"][1:]}
        assert set(tree_hashes(root)) == set(before) - moved
        after = client.get("/api/groups", params={"threshold": THRESHOLD, "limit": 500}).json()
        assert after["total_groups"] == first_page["total_groups"] - 1  # the unseen groups are all still there


def test_keepers_and_skips_for_groups_not_shown_are_400(shared):
    body = all_shown(shared)
    hidden = shared.get("/api/groups", params={"threshold": THRESHOLD, "limit": 500}).json()["groups"][-1]
    shown = [k for k in body["groups"] if k != hidden["key"]]
    for change in ({"keepers": {hidden["key"]: hidden["members"][1]["id"]}}, {"skip": [hidden["key"]]}):
        response = shared.post("/api/apply", json={**body, "groups": shown, **change})
        detail = response.json()["detail"]
        assert response.status_code == 400 and "missing from groups" in detail, detail


def test_groups_that_changed_since_the_page_loaded_them_are_not_applied(root):
    with client_for(root) as client:
        seen = client.get("/api/groups", params={"threshold": THRESHOLD}).json()
        assert client.get("/api/groups", params={"threshold": THRESHOLD}).json()["version"] == seen["version"]
        new = synthetic_photo(640, 480, seed=50)  # two new near duplicates, found only in fresh indexes ...
        new.save(root / "b" / "new.jpg", quality=92)
        new.resize((320, 240)).save(root / "b" / "new-small.jpg", quality=92)
        with Library.open(root) as library:
            tiny = library.manifest()["weights_source"]["path"]
        index_with_cli(root, tiny)  # ... indexed meanwhile
        now = client.get("/api/groups", params={"threshold": THRESHOLD}).json()  # at once: no stale indexes
        with Library.open(root) as library:
            assert _from_json(now["groups"]) == _as_compared(find_duplicates(library, threshold=THRESHOLD))
        assert now["total_groups"] == seen["total_groups"] + 1
        response = client.post("/api/apply", json={"threshold": THRESHOLD, "version": seen["version"],
                                                   "groups": [g["key"] for g in seen["groups"]]})
        assert response.status_code == 409 and "reload" in response.json()["detail"]
        assert (root / "b" / "new-small.jpg").exists() and (root / "a" / "p0.jpg").exists()


def test_keeper_outside_its_group_is_400(shared, shared_root):
    group = shared.get("/api/groups", params={"threshold": THRESHOLD}).json()["groups"][0]
    outsider = next(i for i in ids_by_name(shared_root).values() if i not in [m["id"] for m in group["members"]])
    response = shared.post("/api/apply", json=all_shown(shared, keepers={group["key"]: outsider}))
    assert response.status_code == 400 and "not a member" in response.json()["detail"]


def test_two_applies_at_once_one_acts_the_other_is_told_why(root, monkeypatch):
    from dinoseek.retrieval import actions

    release = threading.Event()
    real_apply = actions.apply

    def slow_apply(*args, **kwargs):
        release.wait(30)
        return real_apply(*args, **kwargs)

    monkeypatch.setattr(actions, "apply", slow_apply)
    barrier = threading.Barrier(2)
    answers = []
    with client_for(root) as client:
        body = all_shown(client)

        def post():
            barrier.wait()
            answers.append(client.post("/api/apply", json=body))

        threads = [threading.Thread(target=post) for _ in range(2)]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            statuses = sorted(a.status_code for a in answers)
            assert statuses == [202, 409], [a.text for a in answers]
            refused = next(a for a in answers if a.status_code == 409).json()["detail"]
            assert "\n" not in refused and ("running" in refused or "busy" in refused)
            assert client.post("/api/undo", json={}).status_code == 409  # undo waits for it too
        finally:
            release.set()  # never leave the apply job waiting, whatever failed above
        job = wait_for(client, next(a for a in answers if a.status_code == 202).json()["job"])
        assert job["state"] == "done", job


def test_apply_while_another_process_holds_the_writer_lock_is_409_naming_it(root):
    with client_for(root) as client, Library.open(root, write=True):  # `dinoseek index` running, say
        response = client.post("/api/apply", json=all_shown(client))
        assert response.status_code == 409
        assert f"pid {os.getpid()}" in response.json()["detail"]


def test_reads_go_on_while_the_writer_lock_is_held(shared, shared_root):
    with Library.open(shared_root, write=True):
        assert shared.get("/api/info").status_code == 200
        assert shared.get("/api/groups", params={"threshold": THRESHOLD}).status_code == 200


def test_undo_journal_is_named_by_file_name_only(shared):
    for name in ("../../etc/passwd", "/etc/passwd", ".hidden"):
        assert shared.post("/api/undo", json={"journal": name}).status_code == 400, name
    assert shared.post("/api/undo", json={"journal": "nope.jsonl"}).status_code == 404


def test_undo_with_nothing_to_undo_fails_with_one_line(shared):
    response = shared.post("/api/undo", json={})
    assert response.status_code == 202
    job = wait_for(shared, response.json()["job"])
    assert job["state"] == "failed" and job["error"] and "\n" not in job["error"]


def test_unknown_job_is_404(shared):
    assert shared.get("/api/jobs/nope").status_code == 404


def test_state_changing_endpoints_refuse_get(shared):
    for path in ("/api/apply", "/api/undo", "/api/marks", "/api/marks/remove"):
        assert shared.get(path).status_code == 405, path


# ---- "not a duplicate" marks -----------------------------------------------------------------------
def test_marking_a_group_not_a_duplicate_removes_it_as_dedup_does(root):
    with client_for(root) as client:
        data = client.get("/api/groups", params={"threshold": THRESHOLD}).json()
        group = next(g for g in data["groups"] if g["kind"] == "near")
        response = client.post("/api/marks", json={"ids": [m["id"] for m in group["members"]]})
        assert response.status_code == 200 and response.json()["marked"] >= 1
        after = client.get("/api/groups", params={"threshold": THRESHOLD, "limit": 500}).json()
        assert group["key"] not in {g["key"] for g in after["groups"]}
        with Library.open(root) as library:
            assert _from_json(after["groups"]) == _as_compared(find_duplicates(library, threshold=THRESHOLD))
        response = client.post("/api/marks/remove", json={"ids": [m["id"] for m in group["members"]]})
        assert response.status_code == 200 and response.json()["removed"] == 1
        again = client.get("/api/groups", params={"threshold": THRESHOLD, "limit": 500}).json()
        assert group["key"] in {g["key"] for g in again["groups"]}


def test_marks_need_two_different_known_photos(shared, shared_root):
    ids = ids_by_name(shared_root)
    assert shared.post("/api/marks", json={"ids": [ids["a/p0.jpg"]]}).status_code == 400
    assert shared.post("/api/marks", json={"ids": [ids["a/p0.jpg"], 999_999]}).status_code == 400
    identical = shared.post("/api/marks", json={"ids": [ids["a/p0.jpg"], ids["b/p0-copy.jpg"]]})
    assert identical.status_code == 400 and "identical" in identical.json()["detail"]


def test_marking_a_mixed_group_marks_only_the_pairs_between_different_contents(tmp_path, tiny_folder):
    root = tmp_path / "photos"
    make_photos(root)
    (root / "b" / "p1-copy.jpg").write_bytes((root / "a" / "p1.jpg").read_bytes())  # p1 twice, plus p1-small
    index_with_cli(root, tiny_folder)
    ids = ids_by_name(root)
    with client_for(root) as client:
        data = client.get("/api/groups", params={"threshold": THRESHOLD, "limit": 500}).json()
        mixed = next(g for g in data["groups"] if ids["a/p1.jpg"] in [m["id"] for m in g["members"]])
        assert len(mixed["members"]) == 3 and mixed["kind"] == "near"
        response = client.post("/api/marks", json={"ids": [m["id"] for m in mixed["members"]]})
        assert response.status_code == 200, response.text
        assert response.json() == {"marked": 1}  # p1 (either copy) against p1-small; the byte copies stay one content
        after = client.get("/api/groups", params={"threshold": THRESHOLD, "limit": 500}).json()
        names = [sorted(m["path"] for m in g["members"]) for g in after["groups"]]
        assert ["a/p1.jpg", "b/p1-copy.jpg"] in names and not any("b/p1-small.jpg" in n for n in names)
        with Library.open(root) as library:
            assert _from_json(after["groups"]) == _as_compared(find_duplicates(library, threshold=THRESHOLD))


def test_marks_take_at_most_200_ids_in_one_request(shared, shared_root):
    ids = sorted(ids_by_name(shared_root).values())
    many = [*ids, *range(1_000_000, 1_000_000 + 201 - len(ids))]
    for path in ("/api/marks", "/api/marks/remove"):
        response = shared.post(path, json={"ids": many})
        detail = response.json()["detail"]
        assert response.status_code == 400 and "at most 200" in detail and "\n" not in detail, detail
    assert shared.get("/api/groups", params={"threshold": THRESHOLD}).json()["total_groups"] == 3  # nothing marked


# ---- review findings: candidate search, caches, reader reloads, marks without the writer lock ------
def test_large_flat_libraries_search_through_the_temporary_ivf_as_find_duplicates(root, monkeypatch):
    import dinoseek.retrieval.dedup as dedup

    monkeypatch.setattr(dedup, "EXACT_PAIRS_MAX", 5)  # the test library (Flat, 12 photos) counts as large
    monkeypatch.setenv("DINOSEEK_TORCH_SEARCH", "off")  # the FAISS path, also on a CUDA machine
    built = []
    real = dedup.trained_ivf_flat
    monkeypatch.setattr(dedup, "trained_ivf_flat", lambda *a, **k: built.append("ivf") or real(*a, **k))
    with Library.open(root) as library:
        expected = find_duplicates(library, threshold=THRESHOLD)
    assert built == ["ivf"]
    with client_for(root) as client:  # its reader holds the library's Flat index loaded
        data = client.get("/api/groups", params={"threshold": THRESHOLD, "limit": 500}).json()
    assert built == ["ivf", "ivf"]  # the server searched as find_duplicates did, not pair by pair in the Flat
    assert _from_json(data["groups"]) == _as_compared(expected)


def test_a_mark_regroups_without_a_new_candidate_search(root, monkeypatch):
    searched = []
    real = groups_module.candidate_pairs
    monkeypatch.setattr(groups_module, "candidate_pairs", lambda library, floor: searched.append(floor) or
                        real(library, floor))
    with client_for(root) as client:
        before = client.get("/api/groups", params={"threshold": THRESHOLD, "limit": 500}).json()
        group = next(g for g in before["groups"] if g["kind"] == "near")
        assert client.post("/api/marks", json={"ids": [m["id"] for m in group["members"]]}).status_code == 200
        after = client.get("/api/groups", params={"threshold": THRESHOLD, "limit": 500}).json()
        assert group["key"] not in {g["key"] for g in after["groups"]}  # the mark shows at once
        assert len(searched) == 1  # from the pairs already searched
        with Library.open(root) as library:
            assert _from_json(after["groups"]) == _as_compared(find_duplicates(library, threshold=THRESHOLD))


def test_groups_are_made_once_per_threshold_for_every_action(root, monkeypatch):
    grouped = []
    real = groups_module.groups_from_pairs
    monkeypatch.setattr(groups_module, "groups_from_pairs", lambda *a: grouped.append(a[-1]) or real(*a))
    with client_for(root) as client:
        answers = {action: client.get("/api/groups", params={"threshold": THRESHOLD, "action": action}).json()
                   for action in ("move", "hardlink", "symlink")}
    assert grouped == [THRESHOLD]
    assert len({a["version"] for a in answers.values()}) == 1  # the same groups and keepers
    for action, answer in answers.items():
        assert {m["role"] for g in answer["groups"] for m in g["members"]} == {"keep", action}


def test_plan_summary_lists_each_photo_folder_once(root, monkeypatch):
    from dinoseek.retrieval import sidecars

    listed = []
    real = sidecars.FolderIndex._listing

    def listing(self, folder):
        if folder not in self._folders:  # listed now, not from this index's cache
            listed.append(folder)
        return real(self, folder)

    monkeypatch.setattr(sidecars.FolderIndex, "_listing", listing)
    with client_for(root) as client:
        data = client.get("/api/groups", params={"threshold": THRESHOLD, "limit": 500}).json()
    assert len(data["groups"]) >= 2
    assert listed and len(listed) == len(set(listed)), listed


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_reader_reloads_do_not_grow_open_files(root, monkeypatch):
    monkeypatch.setattr(library_access, "READER_REFRESH_SECONDS", 0)
    changes = iter(range(1_000_000))  # every look finds the images changed: each one reloads
    monkeypatch.setattr(library_access, "images_token", lambda library: next(changes))
    with client_for(root) as client:
        reader = client.app.state.server.reader
        readers = set()
        for _ in range(3):  # warm up (pools, imports)
            reader.wrote()
            reader.search()
        before = _open_files()
        for _ in range(30):
            reader.wrote()  # as after a mark, apply or undo: the next request looks again
            readers.add(id(reader.search()))
            assert client.get("/api/info").status_code == 200
        assert len(readers) >= 30 // 2  # it did reload (ids of freed readers may repeat)
        assert _open_files() <= before


def test_requests_are_served_while_the_reader_reloads(root, monkeypatch):
    monkeypatch.setattr(library_access, "READER_REFRESH_SECONDS", 0)
    loading, release = threading.Event(), threading.Event()
    real = library_access.LibrarySearch

    def slow_search(*args, **kwargs):
        if loading_wanted:
            loading.set()
            release.wait(30)
        return real(*args, **kwargs)

    loading_wanted = False
    monkeypatch.setattr(library_access, "LibrarySearch", slow_search)
    with client_for(root) as client:
        reader = client.app.state.server.reader
        old = reader.search()
        loading_wanted = True
        with Library.open(root, write=True) as library:  # `dinoseek index` changed a row
            library.catalog.set_status(ids_by_name(root)["b/p4.jpg"], "changed", "test")
        reloading = threading.Thread(target=reader.current)
        reloading.start()
        try:
            assert loading.wait(30)
            start = time.monotonic()
            row = ids_by_name(root)["a/p3.jpg"]
            assert client.get(f"/thumb/{row}").status_code == 200  # from the reader in use
            assert client.get("/api/search", params={"id": row}).status_code == 200
            assert time.monotonic() - start < 10
            assert reader.search() is old
        finally:
            release.set()
            reloading.join(30)
        assert reader.search() is not old
        assert old.library.catalog.summary()[0]  # the replaced reader still answers a request holding it


def test_a_mark_succeeds_while_another_handle_holds_the_writer_lock(root):
    ids = ids_by_name(root)
    with client_for(root) as client, Library.open(root, write=True):  # `dinoseek index` or an apply runs
        response = client.post("/api/marks", json={"ids": [ids["a/p0.jpg"], ids["a/p3.jpg"]]})
        assert response.status_code == 200, response.text
        assert response.json()["marked"] == 1


def test_a_name_that_is_not_utf8_is_shown_printable_in_groups_and_job_results(tmp_path, tiny_folder):
    root = tmp_path / "photos"
    make_library_photos(root)
    raw = os.path.join(os.fsencode(root / "b"), b"caf\xe9.jpg")  # a byte copy named in Latin-1
    with open(raw, "wb") as f:
        f.write((root / "a" / "p3.jpg").read_bytes())
    index_with_cli(root, tiny_folder)
    before = tree_hashes(root)
    with client_for(root) as client:
        body = all_shown(client, action="move")
        data = client.get("/api/groups", params={"threshold": THRESHOLD, "limit": 500}).json()
        names = {m["path"] for g in data["groups"] for m in g["members"]}
        assert "b/caf\\xe9.jpg" in names
        job = wait_for(client, client.post("/api/apply", json=body).json()["job"])
        assert job["state"] == "done" and "b/caf\\xe9.jpg" in {f["path"] for f in job["result"]["files"]}
        undone = wait_for(client, client.post("/api/undo", json={}).json()["job"])
        assert undone["state"] == "done", undone
    assert tree_hashes(root) == before
