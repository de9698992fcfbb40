"""Ray Serve (app/ray_serve.py, deploy/ray/): the same app on a real two-node Ray cluster.

The cluster (bench.ray.RayCluster) is two `ray start` nodes on this machine (distinct ports,
one CPU each, a temp dir of their own), and the app goes on it with `serve deploy
deploy/ray/serve.yaml`, changing only the artifact, the proxy's port and where proxies run.
Everything is called through Ray's HTTP proxy and compared byte for byte with a plain uvicorn
`python -m app` serving the same artifact. Last, deploy/ray/serve-repository.yaml goes beside
it as a second application, under /repo: a model repository multiplexed over two replicas, one
per node, each model's requests routed by Serve's model id. Teardown kills exactly the
processes those nodes started, never `ray stop`, which kills every Ray process of the user by
name.

The multiplexing's own logic (what a request's model is, loading on a miss, unloading on an
eviction only once the model's requests are done, the app's answers for a model not there) is
tested without Ray too, with a stand-in for Serve's cache, which runs only in a replica.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML ships no types
from fastapi.testclient import TestClient
from pydantic.warnings import PydanticDeprecatedSince20
from starlette.types import Message, Scope

from app.main import create_app
from app.settings import Settings
from bench.ray import DEPLOYMENT, RayCluster, serve_config
from bench.servers import free_port
from tests.conftest import REPO, Server, make_artifact

pytestmark = pytest.mark.ray

with warnings.catch_warnings():
    # Ray Serve's own config models still pass extra keywords to pydantic's Field; that is
    # Ray's to fix, and it is the only warning importing it raises.
    warnings.filterwarnings(
        "ignore", category=PydanticDeprecatedSince20, module=r"ray\.serve\._private\.config"
    )
    from ray.serve.schema import ServeDeploySchema

    from app import ray_serve

CONFIGS = sorted((REPO / "deploy" / "ray").glob("*.yaml"))

# -- the config files ---------------------------------------------------------------------------


def load_config(path: Path) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(path.read_text())
    return config


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_file_is_a_valid_serve_config(path: Path) -> None:
    config = ServeDeploySchema.model_validate(load_config(path))
    (application,) = config.applications
    assert application.import_path == "app.ray_serve:build_app"
    (deployment,) = application.deployments
    assert deployment.name == ray_serve.DEPLOYMENT == DEPLOYMENT  # bench.ray names it too
    # A replica count or an autoscaling_config, one of the two.
    assert len({"num_replicas", "autoscaling_config"} & deployment.model_fields_set) == 1


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_file_asks_for_a_gpu_exactly_when_vae_device_is_cuda(path: Path) -> None:
    (application,) = load_config(path)["applications"]
    device = Settings(device=application["runtime_env"]["env_vars"]["VAE_DEVICE"]).device
    (deployment,) = application["deployments"]
    gpus = deployment["ray_actor_options"].get("num_gpus", 0)
    assert (gpus >= 1) == device.startswith("cuda")
    assert deployment["ray_actor_options"]["num_cpus"] >= 1


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_file_installs_the_proxy_retry(path: Path) -> None:
    env = load_config(path)["controller_options"]["runtime_env"]["env_vars"]
    module, name = env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"].split(":")
    assert module == "app.ray_serve"
    (middleware,) = getattr(ray_serve, name)()
    assert middleware.cls is ray_serve.RetryUnanswered


def test_actor_options_ask_for_a_gpu_only_for_cuda() -> None:
    assert ray_serve.actor_options(Settings(device="cuda:1"))["num_gpus"] == 1
    assert ray_serve.actor_options(Settings(device="cuda"), num_cpus=2) == {
        "num_cpus": 2,
        "num_gpus": 1,
    }
    assert ray_serve.actor_options(Settings(device="auto"))["num_gpus"] == 0
    assert ray_serve.actor_options(Settings(device="cpu"))["num_gpus"] == 0


def test_build_app_refuses_unknown_arguments() -> None:
    with pytest.raises(ValueError, match=r"Unknown argument\(s\) \['replicas'\]"):
        ray_serve.build_app({"replicas": "2"})


def test_max_models_per_replica_is_a_build_argument_of_a_repository(tmp_path: Path) -> None:
    # Without a repository there is nothing to multiplex: the argument is refused, not ignored.
    with pytest.raises(ValueError, match="set VAE_MODEL_REPOSITORY too"):
        ray_serve.build_app({"max_models_per_replica": "2"})
    os.environ["VAE_MODEL_REPOSITORY"] = str(tmp_path)
    with pytest.raises(ValueError, match="at least 1, not 0"):
        ray_serve.build_app({"max_models_per_replica": "0"})
    # It reaches each replica as its constructor's argument; left out, Serve's own default.
    # (An int, as a config file's `args:` give it, or a string, as `serve run` does.)
    kwargs: Any = ray_serve.build_app({"max_models_per_replica": 5})._bound_deployment.init_kwargs
    assert kwargs == {"max_models_per_replica": 5}
    kwargs = ray_serve.build_app({"max_models_per_replica": "2"})._bound_deployment.init_kwargs
    assert kwargs == {"max_models_per_replica": 2}
    kwargs = ray_serve.build_app({})._bound_deployment.init_kwargs
    assert kwargs == {}
    assert ray_serve.VAEReplica().max_models_per_replica == ray_serve.DEFAULT_MODELS_PER_REPLICA


def test_the_repository_config_names_real_settings_and_arguments() -> None:
    (application,) = load_config(REPO / "deploy" / "ray" / "serve-repository.yaml")["applications"]
    assert set(application["args"]) <= set(ray_serve.BUILD_ARGS)
    env = application["runtime_env"]["env_vars"]
    settings = {f"VAE_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= settings
    assert Settings(**{k[4:].lower(): v for k, v in env.items()}).model_repository is not None


def test_the_proxy_imports_the_module_without_torch() -> None:
    code = "import sys, app.ray_serve; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, check=False).returncode == 0


# -- the replica's health check -----------------------------------------------------------------


def test_check_health_fails_until_warmed_up_and_after_shutdown(tiny_artifact: Path) -> None:
    replica = ray_serve.VAEReplica()
    replica.app = create_app(Settings(model_path=tiny_artifact))
    with pytest.raises(ray_serve.ReplicaNotReadyError, match="not loaded and warmed up"):
        replica.check_health()
    with TestClient(replica.app):  # the lifespan: load, warm up, start the batcher
        replica.check_health()
    with pytest.raises(ray_serve.ReplicaNotReadyError, match="not loaded and warmed up"):
        replica.check_health()


# -- a model repository through Serve's model multiplexing, without Ray -------------------------

IMG = [[0.0, 1.0, 1.0, 0.0]]  # model a: a 2x2 Bernoulli image, latent 2
TAB = [[0.1, -0.2, 0.3, 1.5, -1.0]]  # model b: 5 Gaussian columns, latent 3
MODEL_ID = ray_serve.MODEL_ID_HEADER


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """a/1/vae.pt and b/1/vae.pt: two models of different input and latent sizes."""
    root = tmp_path_factory.mktemp("repository")
    (root / "a" / "1").mkdir(parents=True)
    make_artifact(root / "a" / "1" / "vae.pt")
    (root / "b" / "1").mkdir(parents=True)
    make_artifact(root / "b" / "1" / "vae.pt", input_shape=(5,), likelihood="gaussian",
                  latent_dim=3)  # fmt: skip
    return root


class ServeLRU:
    """Serve's multiplexed cache in miniature (`_ModelMultiplexWrapper` in
    ray/serve/multiplex.py, which runs only in a replica): at most `size` models, and a miss
    past that first evicts the least recently used one, awaiting its `__del__`."""

    def __init__(self, load: ray_serve.CachedLoad, size: int) -> None:
        self.load, self.size = load, size
        self.models: OrderedDict[str, ray_serve.HeldModel] = OrderedDict()
        self.lock = asyncio.Lock()
        self.loads: list[str] = []

    async def __call__(self, name: str) -> ray_serve.HeldModel:
        if name in self.models:
            self.models.move_to_end(name)
            return self.models[name]
        async with self.lock:
            if name in self.models:
                return self.models[name]
            if len(self.models) >= self.size:
                _, old = self.models.popitem(last=False)
                assert inspect.iscoroutinefunction(old.__del__)  # Serve awaits it then
                await old.__del__()
            self.models[name] = await self.load(name)
            self.loads.append(name)
            return self.models[name]


def multiplexed(settings: Settings, max_models: int = 1) -> tuple[Any, list[ServeLRU]]:
    caches: list[ServeLRU] = []

    def lru(load: ray_serve.CachedLoad, size: int) -> ServeLRU:
        caches.append(ServeLRU(load, size))
        return caches[-1]

    return ray_serve.build_multiplexed_app(settings, max_models, lru), caches


def v2_body(x: list[list[float]], name: str = "instances") -> dict[str, Any]:
    return {"inputs": [{"name": name, "shape": [len(x), len(x[0])], "datatype": "FP32",
                        "data": [v for row in x for v in row]}]}  # fmt: skip


def states(http: Any, **kwargs: Any) -> dict[str, str]:
    return {m["name"]: m["state"] for m in http.get("/models", **kwargs).json()["models"]}


@pytest.mark.parametrize(
    ("path", "header", "names"),
    [
        ("/models/a/encode", "", ["a"]),
        ("/models/a/versions/1/anomaly-score", "b", ["a"]),  # the path names what it serves
        ("/models/a", "", ["a"]),
        ("/models", "b", ["b"]),
        ("/v2/models/b/infer", "", ["b"]),
        ("/v2/models/b-decode/infer", "", ["b", "b-decode"]),
        ("/v2/models/b-anomaly/versions/1/infer", "", ["b", "b-anomaly"]),
        ("/v2/models/-decode/ready", "", ["-decode"]),
        ("/v2/models/vae/infer", "", []),  # the default model's V2 names
        ("/v2/models/vae-decode/infer", "a", ["a"]),
        ("/encode", "", []),
        ("/metrics", "a", ["a"]),
    ],
)
def test_the_model_a_request_is_for(path: str, header: str, names: list[str]) -> None:
    headers = [(MODEL_ID.replace("_", "-").encode(), header.encode())] if header else []
    scope = {"type": "http", "path": "/repo" + path, "root_path": "/repo", "headers": headers}
    assert ray_serve.requested_models(scope) == names


def test_a_multiplexed_replica_loads_on_request_and_evicts_by_unloading(repository: Path) -> None:
    settings = Settings(model_repository=repository, model_control="all", workers=2)
    app, caches = multiplexed(settings, max_models=1)
    # The replica loads what requests ask for, whatever the variables said.
    assert (app.state.settings.model_control, app.state.settings.workers) == ("explicit", 1)
    with TestClient(app) as http:
        assert states(http) == {"a": "UNLOADED", "b": "UNLOADED"}  # nothing until asked
        r = http.post("/models/a/encode", json={"instances": IMG})
        assert r.status_code == 200
        assert np.shape(r.json()["mean"]) == (1, 2)
        assert states(http) == {"a": "READY", "b": "UNLOADED"}
        # One model a replica here: b evicts a, which unloads it.
        r = http.post("/models/b/encode", json={"instances": TAB})
        assert np.shape(r.json()["mean"]) == (1, 3)
        assert states(http) == {"a": "UNLOADED", "b": "READY"}
        # V2 names the model with the operation's suffix; the proxy's model id alone (the
        # header) serves a route without a name.
        r = http.post("/v2/models/a-anomaly/infer", json=v2_body(IMG))
        assert r.status_code == 200, r.text
        assert states(http, headers={MODEL_ID: "b"}) == {"a": "UNLOADED", "b": "READY"}
        (cache,) = caches
        assert cache.size == 1
        assert cache.loads == ["a", "b", "a", "b"]
        # A model that is not there: the app's own answers, and Serve's cache untouched (a miss
        # would have evicted b first).
        r = http.post("/models/nope/encode", json={"instances": IMG}, headers={MODEL_ID: "nope"})
        assert r.status_code == 404
        assert r.json() == {"detail": "No model 'nope' here; the models served are b."}
        r = http.post("/v2/models/nope/infer", json=v2_body(IMG))
        assert r.status_code == 404
        assert r.json() == {
            "error": "Model 'nope' is not served here; the models are b, b-decode and b-anomaly."
        }
        r = http.post("/models/-x/encode", json={"instances": IMG})
        assert r.status_code == 400
        assert r.json()["detail"].startswith("'-x' is not a model name: a model name matches")
        assert cache.loads == ["a", "b", "a", "b"]
        assert states(http) == {"a": "UNLOADED", "b": "READY"}


def test_the_default_model_is_never_evicted(repository: Path) -> None:
    app, caches = multiplexed(Settings(model_repository=repository, default_model="a"))
    with TestClient(app) as http:
        assert states(http) == {"a": "READY", "b": "UNLOADED"}  # loaded at start
        assert http.post("/models/a/encode", json={"instances": IMG}).status_code == 200
        assert http.post("/models/b/encode", json={"instances": TAB}).status_code == 200
        assert states(http) == {"a": "READY", "b": "READY"}  # a left Serve's cache, not here
        assert http.post("/encode", json={"instances": IMG}).status_code == 200
        assert http.post("/models/a/encode", json={"instances": IMG}).status_code == 200
        assert states(http) == {"a": "READY", "b": "UNLOADED"}
        assert caches[0].loads == ["a", "b", "a"]


def test_a_refused_load_is_answered_with_the_refusal(repository: Path, tmp_path: Path) -> None:
    root = tmp_path / "repository"
    shutil.copytree(repository, root)
    (root / "bad" / "1").mkdir(parents=True)
    (root / "bad" / "1" / "vae.pt").write_bytes(b"not a TorchScript archive")
    app, _ = multiplexed(Settings(model_repository=root), max_models=2)
    with TestClient(app) as http:
        r = http.post("/models/bad/encode", json={"instances": IMG})
        assert r.status_code == 409
        assert r.json()["detail"].startswith("Model 'bad' was not loaded")
        r = http.post("/v2/models/bad/infer", json=v2_body(IMG))
        assert r.status_code == 409
        assert r.json()["error"].startswith("Model 'bad' was not loaded")
        assert http.post("/models/b/encode", json={"instances": TAB}).status_code == 200


def test_an_eviction_unloads_only_after_the_requests_admitted_for_the_model(
    repository: Path,
) -> None:
    app, _ = multiplexed(Settings(model_repository=repository), max_models=1)
    multiplexer, models = app.state.multiplexer, app.state.models

    def scope(name: str) -> dict[str, Any]:
        return {"type": "http", "path": f"/models/{name}/encode", "headers": []}

    async def scenario() -> None:
        assert await multiplexer.acquire(scope("a")) == "a"  # admitted, not yet done
        b = asyncio.ensure_future(multiplexer.acquire(scope("b")))  # the cache is full
        await asyncio.sleep(0.3)
        assert not b.done()
        assert set(models.loaded()) == {"a"}  # a still serves its request
        multiplexer.release("a")
        assert await b == "b"
        assert set(models.loaded()) == {"b"}
        multiplexer.release("b")

    try:
        asyncio.run(scenario())
    finally:
        models.close()


def test_a_single_model_replica_is_built_as_before(tiny_artifact: Path, repository: Path) -> None:
    os.environ["VAE_MODEL_PATH"] = str(tiny_artifact)
    app = ray_serve._build_asgi_app()
    assert getattr(app.state, "multiplexer", None) is None
    classes: list[Any] = [m.cls for m in app.user_middleware]
    assert ray_serve.MultiplexModels not in classes
    os.environ["VAE_MODEL_REPOSITORY"] = str(repository)
    app = ray_serve._build_asgi_app()
    assert isinstance(app.state.multiplexer, ray_serve.RepositoryMultiplexer)
    classes = [m.cls for m in app.user_middleware]
    assert classes[-1] is ray_serve.MultiplexModels  # the innermost: inside the Guard


# -- the proxy's retry, on its own --------------------------------------------------------------


@dataclass
class Upstream:
    """An ASGI app standing in for Ray's proxy internals: it fails (returns without a
    response, as the proxy does when a replica dies) the first `failures` times."""

    failures: int
    start_then_fail: bool = False
    bodies: list[bytes] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        self.bodies.append(body)
        if self.start_then_fail:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            return
        if len(self.bodies) <= self.failures:
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body[::-1]})


def call(
    upstream: Upstream,
    path: str = "/encode",
    chunks: tuple[bytes, ...] = (b'{"n": 1}',),
    *,
    method: str = "POST",
    disconnect: bool = False,
    limit: int = ray_serve.RETRY_BODY_LIMIT,
) -> list[Message]:
    incoming: list[Message] = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]
    if disconnect:
        incoming = [{"type": "http.disconnect"}]
    sent: list[Message] = []

    async def receive() -> Message:
        if incoming:
            return incoming.pop(0)
        await asyncio.sleep(3600)  # the client stays connected
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": []}
    middleware = ray_serve.RetryUnanswered(upstream, max_body_bytes=limit)
    asyncio.run(middleware(scope, receive, send))
    return sent


def test_retry_sends_the_same_body_again_when_no_response_came() -> None:
    upstream = Upstream(failures=2)
    sent = call(upstream, chunks=(b"ab", b"cd"))
    assert upstream.bodies == [b"abcd"] * 3
    assert [m.get("status") for m in sent] == [200, None]
    assert sent[1]["body"] == b"dcba"


def test_retry_gives_up_after_three_attempts() -> None:
    upstream = Upstream(failures=5)
    assert call(upstream) == []
    assert len(upstream.bodies) == 3


def test_retry_leaves_a_started_response_alone() -> None:
    upstream = Upstream(failures=0, start_then_fail=True)
    assert len(call(upstream)) == 1
    assert len(upstream.bodies) == 1


@pytest.mark.parametrize("path", ["/admin/reload", "/other-app/predict"])
def test_retry_never_repeats_a_post_that_is_not_a_model_route(path: str) -> None:
    upstream = Upstream(failures=1)
    assert call(upstream, path) == []
    assert len(upstream.bodies) == 1


def test_retry_repeats_gets_and_v2_infer() -> None:
    assert len(call(Upstream(failures=1), "/ready", (b"",), method="GET")) == 2
    assert len(call(Upstream(failures=1), "/v2/models/vae/infer")) == 2


def test_retry_streams_a_body_over_the_limit_through_once() -> None:
    upstream = Upstream(failures=1)
    assert call(upstream, chunks=(b"x" * 6, b"y" * 6), limit=8) == []
    assert upstream.bodies == [b"x" * 6 + b"y" * 6]


def test_retry_stops_when_the_client_left() -> None:
    upstream = Upstream(failures=1)
    assert call(upstream, disconnect=True) == []
    assert upstream.bodies == []


# -- the two-node cluster -----------------------------------------------------------------------


# Every endpoint, seeded where it draws: Ray's answer must be uvicorn's, byte for byte.
X = [[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.5, 0.25]]
NPY_BODY = io.BytesIO()
np.save(NPY_BODY, np.asarray(X, dtype=np.float32), allow_pickle=False)
CALLS: list[tuple[str, str, dict[str, Any]]] = [
    ("GET", "/health", {}),
    ("GET", "/ready", {}),
    ("GET", "/model", {}),
    ("POST", "/encode", {"json": {"instances": X, "samples": 3, "seed": 7}}),
    ("POST", "/encode?samples=2&seed=3", {
        "content": NPY_BODY.getvalue(),
        "headers": {"content-type": "application/x-npy", "accept": "application/x-npy"}}),
    ("POST", "/decode", {"json": {"latents": [[0.5, -1.0], [0.0, 2.0]]}}),
    ("POST", "/decode", {"json": {"latents": [[0.5, -1.0]], "output": "mode"}}),
    ("POST", "/sample", {"json": {"n": 3, "seed": 11}}),
    ("POST", "/anomaly-score", {
        "json": {"instances": X, "samples": 4, "log_likelihood_samples": 8, "seed": 5}}),
    ("POST", "/v2/models/vae/infer", {"json": {
        "inputs": [{"name": "instances", "shape": [2, 4], "datatype": "FP32",
                    "data": [v for row in X for v in row]}],
        "parameters": {"samples": 2, "seed": 1}}}),
    ("POST", "/encode", {"json": {"instances": [[0.0, 2.0, 0.0, 0.0]]}}),  # a 422
    # The heaviest the limits allow (64 x 1024 decoder passes, twice): tens of ms in a replica.
    ("POST", "/anomaly-score", {"json": {"instances": [X[0]] * 64, "samples": 1024,
                                         "log_likelihood_samples": 1024, "seed": 9}}),
]  # fmt: skip
HEAVY = len(CALLS) - 1


def answer(http: httpx.Client, method: str, path: str, kwargs: dict[str, Any]) -> tuple[Any, ...]:
    r = http.request(method, path, **kwargs)
    return r.status_code, r.headers.get("content-type"), r.content


@pytest.fixture(scope="module")
def uvicorn_answers(
    tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[int, tuple[Any, ...]]:
    """What plain uvicorn (`python -m app`) answers to each of CALLS."""
    log = tmp_path_factory.mktemp("uvicorn") / "server.log"
    server = Server({"VAE_MODEL_PATH": str(tiny_artifact), "VAE_DEVICE": "cpu"}, log)
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=10) as http:
            return {i: answer(http, *call) for i, call in enumerate(CALLS)}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def cluster(
    tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RayCluster, str]]:
    """Two nodes, the app deployed from deploy/ray/serve.yaml; yields the proxy's URL."""
    work = tmp_path_factory.mktemp("ray")
    with RayCluster(work, node_cpus=(1, 1)) as ray:
        port = free_port()
        path = work / "serve.yaml"
        path.write_text(yaml.safe_dump(cluster_config(tiny_artifact, port)))
        ray.serve("deploy", str(path))
        ray.wait_running(2)
        yield ray, f"http://127.0.0.1:{port}"


