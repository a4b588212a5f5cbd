"""`dinoseek serve`'s safety: loopback by default, token -> cookie off loopback, Host check, CSRF header;
and the real command on uvicorn, started and stopped."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from conftest import synthetic_photo
from dinoseek.retrieval.errors import InvalidArgumentError
from dinoseek.retrieval.server import create_app
from dinoseek.retrieval.server import thumbnails as thumbnails_module
from dinoseek.retrieval.server.files import FileNotServed, ServedFile, file_chunks
from dinoseek.retrieval.server.security import cookie_name
from dinoseek.retrieval.server.thumbnails import Thumbnails
from fastapi.testclient import TestClient
from test_retrieval import index_with_cli, make_library_photos

TOKEN = "s3cret-token"
PORT = 8765
COOKIE = cookie_name(PORT)
BIG_ID = 2**63  # one past the largest id SQLite can bind


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_folder):
    root = tmp_path_factory.mktemp("serve-security") / "photos"
    make_library_photos(root)
    index_with_cli(root, tiny_folder)
    return root


def client(root, base: str = f"http://127.0.0.1:{PORT}", **kwargs) -> TestClient:
    return TestClient(create_app(root, port=PORT, **kwargs), base_url=base, follow_redirects=False)


# ---- token ---------------------------------------------------------------------------------------
def test_binding_off_loopback_without_a_token_is_refused(root):
    with pytest.raises(InvalidArgumentError, match="needs a token"):
        create_app(root, host="0.0.0.0", port=PORT)


def test_loopback_needs_no_token(root):
    assert client(root).get("/api/info").status_code == 200


def test_without_the_token_every_request_is_401(root):
    c = client(root, host="0.0.0.0", token=TOKEN)
    for path in ("/", "/search", "/docs", "/openapi.json", "/api/info", "/api/groups", "/thumb/1", "/image/1",
                 "/api/jobs/x", f"/?token={TOKEN}x"):
        response = c.get(path)
        assert response.status_code == 401, path
        assert "token" in response.json()["detail"]
    assert c.post("/api/apply", json={}, headers={"X-CSRF-Token": c.app.state.csrf_token}).status_code == 401
    assert c.get("/api/info", cookies={COOKIE: "wrong"}).status_code == 401


def test_the_token_in_the_url_becomes_an_httponly_strict_cookie(root):
    c = client(root, host="0.0.0.0", token=TOKEN)
    response = c.get(f"/?token={TOKEN}&threshold=0.9")
    assert response.status_code == 303
    assert response.headers["location"] == "/?threshold=0.9"  # the token leaves the address bar
    cookie = response.headers["set-cookie"]
    assert f"{COOKIE}={TOKEN}" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert c.get("/api/info").status_code == 200  # the client kept the cookie
    assert c.get("/").status_code == 200


def test_a_token_header_works_for_scripts(root):
    c = client(root, host="0.0.0.0", token=TOKEN)
    assert c.get("/api/info", headers={"Authorization": f"token {TOKEN}"}).status_code == 200


def test_a_token_given_on_loopback_is_required_too(root):
    assert client(root, token=TOKEN).get("/api/info").status_code == 401


# ---- Host ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["evil.example:8765", "evil.example", "127.0.0.1:9999", "localhost", "",
                                  "127.0.0.1:8765.evil.example"])
def test_a_host_header_not_naming_the_server_is_400(root, host):
    response = client(root).get("/api/info", headers={"Host": host})
    assert response.status_code == 400
    assert "Host" in response.json()["detail"]


@pytest.mark.parametrize("host", ["127.0.0.1:8765", "localhost:8765", "[::1]:8765", "LOCALHOST:8765"])
def test_loopback_names_of_the_server_are_accepted(root, host):
    assert client(root).get("/api/info", headers={"Host": host}).status_code == 200


def test_bound_to_every_address_ip_hosts_are_accepted_names_are_not(root):
    c = client(root, host="0.0.0.0", token=TOKEN)
    auth = {"Authorization": f"token {TOKEN}"}
    assert c.get("/api/info", headers={"Host": "192.168.1.20:8765", **auth}).status_code == 200
    assert c.get("/api/info", headers={"Host": "rebind.evil.example:8765", **auth}).status_code == 400


def test_bound_to_one_name_that_name_is_accepted(root):
    c = client(root, host="photos.lan", token=TOKEN)
    auth = {"Authorization": f"token {TOKEN}"}
    assert c.get("/api/info", headers={"Host": "photos.lan:8765", **auth}).status_code == 200
    assert c.get("/api/info", headers={"Host": "other.lan:8765", **auth}).status_code == 400


def test_the_host_check_comes_before_the_token(root):
    c = client(root, host="0.0.0.0", token=TOKEN)
    assert c.get(f"/?token={TOKEN}", headers={"Host": "evil.example:8765"}).status_code == 400


# ---- CSRF ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("path,body", [("/api/apply", {"threshold": 0.98}), ("/api/undo", {}),
                                       ("/api/marks", {"ids": [1, 2]}), ("/api/marks/remove", {"ids": [1, 2]})])
def test_state_changing_posts_need_the_csrf_header(root, path, body):
    c = client(root)
    assert c.post(path, json=body).status_code == 403
    assert c.post(path, json=body, headers={"X-CSRF-Token": "guess"}).status_code == 403
    right = c.post(path, json=body, headers={"X-CSRF-Token": c.app.state.csrf_token})
    assert right.status_code != 403


def test_a_cross_site_form_post_is_refused(root):
    """What another site's <form method=post> can send: no custom header, a form body."""
    c = client(root)
    response = c.post("/api/undo", data={"journal": "x"}, headers={"Origin": "https://evil.example"})
    assert response.status_code == 403
    assert "X-CSRF-Token" in response.json()["detail"]


