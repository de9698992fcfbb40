"""Leave-one-digit-out anomaly benchmark: train on nine digits, score the test set.

For each digit d, a VAE is trained on the training images of the other nine digits; digit d is
the anomaly class of the whole test set. The AUROC of each score (KL, reconstruction
probability, IWAE log-likelihood) is reported per digit and as a mean.

    python -m training.benchmark_anomaly --data-dir ../shared/datasets/mnist --out runs/lodo.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from training.config import ModelConfig, TrainConfig
from training.data import Dataset, default_data_dir, load_data
from training.evaluate import SCORE_DIRECTIONS, anomaly_scores, auroc
from training.pipeline import fit, split

log = logging.getLogger("training")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m training.benchmark_anomaly",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data-dir", type=Path, default=default_data_dir())
    p.add_argument("--out", type=Path, default=Path("runs/benchmark_anomaly.json"))
    p.add_argument("--digits", type=int, nargs="+", default=list(range(10)))
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--latent-dim", type=int, default=ModelConfig.latent_dim)
    p.add_argument("--hidden-dims", type=int, nargs="+", default=list(ModelConfig.hidden_dims))
    p.add_argument("--samples", type=int, default=16, help="L, reconstruction probability")
    p.add_argument("--ll-samples", type=int, default=100, help="K, log-likelihood")
    p.add_argument("--test-images", type=int, help="score only the first N test images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)  # fmt: skip


def leave_out(data: Dataset, digit: int) -> Dataset:
    assert data.y_train is not None
    keep = data.y_train != digit
    return replace(data, x_train=data.x_train[keep], y_train=data.y_train[keep])


def run_digit(data: Dataset, digit: int, args: argparse.Namespace) -> dict[str, float]:
    model_cfg = ModelConfig(
        input_dim=data.x_train.shape[1], hidden_dims=tuple(args.hidden_dims),
        latent_dim=args.latent_dim,
    )  # fmt: skip
    # The default recipe (cosine decay, KL warm-up) for fewer epochs: warm up over half at most.
    warmup = min(TrainConfig.kl_warmup_epochs, args.epochs / 2)
    cfg = TrainConfig(
        epochs=args.epochs, seed=args.seed, kl_warmup_epochs=warmup, eval_images=args.test_images
    )
    splits = split(leave_out(data, digit), cfg, "bernoulli", torch.device(args.device))
    with tempfile.TemporaryDirectory() as ckpt:
        model, _ = fit(splits, model_cfg, cfg, checkpoint_dir=Path(ckpt), progress=False)
    scores = anomaly_scores(
        model, splits.x_test, samples=args.samples, ll_samples=args.ll_samples, seed=args.seed
    )
    assert data.y_test is not None
    is_anomaly = data.y_test[: len(splits.x_test)] == digit
    out = {}
    for name, values in scores.items():
        signed = values if SCORE_DIRECTIONS[name] == "higher" else -values  # higher = anomalous
        out[name] = auroc(signed[~is_anomaly], signed[is_anomaly])
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    data = load_data(args.data_dir)
    if data.y_train is None or data.y_test is None:
        print(f"error: {args.data_dir}: the benchmark needs label files.", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    per_digit: dict[int, dict[str, float]] = {}
    for digit in args.digits:
        per_digit[digit] = run_digit(data, digit, args)
        log.info("digit %d: %s", digit, {k: round(v, 3) for k, v in per_digit[digit].items()})
    names = list(next(iter(per_digit.values())))
    mean = {n: float(np.mean([r[n] for r in per_digit.values()])) for n in names}
    result = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "auroc": {str(d): r for d, r in per_digit.items()},
        "mean_auroc": mean,
        "best_score": max(mean, key=lambda n: mean[n]),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(markdown_table(per_digit, mean))
    return 0


def markdown_table(per_digit: dict[int, dict[str, float]], mean: dict[str, float]) -> str:
    names = list(mean)
    lines = ["| held-out digit | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for digit, row in per_digit.items():
        lines.append(f"| {digit} | " + " | ".join(f"{row[n]:.3f}" for n in names) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{mean[n]:.3f}**" for n in names) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
