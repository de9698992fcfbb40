"""The hot path: the model routes' common requests, served in front of FastAPI's own stack.

Most traffic is a handful of requests: `/encode`, `/decode` and `/anomaly-score` with a JSON
or `.npy` body, and V2 `infer`. For them FastAPI's layers (its error and telemetry
middleware, the router, which tries each route's pattern in turn, the dependency solver, the
exception middleware) cost more than the model does on one instance. `ServiceApp` puts
`HotPath` in front of all of them: it recognises those requests by method, path and media
type and sends them through the service's own middleware (CORS when on, Observe, the Guard:
the same classes, built the same way, so keys, limits, drain, timeout, metrics and logs are
unchanged) to `_Handlers`, which calls the very route function FastAPI would, with the same
dependencies. Validation, error sentences and answers are the same bytes by construction
(tests/test_hot_path.py compares them, path against path).

Everything else goes to FastAPI: other routes, multipart uploads, unknown media types.
FastAPI's own OpenTelemetry hooks therefore see only those; VAE_HOT_PATH=false sends every
request through FastAPI.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request, Response
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.batching import Batcher
from app.common import JSON, NPY, routed_path
from app.deps import get_batcher, get_metrics, get_settings, get_vae
from app.model import VAEService
from app.routes import decode_latents, encode_instances, model_router, score_anomalies
from app.settings import Settings
from app.v2.protocol import HEADER_LENGTH
from app.v2.routes import get_v2_model, infer_v2, v2_error_response
from app.v2.routes import router as v2_router

Serve = Callable[[Request], Awaitable[Response]]
V2_MODELS, V2_INFER = "/v2/models/", "/infer"


class ServiceApp(FastAPI):
    """FastAPI, with the hot path in front of all of it when VAE_HOT_PATH is on: a hot request
    never enters FastAPI's `__call__` (whose telemetry check alone reads the environment on
    every request)."""

    _hot_path: HotPath | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.root_path:  # as FastAPI's own __call__ does first
            scope["root_path"] = self.root_path
        if scope["type"] != "http" or not self.state.settings.hot_path:
            await super().__call__(scope, receive, send)
            return
        if self._hot_path is None:
            self._hot_path = HotPath(self)
        hot = self._hot_path.match(scope)
        if hot is None:
            await super().__call__(scope, receive, send)
            return
        scope["app"] = self  # as Starlette's __call__ does
        await self._hot_path(hot, scope, receive, send)


@dataclass(frozen=True)
class _Hot:
    route: APIRoute  # what Observe labels the request with, as the router would set it
    serve: Serve
    v2: bool


async def _encode(request: Request) -> Response:
    vae, batcher, settings = await _deps(request)
    return await encode_instances(request, vae, batcher, settings)


async def _decode(request: Request) -> Response:
    vae, batcher, settings = await _deps(request)
    return await decode_latents(request, vae, batcher, settings)


async def _score(request: Request) -> Response:
    vae, batcher, settings = await _deps(request)
    return await score_anomalies(request, vae, batcher, settings, await get_metrics(request))


async def _infer(request: Request) -> Response:
    # In the order FastAPI resolves them: an unknown model is a 404 even while the model loads.
    target = await get_v2_model(request, request.path_params["model_name"])
    batcher, settings = await get_batcher(request), await get_settings(request)
    header_length = request.headers.get(HEADER_LENGTH)
    return await infer_v2(
        target, request, batcher, settings, await get_metrics(request), header_length
    )


async def _deps(request: Request) -> tuple[VAEService, Batcher, Settings]:
    return await get_vae(request), await get_batcher(request), await get_settings(request)


SERVE = {"encode": _encode, "decode": _decode, "anomaly-score": _score}
MODELS_PREFIX, VERSIONS = "/models/", "/versions/"
# The model routes are served under each model's name and version too (app/main.py).
NAMED = "/models/{model_name}"
VERSIONED = NAMED + "/versions/{model_version}"


class HotPath:
    """A hot request through the service's own middleware (CORS when on, Observe, the Guard:
    built from the app's list as Starlette builds its stack) to `_Handlers`; an unexpected
    error is answered as FastAPI's outermost layer answers it."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.stack: ASGIApp = _Handlers()
        for cls, args, kwargs in reversed(app.user_middleware):  # the last added is outermost
            self.stack = cls(self.stack, *args, **kwargs)
        # The routes FastAPI's router puts in the scope for these requests, for Observe's
        # labels: a model route included under a prefix (/models/{model_name}/...) is still
        # its original route, /encode, there.
        routes = {r.path: r for r in [*model_router.routes, *v2_router.routes]
                  if isinstance(r, APIRoute)}  # fmt: skip
        self.rest = {
            op: {
                prefix: _Hot(routes["/" + op], serve, v2=False) for prefix in ("", NAMED, VERSIONED)
            }
            for op, serve in SERVE.items()
        }
        self.infer = _Hot(routes["/v2/models/{model_name}/infer"], _infer, v2=True)
        self.infer_version = _Hot(
            routes["/v2/models/{model_name}/versions/{model_version}/infer"], _infer, v2=True
        )

    def match(self, scope: Scope) -> _Hot | None:
        """The hot request's route, with its path parameters set; None for the rest."""
        if scope["method"] != "POST":
            return None
        path = routed_path(scope)
        if path.startswith(V2_MODELS):
            return self._match_infer(scope, path)
        head, _, op = path.rpartition("/")
        routes = self.rest.get(op)
        if routes is None:
            return None
        if head == "":
            hot = routes[""]
        elif head.startswith(MODELS_PREFIX):
            name, _, version = head[len(MODELS_PREFIX) :].partition(VERSIONS)
            if not name or "/" in name or (version and not version.isdigit()):
                return None
            if version:
                hot = routes[VERSIONED]
                scope["path_params"] = {"model_name": name, "model_version": version}
            elif head[len(MODELS_PREFIX) :] == name:
                hot = routes[NAMED]
                scope["path_params"] = {"model_name": name}
            else:
                return None
        else:
            return None
        media = _media(scope)
        plain = media in ("", JSON, NPY) or (
            media.startswith("application/") and media.endswith("+json")
        )
        return hot if plain else None

    def _match_infer(self, scope: Scope, path: str) -> _Hot | None:
        if not path.endswith(V2_INFER):
            return None
        name, _, version = path[len(V2_MODELS) : -len(V2_INFER)].partition(VERSIONS)
        if not name or "/" in name or "/" in version or (VERSIONS in path and not version):
            return None
        if version:
            scope["path_params"] = {"model_name": name, "model_version": version}
            return self.infer_version
        scope["path_params"] = {"model_name": name}
        return self.infer

    async def __call__(self, hot: _Hot, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"], scope["hot"] = hot.route, hot
        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.stack(scope, receive, tracked_send)
        except Exception as e:
            # Starlette's ServerErrorMiddleware: the app's handler for Exception answers 500
            # (in the protocol's shape, with the request id), and the error goes on to the
            # server's log.
            handler = self.app.exception_handlers.get(Exception)
            if handler is not None and not started:
                response = await _call(handler, Request(scope), e)
                await response(scope, receive, send)
            raise


class _Handlers:
    """The innermost ASGI app of the hot path: the route function, and the answer FastAPI's
    exception handlers would give to what it raises."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hot: _Hot = scope["hot"]
        request = Request(scope, receive)
        try:
            response = await hot.serve(request)
        except Exception as e:
            response = await _error_answer(request, e, hot.v2)
        await response(scope, receive, send)


def _media(scope: Scope) -> str:
    value: bytes
    for key, value in scope["headers"]:
        if key == b"content-type":
            return value.split(b";")[0].strip().lower().decode("latin-1")
    return ""


async def _error_answer(request: Request, e: Exception, v2: bool) -> Response:
    """What FastAPI answers for the same error: V2's route class for V2, else the app's
    exception handlers. Anything else (a fault of ours) goes up to HotPath's 500."""
    if v2:
        answer = v2_error_response(e)
        if answer is not None:
            return answer
        raise e
    handlers = request.app.exception_handlers
    for cls in type(e).__mro__:
        if cls is Exception:
            break
        handler = handlers.get(cls)
        if handler is not None:
            return await _call(handler, request, e)
    raise e


async def _call(handler: Callable[..., object], request: Request, e: Exception) -> Response:
    answer = handler(request, e)
    response = await answer if inspect.isawaitable(answer) else answer
    assert isinstance(response, Response)
    return response
