"""``/docs`` (Swagger UI) and ``/redoc`` (ReDoc), served entirely by the service: no CDN, no outside favicon.

FastAPI's default pages load Swagger UI's and ReDoc's scripts and styles from a public CDN and the favicon from
another site, so on a machine without internet (an air-gapped cluster) they are blank. Here the assets come from
the pinned ``fastapi-offline`` wheel (its ``static/`` directory: swagger-ui-dist's bundle and stylesheet, ReDoc's
standalone bundle, FastAPI's favicon) and are served under ``/docs/assets/``; the pages are FastAPI's own
``get_swagger_ui_html`` / ``get_redoc_html`` pointed at them. Swagger UI's validator badge, which calls
validator.swagger.io, is turned off; ReDoc's Google Fonts link is left out. ReDoc's bundle also draws its
"API docs by Redocly" footer with a logo from cdn.redoc.ly, hard-coded, with no option to turn it off: the pages
carry a Content-Security-Policy that allows loads from the service only, so the browser never asks for it (the
image hides itself when it fails to load).

``create_app`` builds the app with ``docs_url=None, redoc_url=None`` and includes ``router``.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse

DOCS_URL = "/docs"
REDOC_URL = "/redoc"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"
ASSETS_URL = "/docs/assets"
# name -> media type: the only files served (a fixed list, so no request names a path on the server).
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
    "favicon.png": "image/png",
}
# Swagger UI's options: FastAPI's defaults plus no validator (its badge fetches validator.swagger.io).
SWAGGER_UI_PARAMETERS = {"validatorUrl": None}

# Only the service's own files. Swagger UI starts from an inline script; both UIs set inline styles; ReDoc builds
# its search worker from a blob: URL and Swagger UI draws some icons as data: images.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; "
    "frame-ancestors 'self'; base-uri 'self'; form-action 'self'"
)

router = APIRouter(include_in_schema=False)


def _self_only(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return page


@cache
def _asset(name: str) -> bytes:
    return (files("fastapi_offline") / "static" / name).read_bytes()


def _prefix(request: Request) -> str:
    """The path the app is mounted under (behind a proxy that strips a prefix), so asset URLs stay right."""
    return str(request.scope.get("root_path", "")).rstrip("/")


@router.get(DOCS_URL)
async def swagger_ui(request: Request) -> HTMLResponse:
    root, app = _prefix(request), request.app
    return _self_only(
        get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=f"{root}{OAUTH2_REDIRECT_URL}",
            swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            swagger_ui_parameters={**SWAGGER_UI_PARAMETERS, **(app.swagger_ui_parameters or {})},
        )
    )


@router.get(OAUTH2_REDIRECT_URL)
async def swagger_ui_oauth2_redirect() -> HTMLResponse:
    return _self_only(get_swagger_ui_oauth2_redirect_html())


@router.get(REDOC_URL)
async def redoc(request: Request) -> HTMLResponse:
    root, app = _prefix(request), request.app
    return _self_only(
        get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            with_google_fonts=False,
        )
    )


@router.get(ASSETS_URL + "/{name}")
async def asset(name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise HTTPException(status_code=404, detail="Not Found")
    # The files change only with the pinned package: a day of browser caching is safe.
    return Response(_asset(name), media_type=media_type, headers={"Cache-Control": "public, max-age=86400"})
