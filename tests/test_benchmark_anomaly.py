"""The leave-one-digit-out benchmark, run small: one digit, one epoch, a test subset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import MNIST_DIR
from training.benchmark_anomaly import leave_out, main
from training.data import load_data


def test_leave_out_drops_exactly_one_digit_from_training() -> None:
    data = load_data(MNIST_DIR)
    held = leave_out(data, 3)
    assert held.y_train is not None
    assert 3 not in set(held.y_train.tolist())
    assert len(held.x_train) == int((data.y_train != 3).sum())
    assert len(held.x_test) == len(data.x_test)  # the test set keeps every digit


@pytest.mark.slow
def test_benchmark_reports_auroc_per_score_and_digit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "lodo.json"
    args = ["--data-dir", str(MNIST_DIR), "--out", str(out), "--digits", "0", "--epochs", "1",
            "--test-images", "1000", "--samples", "4", "--ll-samples", "8"]  # fmt: skip
    assert main(args) == 0
    result = json.loads(out.read_text())
    scores = {"kl_divergence", "reconstruction_log_prob", "log_likelihood"}
    assert set(result["auroc"]["0"]) == scores
    assert result["best_score"] in scores
    # After one epoch zeros already look unlike the other nine digits to every score.
    assert all(0.5 < v <= 1.0 for v in result["auroc"]["0"].values())
    assert result["mean_auroc"] == result["auroc"]["0"]
    table = capsys.readouterr().out
    assert "| 0 |" in table
    assert "**mean**" in table
    assert np.isfinite(list(result["mean_auroc"].values())).all()
