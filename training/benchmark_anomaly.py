"""Anomaly benchmark: leave-one-digit-out or one class on every score, and sanity sets against
a served model.

Leave-one-digit-out (--protocol lodo): for each digit d, a VAE (the default recipe, for
--epochs; --preset quick trains as the CLI's quick preset does) and its background model are
trained on the training images of the other nine digits, calibrated as `python -m training`
does, and the whole test set is scored as callers send it (grey): digit d is the anomaly class.
One class (--protocol oneclass): trained on digit d's training images alone, the other nine
digits are the anomalies. The AUROC of each score is reported per digit and as a mean, with
the share of the normal test digits the default decision flags at its 0.99 threshold, grey
(as served) and binarised.

Sanity sets (--artifact): the artifact is loaded and scored by the service's own code
(app/model.py), normal test digits against uniform noise, all-black and all-white images,
inverted, blurred and patched digits (a bright 8x8 square pasted in): AUROC per score, the
share flagged at the service's default threshold, and whether the attribution finds a pasted
square and a pasted thin line (beside what a per-pixel map could reach at best). What each
score costs is bench/score_costs.py's, artifacts timed in turns in one process.

    python -m training.benchmark_anomaly --data-dir ../shared/datasets/mnist --out runs/lodo.json
    python -m training.benchmark_anomaly --data-dir ... --protocol oneclass --epochs 40
    python -m training.benchmark_anomaly --artifact models/default/vae.pt --digits
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.model import VAEService
from scoring.calibration import Calibration
from training.benchmark_latent import machine, write_result
from training.config import ModelConfig, TrainConfig, schedule
from training.data import Dataset, binarize_fixed, default_data_dir, load_data
from training.evaluate import SCORE_DIRECTIONS, auroc, signed
from training.pipeline import (
    TEST_BINARIZATION_SEED,
    calibration,
    fit,
    fit_background,
    served_scores,
    split,
    test_auroc,
)

log = logging.getLogger("training")

PATCH = 8  # the pasted square's side, in pixels
# What the attribution is asked to find: a bright square, and a thin bright line (a scratch),
# each as (height, width); the line lies across in even rows of the set and down in odd ones.
ATTRIBUTION_SHAPES = {"8x8 patch": (PATCH, PATCH), "1x12 line": (1, 12)}
THRESHOLD = 0.99  # the service's default VAE_ANOMALY_PERCENTILE


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m training.benchmark_anomaly",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data-dir", type=Path, default=default_data_dir())
    p.add_argument("--out", type=Path, default=Path("runs/benchmark_anomaly.json"))
    p.add_argument(
        "--digits",
        type=int,
        nargs="*",
        default=list(range(10)),
        help="held-out digits; none skips leave-one-digit-out",
    )
    p.add_argument("--protocol", choices=("lodo", "oneclass"), default="lodo",
                   help="leave one digit out, or train on one digit")  # fmt: skip
    p.add_argument("--preset", choices=("benchmark", "quick"), default="benchmark",
                   help="quick: the CLI's quick preset, not --epochs")  # fmt: skip
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--latent-dim", type=int, default=ModelConfig.latent_dim)
    p.add_argument("--hidden-dims", type=int, nargs="+", default=list(ModelConfig.hidden_dims))
    p.add_argument("--samples", type=int, default=16, help="L, reconstruction probability")
    p.add_argument("--ll-samples", type=int, default=100, help="K, log-likelihood")
    p.add_argument("--test-images", type=int, help="score only the first N test images")
    p.add_argument(
        "--background-noise", type=float, default=TrainConfig.background_noise,
        help="the likelihood ratio's background model; 0 trains none (and skips the ratio)",
    )  # fmt: skip
    p.add_argument("--artifact", type=Path, help="also run the sanity sets against this model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)  # fmt: skip


def normal_data(data: Dataset, digit: int, protocol: str) -> Dataset:
    """The training images a run learns from: every digit but `digit`, or `digit` alone."""
    assert data.y_train is not None
    keep = (data.y_train == digit) if protocol == "oneclass" else (data.y_train != digit)
    return replace(data, x_train=data.x_train[keep], y_train=data.y_train[keep])


def run_digit(data: Dataset, digit: int, args: argparse.Namespace) -> dict[str, Any]:
    """Each score's AUROC, and the default decision's false alarms on the normal test digits."""
    model_cfg = ModelConfig(
        input_dim=data.x_train.shape[1], hidden_dims=tuple(args.hidden_dims),
        latent_dim=args.latent_dim,
    )  # fmt: skip
    # The quick preset as it is, or the default recipe (cosine decay, KL warm-up) for --epochs.
    quick = args.preset == "quick"
    epochs, warmup = schedule("quick") if quick else schedule(epochs=args.epochs)
    cfg = TrainConfig(
        epochs=epochs, seed=args.seed, kl_warmup_epochs=warmup, eval_images=args.test_images,
        calibration_samples=args.samples, calibration_ll_samples=args.ll_samples,
        background_noise=args.background_noise,
    )  # fmt: skip
    splits = split(
        normal_data(data, digit, args.protocol), cfg, "bernoulli", torch.device(args.device)
    )
    with tempfile.TemporaryDirectory() as ckpt:
        model, _ = fit(splits, model_cfg, cfg, checkpoint_dir=Path(ckpt), progress=False)
        background = fit_background(
            splits, model_cfg, cfg, checkpoint_dir=Path(ckpt), progress=False
        )
    calibrated, scoring, refs = calibration(model, splits, cfg, background)
    assert data.y_test is not None
    labels = data.y_test[: len(splits.x_test)]
    is_anomaly = (labels != digit) if args.protocol == "oneclass" else (labels == digit)
    aurocs = test_auroc(model, splits, cfg, background, scoring, refs, calibrated, is_anomaly)
    cal = Calibration.from_manifest({"calibration": calibrated}, "calibration")
    decision = scoring["decision_score"]
    alarms = {}
    for kind, x in (("grey", splits.test_served), ("binarised", splits.x_test)):
        scores = served_scores(model, x[~torch.from_numpy(is_anomaly)], cfg, background,
                               scoring, refs, calibrated)  # fmt: skip
        alarms[kind] = round(flagged(cal, decision, scores), 4)
    return {"auroc": aurocs, "decision_score": decision, "false_alarms": alarms}


def sanity_sets(x: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Inputs in [0, 1] that are not digits, built from normal test digits x (N, 28 * 28)."""
    rng = np.random.default_rng(seed)
    n = len(x)
    images = x.reshape(n, 28, 28)
    # A 3x3 box blur, twice: strokes smear into grey, as a defocused scan does.
    blurred = images
    for _ in range(2):
        padded = np.pad(blurred, ((0, 0), (1, 1), (1, 1)))
        shifted = [padded[:, i : i + 28, j : j + 28] for i in range(3) for j in range(3)]
        blurred = np.mean(shifted, axis=0)
    return {
        "uniform noise": rng.uniform(0.0, 1.0, x.shape),
        "all black": np.zeros((1, x.shape[1])),
        "all white": np.ones((1, x.shape[1])),
        "inverted": 1.0 - x,
        "blurred": blurred.reshape(n, -1),
        "8x8 patch": paste_patches(x, seed)[0],
    }


