"""Micro-batching: merged forward passes, their limits, and seeded answers that stay exact."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.batching import Batcher, Outputs
from app.main import create_app
from app.settings import Settings


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
    settings = Settings(model_path=tiny_artifact, max_batch_size=8, max_batch_delay_ms=20)
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


def test_concurrent_unseeded_requests_merge_and_match_solo_answers(client: TestClient) -> None:
    rng = np.random.default_rng(0)
    xs = [rng.integers(0, 2, (1, 4)).astype(float).tolist() for _ in range(16)]
    solo = [client.post("/encode", json={"instances": x}).json() for x in xs]
    batcher = client.app.state.batcher  # type: ignore[attr-defined]
    batcher.batch_sizes.clear()
    together: list[dict[str, list[list[float]]]] = [{}] * len(xs)

    def call(i: int) -> None:
        together[i] = client.post("/encode", json={"instances": xs[i]}).json()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(batcher.batch_sizes) > 1, batcher.batch_sizes  # some requests really merged
    assert max(batcher.batch_sizes) <= 8
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
