"""Ray Serve (app/ray_serve.py, deploy/ray/): the same app on a real two-node Ray cluster.

The cluster (bench.ray.RayCluster) is two `ray start` nodes on this machine (distinct ports,
one CPU each, a temp dir of their own), and the app goes on it with `serve deploy
deploy/ray/serve.yaml`, changing only the artifact, the proxy's port and where proxies run.
Everything is called through Ray's HTTP proxy and compared byte for byte with a plain uvicorn
`python -m app` serving the same artifact. Teardown kills exactly the processes those nodes
started, never `ray stop`, which kills every Ray process of the user by name.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient
from pydantic.warnings import PydanticDeprecatedSince20
from starlette.types import Message, Scope

from app.main import create_app
from app.settings import Settings
from bench.ray import DEPLOYMENT, RayCluster, serve_config
from bench.servers import free_port
from tests.conftest import REPO, Server

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
        # deploy/ray/serve.yaml as it is (two replicas, at most one per node), but for the
        # artifact, the port, and the proxy on the head only (both nodes share this host).
        config = serve_config(tiny_artifact, port)
        # One proxy for two nodes: without this it sends everything to its own node's
        # replica (Serve prefers the local one until it is full), and the other one idles.
        proxy_env = config["controller_options"]["runtime_env"]["env_vars"]
        proxy_env["RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING"] = "0"
        path = work / "serve.yaml"
        path.write_text(yaml.safe_dump(config))
        ray.serve("deploy", str(path))
        ray.wait_running(2)
        yield ray, f"http://127.0.0.1:{port}"


def test_two_replicas_run_one_per_node(cluster: tuple[RayCluster, str]) -> None:
    ray, _ = cluster
    replicas = ray.wait_running(2)
    assert len({r.node_id for r in replicas}) == 2


def test_every_endpoint_answers_through_the_proxy_as_uvicorn_does(
    cluster: tuple[RayCluster, str], uvicorn_answers: dict[int, tuple[Any, ...]]
) -> None:
    ray, url = cluster
    with httpx.Client(base_url=url, timeout=10) as http:
        # Each call a few times: the proxy spreads them over both replicas.
        for _ in range(4):
            for i, call in enumerate(CALLS):
                assert answer(http, *call) == uvicorn_answers[i], call
    for replica in ray.wait_running(2):  # both answered some: their request log lines
        assert '"route": "/encode", "method": "POST", "status": 200' in ray.worker_log(replica.pid)


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
