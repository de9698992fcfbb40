"""Admission control in front of every route: API keys, body size, in-flight bound, timeout,
and clients that hang up.

A pure ASGI middleware, not Starlette's `BaseHTTPMiddleware`: it adds no task or stream per
request, and it can answer before the body is read. Its order of checks is the order of cost:

1. the key (401, or 403 on the admin routes, /admin and /v2/repository, for a key that is not
   an admin key), so an unauthenticated caller gets nothing else;
2. the declared body size (413), before a byte of the body is read; a body without a declared
   size (chunked) is counted as it arrives and cut off at the limit;
3. for model requests (every POST outside the admin routes): draining (503 once SIGTERM
   arrived), then the in-flight bound (503 with Retry-After), then the timeout (504). Once
   such a request's body is read and it has run for WATCH_AFTER_S, the Guard listens for the
   client hanging up and cancels the request's work: its job leaves the batcher's queue
   unrun, so a client's timeout does not leave work behind.

Paths are matched as the router matches them, after the root path (uvicorn --root-path, a Ray
route_prefix), which ASGI puts in front of `path`: a prefix must neither open /admin nor close
the probes.

Every refusal is one sentence in the shape of the protocol asked: `{"detail": ...}`, or
`{"error": ...}` on /v2 paths, as V2 clients expect (errors.error_payload).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
from collections.abc import Awaitable

import orjson
from pydantic import SecretStr
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.common import routed_path
from app.errors import error_payload, speaks_v2
from app.lifecycle import Lifecycle
from app.settings import Settings

# Open without a key: probes, and the docs (they describe the API, they serve no data).
OPEN_PATHS = frozenset({"/health", "/ready", "/docs", "/docs/oauth2-redirect", "/redoc",
                        "/openapi.json", "/v2/health/live", "/v2/health/ready"})  # fmt: skip
OPEN_PREFIXES = ("/docs/static/",)
# Admin routes: the service's own, and V2's model repository extension (load, unload, index).
ADMIN_PREFIXES = ("/admin/", "/v2/repository/")
RETRY_AFTER_S = 1
WATCH_AFTER_S = 0.005  # a model request still running this long gets a hang-up watcher
KEY_REQUIRED = "A valid API key is required: send Authorization: Bearer <key> or X-API-Key."
ADMIN_KEY_REQUIRED = "An admin key is required: send Authorization: Bearer <key> or X-API-Key."
Refusal = tuple[int, str, list[tuple[bytes, bytes]]]


def open_paths(settings: Settings) -> frozenset[str]:
    """The paths served without a key, when keys are on: the probes and docs, and /metrics
    unless VAE_METRICS_PUBLIC=false."""
    return OPEN_PATHS | ({"/metrics"} if settings.metrics_public else frozenset())


class Guard:
    def __init__(
        self,
        app: ASGIApp,
        settings: Settings,
        keys: list[SecretStr],
        admin_keys: list[SecretStr] | None = None,
    ) -> None:
        self.app = app
        self.settings = settings
        # Compare digests, not keys: equal lengths, so the comparison time says nothing.
        self._digests = [_digest(k.get_secret_value().encode()) for k in keys]
        self._admin = [_digest(k.get_secret_value().encode()) for k in admin_keys or []]
        self._open = open_paths(settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Only the methods the API has; any other gets the router's 405, unread and harmless.
        if scope["type"] != "http" or scope["method"] not in ("GET", "POST"):
            await self.app(scope, receive, send)
            return
        path = routed_path(scope)
        v2 = speaks_v2(path)
        headers = dict(scope["headers"])  # lower-case names, as ASGI guarantees
        if refusal := self._check_key(path, scope["method"], headers):
            status, detail, extra = refusal
            await _refuse(send, v2, status, detail, extra)
            return
        limit = self.settings.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _refuse(send, v2, 413, _too_large(limit), [(b"connection", b"close")])
            return
        if scope["method"] != "POST" or path.startswith(ADMIN_PREFIXES):
            await self._call(scope, receive, send, limit, v2)
            return
        lifecycle: Lifecycle = scope["app"].state.lifecycle
        if lifecycle.draining:
            detail = "The server is shutting down; send the request to another replica."
            await _refuse(send, v2, 503, detail, [_retry_after(), (b"connection", b"close")])
            return
        if lifecycle.in_flight >= self.settings.max_in_flight:
            detail = (
                f"The server already has {self.settings.max_in_flight} requests in flight, its "
                f"limit (VAE_MAX_IN_FLIGHT); retry after {RETRY_AFTER_S} s."
            )
            await _refuse(send, v2, 503, detail, [_retry_after()])
            return
        # The gauge beside the count: with several workers it is summed across them.
        in_flight = scope["app"].state.metrics.in_flight
        lifecycle.in_flight += 1
        in_flight.inc()
        try:
            timeout = self.settings.request_timeout_s
            await self._call(scope, receive, send, limit, v2, timeout, watch=True)
        finally:
            lifecycle.in_flight -= 1
            in_flight.dec()

    def _check_key(self, path: str, method: str, headers: dict[bytes, bytes]) -> Refusal | None:
        challenge = [(b"www-authenticate", b'Bearer realm="vae-service"')]
        # Admin routes are all POST; a GET there gets the router's 405 and changes nothing.
        if path.startswith(ADMIN_PREFIXES) and method == "POST":
            if not self._admin:  # never open: an admin route changes what every caller gets
                return 403, "Admin routes are off: set VAE_ADMIN_KEYS or VAE_ADMIN_KEYS_FILE.", []
            key = _presented_key(headers)
            if _matches(key, self._admin):
                return None
            if _matches(key, self._digests):
                where = "/admin" if path.startswith(ADMIN_PREFIXES[0]) else "/v2/repository"
                return 403, f"This key may not use {where}; send an admin key (VAE_ADMIN_KEYS).", []
            return 401, ADMIN_KEY_REQUIRED, challenge
        if path in self._open or path.startswith(OPEN_PREFIXES) or not self._digests:
            return None
        key = _presented_key(headers)
        if _matches(key, self._digests) or _matches(key, self._admin):
            return None
        return 401, KEY_REQUIRED, challenge

    async def _call(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        limit: int,
        v2: bool,
        timeout: float | None = None,
        *,
        watch: bool = False,
    ) -> None:
        received = 0
        started = False
        body_read, gone = asyncio.Event(), asyncio.Event()

        async def counted_receive() -> Message:
            nonlocal received
            if watch and body_read.is_set():
                # After the body only a disconnect can come, and the watcher is reading it.
                await gone.wait()
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
                if not message.get("more_body", False):
                    body_read.set()
            elif message["type"] == "http.disconnect":
                gone.set()
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                if watch:
                    await _until_gone(self.app(scope, counted_receive, tracked_send), receive,
                                      body_read, gone)  # fmt: skip
                else:
                    await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge:  # read by a route that let it through, e.g. a plain Request
            if started:
                raise
            await _refuse(send, v2, 413, _too_large(limit), [(b"connection", b"close")])
        except TimeoutError:
            if started or not deadline.expired():  # half an answer cannot be taken back
                raise
            detail = f"The request took longer than {timeout:g} s (VAE_REQUEST_TIMEOUT_S)."
            await _refuse(send, v2, 504, detail, [])
        except (ClientGoneError, ClientDisconnect):  # hung up after the body, or during it
            scope.setdefault("state", {})["client_gone"] = True


class ClientGoneError(Exception):
    """The client hung up before its answer: its work was cancelled, and nobody is told."""


async def _until_gone(
    call: Awaitable[None], receive: Receive, body_read: asyncio.Event, gone: asyncio.Event
) -> None:
    """Run the app's `call` in this task until it answers, or cancel it when the client
    disconnects once the body is read (ClientGoneError). Only the watcher reads `receive`
    after the body, and only a request still running after WATCH_AFTER_S gets one: a task
    per request cost more than most requests' model time, and work that ends within a few
    milliseconds is not worth cancelling."""
    task = asyncio.current_task()
    assert task is not None  # an ASGI app always runs in a task
    loop = asyncio.get_running_loop()
    watcher: asyncio.Task[None] | None = None

    async def watch() -> None:
        await body_read.wait()
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.set()
        task.cancel()

    def start_watching() -> None:
        nonlocal watcher
        watcher = loop.create_task(watch())

    timer = loop.call_later(WATCH_AFTER_S, start_watching)
    try:
        await call
    except asyncio.CancelledError:
        # Ours alone (not the server's, not the timeout's): the client went away.
        if gone.is_set() and task.uncancel() == 0:
            raise ClientGoneError from None
        raise
    finally:
        timer.cancel()
        if watcher is not None:
            watcher.cancel()


class BodyTooLarge(HTTPException):
    """Raised from `receive` once a streamed body passes the limit. An HTTPException, so a
    route that reads the body through FastAPI still answers 413, not "error parsing the body"."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, _too_large(limit), headers={"Connection": "close"})


def _presented_key(headers: dict[bytes, bytes]) -> bytes | None:
    auth = headers.get(b"authorization")
    if auth is not None:
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() == b"bearer" and token.strip():
            return token.strip()
    return headers.get(b"x-api-key")


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def _matches(key: bytes | None, digests: list[bytes]) -> bool:
    if key is None:
        return False
    given = _digest(key)
    # No early exit: every configured key is compared, whichever matches.
    return sum(hmac.compare_digest(given, d) for d in digests) > 0


def _too_large(limit: int) -> str:
    return f"The request body is larger than {limit} bytes, the limit (VAE_MAX_BODY_BYTES)."


def _retry_after() -> tuple[bytes, bytes]:
    return b"retry-after", str(math.ceil(RETRY_AFTER_S)).encode()


async def _refuse(
    send: Send, v2: bool, status: int, detail: str, extra: list[tuple[bytes, bytes]]
) -> None:
    body = orjson.dumps(error_payload(detail, v2=v2))
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *extra,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
