"""Limits, faults and access, each against a real `python -m app` process on a real port."""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import os
import re
import select
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import GatedStart, Server, make_artifact

pytestmark = pytest.mark.server

Start = Callable[[dict[str, str]], Server]

GOOD = {"instances": [[0.0, 1.0, 1.0, 0.0]]}
KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def wide_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """784 inputs, as MNIST's; small, since no test here waits on the model's speed."""
    return make_artifact(
        tmp_path_factory.mktemp("wide") / "vae.pt", input_shape=(784,), hidden=(16,), latent_dim=4
    )


def wide_body(seed: int = 0, instances: int = 2) -> dict[str, object]:
    x = (np.random.default_rng(seed).random((instances, 784)) > 0.5).astype(float)
    return {"instances": x.tolist(), "seed": seed}


ONE = {"instances": [[0.0] * 784]}


def serve(start: Start, artifact: Path, **env: str) -> Server:
    server = start({"VAE_MODEL_PATH": str(artifact), **env})
    server.wait_ready()
    return server


def in_flight(server: Server) -> float:
    """The server's own count of model requests accepted and not yet answered."""
    text = httpx.get(f"{server.url}/metrics").text
    match = re.search(r"^vae_requests_in_flight (\S+)$", text, re.MULTILINE)
    assert match, "no vae_requests_in_flight in /metrics"
    return float(match.group(1))


