"""Ray Serve: the very same `create_app` behind `serve.ingress`, one model and batcher per replica.

    serve run deploy/ray/serve.yaml          # a local cluster, or --address to join one
    serve deploy deploy/ray/serve.yaml       # a running cluster, through its dashboard

Each replica is one Ray actor that builds the app itself (`serve.ingress` with a builder: the
app is built in the replica, never pickled) from the VAE_* variables of the application's
`runtime_env`, exactly as `python -m app` reads them. Serve runs the app's lifespan (load the
artifact, warm up every batch size, start the batcher) inside the replica's constructor, and
routes to a replica only after its first `check_health` passes, which needs `app.state.ready`:
a replica is ready only after warm-up.

The lifespan runs on Serve's user-code event loop, a thread other than the actor's main one,
so `install_signal_handlers` leaves SIGTERM and SIGHUP to Ray: the controller drains and stops
replicas itself.

`proxy_middlewares` is for Serve's HTTP proxy (the config files name it): when a replica dies
with requests in flight, Ray's proxy answers each of them a bare 500 ("Internal Server Error");
the middleware sends them once more instead, to a live replica. The proxy imports this module
for it, so torch stays out: `create_app` is imported in the replica, when the app is built.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ray import serve
from ray.serve import Application, Deployment
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.settings import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger("ray.serve")

# The deployment's name in a Serve config file's `deployments:` list.
DEPLOYMENT = "VAEService"


class ReplicaNotReadyError(RuntimeError):
    """`check_health` fails with this until the model is loaded and warmed up (and again once
    the lifespan has shut down); Serve then keeps (or takes) the replica out of routing."""


def _build_asgi_app() -> FastAPI:
    """Run in each replica's constructor: Settings() reads the replica's VAE_* variables."""
    from app.main import create_app

    return create_app()


class VAEReplica:
    """What a replica adds to the app: a health check Serve can ask."""

    # Set by serve.ingress's wrapper (its `app` property): the FastAPI app built above.
    app: FastAPI

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


def build_app(args: dict[str, str]) -> Application:
    """The application builder behind the config files' `import_path`, and behind
    `serve run app.ray_serve:build_app num_replicas=2`.

    `args` (all optional): num_replicas and num_cpus. The service's settings come from the
    VAE_* variables, read here in the process that builds the app (the application's
    runtime_env in a config file); the config file's `deployments:` options win over these.
    """
    unknown = set(args) - {"num_replicas", "num_cpus"}
    if unknown:
        raise ValueError(f"Unknown argument(s) {sorted(unknown)}: use num_replicas and num_cpus.")
    options = actor_options(Settings(), float(args.get("num_cpus", 1)))
    deployment = VAEDeployment.options(
        num_replicas=int(args.get("num_replicas", 1)), ray_actor_options=options
    )
    return deployment.bind()


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
