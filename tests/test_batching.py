"""Micro-batching: merged forward passes, their limits, and seeded answers that stay exact."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.batching import Batcher, Outputs
from app.main import create_app
from app.settings import Settings
from tests.conftest import GatedStart


def double(x: np.ndarray) -> Outputs:
    return {"y": x * 2, "rowsum": x.sum(axis=1)}


def run_jobs(batcher: Batcher, jobs: list[tuple[object, np.ndarray]]) -> list[Outputs]:
    """Queue every job before the inference thread starts, so what merges is deterministic."""

    async def main() -> list[Outputs]:
        tasks = [asyncio.create_task(batcher.submit(key, x, double, "double")) for key, x in jobs]  # type: ignore[arg-type]
        await asyncio.sleep(0)  # let every task put its job on the queue
        batcher.start()
        return await asyncio.gather(*tasks)

    try:
        return asyncio.run(main())
    finally:
        batcher.stop()


def rows(n: int, start: float = 0.0) -> np.ndarray:
    return np.arange(start, start + 3 * n, dtype=np.float32).reshape(n, 3)


def test_jobs_with_the_same_key_share_one_forward_pass() -> None:
    batcher = Batcher(max_batch_size=16, max_delay_s=0.0)
    out = run_jobs(batcher, [("k", rows(1)), ("k", rows(2, 10)), ("k", rows(3, 20))])
    assert batcher.batch_sizes == {6: 1}
    for (_, x), got in zip([(0, rows(1)), (0, rows(2, 10)), (0, rows(3, 20))], out, strict=True):
        np.testing.assert_array_equal(got["y"], x * 2)
        np.testing.assert_array_equal(got["rowsum"], x.sum(axis=1))


def test_a_batch_never_exceeds_max_batch_size() -> None:
    batcher = Batcher(max_batch_size=4, max_delay_s=0.0)
    run_jobs(batcher, [("k", rows(1)) for _ in range(10)] + [("k", rows(6))])
    assert max(size for size in batcher.batch_sizes if size != 6) <= 4
    assert sum(size * n for size, n in batcher.batch_sizes.items()) == 16
    assert batcher.batch_sizes[6] == 1  # a request over the limit runs alone, whole


def test_different_keys_and_unkeyed_jobs_are_not_merged() -> None:
    batcher = Batcher(max_batch_size=16, max_delay_s=0.0)
    run_jobs(batcher, [("a", rows(1)), ("b", rows(1)), (None, rows(1)), (None, rows(1))])
    assert batcher.batch_sizes == {1: 4}


def test_an_op_failure_reaches_every_merged_request() -> None:
    batcher = Batcher(max_batch_size=16, max_delay_s=0.0)

    def broken(x: np.ndarray) -> Outputs:
        raise ValueError("boom")

    async def main() -> list[object]:
        tasks = [
            asyncio.create_task(batcher.submit("k", rows(1), broken, "broken")) for _ in range(3)
        ]
        await asyncio.sleep(0)
        batcher.start()
        return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        results = asyncio.run(main())
    finally:
        batcher.stop()
    assert all(isinstance(r, ValueError) for r in results)


# --- through the service ---------------------------------------------------------------------


@pytest.fixture
def client(tiny_artifact: Path) -> Iterator[TestClient]:
    settings = Settings(model_path=tiny_artifact, max_batch_size=8, inline_max_ms=0)
    with TestClient(create_app(settings)) as c:
        yield c


def concurrently(client: TestClient, bodies: list[dict[str, object]]) -> list[bytes]:
    out: list[bytes] = [b""] * len(bodies)

    def call(i: int) -> None:
        out[i] = client.post("/anomaly-score", json=bodies[i]).content

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def wait_queued(batcher: Batcher, n: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while batcher._queue.qsize() < n:
        assert time.monotonic() < deadline, f"only {batcher._queue.qsize()} of {n} jobs queued"
        time.sleep(0.005)


def test_concurrent_unseeded_requests_merge_and_match_solo_answers(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(0)
    xs = [rng.integers(0, 2, (1, 4)).astype(float).tolist() for _ in range(16)]
    solo = [client.post("/encode", json={"instances": x}).json() for x in xs]
    batcher: Batcher = client.app.state.batcher  # type: ignore[attr-defined]
    vae = client.app.state.models.serving()  # type: ignore[attr-defined]
    # The first request holds the inference thread until the other sixteen are queued, so
    # what merges depends on no timing: they meet in the queue.
    release, encode = threading.Event(), vae.encode

    def held_encode(*args: object, **kwargs: object) -> object:
        release.wait(30)
        return encode(*args, **kwargs)

    monkeypatch.setattr(vae, "encode", held_encode)
    batcher.batch_sizes.clear()
    together: list[dict[str, list[list[float]]]] = [{}] * len(xs)

    def call(i: int) -> None:
        together[i] = client.post("/encode", json={"instances": xs[i]}).json()

    first = threading.Thread(
        target=client.post, args=("/encode",), kwargs={"json": {"instances": xs[0]}}
    )
    first.start()
    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(xs))]
    try:
        deadline = time.monotonic() + 30
        while not batcher._busy:
            assert time.monotonic() < deadline, "the first request never reached the thread"
            time.sleep(0.005)
        for t in threads:
            t.start()
        wait_queued(batcher, len(xs))
    finally:
        release.set()
        first.join()
        for t in threads:
            t.join()
    assert batcher.batch_sizes == {1: 1, 8: 2}  # the first alone, then two full batches
    for a, b in zip(solo, together, strict=True):
        # Unseeded: equal up to float32 rounding (a merged matrix product rounds differently).
        np.testing.assert_allclose(a["mean"], b["mean"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a["std"], b["std"], rtol=1e-5, atol=1e-6)


def test_concurrent_seeded_requests_equal_their_solo_answers_exactly(client: TestClient) -> None:
    bodies: list[dict[str, object]] = [
        {"instances": [[0.0, 1.0, 0.5, 0.25]] * 3, "samples": 8, "seed": s} for s in range(12)
    ]
    solo = [client.post("/anomaly-score", json=b).content for b in bodies]
    assert concurrently(client, bodies) == solo


# --- cheap work runs where it arrives ---------------------------------------------------------


def where(x: np.ndarray) -> Outputs:
    """Which thread ran the job: the event loop's (inline) or the inference thread."""
    return {"inline": np.full(len(x), threading.current_thread() is threading.main_thread())}


