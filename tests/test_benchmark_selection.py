"""The per-artifact selection benchmark, run small, and the synthetic anomalies it makes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from training.benchmark_selection import KINDS, SHIFT, choose, main, synthetic


def test_each_kind_of_synthetic_anomaly_breaks_the_rows_its_own_way() -> None:
    rng = np.random.default_rng(0)
    mean, std = np.array([10.0, -5.0, 0.0, 100.0]), np.array([1.0, 2.0, 0.5, 10.0])
    x = rng.normal(size=(40, 4)) * std + mean
    made = synthetic(x, mean, std, seed=0)
    assert set(made) == set(KINDS)
    assert all(m.shape == x.shape and m.dtype == np.float32 for m in made.values())
    # shuffle reorders each column's values among the rows; swap takes each value from the
    # same column of some row, about half of them from another row than its own.
    assert np.allclose(np.sort(made["shuffle"], 0), np.sort(x, 0), atol=1e-3)
    assert not np.allclose(made["shuffle"], x)
    found = np.isclose(made["swap"][:, None, :], x[None, :, :], atol=1e-3).any(axis=1)
    assert found.all()
    own = np.isclose(made["swap"], x, atol=1e-3).mean()
    assert 0.35 < own < 0.65
    # shift moves a quarter of the features (one of four) by 3 sd, in the feature's own units.
    moved = np.abs(made["shift"] - x) / std > 1e-3
    assert (moved.sum(1) == 1).all()
    assert np.allclose(np.abs(made["shift"] - x)[moved] / np.broadcast_to(std, x.shape)[moved],
                       SHIFT, atol=1e-3)  # fmt: skip
    # scale doubles each row's distance from the training mean.
    assert np.allclose(made["scale"] - mean, 2 * (x - mean), atol=1e-3)
    # The same seed makes the same anomalies; another seed others.
    again = synthetic(x, mean, std, seed=0)
    assert all(np.array_equal(made[k], again[k]) for k in KINDS)
    assert not np.array_equal(synthetic(x, mean, std, seed=1)["noise"], made["noise"])


def test_the_choice_is_the_best_score_over_the_kinds_on_average() -> None:
    aurocs = {"noise": {"a": 0.9, "b": 0.6}, "swap": {"a": 0.5, "b": 0.7}}
    assert choose(aurocs) == "a"  # 0.70 against 0.65, though b wins on swap
    assert choose({"noise": {"a": 0.6, "b": 0.61}}) == "b"


def test_a_short_run_trains_through_the_cli_and_scores_every_served_score(
    tmp_path: Path,
) -> None:
    out = tmp_path / "selection.json"
    short = "--train-args=--epochs 10 --hidden-dims 32 --latent-dim 2 --background-epochs 2"
    assert main(["--dataset", "iris", "--seeds", "1", "--out", str(out), short]) == 0
    result = json.loads(out.read_text())
    assert result["kinds"] == list(KINDS)
    run = result["datasets"]["iris"]["runs"][0]
    # Iris: 100 normal rows, 70 to train on, of which the trainer holds out 21 (3 in 10).
    assert run["validation_rows"] == 21
    assert set(run["synthetic_auroc"]) == set(KINDS)
    served = set(run["test_auroc"])
    assert {"kl_divergence", "dose", "input_distance", "ensemble"} <= served
    assert all(set(k) == served for k in run["synthetic_auroc"].values())
    assert run["chosen"] == choose(run["synthetic_auroc"])
    assert run["default"] in served
    summary = result["datasets"]["iris"]["summary"]
    assert summary["chosen_test"] == run["test_auroc"][run["chosen"]]
    # Doubling a row's distance from the mean is found by the input distance, a k-NN detector
    # on the standardised rows, on any table of normal rows.
    assert run["synthetic_auroc"]["scale"]["input_distance"] > 0.7
