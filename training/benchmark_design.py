"""The design split the default ensemble is chosen on: MNIST's training images alone, never its
test set, so the benchmarks that report on the test set stay apart from the choice.

For each digit d and each protocol (one class: d alone is normal, trained for --epochs-oneclass
epochs; leave one digit out: d is the anomaly, trained as the quick preset trains), a VAE is
trained and calibrated as `python -m training.benchmark_anomaly` does, on the protocol's normal
training images less 500 held out. Those 500 are the design's normal rows; up to 2,000 training
images of the anomaly class, which no model saw, are its anomalies. No background model is
trained: no ensemble uses the likelihood ratio.

Each candidate ensemble is a weighted sum of its scores' tails, -log(1 - p) with p the score's
calibrated percentile (scoring/scores.py, Ensemble), and is reported by its AUROC per digit,
with each score alone beside them.

    python -m training.benchmark_design --data-dir ../shared/datasets/mnist \\
        --out docs/benchmark/ensemble-design.json
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scoring.calibration import Calibration
from training.benchmark_latent import machine, write_result
from training.config import ModelConfig, TrainConfig, schedule
from training.data import Dataset, default_data_dir, load_data
from training.evaluate import auroc, signed
from training.pipeline import calibration, fit, served_scores, split

log = logging.getLogger("training")

HELD_OUT = 500  # normal training images kept out of training: the design's normal rows
ANOMALIES = 2000  # at most this many training images of the anomaly class
SCORES = (
    "dose", "latent_distance", "latent_polar_distance", "rapp", "input_complexity",
    "feature_distance",
)  # fmt: skip
FORMAT_5 = dict.fromkeys(SCORES[:5], 1.0)
# The candidates, as weights on SCORES' tails. Format 4's three, each of the two newer scores
# added, both (format 5's default), and the latent distance weighted up instead, which on
# these protocols trades one for the other.
CANDIDATES: dict[str, dict[str, float]] = {
    "format 4: dose + latent + rapp": {"dose": 1, "latent_distance": 1, "rapp": 1},
    "format 4 + input complexity": {
        "dose": 1, "latent_distance": 1, "rapp": 1, "input_complexity": 1,
    },
    "format 4 + polar": {"dose": 1, "latent_distance": 1, "latent_polar_distance": 1, "rapp": 1},
    "format 5: format 4 + polar + input complexity": FORMAT_5,
    "format 4 + input complexity, latent x2": {
        "dose": 1, "latent_distance": 2, "rapp": 1, "input_complexity": 1,
    },
    "format 4 + input complexity, latent x3": {
        "dose": 1, "latent_distance": 3, "rapp": 1, "input_complexity": 1,
    },
    "polar in place of latent, + input complexity": {
        "dose": 1, "latent_polar_distance": 1, "rapp": 1, "input_complexity": 1,
    },
    # Format 9's candidates: the feature distance added to format 5's five, or in place of
    # one or both latent distances.
    "format 5 + feature": dict.fromkeys(SCORES, 1.0),
    "format 5, feature in place of polar": {
        "dose": 1, "latent_distance": 1, "feature_distance": 1, "rapp": 1, "input_complexity": 1,
    },
    "format 5, feature in place of both latent": {
        "dose": 1, "feature_distance": 1, "rapp": 1, "input_complexity": 1,
    },
    "format 5 + feature x2": FORMAT_5 | {"feature_distance": 2.0},
    "feature + latent + polar": {
        "feature_distance": 1, "latent_distance": 1, "latent_polar_distance": 1,
    },
    "feature + latent + dose": {"feature_distance": 1, "latent_distance": 1, "dose": 1},
}  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m training.benchmark_design",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data-dir", type=Path, default=default_data_dir())
    p.add_argument("--out", type=Path, default=Path("runs/ensemble-design.json"))
    p.add_argument("--digits", type=int, nargs="+", default=list(range(10)))
    p.add_argument("--protocols", nargs="+", choices=("oneclass", "lodo"),
                   default=["oneclass", "lodo"])  # fmt: skip
    p.add_argument("--epochs-oneclass", type=int, default=40)
    p.add_argument("--epochs", type=int, help="train every model this many epochs (smoke runs)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def design_data(data: Dataset, digit: int, protocol: str) -> tuple[Dataset, np.ndarray]:
    """The training images less the held-out normal rows, and as the test split, those rows
    then the anomalies (the mask says which), all drawn from the training files."""
    assert data.y_train is not None
    y = data.y_train
    is_normal = (y == digit) if protocol == "oneclass" else (y != digit)
    rng = np.random.default_rng(100 + digit)
    normal = np.flatnonzero(is_normal)
    held = rng.choice(normal, HELD_OUT, replace=False)
    others = np.flatnonzero(~is_normal)
    anomalies = rng.choice(others, min(ANOMALIES, len(others)), replace=False)
    train = np.setdiff1d(normal, held)
    x_test = np.concatenate([data.x_train[held], data.x_train[anomalies]])
    is_anomaly = np.r_[np.zeros(len(held), bool), np.ones(len(anomalies), bool)]
    design = replace(data, x_train=data.x_train[train], y_train=y[train], x_test=x_test,
                     y_test=None)  # fmt: skip
    return design, is_anomaly


def tails(data: Dataset, digit: int, protocol: str, args: argparse.Namespace) -> dict[str, Any]:
    """Each score's tail on the design rows, and which rows are anomalies."""
    design, is_anomaly = design_data(data, digit, protocol)
    if protocol == "oneclass":
        epochs, warmup = schedule(epochs=args.epochs or args.epochs_oneclass)
    else:
        epochs, warmup = schedule("quick", args.epochs)
    cfg = TrainConfig(epochs=epochs, seed=args.seed, kl_warmup_epochs=warmup,
                      background_noise=0.0)  # fmt: skip
    splits = split(design, cfg, "bernoulli", torch.device("cpu"))
    with tempfile.TemporaryDirectory() as ckpt:
        model, _ = fit(splits, ModelConfig(input_dim=design.x_train.shape[1]), cfg,
                       checkpoint_dir=Path(ckpt), progress=False)  # fmt: skip
    calibrated, scoring, refs = calibration(model, splits, cfg)
    scores = served_scores(model, splits.test_served, cfg, None, scoring, refs, calibrated)
    cal = Calibration.from_manifest({"calibration": calibrated}, "calibration").scores
    return {
        "tails": {n: cal[n].log_tail(scores[n]) for n in SCORES},
        "alone": {n: signed(n, scores[n]) for n in SCORES},
        "is_anomaly": is_anomaly,
    }