def paste_patches(x: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each image with a white PATCH x PATCH square at a random place, and the square's mask."""
    return paste(x, PATCH, PATCH, seed)


def paste(x: np.ndarray, height: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each 28x28 image with a white height x width rectangle at a random place (width x height
    in odd rows), and the rectangle's mask."""
    sizes = [(height, width) if i % 2 == 0 else (width, height) for i in range(len(x))]
    corners = np.random.default_rng(seed + 1).integers(0, [(29 - h, 29 - w) for h, w in sizes])
    images = x.reshape(len(x), 28, 28).copy()
    mask = np.zeros(images.shape, dtype=bool)
    for i, ((r, c), (h, w)) in enumerate(zip(corners, sizes, strict=True)):
        images[i, r : r + h, c : c + w] = 1.0
        mask[i, r : r + h, c : c + w] = True
    return images.reshape(len(x), -1), mask.reshape(len(x), -1)


def run_sanity(vae: VAEService, x: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    """AUROC of every score against each set, the share the default decision flags, the
    attribution's hit rate on the patch, and each score's cost per instance."""
    offered = [n for n in vae.calibration.scores if n in SCORE_DIRECTIONS]

    def score(xs: np.ndarray) -> dict[str, np.ndarray]:
        out = vae.anomaly_scores(
            xs.astype(np.float32), args.samples, args.seed, args.ll_samples,
            ratio="likelihood_ratio" in offered,
        )  # fmt: skip
        return {n: v for n, v in out.items() if n in offered}

    normal = score(x)
    decision, cal = vae.decision_score, vae.calibration
    # The false alarms on normal digits as callers send them (grey), and binarised as the
    # trainer's test set is, which a format-4 calibration no longer reads.
    binarised = binarize_fixed(x, TEST_BINARIZATION_SEED)
    flags = {
        "normal test digits": flagged(cal, decision, normal),
        "normal test digits, binarised": flagged(cal, decision, score(binarised)),
    }
    aurocs: dict[str, dict[str, float]] = {}
    for kind, xs in sanity_sets(x, args.seed).items():
        s = score(xs)
        flags[kind] = flagged(cal, decision, s)
        if len(xs) > 1:
            aurocs[kind] = {n: auroc(signed(n, normal[n]), signed(n, s[n])) for n in offered}
    return {
        "decision_score": decision,
        "threshold_percentile": THRESHOLD,
        "flagged": flags,
        "auroc": aurocs,
        "attribution": {
            kind: attribution_hits(vae, x[:100], height, width, args)
            for kind, (height, width) in ATTRIBUTION_SHAPES.items()
        },
    }


def flagged(cal: Calibration, name: str, scores: Mapping[str, np.ndarray]) -> float:
    """The share of rows the service flags by score `name` (one of `scores`, which hold every
    score the service computed for them: the ensemble's percentile reads its parts) at its
    default threshold, lowered as the service lowers it where the calibration cannot resolve
    that tail."""
    values = {n: v.astype(np.float32) for n, v in scores.items()}
    over = cal.percentiles(values)[name] > cal.effective_threshold(THRESHOLD)
    return float(over.mean())


def attribution_hits(
    vae: VAEService, x: np.ndarray, height: int, width: int, args: argparse.Namespace
) -> dict[str, float] | None:
    """With a height x width white rectangle pasted in each digit, the share of its k = h * w
    most-attributed pixels that lie in it, beside `per_pixel_ceiling`."""
    if vae.attribution_method is None:
        return None
    patched, mask = paste(x, height, width, args.seed)
    att = vae.anomaly_scores(patched.astype(np.float32), args.samples, args.seed, attribution=True)
    order = np.argsort(-att["attribution"], axis=1)
    top = order[:, : height * width]
    return {
        "in_shape": float(np.take_along_axis(mask, top, axis=1).mean()),
        "per_pixel_ceiling": per_pixel_ceiling(x, patched, mask),
        "changed_found": changed_found(order, patched != x),
    }


def changed_found(order: np.ndarray, changed: np.ndarray) -> float:
    """What a per-pixel map can be asked for: of the n pixels the paste changed in each image,
    the share among its n most-attributed ones (1.0 for a perfect map), over the images
    where it changed any."""
    shares = []
    for ranked, hit in zip(order, changed, strict=True):
        n = int(hit.sum())
        if n:
            shares.append(hit[ranked[:n]].mean())
    return float(np.mean(shares))


def per_pixel_ceiling(x: np.ndarray, patched: np.ndarray, mask: np.ndarray) -> float:
    """The share a map would reach that put exactly the pixels the paste changed first and
    the rest in a random order. Where the shape lies over a white stroke its pixels do not
    change: no per-pixel evidence finds them, and only a guess from their neighbours could."""
    k = mask.sum(1)
    changed = (patched != x).sum(1)  # all inside the mask
    rest = k - np.minimum(changed, k)  # the top-k places left to unchanged pixels
    found = np.minimum(changed, k) + rest * (k - changed) / (x.shape[1] - changed)
    return float((found / k).mean())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    data = load_data(args.data_dir)
    if data.y_train is None or data.y_test is None:
        print(f"error: {args.data_dir}: the benchmark needs label files.", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    if args.preset == "quick":  # what it trained for, not the --epochs it did not use
        config["epochs"] = schedule("quick")[0]
    result: dict[str, Any] = {"config": config, "machine": machine()}
    if args.digits:
        per_digit: dict[int, dict[str, float]] = {}
        alarms: dict[str, dict[str, float]] = {}
        decision = ""
        for digit in args.digits:
            run = run_digit(data, digit, args)
            per_digit[digit], decision = run["auroc"], run["decision_score"]
            alarms[str(digit)] = run["false_alarms"]
            rounded = {k: round(v, 3) for k, v in per_digit[digit].items()}
            log.info("digit %d: %s; false alarms %s", digit, rounded, run["false_alarms"])
        names = [n for n in SCORE_DIRECTIONS if n in next(iter(per_digit.values()))]
        mean = {n: float(np.mean([r[n] for r in per_digit.values()])) for n in names}
        result |= {
            "protocol": args.protocol,
            "auroc": {str(d): r for d, r in per_digit.items()},
            "mean_auroc": mean,
            "best_score": max(mean, key=lambda n: mean[n]),
            "decision_score": decision,
            "false_alarms": alarms,
            "mean_false_alarms": {
                kind: float(np.mean([a[kind] for a in alarms.values()]))
                for kind in ("grey", "binarised")
            },
        }
        print(markdown_table(per_digit, mean))
        alarm_rates = result["mean_false_alarms"]
        print(f"default decision: {decision}; false alarms at {THRESHOLD}: {alarm_rates}")
    if args.artifact:
        x = data.x_test[: args.test_images]  # grey, as callers send them
        vae = VAEService.load(args.artifact, device=args.device)
        result["sanity"] = sanity = run_sanity(vae, x, args)
        print(json.dumps(sanity, indent=1))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    write_result(args.out, result)
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
