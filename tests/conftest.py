"""Shared fixtures: a clean environment, tiny artifacts from the real exporter, real servers."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bench.servers import Process, ServerError, free_port
from training import pipeline
from training.config import ModelConfig, TrainConfig
from training.export import FORMAT_VERSION, build_manifest, export_artifact
from training.model import VAE

REPO = Path(__file__).resolve().parents[1]
V1_SCORES = ("kl_divergence", "reconstruction_log_prob", "log_likelihood")
MNIST_DIR = REPO.parent / "shared" / "datasets" / "mnist"


@pytest.fixture(autouse=True)
def clean_environ() -> Iterator[None]:
    """No VAE_* variable from the developer's shell may leak into a test (cf. httpx's tests)."""
    saved = dict(os.environ)
    for key in list(os.environ):
        if key.startswith("VAE_"):
            del os.environ[key]
    yield
    os.environ.clear()
    os.environ.update(saved)


def drop_format_3(calibration: dict[str, Any], scoring: dict[str, Any]) -> None:
    """A format-3 calibration and scoring data (or manifest) as format 2 had them, in place:
    no latent distance or ensemble, and DoSE deciding."""
    for name in ("latent_distance", "ensemble"):
        del calibration["scores"][name]
    del scoring["latent_distance"]
    scoring["decision_score"] = "dose"


def make_artifact(
    path: Path,
    *,
    input_shape: tuple[int, ...] = (2, 2),
    hidden: tuple[int, ...] = (8,),
    latent_dim: int = 2,
    likelihood: str = "bernoulli",
    seed: int = 0,
    format_version: int = FORMAT_VERSION,
) -> Path:
    """A small untrained VAE (4-8-2 by default) exported by the real exporter, with every score
    of the current format (an untrained background model included), or as an older format
    was: 1, the three likelihood scores and nothing else; 2, without the latent distance and
    the ensemble."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        input_dim=int(np.prod(input_shape)),
        hidden_dims=hidden,
        latent_dim=latent_dim,
        likelihood=likelihood,  # type: ignore[arg-type]
    )
    model = VAE(cfg).eval()
    x_val = torch.rand(64, cfg.input_dim)
    if likelihood == "bernoulli":
        x_val = torch.bernoulli(x_val)
    background = VAE(cfg).eval() if format_version >= 2 else None
    cal_cfg = TrainConfig(calibration_samples=4, calibration_ll_samples=8)
    calibration, scoring, neighbours = pipeline.calibration(
        model, pipeline.Splits(x_val, x_val, x_val, binarize=False), cal_cfg, background
    )
    if format_version <= 2:
        drop_format_3(calibration, scoring)
        neighbours = None
    if format_version == 1:
        calibration["scores"] = {k: calibration["scores"][k] for k in V1_SCORES}
        scoring = {}
    manifest = build_manifest(
        model,
        input_shape=input_shape,
        model_config=cfg.to_dict(),
        train_config={"preset": "test"},
        dataset={"name": "random", "train_size": 0, "val_size": 64, "test_size": 0},
        metrics={},
        calibration=calibration,
        scoring=scoring,
    )
    manifest["format_version"] = format_version
    export_artifact(model, manifest, path, background, neighbours)
    return path


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("tiny") / "vae.pt")


@pytest.fixture(scope="session")
def gaussian_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_artifact(
        tmp_path_factory.mktemp("gauss") / "vae.pt", input_shape=(3,), likelihood="gaussian"
    )


@pytest.fixture(scope="session")
def mnist_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short real training run on the real MNIST files (3 epochs, about 15 s on 2 cores)."""
    from training.__main__ import main

    out = tmp_path_factory.mktemp("mnist") / "vae.pt"
    args = ["--data-dir", str(MNIST_DIR), "--out", str(out), "--epochs", "3", "--eval-k", "50",
            "--eval-images", "1000", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    return out


def require_tool(name: str, install: str) -> str:
    """The path of a machine tool a test drives (chromium, kubectl). Missing, the test fails
    where CI is set (.ci/run sets it), so CI can never pass by skipping, and skips with the
    reason elsewhere, so `make test` still runs on a laptop without it."""
    found = shutil.which(name)
    if found:
        return found
    reason = f"{name} is not installed ({install})"
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(reason)
    pytest.skip(f"{reason}; CI is unset, so this skips instead of failing")


class Server(Process):
    """A real `python -m app` process (or other server `args`) on a free port, or the given one,
    started at once; bench's Process owns the launching, the readiness poll and the stopping."""

    def __init__(
        self,
        env: dict[str, str],
        log: Path,
        *,
        port: int | None = None,
        args: tuple[str, ...] = ("-m", "app"),
    ) -> None:
        port = port or free_port()
        # Only the VAE_* variables given here (Process drops the shell's): module-scoped servers
        # start outside the clean_environ fixture.
        env = {**env, "VAE_PORT": str(port), "VAE_HOST": "127.0.0.1"}
        super().__init__([sys.executable, *args], port=port, env=env, log=log)
        self.launch()

    def wait_ready(self, timeout: float = 60.0, ready_path: str = "/ready") -> None:
        try:
            super().wait_ready(timeout, ready_path)
        except ServerError as e:
            raise AssertionError(str(e)) from None


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], Server]]:
    """Start real servers with the given VAE_* variables; all are stopped after the test."""
    servers: list[Server] = []

    def start(env: dict[str, str]) -> Server:
        server = Server(env, tmp_path / f"server{len(servers)}.log")
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
