"""The review and search pages, read from the package and given this server's CSRF token."""

from __future__ import annotations

import html
from importlib import resources

PLACEHOLDER = "{{CSRF_TOKEN}}"  # in <meta name="csrf-token" content="{{CSRF_TOKEN}}">
PAGES = {"review": "review.html", "search": "search.html"}
# Self-contained pages: scripts, styles and images from this server only (nothing from a CDN can
# load, so the pages work offline and nothing else runs in them); thumbnails of uploads are blobs.
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
                           "img-src 'self' blob: data:; connect-src 'self'; frame-ancestors 'none'; "
                           "form-action 'self'; base-uri 'none'")


def page(name: str, csrf: str) -> str:
    """The page's HTML with the token filled in; a short placeholder page where it is not installed."""
    try:
        text = resources.files("dinoseek.retrieval.server").joinpath("pages", PAGES[name]).read_text("utf-8")
    except FileNotFoundError:
        text = _placeholder(name)
    return text.replace(PLACEHOLDER, html.escape(csrf, quote=True))


def _placeholder(name: str) -> str:
    return (f'<!doctype html><html><head><meta charset="utf-8">'
            f'<meta name="csrf-token" content="{PLACEHOLDER}"><title>dinoseek {name}</title></head>'
            f'<body><p>The {name} page is not installed; the JSON API is described at <a href="/docs">/docs</a>.</p>'
            f'</body></html>')
