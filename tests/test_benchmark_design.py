"""The design split the ensemble is chosen on, run small: it draws on the training files alone,
keeps its held-out normal rows out of training, and scores every candidate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import MNIST_DIR
from training.benchmark_design import ANOMALIES, CANDIDATES, HELD_OUT, SCORES, design_data, main
from training.data import load_data


@pytest.mark.parametrize("protocol", ["oneclass", "lodo"])
def test_the_design_rows_come_from_the_training_files_and_are_not_trained_on(
    protocol: str,
) -> None:
    data = load_data(MNIST_DIR)
    design, is_anomaly = design_data(data, 3, protocol)
    assert design.y_train is not None
    # The test set is never read: the design's rows are training images.
    rows = {r.tobytes() for r in data.x_train}
    assert all(r.tobytes() in rows for r in design.x_test)
    trained = {r.tobytes() for r in design.x_train}
    assert not any(r.tobytes() in trained for r in design.x_test[~is_anomaly])
    assert (~is_anomaly).sum() == HELD_OUT
    assert is_anomaly.sum() <= ANOMALIES
    normal = set(design.y_train.tolist())
    assert normal == ({3} if protocol == "oneclass" else set(range(10)) - {3})


@pytest.mark.slow
def test_the_design_reports_every_score_and_candidate_per_digit(tmp_path: Path) -> None:
    out = tmp_path / "design.json"
    args = ["--data-dir", str(MNIST_DIR), "--out", str(out), "--digits", "1",
            "--protocols", "oneclass", "--epochs", "1"]  # fmt: skip
    assert main(args) == 0
    result = json.loads(out.read_text())
    one = result["protocols"]["oneclass"]
    assert set(one["auroc"]["1"]) == {*SCORES, *CANDIDATES}
    assert one["mean"] == one["worst"] == one["auroc"]["1"]
    assert np.isfinite(list(one["mean"].values())).all()
    # One epoch already tells a 1 from the other digits better than chance.
    assert one["mean"]["format 5: format 4 + polar + input complexity"] > 0.5


def test_the_trainers_ensemble_is_one_the_design_scores() -> None:
    """The recipe an image model is trained with is a candidate of the design split, with the
    same scores and weights, so the design's figures are of what ships."""
    from training.pipeline import ENSEMBLE

    assert ENSEMBLE in CANDIDATES.values()
    assert set(ENSEMBLE) <= set(SCORES)
