"""Two workers that act as one: /metrics adds both up, and a reload, by HTTP or by SIGHUP to
the supervisor, reaches both, with the same sha256 checks. Against a real `python -m app`
with VAE_WORKERS=2."""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict

from tests.conftest import Server, make_artifact

pytestmark = pytest.mark.server

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[tuple[Server, Path, Path]]:
    model = make_artifact(tmp_path / "vae.pt", seed=1)
    run_dir = tmp_path / "run"
    server = Server(
        {"VAE_MODEL_PATH": str(model), "VAE_WORKERS": "2", "VAE_RUN_DIR": str(run_dir),
         "VAE_ADMIN_KEYS": KEY},
        tmp_path / "server.log",
    )  # fmt: skip
    try:
        server.wait_ready()
        wait_for(lambda: len(serving(run_dir)) == 2, "both workers to start")
        yield server, model, run_dir
    finally:
        server.stop()


def serving(run_dir: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in (run_dir / "workers").iterdir() if p.name.isdigit()}


def wait_for(condition: object, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def encode_count(url: str) -> float:
    text = httpx.get(f"{url}/metrics", headers=AUTH).text
    found = re.findall(
        r'^vae_request_duration_seconds_count\{[^}]*route="/encode"[^}]*\} (\S+)$', text, re.M
    )
    return sum(float(v) for v in found)


def encodes_per_worker(run_dir: Path) -> dict[str, float]:
    """/encode requests each worker has counted in its own histogram file (prometheus-client's
    multiprocess mode), by worker pid."""
    out = {}
    for path in (run_dir / "metrics").glob("histogram_*.db"):
        total = 0.0
        for key, value, *_ in MmapedDict.read_all_values_from_file(str(path)):
            name, sample, labels, _ = json.loads(key)
            # The files keep each bucket's own count (made cumulative at a scrape): their sum
            # is the number of requests.
            if name == "vae_request_duration_seconds" and sample.endswith("_bucket"):
                total += value if labels.get("route") == "/encode" else 0.0
        out[path.stem.rsplit("_", 1)[-1]] = total
    return out


def test_metrics_add_up_every_worker(two_workers: tuple[Server, Path, Path]) -> None:
    server, _, run_dir = two_workers
    sent = 0

    def encode() -> None:
        # A fresh connection each: the two workers take turns accepting them.
        r = httpx.post(f"{server.url}/encode", json={"instances": [[1, 0, 0, 1]]}, headers=AUTH)
        assert r.status_code == 200

    # Until both workers have served some: how many that takes is the kernel's business.
    deadline = time.monotonic() + 60
    with cf.ThreadPoolExecutor(8) as pool:
        while len([n for n in encodes_per_worker(run_dir).values() if n > 0]) < 2:
            assert time.monotonic() < deadline, f"one worker served all {sent} requests"
            list(pool.map(lambda _: encode(), range(16)))
            sent += 16
    per_worker = encodes_per_worker(run_dir)
    assert sum(per_worker.values()) == sent
    for _ in range(6):  # whichever worker answers the scrape, it reports all of them
        assert encode_count(server.url) == sent


def test_a_reload_reaches_every_worker(
    two_workers: tuple[Server, Path, Path], tmp_path: Path
) -> None:
    server, model, run_dir = two_workers
    old = hashlib.sha256(model.read_bytes()).hexdigest()
    assert set(serving(run_dir).values()) == {old}

    staged = make_artifact(tmp_path / "next.pt", seed=2)
    os.replace(staged, model)
    new = hashlib.sha256(model.read_bytes()).hexdigest()
    r = httpx.post(f"{server.url}/admin/reload", headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json() == {"sha256": new, "previous_sha256": old, "changed": True, "workers": 2,
                        "workers_serving": 2}  # fmt: skip
    assert set(serving(run_dir).values()) == {new}
    for _ in range(10):  # every connection, whichever worker takes it, gets the new model
        assert httpx.get(f"{server.url}/model", headers=AUTH).json()["sha256"] == new

    # A bad file is refused by the worker that gets the request; none of them changes.
    model.write_bytes(b"not a torchscript archive")
    r = httpx.post(f"{server.url}/admin/reload", headers=AUTH, timeout=120)
    assert r.status_code == 409
    time.sleep(1.0)
    assert set(serving(run_dir).values()) == {new}

    # SIGHUP to the supervisor reloads each worker in place.
    third = make_artifact(tmp_path / "third.pt", seed=3)
    os.replace(third, model)
    newest = hashlib.sha256(model.read_bytes()).hexdigest()
    pids = set(serving(run_dir))
    os.kill(server.pid, signal.SIGHUP)
    wait_for(lambda: set(serving(run_dir).values()) == {newest}, "both workers to reload")
    assert set(serving(run_dir)) == pids  # reloaded in place, not replaced
    info = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    assert f'sha256="{newest}"' in info


def test_one_worker_ignores_a_run_dir(
    tiny_artifact: Path, tmp_path: Path, start_server: Callable[[dict[str, str]], Server]
) -> None:
    # VAE_RUN_DIR matters only with several workers; set for one, nothing changes.
    server = start_server({"VAE_MODEL_PATH": str(tiny_artifact),
                           "VAE_RUN_DIR": str(tmp_path / "unused")})  # fmt: skip
    server.wait_ready()
    assert httpx.post(f"{server.url}/encode", json={"instances": [[1, 0, 0, 1]]}).status_code == 200
    assert "process_resident_memory_bytes" in httpx.get(f"{server.url}/metrics").text
    assert not (tmp_path / "unused").exists()