def test_a_cheap_job_runs_inline_and_a_costly_one_on_the_inference_thread() -> None:
    seen: list[tuple[object, ...]] = []
    batcher = Batcher(16, 0.0, on_batch=lambda *a: seen.append(a), inline_max_s=0.001)
    batcher.start()

    async def main() -> tuple[Outputs, Outputs]:
        cheap = await batcher.submit("k", rows(1), where, "where", cost=lambda n: 0.0005 * n)
        costly = await batcher.submit("k", rows(1), where, "where", cost=lambda n: 0.002 * n)
        return cheap, costly

    try:
        cheap, costly = asyncio.run(main())
    finally:
        batcher.stop()
    assert cheap["inline"].all()
    assert not costly["inline"].any()
    assert [call[-1] for call in seen] == [True, False]  # the metrics tell the two apart


def per_row(seconds: float) -> Callable[[int], float]:
    return lambda rows: seconds * rows


def on_loop(batcher: Batcher, jobs: list[tuple[object, np.ndarray, float]]) -> list[Outputs]:
    """Submit every job in one iteration of the loop, as requests parsed together are."""

    async def main() -> list[Outputs]:
        tasks = [
            asyncio.create_task(batcher.submit(key, x, where, "where", cost=per_row(cost)))  # type: ignore[arg-type]
            for key, x, cost in jobs
        ]
        return await asyncio.gather(*tasks)

    batcher.start()
    try:
        return asyncio.run(main())
    finally:
        batcher.stop()


def test_cheap_jobs_of_one_loop_iteration_share_one_forward_pass_on_the_loop() -> None:
    seen: list[tuple[object, ...]] = []
    batcher = Batcher(16, 0.0, on_batch=lambda *a: seen.append(a), inline_max_s=0.001)
    out = on_loop(batcher, [("k", rows(1), 1e-4), ("k", rows(2), 1e-4), ("k", rows(1), 1e-4)])
    assert all(o["inline"].all() for o in out)
    assert [len(o["inline"]) for o in out] == [1, 2, 1]  # each gets its own rows back
    assert batcher.batch_sizes == {4: 1}
    assert [(call[1], call[-1]) for call in seen] == [(4, True)]


def test_seeded_and_other_keys_run_alone_on_the_loop() -> None:
    batcher = Batcher(16, 0.0, inline_max_s=0.001)
    jobs: list[tuple[object, np.ndarray, float]] = [
        (None, rows(1), 1e-4),
        ("a", rows(1), 1e-4),
        (None, rows(1), 1e-4),
        ("b", rows(2), 1e-4),
    ]
    out = on_loop(batcher, jobs)
    assert all(o["inline"].all() for o in out)
    assert batcher.batch_sizes == {1: 3, 2: 1}


def test_a_gathered_batch_over_the_threshold_goes_to_the_thread_merged() -> None:
    # Each job alone is cheap; the three together cost more than the loop may be held.
    batcher = Batcher(16, 0.0, inline_max_s=0.001)
    out = on_loop(batcher, [("k", rows(1), 4e-4)] * 3)
    assert not any(o["inline"].any() for o in out)
    assert batcher.batch_sizes == {3: 1}


def test_gathered_rows_are_cut_at_max_batch_size() -> None:
    batcher = Batcher(4, 0.0, inline_max_s=0.001)
    on_loop(batcher, [("k", rows(1), 1e-5)] * 10)
    assert batcher.batch_sizes == {4: 2, 2: 1}


