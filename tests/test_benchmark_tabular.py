"""The tabular benchmark, run small: one seed, a short training, two PyOD detectors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.benchmark_tabular import digits, main

SHORT = ("--train-args=--epochs 10 --hidden-dims 32 --latent-dim 2 --background-epochs 2 "
         "--val-min 30 --eval-k 5 --batch-size 32")  # fmt: skip


def test_vae_service_and_pyod_are_scored_on_the_same_split(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tabular.json"
    args = ["--dataset", "breast_cancer", "--seeds", "1", "--detectors", "IForest", "ECOD",
            "--out", str(out), SHORT]  # fmt: skip
    assert main(args) == 0
    result = json.loads(out.read_text())
    run = result["datasets"]["breast_cancer"]["runs"][0]
    # 357 benign rows, 30% held out (107), and every one of the 212 malignant rows.
    assert (run["test_rows"], run["test_anomalies"]) == (107 + 212, 212)
    assert run["train_rows"] == 357 - 107
    # The CLI trained on those same rows, less its validation split.
    assert run["artifact_train_size"] == run["train_rows"] - 30
    # The false alarms: a share of the 107 held-out benign rows, by the default decision at
    # 0.99, which the 30 calibration rows cannot resolve (the threshold is lowered).
    assert run["calibration_rows"] == 30
    assert 0.0 <= run["false_alarms"] <= 1.0
    assert run["false_alarms"] * 107 == pytest.approx(round(run["false_alarms"] * 107), abs=0.01)
    assert set(run["pyod"]) == {"IForest", "ECOD"}
    assert {"kl_divergence", "reconstruction_log_prob", "dose"} <= set(run["vae_service"])
    for metrics in [*run["pyod"].values(), *run["vae_service"].values()]:
        assert 0.0 <= metrics["auroc"] <= 1.0
        assert 0.0 <= metrics["average_precision"] <= 1.0
    # Malignant tumours are far from benign ones: a real detector ranks them well above chance.
    assert run["pyod"]["IForest"]["auroc"] > 0.85
    table = capsys.readouterr().out
    assert "| PyOD: IForest |" in table
    assert "| vae-service: dose |" in table


def test_digits_hold_out_one_digit_per_seed() -> None:
    for seed in (0, 3):
        table = digits(seed)
        assert 50 < len(table.names) < 64  # the blank border pixels are left out
        assert table.x.shape == (1797, len(table.names))
        anomalies = sum(label != table.normal for label in table.labels)
        assert 170 < anomalies < 190  # about a tenth of the 1,797 images: one digit
