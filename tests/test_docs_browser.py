"""/docs and /redoc work offline: their assets come from this service, and real headless
Chromium renders every operation with every host but 127.0.0.1 blocked.

The browser is Debian's `chromium`, which .ci/run installs. Where it is missing the browser tests
fail when CI is set (.ci/run sets it) and skip, saying why, elsewhere, so `make test` still runs on
a laptop without Chromium. A screenshot of /docs is left in build/docs.png (ignored by git).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import zipfile
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.docs import ASSETS_DIR, ASSETS_URL, CONTENT_SECURITY_POLICY, VERSIONS
from app.main import create_app
from app.settings import Settings
from tests.conftest import REPO, Server, require_tool

pytestmark = [pytest.mark.browser, pytest.mark.server]

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking")
# Every request goes to a proxy on a closed port and fails there, before any DNS lookup, except
# requests to 127.0.0.1. "<-loopback>" drops Chromium's implicit bypass for localhost and the
# other loopback names, so the one way out is the literal address the test server listens on.
BLOCK_NETWORK = ("--proxy-server=127.0.0.1:1", "--proxy-bypass-list=<-loopback>;127.0.0.1")
# For the control visit without the proxy: no name resolves but localhost, so Chromium's own
# background requests (updates, sign-in) cannot leave the machine either.
RESOLVE_ONLY_LOCALHOST = ("--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost",)
ERR_PROXY_CONNECTION_FAILED = -130  # Chromium's net/base/net_error_list.h
SCREENSHOT = REPO / "build" / "docs.png"
SWAGGER_POST_GREEN = (73, 204, 144)  # swagger-ui.css: .opblock-post .opblock-summary-method


# --- the browser -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium() -> str:
    return require_tool("chromium", "apt-get install -y chromium; .ci/run installs it")


@dataclass(frozen=True)
class Request:
    url: str
    by_page: bool  # the navigation or one of its subresources, not Chromium's own traffic
    status: int | None  # None: no response arrived
    net_error: int | None


@dataclass(frozen=True)
class Visit:
    dom: str
    console: list[str]
    requests: list[Request]

    def page_requests(self) -> set[tuple[str, int | None]]:
        """(URL without its query, status) of everything the page asked for."""
        return {(r.url.split("?")[0], r.status) for r in self.requests if r.by_page}


def visit(chromium: str, url: str, workdir: Path, *flags: str, block: bool = True) -> Visit:
    """One headless Chromium run on `url`, with a fresh profile (nothing cached) and a NetLog,
    Chromium's own record of every request it made and how each ended."""
    netlog = workdir / "netlog.json"
    cmd = [
        chromium,
        *CHROMIUM_FLAGS,
        *(BLOCK_NETWORK if block else RESOLVE_ONLY_LOCALHOST),
        f"--user-data-dir={workdir / 'profile'}",
        f"--log-net-log={netlog}",
        "--enable-logging=stderr",  # the page's console, CSP violations included
        "--virtual-time-budget=10000",  # let the scripts fetch the schema and render first
        *flags,
        url,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return Visit(proc.stdout, console, read_netlog(netlog))


def read_netlog(path: Path) -> list[Request]:
    log = json.loads(path.read_text())
    names = {code: name for name, code in log["constants"]["logEventTypes"].items()}
    begin = log["constants"]["logEventPhase"]["PHASE_BEGIN"]
    by_source: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for event in log["events"]:
        by_source[event["source"]["id"]].append(event)
    requests = []
    for events in by_source.values():
        starts = [
            e["params"]
            for e in events
            if names[e["type"]] == "URL_REQUEST_START_JOB" and e["phase"] == begin
        ]
        if not starts:
            continue
        status = net_error = None
        for e in events:
            params = e.get("params", {})
            if names[e["type"]] == "HTTP_TRANSACTION_READ_RESPONSE_HEADERS":
                status = int(params["headers"][0].split()[1])  # "HTTP/1.1 200 OK"
            net_error = params.get("net_error", net_error)
        # A page's subresources carry its origin as initiator; Chromium's own requests have none.
        start = starts[0]
        by_page = start.get("request_type") == "main frame" or start["initiator"] != "not an origin"
        requests.append(Request(start["url"], by_page, status, net_error))
    return requests


def outcome(v: Visit, url: str) -> tuple[int | None, int | None]:
    """(status, net error) of the one request for `url`."""
    [request] = [r for r in v.requests if r.url == url]
    return request.status, request.net_error


def outside_answers(v: Visit) -> list[Request]:
    """Requests to any host but 127.0.0.1 that got a response: there must be none."""
    return [r for r in v.requests if urlsplit(r.url).hostname != "127.0.0.1" and r.status]


class OperationsParser(HTMLParser):
    """(METHOD, path) of every operation the rendered page shows.

    Swagger UI: `<div class="opblock opblock-post">` ... `<span data-path="/encode">`.
    ReDoc: `<span type="post" class="... http-verb post">post</span><span>/encode</span>`."""

    def __init__(self) -> None:
        super().__init__()
        self.operations: set[tuple[str, str]] = set()
        self._swagger_method = ""
        self._redoc_method = ""
        self._redoc_path_next = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = dict(attrs)
        classes = (attr.get("class") or "").split()
        if "opblock" in classes:
            self._swagger_method = next(c[8:] for c in classes if c.startswith("opblock-"))
        if "opblock-summary-path" in classes and attr.get("data-path"):
            self.operations.add((self._swagger_method.upper(), str(attr["data-path"])))
        if tag == "span" and self._redoc_method:
            self._redoc_path_next = True
        if tag == "span" and "http-verb" in classes:
            self._redoc_method = str(attr.get("type"))

    def handle_data(self, data: str) -> None:
        if self._redoc_path_next:
            self.operations.add((self._redoc_method.upper(), data))
            self._redoc_method, self._redoc_path_next = "", False


def rendered_operations(dom: str) -> set[tuple[str, str]]:
    parser = OperationsParser()
    parser.feed(dom)
    return parser.operations


def spec_operations(server: Server) -> set[tuple[str, str]]:
    spec = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    return {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops}


def asset(server: Server, package: str, file: str) -> str:
    return f"{server.url}{ASSETS_URL}/{package}/{file}"


@pytest.fixture(scope="module")
def server(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One real `python -m app` (conftest's Server, as `start_server` makes them) for all the
    browser tests: they only read from it, and each start costs seconds of loading."""
    log = tmp_path_factory.mktemp("docs-server") / "server.log"
    s = Server({"VAE_MODEL_PATH": str(tiny_artifact)}, log)  # it passes on no VAE_* of ours
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


# --- the pages in Chromium ---------------------------------------------------------------------


def test_docs_renders_every_operation_with_the_network_blocked(
    chromium: str, server: Server, tmp_path: Path
) -> None:
    v = visit(chromium, f"{server.url}/docs", tmp_path, "--dump-dom")
    operations = spec_operations(server)
    assert len(operations) >= 7  # the four model calls, /health, /ready, /model
    assert rendered_operations(v.dom) == operations
    assert v.page_requests() == {
        (f"{server.url}/docs", 200),
        (asset(server, "swagger-ui-dist", "swagger-ui.css"), 200),
        (asset(server, "swagger-ui-dist", "swagger-ui-bundle.js"), 200),
        (asset(server, "swagger-ui-dist", "favicon-32x32.png"), 200),
        (f"{server.url}/openapi.json", 200),
    }
    assert outside_answers(v) == []
    assert [line for line in v.console if "Content Security Policy" in line] == []


def test_redoc_renders_every_operation_with_the_network_blocked(
    chromium: str, server: Server, tmp_path: Path
) -> None:
    v = visit(chromium, f"{server.url}/redoc", tmp_path, "--dump-dom")
    assert rendered_operations(v.dom) == spec_operations(server)
    # No request for ReDoc's "API docs by Redocly" logo from cdn.redoc.ly: the page's policy
    # stops it in the browser, so it is a console line here, not a request.
    assert v.page_requests() == {
        (f"{server.url}/redoc", 200),
        (asset(server, "redoc", "redoc.standalone.js"), 200),
        (asset(server, "swagger-ui-dist", "favicon-32x32.png"), 200),
        (f"{server.url}/openapi.json", 200),
    }
    assert outside_answers(v) == []
    blocked = [line for line in v.console if "Content Security Policy" in line]
    assert all("https://cdn.redoc.ly/redoc/logo-mini.svg" in line for line in blocked), blocked


def test_docs_screenshot_shows_the_operations(
    chromium: str, server: Server, tmp_path: Path
) -> None:
    SCREENSHOT.parent.mkdir(exist_ok=True)
    SCREENSHOT.unlink(missing_ok=True)
    shot = f"--screenshot={SCREENSHOT}"
    visit(chromium, f"{server.url}/docs", tmp_path, shot, "--window-size=1280,2000")
    with Image.open(SCREENSHOT) as image:
        assert image.size == (1280, 2000)
        colours = {rgb for _, rgb in image.convert("RGB").getcolors(maxcolors=1 << 20) or []}
    assert SWAGGER_POST_GREEN in colours  # the POST badges were drawn, so the spec rendered


def test_the_browser_reaches_127_0_0_1_only(chromium: str, server: Server, tmp_path: Path) -> None:
    """The negative control: the same server under the name `localhost` answers without the
    block and is cut off with it, and an outside URL fails at the proxy, not at DNS."""
    by_name = f"http://localhost:{server.port}/health"
    open_ = visit(chromium, by_name, tmp_path / "open", "--dump-dom", block=False)
    assert (by_name, 200) in open_.page_requests()
    assert '{"status":"ok"}' in open_.dom

    blocked = visit(chromium, by_name, tmp_path / "blocked", "--dump-dom")
    assert outcome(blocked, by_name) == (None, ERR_PROXY_CONNECTION_FAILED)
    assert '{"status":"ok"}' not in blocked.dom

    cdn = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css"
    outside = visit(chromium, cdn, tmp_path / "outside", "--dump-dom")
    assert outcome(outside, cdn) == (None, ERR_PROXY_CONNECTION_FAILED)


# --- the pages and assets as served ------------------------------------------------------------


@pytest.fixture
def client(tiny_artifact: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(model_path=tiny_artifact))) as c:
        yield c


class LinksParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.links += [v for k, v in attrs if k in ("src", "href", "spec-url") and v]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_only_from_this_service(client: TestClient, page: str) -> None:
    html = client.get(page).text
    parser = LinksParser()
    parser.feed(html)
    assert parser.links, html
    assert all(link.startswith(("/docs/static/", "/openapi.json")) for link in parser.links)
    assert re.findall(r"https?://", html) == []


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_allow_this_origin_only(client: TestClient, page: str) -> None:
    policy = client.get(page).headers["content-security-policy"]
    assert policy == CONTENT_SECURITY_POLICY
    sources = {s for directive in policy.split("; ") for s in directive.split()[1:]}
    assert sources <= {"'self'", "'unsafe-inline'", "'none'", "data:", "blob:"}


def test_swagger_css_fetches_nothing(client: TestClient) -> None:
    css = client.get(f"{ASSETS_URL}/swagger-ui-dist/swagger-ui.css").text
    urls = re.findall(r"url\(\s*['\"]?([^'\")]*)", css)
    assert urls
    assert [u for u in urls if not u.startswith("data:")] == []
    assert "@import" not in css


def test_docs_assets_are_the_vendored_release_files(client: TestClient) -> None:
    sums = (ASSETS_DIR / "SHA256SUMS").read_text().splitlines()
    assert len(sums) == 11
    for line in sums:
        digest, name = line.split("  ")
        assert hashlib.sha256((ASSETS_DIR / name).read_bytes()).hexdigest() == digest, name
        served = client.get(f"{ASSETS_URL}/{name}")
        assert served.status_code == 200
        assert hashlib.sha256(served.content).hexdigest() == digest, name
    sources = (ASSETS_DIR / "SOURCES.md").read_text()
    for package, version in VERSIONS.items():
        assert json.loads((ASSETS_DIR / package / "package.json").read_text())["name"] == package
        assert f"`{package}@{version}`" in sources
        assert (ASSETS_DIR / package / "LICENSE").is_file()


def test_docs_page_names_the_vendored_versions(client: TestClient) -> None:
    html = client.get("/docs").text + client.get("/redoc").text
    assert f"swagger-ui-bundle.js?v={VERSIONS['swagger-ui-dist']}" in html
    assert f"redoc.standalone.js?v={VERSIONS['redoc']}" in html


def test_docs_have_no_oauth2_redirect_as_the_api_has_no_oauth2(client: TestClient) -> None:
    schemes = client.get("/openapi.json").json().get("components", {}).get("securitySchemes", {})
    assert [s for s in schemes.values() if s["type"] in ("oauth2", "openIdConnect")] == [], (
        "an OAuth2 scheme needs Swagger's oauth2-redirect page: serve it in app/docs.py"
    )
    assert client.get("/docs/oauth2-redirect").status_code == 404
    assert "oauth2RedirectUrl" not in client.get("/docs").text


def test_docs_pages_follow_the_root_path(tiny_artifact: Path) -> None:
    app = create_app(Settings(model_path=tiny_artifact))
    with TestClient(app, root_path="/vae") as client:
        docs, redoc = client.get("/docs").text, client.get("/redoc").text
    assert "url: '/vae/openapi.json'" in docs
    assert 'href="/vae/docs/static/swagger-ui-dist/swagger-ui.css?v=' in docs
    assert 'spec-url="/vae/openapi.json"' in redoc
    assert 'src="/vae/docs/static/redoc/redoc.standalone.js?v=' in redoc


def test_wheel_ships_the_docs_assets(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("app", "training"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    # No build isolation: the venv's setuptools builds it, so nothing is downloaded.
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip, "-w", str(tmp_path), str(src)], check=True, capture_output=True)
    [wheel] = tmp_path.glob("vae_service-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for line in (ASSETS_DIR / "SHA256SUMS").read_text().splitlines():
        assert f"app/static/docs/{line.split('  ')[1]}" in names