def cluster_config(artifact: Path, port: int) -> dict[str, Any]:
    """deploy/ray/serve.yaml as it is (two replicas, at most one per node), but for the
    artifact, the port, and the proxy on the head only (both nodes share this host)."""
    config = serve_config(artifact, port)
    # One proxy for two nodes: without this it sends everything to its own node's replica
    # (Serve prefers the local one until it is full), and the other one idles.
    proxy_env = config["controller_options"]["runtime_env"]["env_vars"]
    proxy_env["RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING"] = "0"
    return config


def test_two_replicas_run_one_per_node(cluster: tuple[RayCluster, str]) -> None:
    ray, _ = cluster
    replicas = ray.wait_running(2)
    assert len({r.node_id for r in replicas}) == 2


def test_every_endpoint_answers_through_the_proxy_as_uvicorn_does(
    cluster: tuple[RayCluster, str], uvicorn_answers: dict[int, tuple[Any, ...]]
) -> None:
    ray, url = cluster
    encoded = '"route": "/encode", "method": "POST", "status": 200'
    with httpx.Client(base_url=url, timeout=10) as http:
        # Each call a few times: the proxy spreads them over both replicas.
        for _ in range(4):
            for i, call in enumerate(CALLS):
                assert answer(http, *call) == uvicorn_answers[i], call
        # Both must have answered some, by their request log lines. The proxy's choice is its
        # own (two idle replicas tie), so one may not have had an /encode yet: send more, each
        # still checked, until both have, within a bound that only a router that never picks
        # one of them would reach.
        replicas = ray.wait_running(2)
        for _ in range(64):
            if all(encoded in ray.worker_log(r.pid) for r in replicas):
                break
            assert answer(http, *CALLS[3]) == uvicorn_answers[3]
            time.sleep(0.05)
    for replica in replicas:
        assert encoded in ray.worker_log(replica.pid), replica