def wait_in_flight(server: Server, n: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while in_flight(server) < n:
        assert time.monotonic() < deadline, f"fewer than {n} requests ever got in"
        time.sleep(0.01)


def good_request_works(server: Server, headers: dict[str, str] | None = None) -> None:
    r = httpx.post(f"{server.url}/encode", json=GOOD, headers=headers, timeout=30)
    assert r.status_code == 200, r.text


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def raw_post(port: int, head: bytes, chunks: Iterator[bytes]) -> bytes:
    """Send a request by hand and return the start of the answer as soon as one comes, so a
    refusal is read before the server closes a connection it never read the body of."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head)
        for chunk in chunks:
            if select.select([s], [], [], 0)[0]:
                break
            try:
                s.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        return read_answer(s)


def read_answer(s: socket.socket) -> bytes:
    """The whole answer: the head, then as many body bytes as its Content-Length says. One
    recv() may hold the head alone when the server writes head and body apart."""
    answer = b""
    while True:
        try:
            part = s.recv(4096)
        except (ConnectionResetError, TimeoutError):
            return answer
        if not part:
            return answer
        answer += part
        head, sep, body = answer.partition(b"\r\n\r\n")
        declared = re.search(rb"(?im)^content-length: *(\d+)", head)
        if sep and declared and len(body) >= int(declared.group(1)):
            return answer


# -- body size ---------------------------------------------------------------------------------


def test_declared_50mb_body_gets_413_unread_and_memory_stays_flat(
    start_server: Start, tiny_artifact: Path
) -> None:
    server = serve(start_server, tiny_artifact, VAE_MAX_BODY_BYTES="1000000")
    before = peak_rss_kib(server.proc.pid)
    size = 50 * 2**20
    head = (
        f"POST /encode HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {size}\r\n\r\n"
    ).encode()
    answer = raw_post(server.port, head, (b"0" * 2**20 for _ in range(50)))
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert b"larger than 1000000 bytes, the limit (VAE_MAX_BODY_BYTES)." in answer
    assert peak_rss_kib(server.proc.pid) - before < 10 * 1024  # not 50 MB
    good_request_works(server)


def test_chunked_body_is_cut_off_at_the_limit(start_server: Start, tiny_artifact: Path) -> None:
    server = serve(start_server, tiny_artifact, VAE_MAX_BODY_BYTES="1000000")
    before = peak_rss_kib(server.proc.pid)
    head = (
        b"POST /encode HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"%x\r\n%s\r\n" % (2**16, b"1" * 2**16)
    answer = raw_post(server.port, head, (chunk for _ in range(800)))  # 50 MB if all sent
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert peak_rss_kib(server.proc.pid) - before < 10 * 1024
    good_request_works(server)


# -- backpressure and timeouts ----------------------------------------------------------------


def test_in_flight_bound_answers_503_with_retry_after(
    start_gated: GatedStart, wide_artifact: Path
) -> None:
    server, gate = start_gated({"VAE_MODEL_PATH": str(wide_artifact), "VAE_MAX_IN_FLIGHT": "2"})
    gate.close()  # the first two requests stay in flight until the gate opens
    with cf.ThreadPoolExecutor(2) as pool:
        held = [
            pool.submit(httpx.post, f"{server.url}/anomaly-score", json=wide_body(i), timeout=60)
            for i in range(2)
        ]
        wait_in_flight(server, 2)
        refused = httpx.post(f"{server.url}/anomaly-score", json=wide_body(2), timeout=60)
        assert httpx.get(f"{server.url}/health").status_code == 200
        gate.open()
        assert [f.result().status_code for f in held] == [200, 200]
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["detail"] == (
        "The server already has 2 requests in flight, its limit (VAE_MAX_IN_FLIGHT); "
        "retry after 1 s."
    )
    assert httpx.post(f"{server.url}/encode", json=ONE, timeout=30).status_code == 200


def test_slow_request_gets_504_and_the_server_goes_on(
    start_gated: GatedStart, wide_artifact: Path
) -> None:
    server, gate = start_gated({"VAE_MODEL_PATH": str(wide_artifact), "VAE_REQUEST_TIMEOUT_S": "2"})
    gate.close()  # the request cannot finish before its deadline, however fast the machine
    r = httpx.post(f"{server.url}/anomaly-score", json=wide_body(), timeout=30)
    assert r.status_code == 504
    assert r.json()["detail"] == "The request took longer than 2 s (VAE_REQUEST_TIMEOUT_S)."
    assert httpx.get(f"{server.url}/health").status_code == 200
    gate.open()
    r = httpx.post(f"{server.url}/encode", json=ONE, timeout=30)
    assert r.status_code == 200, r.text


def test_v2_paths_get_the_guards_refusals_in_v2_shape(
    start_gated: GatedStart, wide_artifact: Path
) -> None:
    """401, 413, 503 and 504 come from the admission middleware, before any V2 code runs; on
    /v2 paths they must still read `{"error": ...}`, as V2 clients (tritonclient) parse."""
    server, gate = start_gated(
        {"VAE_MODEL_PATH": str(wide_artifact), "VAE_API_KEYS": KEY,
         "VAE_MAX_BODY_BYTES": "1000000", "VAE_MAX_IN_FLIGHT": "1", "VAE_REQUEST_TIMEOUT_S": "2"}
    )  # fmt: skip
    infer = f"{server.url}/v2/models/vae-anomaly/infer"
    small = {"inputs": [{"name": "instances", "shape": [1, 784], "datatype": "FP32",
                         "data": [0.0] * 784}]}  # fmt: skip

    no_key = httpx.post(infer, json=small)
    assert no_key.status_code == 401
    assert no_key.json() == {
        "error": "A valid API key is required: send Authorization: Bearer <key> or X-API-Key."
    }
    # The same refusal on a REST path keeps the service's own shape.
    assert httpx.post(f"{server.url}/encode", json=GOOD).json() == {
        "detail": "A valid API key is required: send Authorization: Bearer <key> or X-API-Key."
    }
    too_big = httpx.post(infer, content=b"0" * 1_000_001, headers=AUTH)
    assert (too_big.status_code, too_big.json()) == (
        413,
        {"error": "The request body is larger than 1000000 bytes, the limit (VAE_MAX_BODY_BYTES)."},
    )
    gate.close()
    with cf.ThreadPoolExecutor(1) as pool:
        running = pool.submit(httpx.post, infer, json=small, headers=AUTH, timeout=60)
        wait_in_flight(server, 1)
        busy = httpx.post(infer, json=small, headers=AUTH)
        timed_out = running.result()  # held at the gate past its 2 s
    gate.open()
    assert (busy.status_code, busy.headers["retry-after"]) == (503, "1")
    assert busy.json() == {
        "error": "The server already has 1 requests in flight, its limit (VAE_MAX_IN_FLIGHT); "
        "retry after 1 s."
    }
    assert (timed_out.status_code, timed_out.json()) == (
        504,
        {"error": "The request took longer than 2 s (VAE_REQUEST_TIMEOUT_S)."},
    )


# -- graceful shutdown ------------------------------------------------------------------------


def test_sigterm_finishes_accepted_requests_refuses_new_ones_and_exits(
    start_gated: GatedStart, wide_artifact: Path
) -> None:
    server, gate = start_gated(
        {"VAE_MODEL_PATH": str(wide_artifact), "VAE_SHUTDOWN_TIMEOUT_S": "60"}
    )
    gate.close()  # one request at the gate, two queued behind it, until the checks are done
    with cf.ThreadPoolExecutor(3) as pool:
        accepted = [
            pool.submit(httpx.post, f"{server.url}/anomaly-score", json=wide_body(i), timeout=60)
            for i in range(3)
        ]
        wait_in_flight(server, 3)
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while (ready := httpx.get(f"{server.url}/ready")).status_code == 200:
            assert time.monotonic() < deadline, "SIGTERM never started the drain"
            time.sleep(0.02)
        late = httpx.post(f"{server.url}/encode", json=ONE)
        assert server.proc.poll() is None  # still serving what it accepted
        gate.open()
        answers = [f.result() for f in accepted]
    assert [r.status_code for r in answers] == [200, 200, 200]
    assert late.status_code == 503
    assert late.headers["retry-after"] == "1"
    assert late.json()["detail"] == (
        "The server is shutting down; send the request to another replica."
    )
    assert ready.status_code == 503
    # uvicorn re-raises the signal once it has shut down, so the exit status is "killed by
    # SIGTERM", as for any process that honours it; it comes once the drain is done, well
    # within the 60 s VAE_SHUTDOWN_TIMEOUT_S.
    assert server.proc.wait(timeout=60) in (0, -signal.SIGTERM)
    assert "drain timed out" not in server.log.read_text()


# -- reload and integrity ---------------------------------------------------------------------


def swap_in(path: Path, seed: int) -> str:
    """Replace the artifact at `path` atomically, as a deploy would; return its sha256."""
    staged = make_artifact(path.with_name(f"staged-{seed}.pt"), seed=seed)
    os.replace(staged, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_reload_swaps_the_model_and_refuses_a_bad_one(
    start_gated: GatedStart, wide_artifact: Path, tmp_path: Path
) -> None:
    path = tmp_path / "vae.pt"
    path.write_bytes(wide_artifact.read_bytes())
    server, gate = start_gated({"VAE_MODEL_PATH": str(path), "VAE_ADMIN_KEYS": KEY})
    old_sha = httpx.get(f"{server.url}/model", headers=AUTH).json()["sha256"]
    url = f"{server.url}/anomaly-score"
    expected = httpx.post(url, json=wide_body(), headers=AUTH, timeout=60)
    assert expected.status_code == 200, expected.text

    no_key = httpx.post(f"{server.url}/admin/reload")
    assert no_key.status_code == 401
    assert "bearer" in no_key.headers["www-authenticate"].lower()

    # A request in flight during the reload finishes on the model it started with: it is held
    # in the old model's call until the new model serves.
    staged = make_artifact(tmp_path / "next.pt", input_shape=(784,), hidden=(64,), latent_dim=8,
                           seed=7)  # fmt: skip
    started = len(gate.calls())
    gate.close()
    with cf.ThreadPoolExecutor(1) as pool:
        held = pool.submit(httpx.post, url, json=wide_body(), headers=AUTH, timeout=60)
        gate.wait_for_calls(started + 1)
        os.replace(staged, path)
        r = httpx.post(f"{server.url}/admin/reload", headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text
        assert not held.done()
        gate.open()
        assert held.result().content == expected.content
    new_sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert r.json() == {"sha256": new_sha, "previous_sha256": old_sha, "changed": True,
                        "workers": 1, "workers_serving": 1}  # fmt: skip
    assert httpx.get(f"{server.url}/model", headers=AUTH).json()["sha256"] == new_sha
    latent = httpx.post(f"{server.url}/encode", json=ONE, headers=AUTH)
    assert len(latent.json()["mean"][0]) == 8  # the new model answers

    path.write_bytes(b"not a torchscript archive")
    r = httpx.post(f"{server.url}/admin/reload", headers=AUTH, timeout=60)
    assert r.status_code == 409
    assert r.json()["detail"] == (
        f"Reload refused, the old model keeps serving: {path}: not a readable TorchScript "
        "artifact (RuntimeError)."
    )
    assert httpx.get(f"{server.url}/model", headers=AUTH).json()["sha256"] == new_sha
    r = httpx.post(f"{server.url}/encode", json=ONE, headers=AUTH)
    assert r.status_code == 200


def test_sighup_reloads(start_server: Start, tiny_artifact: Path, tmp_path: Path) -> None:
    path = tmp_path / "vae.pt"
    path.write_bytes(tiny_artifact.read_bytes())
    server = serve(start_server, path)
    new_sha = swap_in(path, seed=3)
    server.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while httpx.get(f"{server.url}/model").json()["sha256"] != new_sha:
        assert time.monotonic() < deadline, "SIGHUP did not reload"
        time.sleep(0.1)
    good_request_works(server)


def test_admin_routes_are_closed_without_configured_keys(
    start_server: Start, tiny_artifact: Path
) -> None:
    server = serve(start_server, tiny_artifact)
    r = httpx.post(f"{server.url}/admin/reload")
    assert r.status_code == 403
    assert r.json()["detail"] == "Admin routes are off: set VAE_ADMIN_KEYS or VAE_ADMIN_KEYS_FILE."


def test_sha256_pin_refuses_start_and_reload_of_another_artifact(
    start_server: Start, tiny_artifact: Path, tmp_path: Path
) -> None:
    path = tmp_path / "vae.pt"
    path.write_bytes(tiny_artifact.read_bytes())
    pinned = hashlib.sha256(path.read_bytes()).hexdigest()

    wrong = start_server({"VAE_MODEL_PATH": str(path), "VAE_MODEL_SHA256": "0" * 64})
    assert wrong.proc.wait(timeout=60) != 0
    assert f"its sha256 is {pinned}, but VAE_MODEL_SHA256 pins {'0' * 64}" in wrong.log.read_text()

    server = serve(start_server, path, VAE_MODEL_SHA256=pinned, VAE_ADMIN_KEYS=KEY)
    swap_in(path, seed=5)
    r = httpx.post(f"{server.url}/admin/reload", headers=AUTH, timeout=60)
    assert r.status_code == 409
    assert "VAE_MODEL_SHA256 pins" in r.json()["detail"]
    assert httpx.get(f"{server.url}/model", headers=AUTH).json()["sha256"] == pinned


# -- access -----------------------------------------------------------------------------------


def test_api_keys_guard_everything_but_probes_and_docs(
    start_server: Start, tiny_artifact: Path, tmp_path: Path
) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("file-key-1\n\nfile-key-2\n")
    server = serve(start_server, tiny_artifact, VAE_API_KEYS=KEY, VAE_API_KEYS_FILE=str(keys_file))
    for path in ("/health", "/ready", "/openapi.json", "/docs"):
        assert httpx.get(server.url + path).status_code == 200, path
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": KEY[:-1]},
                    {"Authorization": KEY}):  # fmt: skip
        r = httpx.post(f"{server.url}/encode", json=GOOD, headers=headers)
        assert r.status_code == 401, headers
        assert r.headers["www-authenticate"] == 'Bearer realm="vae-service"'
        assert r.json()["detail"] == (
            "A valid API key is required: send Authorization: Bearer <key> or X-API-Key."
        )
        assert httpx.get(f"{server.url}/model", headers=headers).status_code == 401
    for headers in (AUTH, {"X-API-Key": KEY}, {"Authorization": "bearer file-key-2"}):
        good_request_works(server, headers)


def test_logs_hold_neither_bodies_nor_keys(start_server: Start, tiny_artifact: Path) -> None:
    server = serve(start_server, tiny_artifact, VAE_API_KEYS=KEY, VAE_LOG_LEVEL="debug")
    marker = 0.123456789
    body = {"instances": [[marker, 0.0, 1.0, 0.0]], "marker_field": 1}
    httpx.post(f"{server.url}/encode", json=body, headers=AUTH)
    httpx.post(f"{server.url}/encode", json=GOOD, headers={"X-API-Key": KEY})
    httpx.post(f"{server.url}/encode", json=GOOD, headers={"X-API-Key": "wrong-" + KEY})
    server.stop()
    log = server.log.read_text()
    assert "POST /encode" in log  # the access log is on, and says no more than this
    for secret in (KEY, str(marker), "marker_field"):
        assert secret not in log


def test_cors_is_off_by_default_and_follows_the_setting(
    start_server: Start, tiny_artifact: Path
) -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    off = serve(start_server, tiny_artifact)
    r = httpx.options(f"{off.url}/encode", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    on = serve(start_server, tiny_artifact, VAE_CORS_ORIGINS="https://app.example")
    r = httpx.options(f"{on.url}/encode", headers=preflight)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    r = httpx.post(f"{on.url}/encode", json=GOOD, headers={"Origin": "https://other.example"})
    assert "access-control-allow-origin" not in r.headers


def test_openapi_declares_the_keys_so_the_docs_page_can_send_one(tiny_artifact: Path) -> None:
    from app.main import create_app
    from app.settings import Settings

    open_schema = create_app(Settings(model_path=tiny_artifact)).openapi()
    assert "security" not in open_schema
    schema = create_app(Settings(model_path=tiny_artifact, api_keys=[KEY])).openapi()
    assert set(schema["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    assert schema["security"] == [{"bearer": []}, {"apiKey": []}]
    assert schema["paths"]["/health"]["get"]["security"] == []
    assert schema["paths"]["/metrics"]["get"]["security"] == []
    assert "security" not in schema["paths"]["/encode"]["post"]  # the global one applies
