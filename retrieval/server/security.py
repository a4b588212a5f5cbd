"""Who may talk to the server, checked on every request before any route runs.

1. Host: the Host header must name this server (127.0.0.1:PORT, localhost:PORT, [::1]:PORT or the
   bound host) else 400 — a page of another site whose name was re-pointed at 127.0.0.1 (DNS
   rebinding) sends its own name there. Bound to every address (0.0.0.0, ::), IP literals and this
   machine's own names are accepted too; a rebinding attack needs a name of its own.
2. Token (required when bound off loopback, optional on it): `?token=T` once, as in the URL printed
   at start, is exchanged for an HttpOnly SameSite=Strict cookie, as Jupyter does; without the
   cookie (or `Authorization: token T`) every request is 401. The URL token is taken by GET/HEAD
   only (the login redirect); any other method needs the cookie or header and then the CSRF check.
   The cookie's name carries the port: cookies are per host, not per port, so two servers on one
   machine would otherwise overwrite each other's.
3. CSRF: every request that is not GET/HEAD needs header X-CSRF-Token equal to the per-server token
   the pages carry in <meta name="csrf-token">, else 403. Another site open in the same browser can
   send a POST but cannot read the page to learn the token (no CORS headers are ever sent).
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import socket
from dataclasses import dataclass
from urllib.parse import urlencode

from dinoseek.retrieval.errors import InvalidArgumentError
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
WILDCARD = frozenset({"0.0.0.0", "::", ""})
COOKIE_PREFIX = "dinoseek_token"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD"})
HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}


def new_token() -> str:
    return secrets.token_urlsafe(24)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Security:
    host: str  # as bound
    port: int
    token: str | None  # None: no login (loopback only)
    csrf: str  # per server, filled into the pages
    extra_hosts: frozenset[str] = frozenset()  # Host values also accepted (tests: "testserver")
    # This machine's own names, looked up once here: a reverse DNS lookup (getfqdn) per request
    # would block the event loop before every login.
    own_names: frozenset[str] = frozenset()

    @classmethod
    def for_binding(cls, host: str, port: int, token: str | None = None,
                    extra_hosts: tuple[str, ...] = ()) -> Security:
        """Refuses (InvalidArgumentError) to serve off loopback without a token."""
        if not token and not is_loopback(host):
            raise InvalidArgumentError(f"binding {host} (not 127.0.0.1) needs a token: every request is refused "
                                       f"without one", argument="token")
        own = frozenset(_own_names()) if host in WILDCARD else frozenset()
        return cls(host, port, token or None, secrets.token_urlsafe(32), frozenset(h.lower() for h in extra_hosts),
                   own)

    @property
    def cookie(self) -> str:
        return cookie_name(self.port)

    # ---- the checks, in order ----------------------------------------------------------------
    def refusal(self, request: Request) -> Response | None:
        """None when the request may go on; else the response that refuses it."""
        if not self.host_allowed(request.headers.get("host", "")):
            return _error(400, "the Host header does not name this server (DNS rebinding?): open the URL "
                               "`dinoseek serve` printed")
        if self.token is not None:
            given = request.query_params.get("token")
            if request.method in SAFE_METHODS and given is not None and _same(given, self.token):
                return self._login(request)
            if not (_same(request.cookies.get(self.cookie, ""), self.token) or _same(_header_token(request), self.token)):
                return _error(401, "missing or wrong token: open the URL with ?token= that `dinoseek serve` printed")
        if request.method not in SAFE_METHODS and not _same(request.headers.get(CSRF_HEADER, ""), self.csrf):
            return _error(403, f"missing or wrong {CSRF_HEADER} header: reload the page")
        return None

    def host_allowed(self, header: str) -> bool:
        name, port = _split_host(header.strip().lower())
        if port is None:
            port = 80
        if name in self.extra_hosts or header.lower() in self.extra_hosts:
            return True
        if port != self.port:
            return False
        if name in LOOPBACK or name == self.host.lower():
            return True
        if self.host in WILDCARD:
            return _is_ip(name) or name in self.own_names
        return False

    def _login(self, request: Request) -> Response:
        """The token in the URL becomes a cookie; the browser goes on to the same URL without it
        (so it stays out of history, bookmarks and screenshots). Location is always a path on this
        server: a request path `//evil.example/x` must not become a scheme-relative URL elsewhere."""
        query = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
        path = "/" + request.url.path.lstrip("/\\")  # browsers read `/\host` as `//host` too
        response = RedirectResponse(path + (f"?{query}" if query else ""), status_code=303)
        response.set_cookie(self.cookie, self.token, httponly=True, samesite="strict", path="/")
        return response


def cookie_name(port: int) -> str:
    return f"{COOKIE_PREFIX}_{port}"


def _error(status: int, detail: str) -> Response:
    return JSONResponse({"detail": detail}, status_code=status, headers=HEADERS)


def _same(given: str, expected: str) -> bool:
    return bool(given) and hmac.compare_digest(given.encode(), expected.encode())


def _header_token(request: Request) -> str:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "token" else ""


def _split_host(header: str) -> tuple[str, int | None]:
    """"[::1]:8765" -> ("::1", 8765); "localhost" -> ("localhost", None); junk -> ("", None)."""
    if header.startswith("["):
        name, _, rest = header[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        name, _, port = header.rpartition(":") if ":" in header else (header, "", "")
    if port and not port.isdigit():
        return "", None
    return name, int(port) if port else None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def _own_names() -> set[str]:
    names = {socket.gethostname().lower()}
    try:
        names.add(socket.getfqdn().lower())
    except OSError:
        pass
    return names
