"""Percentiles and anomaly decisions: the calibration's arithmetic, and real decisions on MNIST."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.calibration import Calibration
from app.errors import ModelLoadError
from app.main import create_app
from app.settings import Settings
from tests.conftest import MNIST_DIR
from training.data import load_data

LEVELS = np.linspace(0, 1, 1001).tolist()


def manifest_with(quantiles: list[float], direction: str = "higher") -> dict[str, Any]:
    return {
        "calibration": {
            "levels": LEVELS,
            "scores": {"s": {"anomalous_when": direction, "samples": 0, "quantiles": quantiles}},
        }
    }


def test_percentile_is_the_share_of_normal_data_below_for_higher_scores() -> None:
    cal = Calibration.from_manifest(manifest_with(np.linspace(0, 100, 1001).tolist()), "m")
    got = cal.percentile("s", np.array([-5.0, 0.0, 25.0, 99.0, 150.0], dtype=np.float32))
    np.testing.assert_allclose(got, [0.0, 0.0, 0.25, 0.99, 1.0], atol=1e-6)


def test_percentile_is_the_share_above_for_lower_scores() -> None:
    cal = Calibration.from_manifest(manifest_with(np.linspace(0, 100, 1001).tolist(), "lower"), "m")
    got = cal.percentile("s", np.array([-5.0, 1.0, 75.0, 150.0], dtype=np.float32))
    np.testing.assert_allclose(got, [1.0, 0.99, 0.25, 0.0], atol=1e-6)


def test_percentile_handles_tied_quantiles() -> None:
    q = [0.0] * 500 + np.linspace(0, 10, 501).tolist()  # half the normal data scores exactly 0
    cal = Calibration.from_manifest(manifest_with(q), "m")
    got = cal.percentile("s", np.array([0.0, 5.0, 11.0], dtype=np.float32))
    np.testing.assert_allclose(got, [0.5, 0.75, 1.0], atol=1e-3)


@pytest.mark.parametrize(
    ("quantiles", "message"),
    [
        (np.linspace(0, 1, 1000).tolist(), "must be 1001 finite, non-decreasing quantiles"),
        (np.linspace(1, 0, 1001).tolist(), "must be 1001 finite, non-decreasing quantiles"),
        ([float("nan")] * 1001, "must be 1001 finite, non-decreasing quantiles"),
    ],
)
def test_broken_calibration_is_refused(quantiles: list[float], message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        Calibration.from_manifest(manifest_with(quantiles), "m.pt")


def test_missing_calibration_is_refused() -> None:
    with pytest.raises(ModelLoadError, match=r"m\.pt: the manifest has no score calibration"):
        Calibration.from_manifest({}, "m.pt")


# --- real decisions on a model trained on real MNIST ----------------------------------------


@pytest.fixture(scope="module")
def mnist_client(mnist_artifact: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(model_path=mnist_artifact))) as client:
        yield client


@pytest.fixture(scope="module")
def digits() -> list[list[float]]:
    x = load_data(MNIST_DIR).x_test[:300]
    # Binarised like the calibration data (fixed seed): the model was trained on binary images.
    return (np.random.default_rng(0).random(x.shape) < x).astype(np.float32).tolist()


@pytest.mark.slow
@pytest.mark.parametrize("score", ["kl_divergence", "reconstruction_log_prob", "log_likelihood"])
def test_decisions_flag_noise_and_pass_digits(
    mnist_client: TestClient, digits: list[list[float]], score: str
) -> None:
    noise = np.random.default_rng(1).random((100, 784)).round().tolist()
    body = {"decision_score": score, "seed": 0}
    normal = mnist_client.post("/anomaly-score", json={**body, "instances": digits}).json()
    anomalous = mnist_client.post("/anomaly-score", json={**body, "instances": noise}).json()
    assert normal["decision_score"] == score
    assert normal["threshold_percentile"] == 0.99
    assert all(anomalous["is_anomaly"])
    assert all(p > 0.999 for p in anomalous["percentiles"][score])
    # At the 99th percentile about 1% of normal digits are flagged; allow for sampling noise.
    assert np.mean(normal["is_anomaly"]) < 0.05
    assert 0.3 < np.median(normal["percentiles"][score]) < 0.7


@pytest.mark.slow
def test_threshold_can_be_set_per_request(
    mnist_client: TestClient, digits: list[list[float]]
) -> None:
    body = {"instances": digits, "seed": 0, "decision_score": "kl_divergence"}
    loose = mnist_client.post("/anomaly-score", json={**body, "threshold_percentile": 0.5}).json()
    strict = mnist_client.post("/anomaly-score", json=body).json()
    assert loose["threshold_percentile"] == 0.5
    assert 0.3 < np.mean(loose["is_anomaly"]) < 0.7
    assert sum(loose["is_anomaly"]) > sum(strict["is_anomaly"])
    flagged = np.array(loose["percentiles"]["kl_divergence"]) > 0.5
    assert loose["is_anomaly"] == flagged.tolist()


@pytest.mark.slow
def test_log_likelihood_is_returned_only_when_needed(
    mnist_client: TestClient, digits: list[list[float]]
) -> None:
    body = {"instances": digits[:5], "seed": 0, "decision_score": "kl_divergence"}
    without = mnist_client.post("/anomaly-score", json=body).json()
    assert without["log_likelihood"] is None
    assert without["percentiles"]["log_likelihood"] is None
    asked = mnist_client.post("/anomaly-score", json={**body, "log_likelihood_samples": 32}).json()
    assert asked["log_likelihood_samples"] == 32
    # The IWAE bound is at least the log reconstruction probability's ELBO-like value on average.
    assert len(asked["log_likelihood"]) == 5
    assert all(-400 < v < 0 for v in asked["log_likelihood"])