def aurocs(run: dict[str, Any]) -> dict[str, float]:
    """Each score alone and each candidate's AUROC on one digit's design rows."""
    a = run["is_anomaly"]

    def of(values: np.ndarray) -> float:
        return round(auroc(values[~a], values[a]), 4)

    out = {name: of(values) for name, values in run["alone"].items()}
    for name, weights in CANDIDATES.items():
        out[name] = of(sum(w * run["tails"][n] for n, w in weights.items()))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    data = load_data(args.data_dir)
    results: dict[str, Any] = {
        "command": "python -m training.benchmark_design " + " ".join(argv or sys.argv[1:]),
        "machine": machine(),
        "held_out": HELD_OUT,
        "anomalies": ANOMALIES,
        "candidates": CANDIDATES,
        "protocols": {},
    }
    for protocol in args.protocols:
        per_digit = {}
        for digit in args.digits:
            t0 = time.perf_counter()
            per_digit[str(digit)] = aurocs(tails(data, digit, protocol, args))
            log.info("%s, digit %d (%.0f s): %s", protocol, digit, time.perf_counter() - t0,
                     per_digit[str(digit)])  # fmt: skip
        rows = list(per_digit.values())
        results["protocols"][protocol] = {
            "auroc": per_digit,
            "mean": {n: round(float(np.mean([d[n] for d in rows])), 4) for n in rows[0]},
            "worst": {n: min(d[n] for d in rows) for n in rows[0]},
        }
    write_result(args.out, results)
    print(f"raw results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