def test_search_by_upload_needs_the_csrf_header_too(root):
    c = client(root)
    assert c.post("/api/search", files={"image": ("a.jpg", b"x", "image/jpeg")}).status_code == 403


def test_each_server_has_its_own_csrf_token(root):
    assert client(root).app.state.csrf_token != client(root).app.state.csrf_token


def test_no_cors_headers_are_ever_sent(root):
    response = client(root).get("/api/info", headers={"Origin": "https://evil.example"})
    assert response.status_code == 200
    assert not any(h.lower().startswith("access-control-") for h in response.headers)
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"


# ---- the real command ----------------------------------------------------------------------------
def _start(root, *args) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DINOSEEK_PROGRESS": "off"}
    process = subprocess.Popen([sys.executable, "-c", "from dinoseek.retrieval.entry import run; run()", "serve",
                                str(root), "--port", "0", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env)
    line = process.stdout.readline()  # "serving ROOT at URL ..."
    found = re.search(r"at (http://\S+)", line)
    if not found:
        process.kill()
        process.wait(10)
        raise AssertionError(f"no URL printed: {line!r} {process.stderr.read()}")
    return process, found.group(1)


def _stop(process: subprocess.Popen) -> tuple[int, str]:
    process.send_signal(signal.SIGINT)  # Ctrl-C
    try:
        out, _ = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
        raise
    return process.returncode, out


def test_dinoseek_serve_prints_its_url_serves_and_stops_on_ctrl_c(root):
    process, url = _start(root)
    try:
        assert url.startswith("http://127.0.0.1:") and "token" not in url
        info = httpx.get(url + "api/info", timeout=30)
        assert info.status_code == 200 and info.json()["root"] == str(root.resolve())
        page = httpx.get(url, timeout=30)
        assert 'name="csrf-token"' in page.text
    finally:
        code, out = _stop(process)
    assert code == 0 and "stopped" in out


def test_dinoseek_serve_off_loopback_prints_a_token_url_and_refuses_without_it(root):
    process, url = _start(root, "--host", "0.0.0.0")
    try:
        token = re.search(r"\?token=(\S+)", url).group(1)
        port = int(re.search(r":(\d+)/", url).group(1))
        local = f"http://127.0.0.1:{port}/"
        assert httpx.get(local + "api/info", timeout=30).status_code == 401
        with httpx.Client(timeout=30, follow_redirects=True) as browser:
            login = browser.get(f"{local}?token={token}")  # follows the redirect, keeps the cookie
            assert login.status_code == 200 and 'name="csrf-token"' in login.text
            assert browser.get(local + "api/info").status_code == 200
    finally:
        code, _ = _stop(process)
    assert code == 0  # Ctrl-C stops it cleanly


def test_dinoseek_serve_on_a_folder_without_a_library_says_so_in_one_line(tmp_path):
    from click.testing import CliRunner
    from dinoseek.retrieval.cli import main

    result = CliRunner().invoke(main, ["serve", str(tmp_path), "--port", "0"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1


def test_deadline_for_the_real_server_is_short(root):
    """Starting the server does not load the model: it answers within seconds."""
    start = time.monotonic()
    process, url = _start(root)
    try:
        assert httpx.get(url + "api/info", timeout=30).status_code == 200
    finally:
        _stop(process)
    assert time.monotonic() - start < 60


# ---- review findings: each test fails on the code before its fix ----------------------------------
def test_a_url_token_on_a_post_does_not_skip_the_csrf_check(root):
    c = client(root, host="0.0.0.0", token=TOKEN)
    # a POST with the URL token only is not logged in: the token is taken from the URL by GET only
    csrf = {"X-CSRF-Token": c.app.state.csrf_token}
    assert c.post(f"/api/marks?token={TOKEN}", json={"ids": [1, 2]}, headers=csrf).status_code == 401
    c.cookies.set(COOKIE, TOKEN)  # logged in, as another site's form post would be sent
    response = c.post(f"/api/marks?token={TOKEN}", json={"ids": [1, 2]})
    assert response.status_code == 403 and "X-CSRF-Token" in response.json()["detail"]


@pytest.mark.parametrize("path,location", [("//evil.example/x", "/evil.example/x"),
                                           ("///evil.example", "/evil.example")])
def test_the_login_redirect_stays_on_this_server(root, path, location):
    c = client(root, host="0.0.0.0", token=TOKEN)
    response = c.get(f"http://127.0.0.1:{PORT}{path}?token={TOKEN}&threshold=0.9")
    assert response.status_code == 303
    assert response.headers["location"] == location + "?threshold=0.9"


def test_the_host_check_does_no_name_lookup_per_request(root, monkeypatch):
    c = client(root, host="0.0.0.0", token=TOKEN)  # this machine's names are looked up here, once

    def no_lookup(*_):
        raise AssertionError("a DNS lookup while answering a request")

    monkeypatch.setattr("socket.getfqdn", no_lookup)
    monkeypatch.setattr("socket.gethostname", no_lookup)
    assert c.get("/api/info", headers={"Host": "rebind.evil.example:8765"}).status_code == 400
    own = c.app.state.server.security.own_names
    assert own and all(c.get("/", headers={"Host": f"{name}:8765"}).status_code == 401 for name in own)


def _checked(photo: Path, root: Path, library_folder: Path) -> ServedFile:
    """What served_file returns for `photo` (the check), to swap the file before the read."""
    st = os.lstat(photo)
    return ServedFile(photo, hashlib.sha256(photo.read_bytes()).hexdigest(), st.st_size, "JPEG", st.st_dev, st.st_ino, root, library_folder)


@pytest.fixture
def swap(tmp_path):
    """A photo in ROOT and a secret outside it."""
    root = tmp_path / "photos"
    (root / "a").mkdir(parents=True)
    synthetic_photo(64, 48).save(root / "a" / "p.jpg")
    secret = tmp_path / "secret"
    secret.mkdir()
    synthetic_photo(64, 48, seed=1).save(secret / "p.jpg")
    return SimpleNamespace(root=root, photo=root / "a" / "p.jpg", secret=secret,
                           checked=_checked(root / "a" / "p.jpg", root, root / ".dinoseek"))


def test_a_photo_swapped_for_a_symlink_after_the_check_is_not_served(swap):
    swap.photo.unlink()
    swap.photo.symlink_to(swap.secret / "p.jpg")
    with pytest.raises(FileNotServed):
        b"".join(file_chunks(swap.checked))
    with pytest.raises(FileNotServed):
        Thumbnails(swap.root / ".dinoseek").get(swap.checked, 128)


def test_a_folder_swapped_for_a_symlink_after_the_check_is_not_served(swap):
    (swap.root / "a").rename(swap.root / "old")
    (swap.root / "a").symlink_to(swap.secret)
    with pytest.raises(FileNotServed):
        b"".join(file_chunks(swap.checked))
    with pytest.raises(FileNotServed):
        Thumbnails(swap.root / ".dinoseek").get(swap.checked, 128)


def test_the_checked_photo_is_served_from_the_one_file_it_opened(swap):
    assert b"".join(file_chunks(swap.checked)) == swap.photo.read_bytes()
    thumb = Thumbnails(swap.root / ".dinoseek").get(swap.checked, 128)
    assert thumb.startswith(b"\xff\xd8")


def test_ids_beyond_int64_are_one_json_line_with_the_security_headers(root):
    c = client(root)
    csrf = {"X-CSRF-Token": c.app.state.csrf_token}
    answers = [c.get(f"/image/{BIG_ID}"), c.get(f"/thumb/{BIG_ID}"), c.get(f"/api/similar/{BIG_ID}"),
               c.get("/api/search", params={"id": BIG_ID}),
               c.post("/api/marks", json={"ids": [BIG_ID, 1]}, headers=csrf)]
    for response in answers:
        assert 400 <= response.status_code < 500, response.request.url
        assert response.headers["content-type"] == "application/json"
        assert response.json()["detail"].count("\n") == 0
        assert response.headers["x-content-type-options"] == "nosniff"
    assert answers[0].status_code == answers[1].status_code == 404


def test_an_unexpected_error_is_a_json_500_with_the_security_headers(root, caplog):
    c = client(root)

    def broken():
        raise RuntimeError("boom\nsecond line")

    c.app.add_api_route("/broken", broken)
    c = TestClient(c.app, base_url=f"http://127.0.0.1:{PORT}", raise_server_exceptions=False)
    response = c.get("/broken")
    assert response.status_code == 500
    assert response.json() == {"detail": "internal error: boom"}
    assert response.headers["x-content-type-options"] == "nosniff"
    assert any(r.exc_info and "boom" in str(r.exc_info[1]) for r in caplog.records)  # the traceback is logged


def test_docs_load_no_script_from_another_site(root):
    c = client(root)
    docs = c.get("/docs")
    assert docs.status_code == 200 and "SwaggerUIBundle" in docs.text
    assert "cdn.jsdelivr" not in docs.text and not re.search(r"(src|href)=.https?:", docs.text)
    assert "default-src 'self'" in docs.headers["content-security-policy"]
    for asset in re.findall(r"(?:src|href)=.(/docs/assets/[^'\"]+)", docs.text):
        assert c.get(asset).status_code == 200, asset
    assert c.get("/docs/assets/..%2F__init__.py").status_code == 404
    assert c.get("/redoc").status_code == 404  # would load redoc from a CDN


@pytest.mark.parametrize("path", ["/", "/search", "/docs"])
def test_every_page_has_the_content_security_policy(root, path):
    response = client(root).get(path)
    assert response.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in response.headers["content-security-policy"]


def test_the_cookie_name_carries_the_port(root):
    names = set()
    for port in (8765, 8766):
        c = TestClient(create_app(root, host="0.0.0.0", port=port, token=TOKEN), base_url=f"http://127.0.0.1:{port}",
                       follow_redirects=False)
        names.add(c.get(f"/?token={TOKEN}").headers["set-cookie"].split("=")[0])
        assert c.get("/api/info").status_code == 200
    assert len(names) == 2 and names == {cookie_name(8765), cookie_name(8766)}


def test_photos_are_not_embeddable_by_other_sites(root):
    c = client(root)
    for path in ("/image/1", "/thumb/1"):
        response = c.get(path)
        assert response.status_code == 200, path
        assert response.headers["cross-origin-resource-policy"] == "same-origin"


def test_thumbnail_sizes_snap_to_a_few_fixed_sides(swap):
    thumbnails = Thumbnails(swap.root / ".dinoseek")
    asked = {1: 128, 100: 128, 128: 128, 130: 256, 300: 512, 1000: 1024, 5000: 1024}
    for side, snapped in asked.items():
        thumbnails.get(swap.checked, side)
        assert thumbnails.path_for(swap.checked.sha256, swap.checked.size, snapped).exists(), side
    assert len(list(thumbnails.folder.rglob("*.jpg"))) == 4


def test_thumbnail_decodes_are_limited_to_four_at_once(swap, monkeypatch):
    running, most, lock = 0, 0, threading.Lock()
    real_read = thumbnails_module.read_image

    def slow_read(*args, **kwargs):
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.2)
        with lock:
            running -= 1
        return real_read(*args, **kwargs)

    monkeypatch.setattr(thumbnails_module, "read_image", slow_read)
    thumbnails = Thumbnails(swap.root / ".dinoseek")
    photos = [ServedFile(**{**swap.checked.__dict__, "sha256": f"{i:064x}"}) for i in range(10)]  # no cache hits
    threads = [threading.Thread(target=thumbnails.get, args=(photo, 256)) for photo in photos]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert most == 4
