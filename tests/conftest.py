"""Shared fixtures: a clean environment, tiny artifacts from the real exporter, real servers."""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bench.servers import Process, ServerError, free_port
from scoring.scores import References
from training import pipeline
from training.config import ModelConfig, TrainConfig
from training.evaluate import projection_stats
from training.export import FORMAT_VERSION, build_manifest, export_artifact
from training.model import VAE

REPO = Path(__file__).resolve().parents[1]
V1_SCORES = ("kl_divergence", "reconstruction_log_prob", "log_likelihood")
# Every score of the current artifact format, in the order the service lists them, written out
# here rather than read from the app (app.common.SCORES), so a score that goes missing fails.
EVERY_SCORE = (*V1_SCORES, "input_complexity", "likelihood_ratio", "dose", "latent_distance",
               "latent_polar_distance", "rapp", "feature_distance", "ensemble")  # fmt: skip
# The real MNIST slice that ships with the tests (10,000 training and 5,000 test images; its
# README says how it was cut): every test reads it, so a clone with nothing beside it passes.
MNIST_DIR = REPO / "tests" / "data" / "mnist"


# Every test runs on the CPU, whatever the machine has, so no verdict depends on a GPU being
# there; the CUDA path has tests of its own (tests/test_cuda.py), run only where CUDA exists.
# TEST_HOT_PATH=off runs every test on FastAPI's path alone (app/hot_path.py off), so the
# suite shows that both paths keep the same promises.
TEST_DEVICE = {"VAE_DEVICE": "cpu"} | (
    {"VAE_HOT_PATH": "false"} if os.environ.get("TEST_HOT_PATH") == "off" else {}
)


@pytest.fixture(autouse=True)
def clean_environ() -> Iterator[None]:
    """No VAE_* variable from the developer's shell may leak into a test (cf. httpx's tests),
    and the device is the CPU: Settings() and the trainer's --device default read it."""
    saved = dict(os.environ)
    for key in list(os.environ):
        if key.startswith("VAE_"):
            del os.environ[key]
    os.environ.update(TEST_DEVICE)
    yield
    os.environ.clear()
    os.environ.update(saved)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A Ray cluster or a browser is never part of the fast loop: their tests are slow too."""
    for item in items:
        if item.get_closest_marker("ray") or item.get_closest_marker("browser"):
            item.add_marker(pytest.mark.slow)


LEGACY_LEVELS = np.linspace(0.0, 1.0, 1001)


def as_quantiles(calibration: dict[str, Any]) -> None:
    """A format-4 calibration (sorted validation values) as formats 1 to 3 held it, in place:
    1001 quantiles at levels 0, 0.001, ..., 1, by numpy's linear interpolation."""
    calibration["levels"] = LEGACY_LEVELS.round(4).tolist()
    for entry in calibration["scores"].values():
        entry["quantiles"] = np.quantile(np.asarray(entry.pop("values")), LEGACY_LEVELS).tolist()


def drop_format_9(calibration: dict[str, Any], scoring: dict[str, Any]) -> None:
    """A format-9 image model's calibration and scoring data as format 8 had them, in place: no
    feature distance, and the ensemble of format 5's five scores, unweighted, its validation
    rows without the feature distance's column (its values here stay format 9's, so they
    serve the mechanics only, not a decision)."""
    del calibration["scores"]["feature_distance"]
    del scoring["feature_distance"]
    parts = scoring["ensemble"]["scores"]
    column = parts.index("feature_distance")
    scoring["ensemble"] = {"scores": parts[:column] + parts[column + 1 :], "combine": "fisher"}
    entry = calibration["scores"]["ensemble"]
    del entry["weights"]
    entry["parts"] = scoring["ensemble"]["scores"]
    entry["rows"] = [row[:column] + row[column + 1 :] for row in entry["rows"]]


def drop_format_8(calibration: dict[str, Any]) -> None:
    """A format-8 calibration as formats 4 to 7 had it, in place: the ensemble's values alone,
    without each validation row's values of its parts (read by rank, not as a conformal
    p-value)."""
    entry = calibration["scores"].get("ensemble", {})
    entry.pop("parts", None)
    entry.pop("rows", None)


def drop_format_6(model: VAE, x: torch.Tensor, scoring: dict[str, Any]) -> None:
    """An image model's attribution entry (in scoring data or a manifest) as formats 3 to 5 had
    it, in place: -log p(x_d|z*) at the trimmed projection, standardised on the rows x."""
    scoring["attribution"] = projection_stats(model, x)


