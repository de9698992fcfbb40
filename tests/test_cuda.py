"""The CUDA path, on a real GPU: these run only where CUDA exists (marker `cuda`), and every other
test pins the CPU, so no verdict elsewhere depends on a GPU being present.

- a real server with VAE_DEVICE=cuda serves every operation, and its seeded answers repeat
  byte for byte and agree with a CPU server's to float32 rounding (the kernels differ);
- an absent GPU index is refused at start-up with one sentence;
- the trainer trains on the GPU and its artifact serves on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from tests.conftest import MNIST_DIR, Server
from training.__main__ import main as train

pytestmark = [
    pytest.mark.server,
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available here"),
]
StartServer = Callable[[dict[str, str]], Server]
X = [[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.5, 0.25]]
CALLS: list[tuple[str, dict[str, object]]] = [
    ("/encode", {"instances": X, "samples": 3, "seed": 5}),
    ("/decode", {"latents": [[0.3, -1.2], [2.0, 0.5]]}),
    ("/sample", {"n": 3, "seed": 9}),
    ("/anomaly-score", {"instances": X, "seed": 1, "scores": ["likelihood_ratio"],
                        "log_likelihood_samples": 8, "attribution": True}),
]  # fmt: skip


def answers(url: str) -> list[dict[str, object]]:
    out = []
    for path, body in CALLS:
        r = httpx.post(url + path, json=body, timeout=60)
        assert r.status_code == 200, r.text
        out.append(r.json())
    return out


def close(a: object, b: object) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys()
        for key in a:
            close(a[key], b[key])
    elif isinstance(a, list) and a and not isinstance(a[0], str | bool):
        np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), rtol=1e-3, atol=1e-3)
    else:
        assert a == b


def test_a_cuda_server_serves_every_operation_like_a_cpu_one(
    start_server: StartServer, tiny_artifact: Path
) -> None:
    gpu = start_server({"VAE_MODEL_PATH": str(tiny_artifact), "VAE_DEVICE": "cuda"})
    cpu = start_server({"VAE_MODEL_PATH": str(tiny_artifact), "VAE_DEVICE": "cpu"})
    gpu.wait_ready()
    cpu.wait_ready()
    assert httpx.get(f"{gpu.url}/model").json()["device"] == "cuda:0"
    on_gpu = answers(gpu.url)
    assert answers(gpu.url) == on_gpu  # seeded: the same answer every time
    close(on_gpu, answers(cpu.url))


def test_a_gpu_that_is_not_there_stops_start_up(
    start_server: StartServer, tiny_artifact: Path
) -> None:
    missing = torch.cuda.device_count()
    server = start_server({"VAE_MODEL_PATH": str(tiny_artifact), "VAE_DEVICE": f"cuda:{missing}"})
    assert server.proc.wait(timeout=120) != 0
    assert (
        f"VAE_DEVICE=cuda:{missing} names a GPU that does not exist ({missing} visible)."
        in server.log.read_text()
    )


def test_training_on_the_gpu_gives_an_artifact_the_cpu_serves(
    start_server: StartServer, tmp_path: Path
) -> None:
    out = tmp_path / "vae.pt"
    args = ["--data-dir", str(MNIST_DIR), "--out", str(out), "--device", "cuda", "--epochs", "1",
            "--eval-k", "10", "--eval-images", "200", "--no-progress"]  # fmt: skip
    assert train(args) == 0
    server = start_server({"VAE_MODEL_PATH": str(out), "VAE_DEVICE": "cpu"})
    server.wait_ready()
    r = httpx.post(f"{server.url}/anomaly-score", json={"instances": [[0.0] * 784], "seed": 0})
    assert r.status_code == 200, r.text