def test_cheap_jobs_run_on_the_loop_while_the_thread_holds_a_costly_one() -> None:
    """The thread busy with a long job does not hold up cheap ones: they run on the loop."""
    batcher = Batcher(16, 0.0, inline_max_s=1.0)
    started, release = threading.Event(), threading.Event()

    def held(x: np.ndarray) -> Outputs:
        started.set()
        release.wait(30)
        return where(x)

    async def main() -> tuple[Outputs, Outputs]:
        first = asyncio.create_task(batcher.submit(None, rows(1), held, "held"))
        await asyncio.to_thread(started.wait, 30)
        second = await batcher.submit("k", rows(1), where, "where", cost=lambda n: 0.0)
        release.set()
        return await first, second

    batcher.start()
    try:
        first, second = asyncio.run(main())
    finally:
        release.set()
        batcher.stop()
    assert not first["inline"].any()
    assert second["inline"].all()


@pytest.mark.parametrize(("inline_max_s", "delay_s"), [(0.0, 0.0), (1.0, 0.005)])
def test_nothing_runs_inline_when_off_or_when_batches_wait_for_company(
    inline_max_s: float, delay_s: float
) -> None:
    # A batching window asks requests to wait for others to merge with: inline would not.
    batcher = Batcher(16, delay_s, inline_max_s=inline_max_s)
    batcher.start()
    try:
        out = asyncio.run(batcher.submit("k", rows(1), where, "where", cost=lambda n: 1e-6))
    finally:
        batcher.stop()
    assert not out["inline"].any()


def inline_jobs(server_url: str) -> dict[str, float]:
    text = httpx.get(f"{server_url}/metrics").text
    # One series per operation of the one model, `default` (VAE_MODEL_PATH), version 1.
    pattern = r'^vae_inline_jobs_total\{model="default",op="(\w+)",version="1"\} (\S+)$'
    found = re.findall(pattern, text, re.M)
    return {op: float(v) for op, v in found}


@pytest.mark.server
def test_a_real_server_runs_small_requests_inline_and_large_ones_batched(
    tiny_artifact: Path, start_gated: GatedStart
) -> None:
    # Each row costs 1 us by decree (tests.gated_app), not by a measurement: one instance at
    # L=16 is 17 us, within the 1 ms threshold; 100 instances at L=512 are 51 ms, far over.
    costs = {"VAE_MODEL_PATH": str(tiny_artifact), "TEST_ROW_COST_S": "1e-6"}
    server, _ = start_gated({**costs, "VAE_INLINE_MAX_MS": "1"})
    x = [[1.0, 0.0, 0.0, 1.0]]
    a = httpx.post(f"{server.url}/anomaly-score", json={"instances": x, "seed": 3}).content
    assert httpx.post(f"{server.url}/encode", json={"instances": x}).status_code == 200
    assert inline_jobs(server.url) == {"anomaly": 1.0, "encode": 1.0}
    big = {"instances": x * 100, "samples": 512}
    assert httpx.post(f"{server.url}/anomaly-score", json=big, timeout=60).status_code == 200
    assert inline_jobs(server.url)["anomaly"] == 1.0
    off, _ = start_gated({**costs, "VAE_INLINE_MAX_MS": "0"})
    b = httpx.post(f"{off.url}/anomaly-score", json={"instances": x, "seed": 3}).content
    assert inline_jobs(off.url) == {}
    assert a == b  # a seeded answer is the same wherever it ran


def post_raw(port: int, path: str, body: bytes) -> socket.socket:
    """A request written whole to the server's socket before this returns: it is then at the
    server, whether or not the server has read it yet."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")  # fmt: skip
    sock.sendall(head.encode() + body)
    return sock


def status_of(sock: socket.socket) -> int:
    with sock:
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1])


@pytest.mark.server
def test_a_real_server_merges_requests_waiting_at_its_socket_into_one_pass_on_the_loop(
    tiny_artifact: Path, start_gated: GatedStart
) -> None:
    """While a first cheap job holds the event loop (closed gate, on purpose), eight more
    requests arrive whole at the socket. Once it ends, the loop reads them, and the flush runs
    them as one forward pass: no request waited for anything that had not already arrived."""
    env = {"VAE_MODEL_PATH": str(tiny_artifact), "TEST_ROW_COST_S": "1e-6",
           "VAE_INLINE_MAX_MS": "1"}  # fmt: skip
    server, gate = start_gated(env)
    body = b'{"instances": [[1.0, 0.0, 0.0, 1.0]]}'
    gate.close()
    first = post_raw(server.port, "/encode", body)
    gate.wait_for_calls(1)  # the loop is now held inside the first pass
    waiting = [post_raw(server.port, "/encode", body) for _ in range(8)]
    gate.open()
    assert [status_of(s) for s in [first, *waiting]] == [200] * 9
    assert gate.calls() == ["encode 1", "encode 8"]
    assert inline_jobs(server.url) == {"encode": 2.0}
