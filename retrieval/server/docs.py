"""/docs: Swagger UI over /openapi.json, with its script and style served by this server.

FastAPI's default /docs loads Swagger UI from cdn.jsdelivr.net: it would not work offline, and a
third-party script would run on the origin that holds the login cookie. This is FastAPI's
"self-hosting JavaScript and CSS for docs" recipe, with the files shipped by `fastapi-offline`
(swagger-ui-dist 5, which reads OpenAPI 3.1). The page gets the pages' Content-Security-Policy
from the app's guard (every HTML answer does).
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI, HTTPException
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

ASSETS = "/docs/assets"
# The only files served from the package: a name from the request never becomes a path by itself.
FILES = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css", "favicon.png": "image/png"}


def add_docs(app: FastAPI) -> None:
    static = resources.files("fastapi_offline").joinpath("static")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} API",
                                   swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{ASSETS}/favicon.png",
                                   # no badge fetched from validator.swagger.io
                                   swagger_ui_parameters={"validatorUrl": None})

    @app.get(ASSETS + "/{name}", include_in_schema=False)
    def asset(name: str) -> FileResponse:
        if name not in FILES:
            raise HTTPException(404, f"no docs asset {name!r}")
        return FileResponse(str(static.joinpath(name)), media_type=FILES[name],
                            headers={"Cache-Control": "private, max-age=86400"})