def test_metrics_answer_through_the_proxy_and_name_the_artifact(
    cluster: tuple[RayCluster, str],
) -> None:
    # One replica's registry per scrape (the proxy picks the replica), each naming the same
    # artifact: the same sha256, so the same calibration, on every replica.
    _, url = cluster
    sha256 = httpx.get(f"{url}/model").json()["sha256"]
    for _ in range(4):
        r = httpx.get(f"{url}/metrics")
        assert r.status_code == 200
        (info,) = [ln for ln in r.text.splitlines() if ln.startswith("vae_model_info{")]
        assert f'sha256="{sha256}"' in info


@dataclass
class Load:
    """Threads sending every call in turn, each answer checked against uvicorn's;
    a connection error is retried (the only retry allowed), anything else is a failure.

    Every other call is the heavy one, so requests spend most of their time inside the
    replicas (not in the proxy): with 16 threads, a replica killed under this load usually has
    some in flight.
    """

    url: str
    expected: dict[int, tuple[Any, ...]]
    ok: int = 0
    connection_retries: int = 0
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            n = 0
            while not self.stop.is_set():
                i = HEAVY if n % 2 else (n // 2) % len(CALLS)
                try:
                    got = answer(http, *CALLS[i])
                except httpx.TransportError:  # the same call again
                    with self.lock:
                        self.connection_retries += 1
                    continue
                n += 1
                with self.lock:
                    if got == self.expected[i]:
                        self.ok += 1
                    else:
                        self.failures.append(f"{CALLS[i][1]}: {got[0]} {got[2][:200]!r}")

    def wait_for(self, count: int, timeout: float = 60.0) -> None:
        target = self.ok + count
        deadline = time.monotonic() + timeout
        while self.ok < target and time.monotonic() < deadline and not self.failures:
            time.sleep(0.05)
        assert self.ok >= target or self.failures, f"only {self.ok} answers in {timeout} s"


def test_killing_a_replica_mid_load_loses_no_request_and_serve_restarts_it(
    cluster: tuple[RayCluster, str], uvicorn_answers: dict[int, tuple[Any, ...]]
) -> None:
    ray, url = cluster
    before = ray.wait_running(2)
    victim = before[0]
    load = Load(url, uvicorn_answers)
    threads = [threading.Thread(target=load.run) for _ in range(16)]
    for t in threads:
        t.start()
    try:
        load.wait_for(100)
        os.kill(victim.pid, signal.SIGKILL)
        after = ray.wait_running(2, exclude=victim.pid)
        load.wait_for(100)  # and on after the replacement joined
    finally:
        load.stop.set()
        for t in threads:
            t.join()
    assert load.failures == []
    (new,) = [r for r in after if r.pid not in {b.pid for b in before}]
    # The replacement went where the room was, the node that lost its replica, and serves.
    assert new.node_id == victim.node_id
    assert '"status": 200' in ray.worker_log(new.pid)
    # Whether the killed replica had a request in flight at that instant is the machine's
    # timing, not this test's to decide (a run here had none, and the proxy's log no resend):
    # the claim is that none is lost either way. The proxy's resend of an unanswered request
    # is tested without timing by test_retry_sends_the_same_body_again_when_no_response_came.


# -- a model repository multiplexed over the two nodes ------------------------------------------

REPOSITORY_APP = "vae-models"  # beside the cluster's `vae` application, under /repo


@pytest.fixture(scope="module")
def repository_app(
    cluster: tuple[RayCluster, str],
    tiny_artifact: Path,
    repository: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> str:
    """deploy/ray/serve-repository.yaml as a second application on the cluster (the first one's
    config unchanged, so Serve leaves it alone), under /repo, with models a, b and c (a's
    weights under another name), one model per replica at most, and no CPUs of its own (the
    first application holds them); its URL."""
    ray, url = cluster
    work = tmp_path_factory.mktemp("ray-repository")
    root = work / "repository"
    shutil.copytree(repository, root)
    shutil.copytree(root / "a", root / "c")
    config = cluster_config(tiny_artifact, int(url.rsplit(":", 1)[1]))
    (app,) = load_config(REPO / "deploy" / "ray" / "serve-repository.yaml")["applications"]
    app |= {"name": REPOSITORY_APP, "route_prefix": "/repo"}
    app["args"]["max_models_per_replica"] = 1
    app["runtime_env"]["env_vars"]["VAE_MODEL_REPOSITORY"] = str(root)
    (deployment,) = app["deployments"]
    deployment["ray_actor_options"]["num_cpus"] = 0
    config["applications"].append(app)
    path = work / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    ray.serve("deploy", str(path))
    ray.wait_running(2, application=REPOSITORY_APP)
    return f"{url}/repo"


def log_records(ray: RayCluster, pid: int, since: int = 0) -> list[dict[str, Any]]:
    """The app's JSON log lines in a replica's stderr, from offset `since` on."""
    records = []
    for line in ray.worker_log(pid)[since:].splitlines():
        start = line.find("{")
        try:
            record = json.loads(line[start:]) if start >= 0 else None
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def repository_events(records: list[dict[str, Any]]) -> list[str]:
    """What the repository did: "model a: versions [1] serving (...)", "model a: unloaded ..."."""
    return [r["message"] for r in records if r.get("logger") == "app.repository"]


def test_a_repository_is_multiplexed_over_the_replicas_by_model_id(
    cluster: tuple[RayCluster, str], repository_app: str
) -> None:
    ray, _ = cluster
    replicas = ray.wait_running(2, application=REPOSITORY_APP)
    assert len({r.node_id for r in replicas}) == 2  # one per node
    pids = [r.pid for r in replicas]

    def events() -> list[str]:
        return [e for pid in pids for e in repository_events(log_records(ray, pid))]

    with httpx.Client(base_url=repository_app, timeout=30) as http:

        def encode(name: str, x: list[list[float]], header: bool = True) -> httpx.Response:
            headers = {MODEL_ID: name} if header else {}
            return http.post(f"/models/{name}/encode", json={"instances": x}, headers=headers)

        # Nothing is loaded until a request asks, on either replica.
        for _ in range(4):
            assert states(http) == {"a": "UNLOADED", "b": "UNLOADED", "c": "UNLOADED"}
        # a, then b, each with its model id: Serve sends a model no replica holds to the one
        # that holds the fewest, so once the proxy knows where a is (replicas report their
        # models every 0.1 s), b goes to the other replica. A round that loads nothing shows
        # the proxy has settled.
        for _ in range(10):
            before = len(events())
            assert np.shape(encode("a", IMG).json()["mean"]) == (1, 2)
            time.sleep(1)
            assert np.shape(encode("b", TAB).json()["mean"]) == (1, 3)
            time.sleep(1)
            if len(events()) == before:
                break
        else:
            pytest.fail(f"the models never settled on the replicas: {events()}")

        marks = {pid: len(ray.worker_log(pid)) for pid in pids}
        for _ in range(4):
            assert np.shape(encode("a", IMG).json()["mean"]) == (1, 2)
            assert np.shape(encode("b", TAB).json()["mean"]) == (1, 3)
            r = http.post("/v2/models/b/infer", json=v2_body(TAB), headers={MODEL_ID: "b"})
            assert r.status_code == 200, r.text
            mean = next(o for o in r.json()["outputs"] if o["name"] == "mean")
            assert mean["shape"] == [1, 3]
            r = http.post("/v2/models/b-decode/infer", json=v2_body([[0.0, 1.0, -1.0]], "latents"),
                          headers={MODEL_ID: "b"})  # fmt: skip
            assert r.status_code == 200, r.text
            # A model there is not: the app's own 404s, and no replica's model evicted for it.
            r = encode("nope", IMG)
            assert r.status_code == 404
            assert r.json()["detail"].startswith("No model 'nope' here; the models served are ")
            r = http.post("/v2/models/nope/infer", json=v2_body(IMG))
            assert r.status_code == 404
            assert r.json()["error"].startswith("Model 'nope' is not served here")
        # Each model's requests went to one replica, a different one for each: the proxy
        # routed by model id, and nothing was loaded or unloaded meanwhile.
        served = []
        for pid in pids:
            records = log_records(ray, pid, marks[pid])
            assert repository_events(records) == []
            served.append(
                {r["model"] for r in records if r.get("model") and r.get("status") == 200}
            )
        assert sorted(served, key=sorted) == [{"a"}, {"b"}]
        holder = {name: pids[served.index({name})] for name in ("a", "b")}

        # c, which no replica holds, goes to one of them, both holding one model (the
        # bound): that replica unloads its model for it.
        marks = {pid: len(ray.worker_log(pid)) for pid in pids}
        assert np.shape(encode("c", IMG).json()["mean"]) == (1, 2)
        moved = {pid: repository_events(log_records(ray, pid, marks[pid])) for pid in pids}
        (pid,) = [pid for pid in pids if moved[pid]]
        (evicted,) = [name for name in ("a", "b") if holder[name] == pid]
        assert [e.split(" (")[0] for e in moved[pid]] == [
            f"model {evicted}: unloaded versions [1]",
            "model c: versions [1] serving",
        ]
        assert states(http, headers={MODEL_ID: "c"}) == {
            "a": "UNLOADED", "b": "UNLOADED", "c": "READY"
        }  # fmt: skip
        # Every model still answers, without the header too (then on whichever replica).
        assert encode(evicted, IMG if evicted == "a" else TAB).status_code == 200
        for name, x in (("a", IMG), ("b", TAB), ("c", IMG)):
            assert encode(name, x, header=False).status_code == 200
    for pid in pids:  # Serve's eviction awaited each model's `__del__`, and nothing else did
        assert "was never awaited" not in ray.worker_log(pid)
