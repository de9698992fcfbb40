"""Ray Serve: the very same `create_app` behind `serve.ingress`, one model and batcher per replica,
or a model repository multiplexed over the replicas.

    serve run deploy/ray/serve.yaml          # a local cluster, or --address to join one
    serve deploy deploy/ray/serve.yaml       # a running cluster, through its dashboard
    serve deploy deploy/ray/serve-repository.yaml   # many models over the replicas

Each replica is one Ray actor that builds the app itself (`serve.ingress` with a builder: the
app is built in the replica, never pickled) from the VAE_* variables of the application's
`runtime_env`, exactly as `python -m app` reads them. Serve runs the app's lifespan (load the
artifact, warm up every batch size, start the batcher) inside the replica's constructor, and
routes to a replica only after its first `check_health` passes, which needs `app.state.ready`:
a replica is ready only after warm-up.

The lifespan runs on Serve's user-code event loop, a thread other than the actor's main one,
so `install_signal_handlers` leaves SIGTERM and SIGHUP to Ray: the controller drains and stops
replicas itself.

With VAE_MODEL_REPOSITORY (deploy/ray/serve-repository.yaml), the deployment serves the
repository through Serve's model multiplexing, so that many models spread over the replicas
and nodes, each replica holding a few:

- Every replica runs the repository in `explicit` control (forced here, whatever
  VAE_MODEL_CONTROL says, and with one worker): it starts holding nothing but
  VAE_DEFAULT_MODEL (if set, or the only model when there is one).
- A request for a model goes first through `serve.multiplexed(max_num_models_per_replica=N)`,
  Serve's per-replica LRU cache, keyed by the model's name: a miss loads the model into the
  replica's repository (`await models.load(name)`), and when the cache is full Serve evicts its
  least recently used model first, which unloads it (`await models.unload(name)`) once the
  requests admitted for it have finished. N is the build argument `max_models_per_replica`
  (DEFAULT_MODELS_PER_REPLICA unless the config's `args:` set it); VAE_MAX_MODELS still bounds
  the versions a replica holds, so keep it at least N times the versions per model.
- The model a request is for is the one its path names (`/models/{name}/...`, V2's
  `/v2/models/{name}[-decode|-anomaly]/...`), else the one Serve routes it by: the
  `serve_multiplexed_model_id` header. Send that header (the model's name) and Serve's proxy
  routes each model's requests to the replicas that hold it (or, for a model no replica holds,
  to one that holds the fewest); without it a request lands on any replica, which loads the
  model on demand all the same.
- A model the repository does not have never reaches Serve's cache (it would evict a model
  first): the request goes on to the app, which answers its own 404 (400 for a name that is
  not one). A load the repository refuses (a bad artifact, VAE_MAX_MODELS) is answered with
  the refusal (409), in the protocol's shape.
- The default model, loaded at start for the routes without a name, is never unloaded by an
  eviction. /admin/models/{name}/load and /unload act on the one replica they reach; Serve's
  cache decides what the replicas hold, and a model an admin unloaded is loaded again by the
  next request for it.

`proxy_middlewares` is for Serve's HTTP proxy (the config files name it): when a replica dies
with requests in flight, Ray's proxy answers each of them a bare 500 ("Internal Server Error");
the middleware sends them once more instead, to a live replica. The proxy imports this module
for it, so torch stays out: `create_app` and the repository are imported in the replica, when
the app is built.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ray import serve
from ray.serve import Application, Deployment
from starlette.middleware import Middleware
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.common import routed_path
from app.settings import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI

    from app.repository import ModelRepository

log = logging.getLogger("ray.serve")

# The deployment's name in a Serve config file's `deployments:` list.
DEPLOYMENT = "VAEService"
# Models a replica holds at once when the config's `args:` give no max_models_per_replica
# (Serve's own default for `serve.multiplexed`).
DEFAULT_MODELS_PER_REPLICA = 3
# The header Serve's proxy routes multiplexed requests by (it also takes it with hyphens).
MODEL_ID_HEADER = "serve_multiplexed_model_id"
_MODEL_ID_HEADERS = (MODEL_ID_HEADER.encode(), MODEL_ID_HEADER.replace("_", "-").encode())


class ReplicaNotReadyError(RuntimeError):
    """`check_health` fails with this until the model is loaded and warmed up (and again once
    the lifespan has shut down); Serve then keeps (or takes) the replica out of routing."""


def _build_asgi_app() -> FastAPI:
    """Run in each replica's constructor: Settings() reads the replica's VAE_* variables."""
    from app.main import create_app

    settings = Settings()
    if settings.model_repository is None:
        return create_app(settings)
    return build_multiplexed_app(settings)


class VAEReplica:
    """What a replica adds to the app: a health check Serve can ask, and the build argument
    that bounds the models it holds (with a model repository)."""

    # Set by serve.ingress's wrapper (its `app` property): the FastAPI app built above.
    app: FastAPI

    def __init__(self, max_models_per_replica: int = DEFAULT_MODELS_PER_REPLICA) -> None:
        self.max_models_per_replica = max_models_per_replica

    def check_health(self) -> None:
        """Serve calls this once after the constructor (which ran the lifespan) and then
        every health_check_period_s; raising takes the replica out of routing, and Serve
        replaces it."""
        if not self.app.state.ready:
            raise ReplicaNotReadyError("The model is not loaded and warmed up.")


# Decorators spelled as calls: mypy keeps a decorated class's own type, not the Deployment.
VAEDeployment: Deployment = serve.deployment(
    name=DEPLOYMENT,
    ray_actor_options={"num_cpus": 1},
    # Serve's default (5) caps what a replica is sent at once; the batcher merges only what
    # is queued together, so let as many through as it merges into one forward pass.
    max_ongoing_requests=64,
    health_check_period_s=2,
)(serve.ingress(_build_asgi_app)(VAEReplica))


def actor_options(settings: Settings, num_cpus: float = 1) -> dict[str, Any]:
    """What a replica asks Ray for: its CPUs, and one GPU when VAE_DEVICE asks for CUDA.

    "auto" asks for none: Ray hides GPUs from an actor that did not ask for one, so "auto"
    then serves on the CPU rather than on a GPU Ray may have given to someone else.
    """
    gpus = 1 if settings.device.startswith("cuda") else 0
    return {"num_cpus": num_cpus, "num_gpus": gpus}


BUILD_ARGS = ("num_replicas", "num_cpus", "max_models_per_replica")


def build_app(args: dict[str, Any]) -> Application:
    """The application builder behind the config files' `import_path`, and behind
    `serve run app.ray_serve:build_app num_replicas=2`.

    `args` (all optional): num_replicas, num_cpus, and, with VAE_MODEL_REPOSITORY,
    max_models_per_replica (the models each replica holds at once, Serve's LRU bound;
    DEFAULT_MODELS_PER_REPLICA if not given). The service's settings come from the VAE_*
    variables, read here in the process that builds the app (the application's runtime_env in
    a config file); the config file's `deployments:` options win over these.
    """
    unknown = set(args) - set(BUILD_ARGS)
    if unknown:
        raise ValueError(f"Unknown argument(s) {sorted(unknown)}: use {', '.join(BUILD_ARGS)}.")
    settings = Settings()
    options = actor_options(settings, float(args.get("num_cpus", 1)))
    deployment = VAEDeployment.options(
        num_replicas=int(args.get("num_replicas", 1)), ray_actor_options=options
    )
    if "max_models_per_replica" not in args:
        return deployment.bind()
    if settings.model_repository is None:
        raise ValueError(
            "max_models_per_replica bounds the models of a repository each replica holds; "
            "set VAE_MODEL_REPOSITORY too (or drop the argument for VAE_MODEL_PATH's one model)."
        )
    models = int(args["max_models_per_replica"])
    if models < 1:
        raise ValueError(f"max_models_per_replica must be at least 1, not {models}.")
    return deployment.bind(max_models_per_replica=models)


# -- in a replica: a model repository through Serve's model multiplexing -------------------------

# Serve's LRU cache in front of a load: (load, max models) -> the cached load (serve.multiplexed).
CachedLoad = Callable[[str], Awaitable["HeldModel"]]
LRU = Callable[[CachedLoad, int], CachedLoad]


def replica_settings(settings: Settings) -> Settings:
    """A multiplexed replica's settings: the repository in `explicit` control (Serve's cache
    loads the models, not the start-up), in one process (the repository refuses to load and
    unload with several workers)."""
    forced = {"model_control": "explicit", "workers": 1}
    changed = {k: v for k, v in forced.items() if getattr(settings, k) != v}
    if changed:
        log.info("model repository multiplexed over the replicas: using %s", changed)
    return settings.model_copy(update=changed)


def build_multiplexed_app(
    settings: Settings, max_models: int | None = None, lru: LRU | None = None
) -> FastAPI:
    """The app of a replica that serves `settings.model_repository` through Serve's model
    multiplexing: `create_app` with the multiplex step (`MultiplexModels`) as the innermost of
    its own middleware, inside the Guard (keys, limits and the request timeout apply to it, and
    Observe logs what it answers).

    `max_models` (default: the replica's build argument) and `lru` (default: Serve's
    `serve.multiplexed`, which works only in a replica) are for tests."""
    from app.main import create_app

    app = create_app(replica_settings(settings))
    multiplexer = RepositoryMultiplexer(app, max_models, lru)
    app.state.multiplexer = multiplexer
    # Appended: the last of user_middleware is the innermost (Starlette's order, and the hot
    # path's, which builds its stack from the same list).
    app.user_middleware.append(Middleware(MultiplexModels, multiplexer=multiplexer))
    return app


def requested_models(scope: Scope) -> list[str]:
    """The names a request's model may have, the likeliest first: the one its path names
    (/models/{name}/..., V2's /v2/models/{name}, {name}-decode or {name}-anomaly), else the
    serve_multiplexed_model_id header's (Serve's model id). Nothing for the routes of the
    default model (/encode, ..., V2's `vae` names) without the header."""
    from app.v2.protocol import MODELS, readings

    path = routed_path(scope)
    if path.startswith("/models/"):
        name = path[len("/models/") :].split("/", 1)[0]
        if name:
            return [name]
    elif path.startswith("/v2/models/"):
        v2_name = path[len("/v2/models/") :].split("/", 1)[0]
        if v2_name and v2_name not in MODELS:
            # `b-decode` is likelier model `b` decoding than a model named `b-decode`.
            return [name for name, _ in reversed(readings(v2_name))]
    model_id = serve.get_multiplexed_model_id() or _header_model_id(scope)
    return [model_id] if model_id else []


def _header_model_id(scope: Scope) -> str:
    for key, value in scope["headers"]:
        if key in _MODEL_ID_HEADERS:
            return bytes(value).decode("latin-1")
    return ""


class HeldModel:
    """What Serve's cache holds for a model of the replica's repository (the repository holds
    the model itself); evicting it unloads the model.

    Serve's eviction awaits the evicted object's `__del__` when that is a coroutine function.
    It is an attribute of the instance here, not a method: the garbage collector calls only a
    class's `__del__`, and would leave a coroutine that nobody awaits."""

    def __init__(self, name: str, evict: Callable[[], Awaitable[None]]) -> None:
        self.name = name
        self.__del__ = evict


def _serve_lru(load: CachedLoad, max_models: int) -> CachedLoad:
    # A plain function, not a bound method: Serve keeps its cache on the function it wraps.
    async def load_model(model_id: str) -> HeldModel:
        return await load(model_id)

    cached: CachedLoad = serve.multiplexed(max_num_models_per_replica=max_models)(load_model)
    return cached


def _replica_max_models() -> int:
    """The build argument of the replica this app runs in (Serve's replica context)."""
    replica = serve.get_replica_context().servable_object
    return int(getattr(replica, "max_models_per_replica", DEFAULT_MODELS_PER_REPLICA))


class RepositoryMultiplexer:
    """One per multiplexed replica (`app.state.multiplexer`): Serve's LRU cache of models in
    front of the app's repository, and the requests admitted for each model, so an eviction
    unloads a model only once they are done (a request takes its model when its route starts,
    a moment after it was admitted)."""

    def __init__(self, app: FastAPI, max_models: int | None = None, lru: LRU | None = None):
        self.app = app
        self.max_models = max_models
        self._lru = lru or _serve_lru
        self._cached: CachedLoad | None = None
        self._admitted: dict[str, int] = {}  # name -> requests admitted and not yet done
        self._drained: dict[str, asyncio.Event] = {}  # set when a name's count drops to 0

    @property
    def models(self) -> ModelRepository:
        models: ModelRepository = self.app.state.models
        return models

    def _cache(self) -> CachedLoad:
        if self._cached is None:  # at the first request: Serve's cache needs the replica's
            max_models = self.max_models or _replica_max_models()
            self._cached = self._lru(self._load, max_models)
            log.info("multiplexing the model repository: at most %d model(s) here", max_models)
        return self._cached

    async def acquire(self, scope: Scope) -> str | Response | None:
        """Make the request's model serve here, through Serve's cache; its name once admitted
        (`release` it when the request is done). None lets the request through as it is (no
        model named, or one the repository does not have: the app answers); a Response
        answers a load the repository refused."""
        from app.errors import VAEServiceError, error_payload, speaks_v2
        from app.repository import InvalidModelNameError, ModelNotFoundError, check_name
        from scoring.artifact import ModelLoadError

        models = self.models
        for name in requested_models(scope):
            try:
                check_name(name)
                # Only a model there is enters Serve's cache: a miss evicts one first.
                if name not in models.held() and name not in models.on_disk():
                    continue
                await self._cache()(name)
                if name not in models.loaded():  # unloaded behind Serve's back (an admin)
                    await models.load(name)
            except (InvalidModelNameError, ModelNotFoundError):
                continue  # the app says what there is
            except ModelLoadError:
                return None  # the repository cannot be read: the app answers that too
            except VAEServiceError as e:
                log.warning("model %s not loaded: %s", name, e.detail)
                if speaks_v2(routed_path(scope)):
                    from app.v2.routes import v2_error_response

                    answer = v2_error_response(e)
                    if answer is not None:
                        return answer
                return JSONResponse(error_payload(e.detail), status_code=e.status_code)
            # No await since the cache answered: an eviction of `name` cannot start before this.
            self._admitted[name] = self._admitted.get(name, 0) + 1
            return name
        return None

    def release(self, name: str) -> None:
        left = self._admitted[name] - 1
        if left:
            self._admitted[name] = left
            return
        del self._admitted[name]
        drained = self._drained.pop(name, None)
        if drained is not None:
            drained.set()

    async def _load(self, name: str) -> HeldModel:
        """Serve's cache missed `name`: load it (unless it serves already: the default model,
        or one an admin loaded)."""
        if name not in self.models.loaded():
            await self.models.load(name)

        async def evict() -> None:
            await self._evict(name)

        return HeldModel(name, evict)

    async def _evict(self, name: str) -> None:
        """Serve's cache let `name` go: unload it once its admitted requests are done (at most
        VAE_REQUEST_TIMEOUT_S, the longest they may take; one that outlives it finishes on the
        model it took). The default model stays: the routes without a name serve it."""
        from app.errors import VAEServiceError

        models = self.models
        if name == models.default:
            return
        if name in self._admitted:
            drained = self._drained.setdefault(name, asyncio.Event())
            timeout = models.settings.request_timeout_s
            try:
                await asyncio.wait_for(drained.wait(), timeout)
            except TimeoutError:
                log.warning("model %s: unloading with requests still running after %.0f s",
                            name, timeout)  # fmt: skip
        try:
            await models.unload(name)
        except VAEServiceError as e:  # not loaded any more (an admin unloaded it)
            log.info("model %s: evicted, %s", name, e.detail)


class MultiplexModels:
    """ASGI middleware in a multiplexed replica: each request's model through Serve's cache
    (`RepositoryMultiplexer.acquire`) before the app serves it."""

    def __init__(self, app: ASGIApp, multiplexer: RepositoryMultiplexer) -> None:
        self.app = app
        self.multiplexer = multiplexer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        taken = await self.multiplexer.acquire(scope)
        if isinstance(taken, Response):
            await taken(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            if taken is not None:
                self.multiplexer.release(taken)


# -- in Serve's HTTP proxy ----------------------------------------------------------------------

# Requests whose answer is a pure function of the request (the model routes are; GETs read
# state), so sending one again cannot do anything twice. /admin/reload is not among them.
_PURE_POST_SUFFIXES = ("/encode", "/decode", "/sample", "/anomaly-score", "/infer")
# The largest body kept for a second attempt (VAE_MAX_BODY_BYTES's default); a bigger one
# streams through once, so a body the app refuses unread (413) is not read by the proxy either.
RETRY_BODY_LIMIT = 32 * 2**20


def proxy_middlewares() -> list[Middleware]:
    """Serve's HTTP proxy callback: RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH names this
    function (the config files set it for the controller, whose proxies inherit it)."""
    return [Middleware(RetryUnanswered)]


class RetryUnanswered:
    """Send a pure request again when the proxy got no answer for it from its replica.

    A replica that dies with requests in flight (a crash, a killed process, a lost node)
    leaves Ray's proxy with an ActorDiedError for each, which it ends without a response, so
    the client would get uvicorn's bare 500 ("Internal Server Error"). The router marks the
    dead replica, so a second attempt goes to a live one. Nothing is retried once a response
    has started, after the client disconnects, or for a refusal Ray answers itself (408, 429,
    503: those have responses).
    """

    def __init__(
        self, app: ASGIApp, attempts: int = 3, max_body_bytes: int = RETRY_BODY_LIMIT
    ) -> None:
        self.app = app
        self.attempts = attempts
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _is_pure(scope) or self._declared_too_big(scope):
            await self.app(scope, receive, send)
            return
        request = _Request(receive)
        if not await request.read_body(self.max_body_bytes):  # too big, or the client left
            await self.app(scope, request.receive(), send)
            return
        for attempt in range(1, self.attempts + 1):
            response = _Response(send)
            # A copy per attempt: the proxy adds headers (its request id) to the scope.
            await self.app(dict(scope), request.receive(), response.send)
            if response.started or request.disconnected or attempt == self.attempts:
                return
            log.warning(
                "%s %s: the replica did not answer (it died?); sending it again (attempt %d "
                "of %d)", scope["method"], scope["path"], attempt + 1, self.attempts,
            )  # fmt: skip

    def _declared_too_big(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"content-length":
                return not value.isdigit() or int(value) > self.max_body_bytes
        return False


def _is_pure(scope: Scope) -> bool:
    method, path = scope["method"], scope["path"]
    return method in ("GET", "HEAD") or (
        method == "POST" and path.rstrip("/").endswith(_PURE_POST_SUFFIXES)
    )


class _Request:
    """The body, read once, replayed to every attempt; then the live channel (disconnects)."""

    def __init__(self, live: Receive) -> None:
        self._live = live
        self._messages: list[Message] = []
        self.disconnected = False

    async def read_body(self, limit: int) -> bool:
        """True once the whole body is kept; False if it outgrew `limit` or the client left
        (what was read is then replayed once, and the rest streams on from the client)."""
        size = 0
        while True:
            message = await self._next()
            self._messages.append(message)
            if message["type"] != "http.request":
                return False
            size += len(message.get("body", b""))
            if size > limit:
                return False
            if not message.get("more_body", False):
                return True

    def receive(self) -> Receive:
        pending = list(self._messages)

        async def receive() -> Message:
            return pending.pop(0) if pending else await self._next()

        return receive

    async def _next(self) -> Message:
        message = await self._live()
        if message["type"] == "http.disconnect":
            self.disconnected = True
        return message


class _Response:
    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)
