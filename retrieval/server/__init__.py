"""`dinoseek serve`: a JSON API and review/search pages over the same functions as the CLI.

    from dinoseek.retrieval.server import create_app
    app = create_app("~/Pictures")  # an ASGI app; `dinoseek serve` runs it on uvicorn

Modules: `app` (the factory and routes), `library_access` (readers, the writer lock, the change
token), `groups` (cached candidate pairs -> duplicate groups per threshold), `files` (files and
thumbnails by catalog id only), `jobs` (apply/undo off the event loop, with progress), `security`
(loopback, token cookie, Host check, CSRF header), `pages` (the HTML pages with their CSRF token).
"""

from .app import create_app

__all__ = ["create_app"]
