"""/docs (Swagger UI) and /redoc, served with their assets from this service: no CDN, no font
or favicon host, so the pages work on a machine with no route to the internet.

FastAPI's own pages load Swagger UI and ReDoc from cdn.jsdelivr.net, ReDoc's fonts from
fonts.googleapis.com and the favicon from fastapi.tiangolo.com. We keep FastAPI's page
templates (`get_swagger_ui_html`, `get_redoc_html`, its "Self-Hosting" recipe) and point them
at app/static/docs/.

Why vendored, not a PyPI package: of the packages that ship these files, drf-spectacular-sidecar
is the one kept current with licences and exact versions, but it depends on Django;
fastapi-offline (one maintainer) ships Swagger UI 5.32.6 and ReDoc 2.5.3 as of November 2026,
months behind, without their licence files or a stated version; swagger-ui-bundle stops at
Swagger UI 4.15.5 and has no ReDoc. So app/static/docs/ holds the exact release files of
swagger-ui-dist and redoc from npm, with their licences and package.json (the version is read
from there), written by scripts/vendor-docs-assets.sh and pinned by its SHA256SUMS. ReDoc stays
on 2.x, the major FastAPI's template is written for.

Both pages also carry a Content-Security-Policy that lets them fetch from this origin only.
The bundles do reach out on their own: ReDoc 2.5.4 (and 3.x) always shows its "API docs by
Redocly" logo from cdn.redoc.ly, with no option to turn it off; the policy stops that request in
the browser (ReDoc then drops the image), and does the same for any image a description links.

Swagger's /docs/oauth2-redirect is deliberately absent: it only completes an OAuth2 login, and
this API declares no OAuth2 security scheme (tests/test_docs_browser.py fails if one appears).
"""

from __future__ import annotations

import json
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_DIR = Path(__file__).parent / "static" / "docs"
ASSETS_URL = "/docs/static"


def _version(package: str) -> str:
    """The release vendored for `package`, from its own package.json."""
    data = json.loads((ASSETS_DIR / package / "package.json").read_text())
    version: str = data["version"]
    return version


# The npm package names, which are also the directory names under ASSETS_DIR.
VERSIONS = {package: _version(package) for package in ("swagger-ui-dist", "redoc")}

# 'unsafe-inline': FastAPI's Swagger page starts Swagger UI from an inline script, and both UIs
# inject <style> elements. ReDoc runs its search index in a worker made from a blob: URL; both
# draw icons from data: URLs. Swagger UI shows an image answer (/sample's image/png) from a blob:
# URL its own script made of the response.
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self' 'unsafe-inline'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data: blob:",
        "font-src 'self' data:",
        "worker-src 'self' blob:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "frame-ancestors 'self'",
    )
)

# Swagger UI asks validator.swagger.io about the spec by default; no badge, no request.
SWAGGER_UI_PARAMETERS = {"validatorUrl": None}

docs_router = APIRouter(include_in_schema=False)


def _asset(request: Request, package: str, file: str) -> str:
    # The version in the query string: StaticFiles ignores it, and a browser that cached an
    # older release refetches after an upgrade. root_path keeps the URLs right behind a proxy
    # that strips a prefix, as FastAPI's own docs routes do.
    return f"{_root(request)}{ASSETS_URL}/{package}/{file}?v={VERSIONS[package]}"


def _root(request: Request) -> str:
    root: str = request.scope.get("root_path", "")
    return root.rstrip("/")


def _openapi_url(request: Request) -> str:
    app: FastAPI = request.app
    return _root(request) + (app.openapi_url or "")


def _with_policy(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return page


@docs_router.get("/docs")
async def swagger_ui_html(request: Request) -> HTMLResponse:
    page = get_swagger_ui_html(
        openapi_url=_openapi_url(request),
        title=f"{request.app.title} - Swagger UI",
        swagger_js_url=_asset(request, "swagger-ui-dist", "swagger-ui-bundle.js"),
        swagger_css_url=_asset(request, "swagger-ui-dist", "swagger-ui.css"),
        swagger_favicon_url=_asset(request, "swagger-ui-dist", "favicon-32x32.png"),
        oauth2_redirect_url=None,
        swagger_ui_parameters=SWAGGER_UI_PARAMETERS,
    )
    return _with_policy(page)


@docs_router.get("/redoc")
async def redoc_html(request: Request) -> HTMLResponse:
    page = get_redoc_html(
        openapi_url=_openapi_url(request),
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=_asset(request, "redoc", "redoc.standalone.js"),
        redoc_favicon_url=_asset(request, "swagger-ui-dist", "favicon-32x32.png"),
        with_google_fonts=False,
    )
    return _with_policy(page)


def install_docs(app: FastAPI) -> None:
    """Serve /docs, /redoc and their assets; the app must be built with docs_url=None and
    redoc_url=None, so FastAPI's CDN-backed pages are not registered first."""
    app.include_router(docs_router)
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS_DIR), name="docs-assets")
