"""`dinoseek serve`'s safety: loopback by default, token -> cookie off loopback, Host check, CSRF header;
and the real command on uvicorn, started and stopped."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest
from dinoseek.retrieval.errors import InvalidArgumentError
from dinoseek.retrieval.server import create_app
from dinoseek.retrieval.server.security import COOKIE
from fastapi.testclient import TestClient
from test_retrieval import index_with_cli, make_library_photos

TOKEN = "s3cret-token"
PORT = 8765


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
        raise AssertionError(f"no URL printed: {line!r} {process.stderr.read()}")
    return process, found.group(1)


def _stop(process: subprocess.Popen) -> tuple[int, str]:
    process.send_signal(signal.SIGINT)  # Ctrl-C
    try:
        out, _ = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
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
        _stop(process)


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
