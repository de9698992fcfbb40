"""vae_service_client against real servers: real `python -m app` (uvicorn) processes on real ports.

The equality tests compare every method of both clients, in both the .npy and the JSON mode,
with the raw JSON REST answer to the same seeded request. The retry tests use servers that
really refuse connections, or really answer 503 because their model is not loaded.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from vae_service_client import (
    AnomalyScores,
    AsyncVAEClient,
    Encoded,
    ModelInfo,
    ModelSummary,
    ModelVersionState,
    RetryPolicy,
    Samples,
    VAEAuthError,
    VAEClient,
    VAEConnectionError,
    VAEError,
    VAENotFoundError,
    VAETimeoutError,
    VAEUnavailableError,
    VAEValidationError,
)
from vae_service_client.client import error_from_response, parse_retry_after

from bench.servers import free_port
from tests.conftest import EVERY_SCORE, REPO, GatedStart, Server, make_artifact

pytestmark = pytest.mark.server

StartServer = Callable[[dict[str, str]], Server]

X = [[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.5, 0.25]]
LATENTS = [[0.3, -1.2], [2.0, 0.5], [0.0, 0.0]]
# Every /anomaly-score option, the threshold low enough that some instance is flagged.
MORE_OPTIONS: dict[str, Any] = {"seed": 1, "scores": ["likelihood_ratio"], "attribution": True}
SCORE_OPTIONS: dict[str, Any] = {
    "samples": 2,
    "log_likelihood_samples": 8,
    "seed": 1,
    "threshold_percentile": 0.2,
    "decision_score": "kl_divergence",
}
NOT_READY = "The model is not loaded yet; try again shortly."
# Fast retries that still wait long enough (minutes at most) for a server to start.
PATIENT = RetryPolicy(retries=600, backoff=0.05, max_backoff=0.25)


@pytest.fixture(scope="module")
def server(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One real server for the tests that only read from it."""
    srv = Server({"VAE_MODEL_PATH": str(tiny_artifact)}, tmp_path_factory.mktemp("s") / "log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    procs: list[Server] = []

    def start(port: int, env: dict[str, str], *, ready: bool = True) -> Server:
        # `ready=False`: the real app with its lifespan off, so the model never loads and the
        # model routes answer 503, as a server does before its warm-up ends (uvicorn only
        # listens once the lifespan has finished, so a starting server refuses connections
        # instead: no other real way to meet its 503 today).
        args: tuple[str, ...] = ("-m", "app")
        if not ready:
            args = ("-m", "uvicorn", "app.main:create_app", "--factory", "--lifespan", "off",
                    "--host", "127.0.0.1", "--port", str(port))  # fmt: skip
        proc = Server(env, tmp_path / f"server{len(procs)}.log", port=port, args=args)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()


def wait_listening(url: str, proc: Server, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.proc.poll() is None, proc.log.read_text()
        try:
            httpx.get(f"{url}/health", timeout=1.0)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError(f"not listening in {timeout}s:\n{proc.log.read_text()}")


class OnRecord(logging.Handler):
    """Calls `action` once, at the first vae_service_client log record whose message has `text`."""

    def __init__(self, text: str, action: Callable[[], None]) -> None:
        super().__init__(logging.WARNING)
        self.text, self.action, self.messages = text, action, list[str]()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        if len(self.messages) == 1:
            assert self.text in self.messages[0], self.messages[0]
            self.action()


@pytest.fixture
def client_log() -> Iterator[Callable[[logging.Handler], None]]:
    logger = logging.getLogger("vae_service_client")
    added: list[logging.Handler] = []

    def add(handler: logging.Handler) -> None:
        logger.addHandler(handler)
        added.append(handler)

    yield add
    for handler in added:
        logger.removeHandler(handler)


# -- the same answers as the raw REST API -------------------------------------------------------


def raw_answers(url: str) -> dict[str, Any]:
    with httpx.Client(base_url=url, timeout=10) as http:

        def post(path: str, body: dict[str, Any]) -> Any:
            response = http.post(path, json=body)
            assert response.status_code == 200, response.text
            return response.json()

        return {
            "encode": post("/encode", {"instances": X, "samples": 3, "seed": 5}),
            "encode0": post("/encode", {"instances": X, "seed": 5}),
            "decode": post("/decode", {"latents": LATENTS}),
            "decode_mode": post("/decode", {"latents": LATENTS, "output": "mode"}),
            "sample": post("/sample", {"n": 3, "seed": 9}),
            "sample_mode": post("/sample", {"n": 2, "seed": 9, "output": "mode"}),
            "scores": post("/anomaly-score", {"instances": X, "samples": 4, "seed": 1}),
            "scores_ll": post("/anomaly-score", {"instances": X, **SCORE_OPTIONS}),
            "scores_more": post("/anomaly-score", {"instances": X, **MORE_OPTIONS}),
            "model": http.get("/model").json(),
        }


def call_every_method(client: VAEClient) -> dict[str, Any]:
    return {
        "encode": client.encode(X, samples=3, seed=5),
        "encode0": client.encode(X, seed=5),
        "decode": client.decode(LATENTS),
        "decode_mode": client.decode(LATENTS, output="mode"),
        "sample": client.sample(3, seed=9),
        "sample_mode": client.sample(2, seed=9, output="mode"),
        "scores": client.anomaly_score(X, samples=4, seed=1),
        "scores_ll": client.anomaly_score(X, **SCORE_OPTIONS),
        "scores_more": client.anomaly_score(X, **MORE_OPTIONS),
        "model": client.model_info(),
        "health": client.health(),
        "ready": client.ready(),
    }


async def acall_every_method(client: AsyncVAEClient) -> dict[str, Any]:
    return {
        "encode": await client.encode(X, samples=3, seed=5),
        "encode0": await client.encode(X, seed=5),
        "decode": await client.decode(LATENTS),
        "decode_mode": await client.decode(LATENTS, output="mode"),
        "sample": await client.sample(3, seed=9),
        "sample_mode": await client.sample(2, seed=9, output="mode"),
        "scores": await client.anomaly_score(X, samples=4, seed=1),
        "scores_ll": await client.anomaly_score(X, **SCORE_OPTIONS),
        "scores_more": await client.anomaly_score(X, **MORE_OPTIONS),
        "model": await client.model_info(),
        "health": await client.health(),
        "ready": await client.ready(),
    }


def expected_info(raw: dict[str, Any]) -> ModelInfo:
    """The ModelInfo a client should read from a raw GET /model (or /models/{name}) answer."""
    versions = raw.get("versions")
    if versions is not None:
        raw = {**raw, "versions": tuple(ModelVersionState(**v) for v in versions)}
    return ModelInfo(**raw)


def same(got: np.ndarray | None, raw: Any) -> None:
    if raw is None:
        assert got is None
        return
    assert isinstance(got, np.ndarray)
    expected = np.asarray(raw)
    # The server computes in float32 and prints each float32 exactly, so equality is exact.
    assert got.dtype == (np.bool_ if expected.dtype == np.bool_ else np.float32)
    np.testing.assert_array_equal(got, expected.astype(got.dtype), strict=True)


def assert_matches_raw(got: dict[str, Any], raw: dict[str, Any]) -> None:
    for name in ("encode", "encode0"):
        enc = got[name]
        assert isinstance(enc, Encoded)
        for field in ("mean", "std", "samples"):
            same(getattr(enc, field), raw[name][field])
    assert got["encode"].samples.shape == (2, 3, 2)
    for name in ("decode", "decode_mode"):
        same(got[name], raw[name]["outputs"])
    for name in ("sample", "sample_mode"):
        assert isinstance(got[name], Samples)
        same(got[name].latents, raw[name]["latents"])
        same(got[name].outputs, raw[name]["outputs"])
    for name in ("scores", "scores_ll", "scores_more"):
        scores, expected = got[name], raw[name]
        assert isinstance(scores, AnomalyScores)
        for field in (*EVERY_SCORE, "is_anomaly", "attribution"):
            same(getattr(scores, field), expected[field])
        for field, values in expected["percentiles"].items():
            same(getattr(scores.percentiles, field), values)
        for field in ("decision_score", "threshold_percentile", "samples"):
            assert getattr(scores, field) == expected[field]
        assert scores.log_likelihood_samples == expected["log_likelihood_samples"]
    assert got["scores_ll"].is_anomaly.any()  # the 0.2 threshold really reached the server
    assert got["scores_more"].likelihood_ratio is not None  # asked for by name
    assert got["scores_more"].attribution.shape == (2, 4)
    assert got["model"] == expected_info(raw["model"])
    assert got["health"] is True
    assert got["ready"] is True


@pytest.mark.parametrize("binary", [True, False], ids=["npy", "json"])
def test_sync_client_matches_the_raw_json_api(server: Server, binary: bool) -> None:
    with VAEClient(server.url, binary=binary) as client:
        got = call_every_method(client)
    assert_matches_raw(got, raw_answers(server.url))


@pytest.mark.parametrize("binary", [True, False], ids=["npy", "json"])
def test_async_client_matches_the_raw_json_api(server: Server, binary: bool) -> None:
    async def main() -> dict[str, Any]:
        async with AsyncVAEClient(server.url, binary=binary) as client:
            return await acall_every_method(client)

    assert_matches_raw(asyncio.run(main()), raw_answers(server.url))


def test_binary_mode_sends_and_receives_npy(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="vae_service_client")
    with VAEClient(server.url) as client:
        client.encode(X, seed=0)
        client.sample(2, seed=0)
        client.anomaly_score(X, seed=0)
    with VAEClient(server.url, binary=False) as client:
        client.encode(X, seed=0)
    assert [r.getMessage().split(",")[0] for r in caplog.records] == [
        "POST /encode (application/x-npy",
        "POST /sample (application/json",  # /sample takes JSON only, but answers .npy
        "POST /anomaly-score (application/x-npy",  # and /anomaly-score answers JSON only
        "POST /encode (application/json",
    ]
    answers = [r.getMessage().split("-> ")[1].split(",")[0] for r in caplog.records]
    assert answers == ["200 (application/x-npy", "200 (application/x-npy",
                       "200 (application/json", "200 (application/json"]  # fmt: skip


def test_server_parses_the_npy_body(server: Server) -> None:
    # The two body parsers word a non-finite value differently: proof of which one ran.
    x = [[0.0, float("nan"), 0.0, 0.0]]
    with VAEClient(server.url) as client, pytest.raises(VAEValidationError) as npy:
        client.encode(x)
    with (
        VAEClient(server.url, binary=False) as client,
        pytest.raises(VAEValidationError) as as_json,
    ):
        client.encode(x)
    assert npy.value.detail == "instances[0] has a non-finite value."
    assert as_json.value.detail == "instances[0][1]: Input should be a finite number."


def test_shaped_and_mixed_instances_give_the_same_posterior(server: Server) -> None:
    with VAEClient(server.url) as client:
        flat = client.encode(np.array(X), seed=3)
        shaped = client.encode(np.array(X).reshape(2, 2, 2), seed=3)  # N x H x W, as .npy
        mixed = client.encode([X[0], [X[1][:2], X[1][2:]]], seed=3)  # no array holds it: JSON
    for enc in (shaped, mixed):
        np.testing.assert_array_equal(enc.mean, flat.mean)
        np.testing.assert_array_equal(enc.std, flat.std)


# -- errors --------------------------------------------------------------------------------------


def test_422_raises_the_typed_error_with_the_servers_detail_and_is_not_retried(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="vae_service_client")
    with VAEClient(server.url, retry=RetryPolicy(retries=3)) as client:
        with pytest.raises(VAEValidationError) as bad_shape:
            client.encode([[0.0, 1.0, 1.0]])
        with pytest.raises(VAEValidationError) as bad_option:
            client.anomaly_score(X, samples=2000)
    assert bad_shape.value.status_code == 422
    assert bad_shape.value.detail == (
        "instances[0] has 3 values; this model takes 4 values or a 2x2 array."
    )
    assert str(bad_shape.value) == f"HTTP 422: {bad_shape.value.detail}"
    assert bad_option.value.detail == "samples=2000 is over the limit of 1024 (VAE_MAX_SAMPLES)."
    assert len(caplog.records) == 2  # one exchange each, no retries


def test_async_client_raises_the_same_typed_errors(server: Server) -> None:
    async def main() -> VAEValidationError:
        async with AsyncVAEClient(server.url) as client:
            with pytest.raises(VAEValidationError) as e:
                await client.decode([[0.0, 0.0, 0.0]])
            return e.value

    error = asyncio.run(main())
    assert error.status_code == 422
    assert error.detail == "latents[0] has 3 values; this model's latent size is 2."


def request_count(url: str, route: str) -> float:
    """How many requests to `route` the server has answered, by its own /metrics."""
    text = httpx.get(f"{url}/metrics").text
    found = re.findall(
        rf'^vae_request_duration_seconds_count{{[^}}]*route="{route}"[^}}]*}} (\S+)$', text, re.M
    )
    return sum(float(v) for v in found)


def wait_idle(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(r"^vae_requests_in_flight 0\.0$", httpx.get(f"{url}/metrics").text, re.M):
        assert time.monotonic() < deadline, "requests still in flight"
        time.sleep(0.01)


def test_client_timeout_raises_timeout_error_without_retrying(
    start_gated: GatedStart, tiny_artifact: Path, client_log: Callable[[logging.Handler], None]
) -> None:
    server, gate = start_gated({"VAE_MODEL_PATH": str(tiny_artifact)})
    retries = OnRecord("", lambda: None)
    client_log(retries)
    gate.close()  # no answer can come within the client's timeout
    timeout = httpx.Timeout(10.0, read=0.5)
    client = VAEClient(server.url, timeout=timeout, retry=RetryPolicy(retries=3))
    with client, pytest.raises(VAETimeoutError) as e:
        client.anomaly_score(X, seed=0)
    gate.open()
    wait_idle(server.url)
    assert e.value.status_code is None
    assert e.value.detail.startswith("No answer to POST http://127.0.0.1:")
    assert e.value.detail.endswith("within the timeout (ReadTimeout).")
    assert retries.messages == []  # no retry was logged ...
    assert request_count(server.url, "/anomaly-score") == 1  # ... and one request was sent


def test_server_timeout_raises_timeout_error_with_its_detail(
    start_gated: GatedStart, tiny_artifact: Path
) -> None:
    server, gate = start_gated({"VAE_MODEL_PATH": str(tiny_artifact), "VAE_REQUEST_TIMEOUT_S": "1"})
    gate.close()  # the server's own deadline passes first
    client = VAEClient(server.url, retry=RetryPolicy(retries=3))
    with client, pytest.raises(VAETimeoutError) as e:
        client.encode(X, seed=0)
    gate.open()
    assert (e.value.status_code, e.value.detail) == (
        504,
        "The request took longer than 1 s (VAE_REQUEST_TIMEOUT_S).",
    )
    assert request_count(server.url, "/encode") == 1  # a 504 is not retried


@pytest.mark.parametrize("binary", [True, False], ids=["npy", "json"])
def test_a_body_over_the_limit_raises_the_validation_error_with_the_413s_detail(
    start_server: StartServer, tiny_artifact: Path, binary: bool
) -> None:
    server = start_server({"VAE_MODEL_PATH": str(tiny_artifact), "VAE_MAX_BODY_BYTES": "1024"})
    server.wait_ready()
    big = np.zeros((100, 4), dtype=np.float32)  # over 1 KiB in either encoding
    with VAEClient(server.url, binary=binary) as client, pytest.raises(VAEValidationError) as e:
        client.encode(big)
    assert (e.value.status_code, e.value.detail) == (
        413,
        "The request body is larger than 1024 bytes, the limit (VAE_MAX_BODY_BYTES).",
    )


@pytest.mark.parametrize(
    ("status", "headers", "body", "error", "detail"),
    [
        (400, {}, b'{"detail": "Bad request."}', VAEValidationError, "Bad request."),
        (415, {}, b'{"detail": "Nope."}', VAEValidationError, "Nope."),
        (404, {}, b'{"detail": "Not Found"}', VAENotFoundError, "Not Found"),
        (409, {}, b'{"detail": "Over the limit."}', VAEError, "Over the limit."),
        (500, {}, b"Internal Server Error", VAEError, "Internal Server Error"),
        (502, {}, b"", VAEError, "Bad Gateway"),
        (422, {}, b'{"detail": [{"loc": ["body"]}]}', VAEValidationError,
         '[{"loc": ["body"]}]'),
    ],
)  # fmt: skip
def test_answers_only_a_proxy_or_a_fault_gives_map_to_typed_errors(
    status: int, headers: dict[str, str], body: bytes, error: type[VAEError], detail: str
) -> None:
    # What the client's own calls never meet from the service itself (it sends the right
    # media types and routes): a proxy's 502, an HTML 500, a list-shaped detail. The statuses
    # the service does send (401, 403, 404, 409, 413, 422, 503, 504) are tested against real
    # servers.
    response = httpx.Response(
        status, headers={"content-type": "application/json", **headers}, content=body
    )
    exc = error_from_response(response)
    assert type(exc) is error
    assert (exc.status_code, exc.detail) == (status, detail)


# -- retries -------------------------------------------------------------------------------------


def test_retries_until_a_late_server_comes_up(
    spawn: Callable[..., Server],
    tiny_artifact: Path,
    client_log: Callable[[logging.Handler], None],
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    started: list[Server] = []
    # The server starts only once the first attempt has failed.
    on_first = OnRecord(
        "ConnectError; retry 1 of 600",
        lambda: started.append(spawn(port, {"VAE_MODEL_PATH": str(tiny_artifact)})),
    )
    client_log(on_first)
    with VAEClient(url, retry=PATIENT) as client:
        got = client.sample(3, seed=9)
    assert len(started) == 1
    assert len(on_first.messages) >= 2  # it kept retrying while the server started
    raw = httpx.post(f"{url}/sample", json={"n": 3, "seed": 9}).json()
    same(got.outputs, raw["outputs"])


def test_no_retries_raises_the_connection_error_at_once(
    client_log: Callable[[logging.Handler], None],
) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    retries = OnRecord("", lambda: None)
    client_log(retries)
    with VAEClient(url, retry=RetryPolicy(retries=0)) as client:
        with pytest.raises(VAEConnectionError) as e:
            client.encode(X)
        assert client.health() is False  # a probe reports no answer as "not up"
    assert e.value.status_code is None
    assert e.value.detail.startswith(f"Cannot connect for POST {url}/encode")
    assert retries.messages == []


def test_503_is_retried_then_raised_with_the_servers_detail(
    spawn: Callable[..., Server],
    tiny_artifact: Path,
    client_log: Callable[[logging.Handler], None],
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = spawn(port, {"VAE_MODEL_PATH": str(tiny_artifact)}, ready=False)
    wait_listening(url, proc)
    retries = OnRecord("503; retry 1 of 2", lambda: None)
    client_log(retries)
    with VAEClient(url, retry=RetryPolicy(retries=2, backoff=0.01)) as client:
        with pytest.raises(VAEUnavailableError) as e:
            client.encode(X)
        assert client.health() is True
        assert client.ready() is False  # a probe's 503 is an answer, not retried
    assert (e.value.status_code, e.value.detail) == (503, NOT_READY)
    assert len(retries.messages) == 2
    proc.stop()
    log = proc.log.read_text()
    assert log.count('"POST /encode?samples=0 HTTP/1.1" 503') == 3  # 1 + 2 retries, really sent
    assert log.count('"GET /ready HTTP/1.1" 503') == 1


def test_async_client_waits_out_503_until_the_model_is_ready(
    spawn: Callable[..., Server],
    tiny_artifact: Path,
    server: Server,
    client_log: Callable[[logging.Handler], None],
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"VAE_MODEL_PATH": str(tiny_artifact)}
    not_ready = spawn(port, env, ready=False)
    wait_listening(url, not_ready)

    def replace() -> None:
        # The not-ready server goes away and a real one takes its port: the client meets
        # 503s, then refused connections, then answers. This runs inside the client's retry
        # (blocking its loop a moment), so the old server is gone before the next attempt and
        # no attempt races its shutdown.
        not_ready.stop()
        spawn(port, env)

    client_log(OnRecord("503; retry 1 of 600", replace))

    async def main() -> Encoded:
        async with AsyncVAEClient(url, retry=PATIENT) as client:
            return await client.encode(X, samples=2, seed=4)

    got = asyncio.run(main())
    raw = httpx.post(
        f"{server.url}/encode", json={"instances": X, "samples": 2, "seed": 4}
    ).json()  # the same artifact on another server: the same answer
    same(got.samples, raw["samples"])
    assert '"POST /encode?samples=2&seed=4 HTTP/1.1" 503' in not_ready.log.read_text()


def test_retry_waits_grow_and_honour_retry_after_up_to_the_cap() -> None:
    policy = RetryPolicy(retries=10, backoff=0.5, max_backoff=4.0, max_retry_after=10.0)
    for attempt, step in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (6, 4.0)]:
        waits = [policy.delay(attempt) for _ in range(200)]
        assert step / 2 <= min(waits) <= max(waits) <= step
        assert max(waits) - min(waits) > step / 4  # jittered, not one fixed wait
    assert 3.0 <= policy.delay(0, retry_after=3.0) <= 3.5
    assert policy.delay(0, retry_after=120.0) == 10.0
    with pytest.raises(ValueError, match="must not be negative"):
        RetryPolicy(retries=-1)


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Thu, 01 Jan 2026 12:00:30 GMT", now) == 30.0
    assert parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now) == 0.0  # already past
    assert parse_retry_after("soon") is None
    assert parse_retry_after("nan") is None
    assert parse_retry_after(None) is None


# -- API keys ------------------------------------------------------------------------------------


def test_api_key_is_sent_as_a_bearer_token(start_server: StartServer, tiny_artifact: Path) -> None:
    server = start_server({"VAE_MODEL_PATH": str(tiny_artifact), "VAE_API_KEYS": "k1"})
    with VAEClient(server.url, api_key="k1") as client:
        deadline = time.monotonic() + 60
        while not client.ready():  # /ready may itself want the key
            assert time.monotonic() < deadline, server.log.read_text()
            time.sleep(0.1)
        assert client.encode(X, seed=0).mean.shape == (2, 2)
    for key in (None, "wrong"):
        with VAEClient(server.url, api_key=key) as client, pytest.raises(VAEAuthError) as e:
            client.encode(X)
        assert (e.value.status_code, e.value.detail) == (
            401,
            "A valid API key is required: send Authorization: Bearer <key> or X-API-Key.",
        )


# -- packaging -----------------------------------------------------------------------------------


def test_importing_the_client_loads_no_torch_and_no_fastapi() -> None:
    code = (
        "import sys, vae_service_client; "
        "print(sorted(m for m in ('torch', 'fastapi', 'starlette', 'pydantic') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


# -- httpx's options, the caller's own client, trio ----------------------------------------------


def test_the_callers_httpx_client_is_used_and_left_open(server: Server) -> None:
    sent: list[str] = []
    http = httpx.Client(event_hooks={"request": [lambda r: sent.append(r.url.path)]})
    with VAEClient(server.url, http_client=http) as client:
        assert client.encode(X, seed=5).mean.shape == (2, 2)
        assert client.model_info().sha256
    assert sent == ["/encode", "/model"]
    assert http.get(f"{server.url}/health").status_code == 200  # still the caller's, still open
    http.close()


def test_httpx_options_reach_the_clients_own_httpx_client(server: Server) -> None:
    sent: list[str] = []
    hooks = {"request": [lambda r: sent.append(r.headers["user-agent"])]}
    options: dict[str, Any] = {"event_hooks": hooks, "limits": httpx.Limits(max_connections=1),
                               "transport": httpx.HTTPTransport(retries=0)}  # fmt: skip
    with VAEClient(server.url, **options) as client:
        client.sample(2, seed=0)
    assert len(sent) == 1
    assert sent[0].startswith("vae-service-client/")
    with pytest.raises(TypeError, match="Give http_client or httpx options, not both"):
        VAEClient(server.url, http_client=httpx.Client(), verify=False)
    with pytest.raises(TypeError, match="headers: set by VAEClient itself"):
        VAEClient(server.url, headers={"x": "y"})


def test_async_client_runs_under_trio_and_waits_out_503_there(
    server: Server, spawn: Callable[..., Server], tiny_artifact: Path
) -> None:
    import trio

    port = free_port()
    not_ready = spawn(port, {"VAE_MODEL_PATH": str(tiny_artifact)}, ready=False)
    wait_listening(f"http://127.0.0.1:{port}", not_ready)

    async def main() -> tuple[Encoded, VAEUnavailableError]:
        async with AsyncVAEClient(server.url) as client:
            enc = await client.encode(X, samples=2, seed=4)
        retry = RetryPolicy(retries=2, backoff=0.01)
        async with AsyncVAEClient(f"http://127.0.0.1:{port}", retry=retry) as client:
            with pytest.raises(VAEUnavailableError) as e:
                await client.encode(X)  # two waits between retries, on trio's clock
        return enc, e.value

    enc, error = trio.run(main)
    raw = httpx.post(f"{server.url}/encode", json={"instances": X, "samples": 2, "seed": 4}).json()
    same(enc.samples, raw["samples"])
    assert error.detail == NOT_READY
    assert not_ready.log.read_text().count('"POST /encode?samples=0 HTTP/1.1" 503') == 3


# -- many models: a model repository -------------------------------------------------------------

X3 = [[0.1, 0.2, 0.3], [1.0, -1.0, 0.5]]  # for model b (gaussian_artifact: 3 inputs, latent 2)
BAD_NAMES = ["", "-a", ".a", "_a", "a/b", "a b", "../a", "a?b", "a%2Fb", "é", "a\n", "x" * 65]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def repository(root: Path, models: dict[str, dict[int, Path]]) -> Path:
    """A model repository in Triton's layout, root/<name>/<version>/vae.pt, of copies."""
    for name, versions in models.items():
        for version, artifact in versions.items():
            (root / name / str(version)).mkdir(parents=True)
            shutil.copy(artifact, root / name / str(version) / "vae.pt")
    return root


@pytest.fixture(scope="module")
def a2_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Version 2 of model a: as tiny_artifact (4 inputs), with a latent of 3, not 2."""
    return make_artifact(tmp_path_factory.mktemp("a2") / "vae.pt", latent_dim=3, seed=1)


@pytest.fixture(scope="module")
def repo_server(
    tiny_artifact: Path,
    a2_artifact: Path,
    gaussian_artifact: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Server]:
    """A real server of a repository: a (version 1: 4 inputs and a latent of 2, version 2: a
    latent of 3) and b (3 inputs, latent 2), all loaded, a the default."""
    root = repository(
        tmp_path_factory.mktemp("repo"),
        {"a": {1: tiny_artifact, 2: a2_artifact}, "b": {1: gaussian_artifact}},
    )
    env = {"VAE_MODEL_REPOSITORY": str(root), "VAE_MODEL_CONTROL": "all", "VAE_DEFAULT_MODEL": "a"}
    srv = Server(env, tmp_path_factory.mktemp("repo-log") / "log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def test_a_client_bound_to_one_model_and_a_view_bound_to_another_encode_each_ones_shapes(
    repo_server: Server,
) -> None:
    sent: list[str] = []
    hooks = {"request": [lambda r: sent.append(f"{r.method} {r.url.path}")]}
    url = repo_server.url
    a = VAEClient(url, model="a", event_hooks=hooks)
    with a:
        with a.model("b") as b:  # closing the view leaves a's pool open
            assert isinstance(b, VAEClient)
            assert (b.model_name, b.model_version) == ("b", None)
            assert b.encode(X3, seed=0).mean.shape == (2, 2)
            assert b.sample(3, seed=0).outputs.shape == (3, 3)
            assert b.anomaly_score(X3, seed=0).kl_divergence.shape == (2,)
            assert b.decode([[0.0, 0.0]]).shape == (1, 3)
            info_b = b.model_info()
            assert b.ready() is True
        enc = a.encode(X, seed=0)  # a's latest version, 2: a latent of 3
        assert enc.mean.shape == (2, 3)
        info_a = a.model_info()
        assert a.ready() is True
        assert a.model("nope").ready() is False  # 404: no such model
        assert a.model("a", version=9).ready() is False  # 404: no such version
        with pytest.raises(VAENotFoundError) as e:
            a.model("nope").encode(X)
        assert e.value.status_code == 404
        assert "No model 'nope' here" in e.value.detail
    with pytest.raises(RuntimeError):  # the parent closed the pool the view shares
        b.encode(X3)
    assert sent == [
        "POST /models/b/encode", "POST /models/b/sample", "POST /models/b/anomaly-score",
        "POST /models/b/decode", "GET /models/b", "GET /models/b/ready",
        "POST /models/a/encode", "GET /models/a", "GET /models/a/ready",
        "GET /models/nope/ready", "GET /models/a/versions/9/ready", "POST /models/nope/encode",
    ]  # fmt: skip
    assert info_b == expected_info(httpx.get(f"{url}/models/b").json())
    assert (info_b.name, info_b.version, info_b.manifest["input_shape"]) == ("b", 1, [3])
    assert info_a == expected_info(httpx.get(f"{url}/models/a").json())
    assert (info_a.name, info_a.version) == ("a", 2)
    assert info_a.versions is not None
    assert [(v.version, v.state) for v in info_a.versions] == [(1, "READY"), (2, "READY")]
    raw = httpx.post(f"{url}/models/a/encode", json={"instances": X, "seed": 0}).json()
    same(enc.mean, raw["mean"])
    with VAEClient(url) as default:  # no model: today's routes, the default model (a)
        assert default.encode(X, seed=0).mean.shape == (2, 3)
        assert default.model_info().name == "a"
        assert default.ready() is True


def test_a_version_bound_client_and_view_reach_that_version(
    repo_server: Server, tiny_artifact: Path, a2_artifact: Path
) -> None:
    url = repo_server.url
    with VAEClient(url, model="a", version=1, binary=False) as v1:
        enc1 = v1.encode(X, samples=2, seed=3)
        info1 = v1.model_info()
        assert v1.ready() is True
        v2 = v1.model("a", version=2)
        assert (v2.model_version, v2.binary) == (2, False)  # the settings travel to the view
        enc2 = v2.encode(X, seed=3)
        info2 = v2.model_info()
        with pytest.raises(VAENotFoundError) as e:
            v1.model("a", version=3).encode(X)
    assert enc1.mean.shape == (2, 2)
    assert enc1.samples is not None
    assert enc1.samples.shape == (2, 2, 2)
    assert enc2.mean.shape == (2, 3)
    raw = httpx.post(
        f"{url}/models/a/versions/1/encode", json={"instances": X, "samples": 2, "seed": 3}
    ).json()
    same(enc1.samples, raw["samples"])
    assert (info1.version, info1.sha256) == (1, sha256(tiny_artifact))
    assert (info2.version, info2.sha256) == (2, sha256(a2_artifact))
    assert info1 == expected_info(httpx.get(f"{url}/models/a/versions/1").json())
    assert e.value.detail == "Model 'a' has no version 3 loaded; its versions are 1 and 2."


def test_models_lists_the_repository(
    repo_server: Server, tiny_artifact: Path, a2_artifact: Path, gaussian_artifact: Path
) -> None:
    with VAEClient(repo_server.url, model="b") as client:  # a bound client lists them all
        models = client.models()
    assert models == [
        ModelSummary("a", "READY", (
            ModelVersionState(1, "READY", None, sha256(tiny_artifact)),
            ModelVersionState(2, "READY", None, sha256(a2_artifact)),
        ), default=True),
        ModelSummary("b", "READY", (
            ModelVersionState(1, "READY", None, sha256(gaussian_artifact)),
        ), default=False),
    ]  # fmt: skip
    raw = httpx.get(f"{repo_server.url}/models").json()
    assert raw["default"] == "a"
    assert [m["name"] for m in raw["models"]] == ["a", "b"]


def test_bad_model_names_and_versions_raise_before_any_request() -> None:
    sent: list[str] = []
    hooks = {"request": [lambda r: sent.append(str(r.url))]}
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there: nothing may be sent
    rule = re.escape("^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    with VAEClient(url, event_hooks=hooks) as client:
        for name in BAD_NAMES:
            with pytest.raises(ValueError, match=rule):
                VAEClient(url, model=name)
            with pytest.raises(ValueError, match=rule):
                client.model(name)
            with pytest.raises(ValueError, match=rule):
                client.load_model(name)
            with pytest.raises(ValueError, match=rule):
                client.unload_model(name)
        for version in (0, -1):
            with pytest.raises(ValueError, match="version is an int >= 1"):
                client.model("a", version=version)
        with pytest.raises(TypeError, match="version is an int"):
            client.model("a", version=True)
        with pytest.raises(ValueError, match="A version needs a model"):
            VAEClient(url, version=1)
        with pytest.raises(ValueError, match=rule):
            AsyncVAEClient(url, model="a/b")
        # The longest name the rule allows, and each character it allows, pass.
        assert client.model("A" + "z9_.-" * 12 + "abc", version=1).model_name is not None
    assert sent == []


def test_async_client_bound_to_models(repo_server: Server, tiny_artifact: Path) -> None:
    url = repo_server.url

    async def main() -> tuple[Encoded, Encoded, ModelInfo, list[ModelSummary], list[bool]]:
        async with AsyncVAEClient(url, model="b") as b:
            enc_b = await b.encode(X3, seed=0)
            async with b.model("a", version=1) as a1:  # a view: plain method, no await
                assert isinstance(a1, AsyncVAEClient)
                enc_a1 = await a1.encode(X, seed=0)
                info = await a1.model_info()
            models = await b.models()  # the pool is still open after the view's close
            ready = [await b.ready(), await b.model("nope").ready()]
            with pytest.raises(VAENotFoundError):
                await b.model("a", version=5).decode([[0.0, 0.0]])
            with pytest.raises(ValueError, match="breaks the server's rule"):
                b.model("a b")
        return enc_b, enc_a1, info, models, ready

    enc_b, enc_a1, info, models, ready = asyncio.run(main())
    assert enc_b.mean.shape == (2, 2)
    assert enc_a1.mean.shape == (2, 2)
    raw = httpx.post(f"{url}/models/b/encode", json={"instances": X3, "seed": 0}).json()
    same(enc_b.mean, raw["mean"])
    assert (info.name, info.version, info.sha256) == ("a", 1, sha256(tiny_artifact))
    assert [(m.name, m.state, m.default) for m in models] == [("a", "READY", True),
                                                              ("b", "READY", False)]  # fmt: skip
    assert ready == [True, False]


def test_load_and_unload_models_with_the_admin_key(
    start_server: StartServer, tmp_path: Path, tiny_artifact: Path, gaussian_artifact: Path
) -> None:
    root = repository(tmp_path / "repo", {"a": {1: tiny_artifact}, "b": {1: gaussian_artifact}})
    server = start_server({
        "VAE_MODEL_REPOSITORY": str(root), "VAE_MODEL_CONTROL": "explicit",
        "VAE_ADMIN_KEYS": "adm", "VAE_API_KEYS": "user", "VAE_MAX_MODELS": "1",
    })  # fmt: skip
    server.wait_ready(ready_path="/health")
    unloaded_b = ModelSummary("b", "UNLOADED", (ModelVersionState(1, "UNLOADED", "not loaded"),))
    with VAEClient(server.url, api_key="adm") as admin:
        b = admin.model("b")
        assert admin.models() == [
            ModelSummary("a", "UNLOADED", (ModelVersionState(1, "UNLOADED", "not loaded"),)),
            unloaded_b,
        ]  # explicit, no default: nothing loaded at start
        assert b.ready() is False
        with pytest.raises(VAENotFoundError) as not_loaded:
            b.encode(X3)
        loaded = admin.load_model("b")
        assert b.ready() is True
        assert b.encode(X3, seed=0).mean.shape == (2, 2)
        with pytest.raises(VAEError) as over:
            admin.load_model("a")  # a second model: over VAE_MAX_MODELS=1
        with VAEClient(server.url, api_key="user") as user, pytest.raises(VAEAuthError) as e403:
            user.unload_model("b")
        with VAEClient(server.url) as anonymous, pytest.raises(VAEAuthError) as e401:
            anonymous.load_model("a")
        with pytest.raises(VAENotFoundError) as unknown:
            admin.load_model("nope")
        assert admin.unload_model("b") == unloaded_b
        with pytest.raises(VAENotFoundError) as gone:
            b.encode(X3)  # the unloaded model's calls answer 404
        assert b.ready() is False
        with pytest.raises(VAENotFoundError) as again:
            admin.unload_model("b")
    assert (not_loaded.value.status_code, not_loaded.value.detail) == (
        404, "Model 'b' is not loaded; load it with POST /v2/repository/models/b/load or "
        "/admin/models/b/load.",
    )  # fmt: skip
    assert loaded == ModelSummary(
        "b", "READY", (ModelVersionState(1, "READY", None, sha256(gaussian_artifact)),)
    )
    assert type(over.value) is VAEError
    assert over.value.status_code == 409
    assert over.value.detail.startswith("Loading 'a' (1 version(s)) would hold 2 models")
    assert (e403.value.status_code, e401.value.status_code) == (403, 401)
    assert unknown.value.detail.startswith("No model 'nope' in the repository")
    assert gone.value.detail == not_loaded.value.detail
    assert again.value.detail == "Model 'b' is not loaded."

    async def main() -> tuple[ModelSummary, Encoded, ModelSummary]:
        async with AsyncVAEClient(server.url, api_key="adm") as admin:
            summary = await admin.load_model("a")
            enc = await admin.model("a").encode(X, seed=0)
            return summary, enc, await admin.unload_model("a")

    summary, enc, unloaded = asyncio.run(main())
    assert (summary.name, summary.state, summary.versions[0].state) == ("a", "READY", "READY")
    assert enc.mean.shape == (2, 2)
    assert (unloaded.state, unloaded.versions[0].state) == ("UNLOADED", "UNLOADED")
