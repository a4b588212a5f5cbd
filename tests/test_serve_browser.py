"""The review and search pages in a real browser: headless Chromium (Debian's `chromium`) driven by
Playwright against `dinoseek serve`'s app running on uvicorn on a free loopback port.

Skipped when Chromium or Playwright is missing, unless DINOSEEK_REQUIRE_BROWSER=1 (CI), where that
is a failure. Screenshots of both pages land in the tests' temporary folders (review.png, search.png)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from test_retrieval import THRESHOLD, _jpeg, index_with_cli, make_library_photos, tree_hashes

from dinoseek.indexer.library import Library
from dinoseek.retrieval.dedup import find_duplicates

try:
    from playwright.sync_api import expect
except ImportError:  # the `chromium` fixture skips (or fails, in CI) with the reason
    expect = None

REQUIRE_BROWSER = os.environ.get("DINOSEEK_REQUIRE_BROWSER") == "1"
# A legal POSIX file name that is also markup: the page must show it as text, never run it.
HOSTILE_NAME = "<img src=x onerror=alert(1)>.jpg"


def _missing(reason: str):
    if REQUIRE_BROWSER:
        pytest.fail(f"{reason} (DINOSEEK_REQUIRE_BROWSER=1)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def chromium():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed (pip install -e .[test])")
    executable = shutil.which("chromium")
    if executable is None:
        _missing("no `chromium` on PATH (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def library_root(tmp_path_factory, tiny_folder):
    """The test_retrieval library (3 groups at THRESHOLD) plus a byte copy of p3 named like markup."""
    root = tmp_path_factory.mktemp("served") / "photos"
    make_library_photos(root)
    (root / "b" / HOSTILE_NAME).write_bytes((root / "a" / "p3.jpg").read_bytes())
    index_with_cli(root, tiny_folder)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(library_root, tiny_folder):
    """The real app on uvicorn in a background thread; stopped (and joined) when the module ends."""
    yield from _serve(library_root, tiny_folder)


@pytest.fixture(scope="module")
def three_root(tmp_path_factory, tiny_folder):
    """The test_retrieval library plus a re-encode of p1: p1, p1-small and p1-reencoded are one group of 3."""
    from PIL import Image

    root = tmp_path_factory.mktemp("served3") / "photos"
    make_library_photos(root)
    with Image.open(root / "a" / "p1.jpg") as p1:
        (root / "b" / "p1-reencoded.jpg").write_bytes(_jpeg(p1.convert("RGB"), quality=60))
    index_with_cli(root, tiny_folder)
    return root


@pytest.fixture(scope="module")
def three_server(three_root, tiny_folder):
    yield from _serve(three_root, tiny_folder)


def _serve(root, tiny_folder):
    import uvicorn
    from dinoseek.retrieval.server import create_app

    port = _free_port()
    app = create_app(root, weights=tiny_folder, precision="fp32", host="127.0.0.1", port=port)
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    stop = time.monotonic() + 30
    try:
        while not uv.started:
            assert thread.is_alive() and time.monotonic() < stop, "the server did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:  # stopped whatever happened, a failed start included
        uv.should_exit = True
        thread.join(timeout=15)
    assert not thread.is_alive(), "the server did not stop"


class Watched:
    """A page that records script errors, alerts and every URL it requested."""

    def __init__(self, page, base: str):
        self.page, self.base = page, base
        self.errors: list[str] = []
        self.requests: list[str] = []
        page.on("pageerror", lambda error: self.errors.append(f"script error: {error}"))
        page.on("dialog", lambda dialog: (self.errors.append(f"dialog: {dialog.message}"), dialog.dismiss()))
        page.on("request", lambda request: self.requests.append(request.url))

    def outside(self) -> list[str]:
        return [u for u in self.requests if not u.startswith((self.base + "/", "blob:", "data:"))]


@pytest.fixture
def browser_page(chromium, server):
    context = chromium.new_context(viewport={"width": 1200, "height": 800})
    page = context.new_page()
    page.set_default_timeout(20_000)
    watched = Watched(page, server)
    yield watched
    context.close()
    assert watched.errors == []


def _group_with(page, name: str):
    """The group section holding the photo whose file name is exactly `name`."""
    return page.locator(".group", has=page.locator(".name", has_text=re.compile("^" + re.escape(name) + "$")))


def _wait_until(page, condition: str, seconds: float = 20) -> None:
    """Poll a JS condition from here: the pages' Content-Security-Policy forbids the eval that
    `page.wait_for_function` uses for a string (and the tests keep that policy on)."""
    stop = time.monotonic() + seconds
    while not page.evaluate(f"() => Boolean({condition})"):
        assert time.monotonic() < stop, f"still false after {seconds} s: {condition}"
        time.sleep(0.05)


def _reference_groups(root: Path, threshold: float = THRESHOLD):
    with Library.open(root) as library:
        return find_duplicates(library, threshold=threshold)


def test_review_page_shows_groups_keeper_first_with_member_details(browser_page, server, library_root, tmp_path):
    page = browser_page.page
    page.goto(f"{server}/?threshold={THRESHOLD}")
    page.wait_for_selector(".group")
    groups = _reference_groups(library_root)
    assert page.locator(".group").count() == len(groups) == 4
    for group in groups:
        section = _group_with(page, os.path.basename(group.keeper.path))
        first = section.locator(".member").first
        assert first.locator(".badge").inner_text() == "KEEP"
        assert first.locator(".name").inner_text() == os.path.basename(group.keeper.path)
        for member in group.others:
            card = section.locator(".member", has=page.locator(".name", has_text=os.path.basename(member.path)))
            assert card.locator(".badge").inner_text() == "MOVE to quarantine"
            assert f"{group.similarity_to_keeper(member):.3f}" in card.locator(".sim").inner_text()
            assert f"{member.width}×{member.height}" in card.inner_text()
            assert group.reason_for(member) in card.locator(".reason").inner_text()
    page.screenshot(path=str(tmp_path / "review.png"))


def test_file_names_are_shown_as_text_never_as_html(browser_page, server):
    page = browser_page.page
    page.goto(f"{server}/?threshold={THRESHOLD}")
    page.wait_for_selector(".group")
    assert page.locator(".name", has_text=HOSTILE_NAME).count() == 1
    assert page.locator('img[src="x"]').count() == 0  # the name never became an element
    page.locator(".member", has=page.locator(".name", has_text=HOSTILE_NAME)).locator(".thumb").click()
    assert page.locator("#viewer-caption").inner_text().startswith("b/" + HOSTILE_NAME)
    page.keyboard.press("Escape")
    assert not page.locator("#viewer").is_visible()
    # browser_page checks at teardown that no alert() ran


def test_full_size_image_opens_from_the_thumbnail(browser_page, server):
    page = browser_page.page
    page.goto(f"{server}/?threshold={THRESHOLD}")
    page.wait_for_selector(".group")
    page.locator(".group .thumb").first.click()
    viewer = page.locator("#viewer-img")
    viewer.wait_for(state="visible")
    _wait_until(page, "document.getElementById('viewer-img').naturalWidth > 0")
    assert page.evaluate("document.getElementById('viewer-img').naturalWidth") == 640  # the original, not the thumbnail


def test_threshold_slider_reloads_the_groups_for_that_threshold(browser_page, server, library_root):
    page = browser_page.page
    page.goto(f"{server}/?threshold={THRESHOLD}")
    page.wait_for_selector(".group")
    exact = [g for g in _reference_groups(library_root, threshold=1.0)]
    assert 0 < len(exact) < page.locator(".group").count()
    page.locator(".group").first.locator(".skip").click()  # a choice the new threshold resets, and says so
    page.locator("#threshold").fill("1")  # fires input and change, as a drag that ends does
    expect(page.locator("#threshold-value")).to_have_text("1.000")
    expect(page.locator(".group")).to_have_count(len(exact))
    expect(page.locator("#status")).to_contain_text("1 choice (kept copies, skips) made at the previous threshold")
    assert set(page.locator(".group-head .meta").all_inner_texts()) == {"byte-identical · lowest similarity 1.000 · 2 files"}
    # byte copies are always duplicates: no button to say otherwise, for the group or a member
    assert page.locator(".not-dup-group").count() == 0 and page.locator(".not-dup").count() == 0
    assert "threshold=1" in page.url  # a reload keeps it


def test_keyboard_moves_between_groups_and_keeps_the_focused_photo(browser_page, server):
    page = browser_page.page
    page.goto(f"{server}/?threshold={THRESHOLD}")
    page.wait_for_selector(".group.focused")
    assert page.locator(".group").first.get_attribute("class").endswith("focused")
    page.keyboard.press("j")
    second = page.locator(".group").nth(1)
    assert "focused" in second.get_attribute("class")
    other = second.locator(".member").nth(1).locator(".name").inner_text()
    page.keyboard.press("ArrowRight")
    page.keyboard.press("Enter")  # keep the focused (second) photo
    second = page.locator(".group").nth(1)
    assert second.locator(".member").first.locator(".name").inner_text() == other
    assert second.locator(".member").first.locator(".badge").inner_text() == "KEEP"
    page.keyboard.press("s")  # skip this group this time
    assert "skipped" in page.locator(".group").nth(1).get_attribute("class")
    assert "1 skipped" in page.locator("#summary").inner_text()
    page.keyboard.press("k")
    assert "focused" in page.locator(".group").first.get_attribute("class")


def test_not_a_duplicate_key_marks_the_focused_photo_and_undo_mark_takes_it_back(browser_page, server):
    page = browser_page.page
    page.goto(f"{server}/?threshold={THRESHOLD}")
    page.wait_for_selector(".group")
    count = page.locator(".group").count()
    section = _group_with(page, "p1-small.jpg")
    assert section.locator(".member").count() == 2  # marking its only pair dissolves the group
    section.locator(".member", has=page.locator(".name", has_text="p1-small.jpg")).locator(".name").click()  # focus
    page.keyboard.press("n")
    expect(page.locator(".group")).to_have_count(count - 1)
    expect(page.locator("#status")).to_contain_text("Marked p1-small.jpg as not a duplicate (1 pair)")
    page.get_by_role("button", name="undo mark").click()
    expect(page.locator(".group")).to_have_count(count)
    expect(_group_with(page, "p1-small.jpg")).to_have_count(1)


def test_review_apply_moves_exactly_the_reviewed_files_and_undo_restores_them(browser_page, server, library_root):
    page = browser_page.page
    before = tree_hashes(library_root)
    groups = _reference_groups(library_root)
    by_keeper = {os.path.basename(g.keeper.path): g for g in groups}
    page.goto(f"{server}/?threshold={THRESHOLD}")
    page.wait_for_selector(".group")
    assert page.locator("#summary").inner_text().startswith(f"{sum(len(g.others) for g in groups)} files")

    # keep the half-size copy of p1 instead of p1 itself: p1.jpg is what moves now
    p1 = by_keeper["p1.jpg"]
    small = next(m for m in p1.others)
    section = _group_with(page, "p1.jpg")
    section.locator(".member", has=page.locator(".name", has_text=os.path.basename(small.path))) \
        .get_by_role("button", name="keep this").click()
    assert section.locator(".member").first.locator(".name").inner_text() == os.path.basename(small.path)
    assert "1 keeper changed" in page.locator("#summary").inner_text()

    # p2 and its re-encode are "not a duplicate": the group leaves the page and the plan
    _group_with(page, "p2.jpg").get_by_role("button", name="not duplicates").click()
    expect(page.locator(".group")).to_have_count(len(groups) - 1)
    expect(page.locator("#status")).to_contain_text("Marked")

    moving = {m.path for g in groups if g is not by_keeper["p1.jpg"] and g is not by_keeper["p2.jpg"]
              for m in g.others} | {p1.keeper.path}  # paths relative to the root
    assert page.locator("#summary").inner_text().startswith(f"{len(moving)} files")

    page.locator("#apply").click()
    confirm = page.locator("#confirm")
    confirm.wait_for(state="visible")
    page.keyboard.press("Escape")  # cancelled: nothing happens
    expect(confirm).to_be_hidden()
    assert not page.locator("#job").is_visible() and tree_hashes(library_root) == before

    page.locator("#apply").click()
    confirm.wait_for(state="visible")
    text = confirm.locator("#confirm-text").inner_text()
    assert text.startswith(f"Move {len(moving)} files (") and f"from the {len(groups) - 1} groups you reviewed" in text
    assert confirm.locator("#confirm-left").inner_text() == ""  # every group was on the page
    page.locator("#confirm-apply").click()
    expect(page.locator("#job-text")).to_have_text(re.compile(r"^Done"), timeout=60_000)
    expect(page.locator("#job-text")).to_have_text(f"Done: {len(moving)} files moved.")

    after = tree_hashes(library_root)
    gone = set(before) - set(after)
    assert gone == moving
    assert all(after[p] == before[p] for p in after)  # nothing else changed
    quarantined = set(tree_hashes(library_root / ".dinoseek" / "quarantine").values())
    assert {before[p] for p in gone} <= quarantined

    page.get_by_role("button", name="Undo").click()
    expect(page.locator("#job-text")).to_have_text(re.compile(r"^Restored"), timeout=60_000)
    expect(page.locator("#job-text")).to_have_text(f"Restored {len(moving)} files.")
    assert tree_hashes(library_root) == before
    expect(page.locator(".group")).to_have_count(len(groups) - 1)  # the restored groups are back on the page

    page.locator("#apply").click()  # cancelling a later confirmation does nothing either
    confirm.wait_for(state="visible")
    page.keyboard.press("Escape")
    expect(confirm).to_be_hidden()
    page.wait_for_timeout(500)
    assert tree_hashes(library_root) == before and page.locator("#job-text").inner_text().startswith("Restored")


def test_search_page_finds_an_uploaded_copy_first_and_searches_by_a_result(browser_page, server, library_root,
                                                                           tmp_path):
    page = browser_page.page
    page.goto(f"{server}/search")
    query = tmp_path / "query-upload.jpg"
    query.write_bytes((library_root / "b" / "p5.jpg").read_bytes())
    page.set_input_files("#file", str(query))
    page.wait_for_selector(".hit")
    first = page.locator(".hit").first
    assert first.locator(".name").inner_text() == "p5.jpg"
    assert float(first.locator(".score").inner_text()) >= 0.999
    _wait_until(page, "[...document.querySelectorAll('.hit img')].every(i => i.complete && i.naturalWidth > 0)")
    page.screenshot(path=str(tmp_path / "search.png"))

    second = page.locator(".hit").nth(1)
    name = second.locator(".name").inner_text()
    second.click()
    expect(page.locator("#query-caption")).to_have_text(re.compile(re.escape(name) + "$"))
    expect(page.locator(".hit").first.locator(".name")).not_to_have_text("p5.jpg")
    scores = [float(s) for s in page.locator(".hit .score").all_inner_texts()]
    names = page.locator(".hit .name").all_inner_texts()
    assert scores[0] >= 0.999 and name in [n for n, s in zip(names, scores) if s >= 0.999]  # itself (or a byte copy) first


def test_pages_load_nothing_from_outside_the_server(browser_page, server):
    page = browser_page.page
    for path in (f"/?threshold={THRESHOLD}", "/search"):
        page.goto(server + path)
        page.wait_for_load_state("networkidle")
    assert browser_page.requests and browser_page.outside() == []


def test_review_page_pages_through_many_groups(browser_page, server, tmp_path):
    """10,000 groups: the page asks the server for one page at a time and renders only it; `j` past
    the last group of a page loads the next. The groups API is stubbed here (the server's paging is
    tested in-process)."""
    page = browser_page.page
    asked = []

    def groups(route):
        params = dict(p.split("=", 1) for p in route.request.url.split("?", 1)[1].split("&"))
        offset, limit = int(params["offset"]), int(params["limit"])
        asked.append((offset, limit))
        members = lambda g: [{"id": 10 * g + i, "path": f"img/{g:05d}-{i}.jpg", "folder": "img", "width": 40,
                              "height": 30, "bytes": 1000, "format": "JPEG", "captured_at": None, "camera": None,
                              "similarity": 1.0 if i == 0 else 0.99, "reason": "r", "role": "keep" if i == 0 else "move"}
                             for i in range(2)]
        route.fulfill(json={"threshold": 0.95, "total_groups": 10_000, "offset": offset, "limit": limit,
                            "version": "v1", "summary": {"files": 10_000, "bytes": 10_000_000, "same_filesystem": True,
                                        "quarantine": "/q"},
                            "groups": [{"key": f"k{g}", "kind": "near", "min_similarity": 0.99, "keeper": 10 * g,
                                        "members": members(g)} for g in range(offset, min(10_000, offset + limit))]})

    page.route(re.compile(r".*/api/groups\?.*"), groups)
    page.route(re.compile(r".*/thumb/\d+.*"), lambda route: route.fulfill(status=404, json={"detail": "stub"}))
    page.goto(f"{server}/")
    page.wait_for_selector(".group")
    rendered = page.locator(".group").count()
    assert 0 < rendered <= 100 and asked[-1][1] == rendered
    assert "10,000 files" in page.locator("#summary").inner_text()
    assert "of 10,000" in page.locator("#pager-top").inner_text()
    for _ in range(rendered):
        page.keyboard.press("j")
    expect(page.locator(".group .title").first).to_have_text(re.compile(f"^Group {rendered + 1} "))
    assert asked[-1][0] == rendered
    page.locator("#pager-top .prev").click()
    expect(page.locator(".group .title").first).to_have_text(re.compile("^Group 1 "))

    page.locator("#pager-top .next").click()  # a second page seen: 100 groups reviewed of 10,000
    expect(page.locator(".group .title").first).to_have_text(re.compile(f"^Group {rendered + 1} "))


def test_apply_confirmation_and_request_name_only_the_groups_shown(browser_page, server, tmp_path):
    """10,000 groups, two pages seen: the dialog says what is acted on and what is left alone, and the
    apply request names the version and the 100 groups shown, nothing else (groups API stubbed)."""
    page = browser_page.page
    applied = []

    def groups(route):
        params = dict(p.split("=", 1) for p in route.request.url.split("?", 1)[1].split("&"))
        offset, limit = int(params["offset"]), int(params["limit"])
        members = lambda g: [{"id": 10 * g + i, "path": f"img/{g:05d}-{i}.jpg", "folder": "img", "width": 40,
                              "height": 30, "bytes": 1000, "format": "JPEG", "captured_at": None, "camera": None,
                              "similarity": 1.0 if i == 0 else 0.99, "reason": "r", "role": "keep" if i == 0 else "move"}
                             for i in range(2)]
        route.fulfill(json={"threshold": 0.95, "version": "v1", "total_groups": 10_000, "offset": offset,
                            "limit": limit, "summary": {"files": 10_000, "bytes": 10_000_000, "same_filesystem": True,
                                                        "quarantine": "/q", "sidecars": 0},
                            "groups": [{"key": f"k{g}", "kind": "near", "min_similarity": 0.99, "keeper": 10 * g,
                                        "members": members(g)} for g in range(offset, min(10_000, offset + limit))]})

    def apply(route):
        applied.append(route.request.post_data_json)
        route.fulfill(status=409, json={"detail": "stubbed: nothing applied"})

    page.route(re.compile(r".*/api/groups\?.*"), groups)
    page.route(re.compile(r".*/api/apply$"), apply)
    page.route(re.compile(r".*/thumb/\d+.*"), lambda route: route.fulfill(status=404, json={"detail": "stub"}))
    page.goto(f"{server}/")
    page.wait_for_selector(".group")
    page.locator("#pager-top .next").click()
    expect(page.locator(".group .title").first).to_have_text(re.compile("^Group 51 "))
    page.locator(".group").first.locator(".skip").click()
    summary = page.locator("#summary").inner_text()
    assert summary.startswith("99 files · 99.0 kB to set aside from 99 reviewed groups"), summary
    assert "all 10,000 groups here: 10,000 files" in summary and "9,900 not reviewed yet, left alone" in summary

    page.locator("#apply").click()
    confirm = page.locator("#confirm")
    confirm.wait_for(state="visible")
    assert confirm.locator("#confirm-text").inner_text() == \
        "Move 99 files (99.0 kB) from the 99 groups you reviewed to /q?"
    assert confirm.locator("#confirm-left").inner_text() == \
        "9,900 groups at this threshold were not reviewed (pages not opened) and will be left alone."
    assert confirm.locator("#confirm-note").inner_text().startswith("1 group skipped.")
    confirm.screenshot(path=str(tmp_path / "confirm.png"))
    page.locator("#confirm-apply").click()
    expect(page.locator("#status")).to_have_text("stubbed: nothing applied")
    assert len(applied) == 1
    body = applied[0]
    assert body["version"] == "v1" and body["skip"] == ["k50"] and body["threshold"] == 0.95
    assert sorted(body["groups"], key=lambda k: int(k[1:])) == [f"k{g}" for g in range(100)]


def test_keeper_chosen_then_another_member_marked_not_a_duplicate_still_applies(browser_page, three_server, three_root):
    """A member mark splits the group (its key goes): the keeper chosen on it must not make apply a 409."""
    page = browser_page.page
    before = tree_hashes(three_root)
    page.goto(f"{three_server}/?threshold={THRESHOLD}")
    page.wait_for_selector(".group")
    section = _group_with(page, "p1-reencoded.jpg")
    assert section.locator(".member").count() == 3
    default_keeper = section.locator(".member").first.locator(".name").inner_text()
    others = [n for n in section.locator(".member .name").all_inner_texts() if n != default_keeper]
    keep, unmark = others[0], others[1]
    section.locator(".member", has=page.locator(".name", has_text=re.compile(f"^{re.escape(keep)}$"))) \
        .get_by_role("button", name="keep this").click()
    section = _group_with(page, keep)
    assert section.locator(".member").first.locator(".name").inner_text() == keep
    section.locator(".member", has=page.locator(".name", has_text=re.compile(f"^{re.escape(unmark)}$"))) \
        .get_by_role("button", name="not a duplicate").click()
    expect(page.locator("#status")).to_contain_text(f"Marked {unmark} as not a duplicate")
    assert "keeper changed" not in page.locator("#summary").inner_text()  # the split group's choice is gone

    groups = _reference_groups(three_root)  # with the mark: the p1 group split
    moving = {m.path for g in groups for m in g.others}
    assert page.locator("#summary").inner_text().startswith(f"{len(moving)} files")  # not counted twice
    page.locator("#apply").click()
    page.locator("#confirm").wait_for(state="visible")
    page.locator("#confirm-apply").click()
    expect(page.locator("#job-text")).to_have_text(re.compile(r"^Done"), timeout=60_000)
    expect(page.locator("#status")).to_have_text("")  # no error once the groups are reloaded after the apply
    assert set(before) - set(tree_hashes(three_root)) == moving
    page.get_by_role("button", name="Undo").click()
    expect(page.locator("#job-text")).to_have_text(re.compile(r"^Restored"), timeout=60_000)
    assert tree_hashes(three_root) == before
