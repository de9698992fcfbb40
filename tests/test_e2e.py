"""End to end: a real `python -m app` (uvicorn) process on a free port, called over HTTP."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, GatedStart, Server

pytestmark = pytest.mark.server

StartServer = Callable[[dict[str, str]], Server]


def test_every_endpoint_over_real_http(start_server: StartServer, tiny_artifact: Path) -> None:
    server = start_server({"VAE_MODEL_PATH": str(tiny_artifact)})
    server.wait_ready()
    with httpx.Client(base_url=server.url, timeout=10) as http:
        assert http.get("/health").json() == {"status": "ok"}
        assert http.get("/ready").status_code == 200
        assert http.get("/model").json()["manifest"]["input_dim"] == 4
        assert "/anomaly-score" in http.get("/openapi.json").json()["paths"]
        assert "swagger-ui" in http.get("/docs").text

        x = [[0.0, 1.0, 1.0, 0.0]]
        enc = http.post("/encode", json={"instances": x, "samples": 2, "seed": 5})
        assert enc.status_code == 200
        assert len(enc.json()["samples"][0]) == 2
        dec = http.post("/decode", json={"latents": enc.json()["mean"]})
        assert dec.status_code == 200
        assert len(dec.json()["outputs"][0]) == 4
        sample = http.post("/sample", json={"n": 3, "seed": 9})
        assert sample.status_code == 200
        assert len(sample.json()["outputs"]) == 3
        score = http.post("/anomaly-score", json={"instances": x, "seed": 1})
        assert score.status_code == 200

        # The same seed over a fresh connection gives the same bytes.
        assert http.post("/sample", json={"n": 3, "seed": 9}).content == sample.content
        assert (
            http.post("/anomaly-score", json={"instances": x, "seed": 1}).content == score.content
        )

        bad = http.post("/encode", json={"instances": [[0.0, 2.0, 0.0, 0.0]]})
        assert bad.status_code == 422
        assert "instances[0] has values outside [0, 1]" in bad.json()["detail"]
        assert http.post("/encode", json={"instances": x}).status_code == 200


def test_health_answers_while_a_long_score_runs(
    start_gated: GatedStart, tiny_artifact: Path
) -> None:
    server, gate = start_gated({"VAE_MODEL_PATH": str(tiny_artifact)})
    gate.close()  # the score is held in the model call: it runs for as long as the test wants
    done = threading.Event()

    def long_request() -> None:
        body = {"instances": [[0.5] * 4] * 8, "seed": 0}
        httpx.post(f"{server.url}/anomaly-score", json=body, timeout=120).raise_for_status()
        done.set()

    worker = threading.Thread(target=long_request)
    worker.start()
    try:
        gate.wait_for_calls(1)  # the score is running in the inference thread
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        assert httpx.get(f"{server.url}/ready", timeout=10).status_code == 200
        assert not done.is_set()  # both answered while the score still ran
    finally:
        gate.open()
        worker.join()
    assert done.is_set()


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: d / "missing.pt", "no artifact there; train one"),
        (lambda d: (d / "junk.pt").write_bytes(b"not a model") and d / "junk.pt",
         "not a readable TorchScript artifact"),
    ],
)  # fmt: skip
def test_server_refuses_to_start_with_one_clear_line(
    tmp_path: Path, setup: Callable[[Path], Path], message: str
) -> None:
    path = setup(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "app"],
        cwd=REPO,
        env={"VAE_MODEL_PATH": str(path), "VAE_PORT": "1", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "cannot start:" in line]
    assert len(lines) == 1, proc.stderr
    assert message in lines[0]
    assert str(path) in lines[0]
