"""GET /: the drawing page (plain HTML, CSS and JavaScript shipped in service/static, no build step).

The files are read once, when the app is built, and served from memory with an ETag; only the
names listed here are served (never a path a client gives). The page talks to the API with URLs
relative to itself, so it also works behind a proxy that mounts the service under a prefix.
"""

from __future__ import annotations

import hashlib
from importlib import resources

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse

STATIC_PACKAGE = "service.static"
# The page's ES modules (app.js imports the other two) and its style sheet.
ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "geometry.js": "text/javascript; charset=utf-8",
    "results.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
PAGE = "index.html"
# Everything the page loads comes from this origin: no CDN, no inline script.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def read_static(name: str) -> bytes:
    return resources.files(STATIC_PACKAGE).joinpath(name).read_bytes()


def build_router() -> APIRouter:
    router = APIRouter(tags=["page"])
    files = {name: read_static(name) for name in (PAGE, *ASSETS)}
    etags = {name: f'"{hashlib.sha256(data).hexdigest()[:32]}"' for name, data in files.items()}

    def serve(request: Request, name: str, media: str) -> Response:
        headers = {
            "ETag": etags[name],
            "Cache-Control": "no-cache",  # revalidate: a new release is picked up on reload
            "X-Content-Type-Options": "nosniff",
        }
        if name == PAGE:
            headers["Content-Security-Policy"] = CSP
            headers["Referrer-Policy"] = "no-referrer"
        if request.headers.get("if-none-match") == etags[name]:
            return Response(status_code=304, headers=headers)
        return Response(files[name], media_type=media, headers=headers)

    @router.get(
        "/",
        summary="The drawing page: sketch in the browser, see the matching photos",
        response_class=HTMLResponse,
        responses={
            200: {"description": "the page (HTML)", "content": {"text/html": {"schema": {"type": "string"}}}},
            304: {"description": "unchanged since the ETag the client holds"},
        },
    )
    async def page(request: Request) -> Response:
        return serve(request, PAGE, "text/html; charset=utf-8")

    def asset_route(name: str, media: str):
        async def asset(request: Request) -> Response:
            return serve(request, name, media)

        asset.__name__ = f"static_{name.replace('.', '_')}"
        return asset

    for name, media in ASSETS.items():
        router.add_api_route(
            f"/static/{name}", asset_route(name, media), methods=["GET"], include_in_schema=False
        )
    return router