def drop_format_5(calibration: dict[str, Any], scoring: dict[str, Any]) -> None:
    """A format-5 calibration and scoring data as format 4 had them, in place: no polar
    distance, and the ensemble of three scores (its values here stay format 5's, so they serve
    the mechanics only, not a decision)."""
    del calibration["scores"]["latent_polar_distance"]
    del scoring["latent_polar_distance"]
    scoring["ensemble"] = {"scores": ["dose", "latent_distance", "rapp"], "combine": "fisher"}


def drop_format_4(calibration: dict[str, Any], scoring: dict[str, Any]) -> None:
    """A format-4 calibration and scoring data as format 3 had them, in place: no RaPP, and the
    ensemble the larger of two percentiles (its values here stay format 4's, so they serve
    the mechanics only, not a decision)."""
    del calibration["scores"]["rapp"]
    del scoring["rapp"], scoring["ensemble"]
    as_quantiles(calibration)


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
    the ensemble; 1 to 3, without RaPP, calibrated by quantiles rather than sorted values; 1 to
    4, without the polar distance; 2 to 5, an image model's attribution standardised at the
    trimmed projection rather than the residual from x redrawn; 1 to 7, without the
    ensemble's validation rows; 1 to 8, without the feature distance."""
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
    calibration, scoring, refs = pipeline.calibration(
        model, pipeline.Splits(x_val, x_val, x_val, binarize=False), cal_cfg, background
    )
    if format_version <= 8 and refs.features is not None:
        drop_format_9(calibration, scoring)
        refs = replace(refs, features=None)
    if format_version <= 7:
        drop_format_8(calibration)
    if format_version <= 5:
        drop_format_6(model, x_val, scoring)
    if format_version <= 4:
        drop_format_5(calibration, scoring)
        assert refs.neighbours is not None
        refs = References(replace(refs.neighbours, log_lengths=None), refs.gaps)
    if format_version <= 3:
        drop_format_4(calibration, scoring)
        refs = References(refs.neighbours)
    if format_version <= 2:
        drop_format_3(calibration, scoring)
        refs = References()
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
    export_artifact(model, manifest, path, background, refs)
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
    """A short real training run on the shipped MNIST slice: 7 epochs of its 9,000 training
    images, about as many steps as 3 epochs of 20,000 (seconds on 2 cores)."""
    from training.__main__ import main

    out = tmp_path_factory.mktemp("mnist") / "vae.pt"
    args = ["--data-dir", str(MNIST_DIR), "--out", str(out), "--epochs", "7", "--eval-k", "50",
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
        # start outside the clean_environ fixture. The CPU unless a test asks for a device.
        env = {**TEST_DEVICE, **env, "VAE_PORT": str(port), "VAE_HOST": "127.0.0.1"}
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


class Gate:
    """The test-only controls of a `python -m tests.gated_app` server (see that module): while
    closed, every model call waits; `calls()` lists the calls that reached it."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.file, self.log, self.load = folder / "gate", folder / "calls", folder / "load"
        self.env = {"TEST_GATE": str(self.file), "TEST_CALLS": str(self.log),
                    "TEST_LOAD_GATE": str(self.load)}  # fmt: skip

    def close(self) -> None:
        self.file.touch()

    def open(self) -> None:
        self.file.unlink(missing_ok=True)

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def wait_for_calls(self, n: int, timeout: float = 60.0) -> list[str]:
        """Poll until at least n model calls have reached the gate; their lines."""
        deadline = time.monotonic() + timeout
        while len(calls := self.calls()) < n:
            assert time.monotonic() < deadline, f"only {len(calls)} of {n} model calls started"
            time.sleep(0.01)
        return calls


GatedStart = Callable[[dict[str, str]], tuple[Server, Gate]]


@pytest.fixture
def start_gated(tmp_path: Path) -> Iterator[GatedStart]:
    """Start real `tests.gated_app` servers, ready, each with its gate (open at first)."""
    started: list[tuple[Server, Gate]] = []

    def start(env: dict[str, str]) -> tuple[Server, Gate]:
        gate = Gate(tmp_path / f"gate{len(started)}")
        server = Server({**gate.env, **env}, tmp_path / f"gated{len(started)}.log",
                        args=("-m", "tests.gated_app"))  # fmt: skip
        started.append((server, gate))
        server.wait_ready()
        return server, gate

    yield start
    for server, gate in started:
        gate.open()  # a held call would otherwise hold up the shutdown
        gate.load.unlink(missing_ok=True)
        server.stop()
