"""Running the app on uvicorn: bind first (so port 0 gets a real port the Host check can name),
then serve until Ctrl-C, which uvicorn turns into a graceful shutdown."""

from __future__ import annotations

import socket

import uvicorn
from fastapi import FastAPI

from .security import WILDCARD, is_loopback, new_token


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one); OSError when it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=128)


def token_for(host: str, token: str | None) -> str | None:
    """The token a binding needs: the one given, else a new one off loopback, else none."""
    return token or (None if is_loopback(host) else new_token())


def url_of(host: str, port: int, token: str | None) -> str:
    """The URL to open, as printed at start (with ?token= when there is one)."""
    shown = socket.gethostname() if host in WILDCARD else host
    shown = f"[{shown}]" if ":" in shown else shown
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


def serve(app: FastAPI, sock: socket.socket) -> None:
    """Serve on `sock` until Ctrl-C (or SIGTERM), then return; running jobs finish first (see
    app.create_app). uvicorn shuts down gracefully on the signal and then raises it again for the
    caller: here that is the way out, not an interruption."""
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
