"""Would choosing a table model's decision per artifact, on synthetic anomalies, beat its default?

No single score wins on every table: the KL ranks breast_cancer's malignant rows best and is the
worst score on digits. A trainer could choose a score for each artifact without anomaly labels,
by making anomalies out of its own validation rows and keeping the score that ranks them best.
This benchmark measures what that choice would give, beside the default decision, on the tables
of training.benchmark_tabular, trained the same way (the real CLI, the same splits and seeds).

For each artifact, its validation rows (as its trainer split them) are made anomalous five ways,
in units of the training rows' standard deviation:

- `swap`: half of a row's features, at random, taken from another validation row (each value is
  normal, their combination is not);
- `shuffle`: every feature taken from a different row (each column's values kept, every link
  between columns broken);
- `noise`: Gaussian noise of one standard deviation added to every feature;
- `shift`: a quarter of the features moved by 3 standard deviations, up or down;
- `scale`: the row's distance from the training mean doubled.

Every score the artifact serves ranks the validation rows against each kind (AUROC, higher
flagging anomalies); the choice is the score with the highest mean over the five, and it is
scored on the held-out test rows as every score is.

    python -m training.benchmark_selection --out docs/benchmark/tabular-selection.json
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.model import VAEService
from training.benchmark_latent import machine, write_result
from training.benchmark_tabular import DATASETS, options, train_artifact, write_csv
from training.config import TrainConfig
from training.evaluate import auroc, signed
from training.pipeline import split
from training.tables import load_table

log = logging.getLogger("training")

Rows = np.ndarray
Maker = Callable[[Rows, np.random.Generator], Rows]

# As docs/benchmarks/tables.md runs them: each of the design tables' three classes is the anomaly
# class twice.
DESIGN_SEEDS = {"wine": 6, "iris": 6}
SHIFT = 3.0  # standard deviations: well outside most of a feature's normal values
SHIFTED_SHARE = 0.25


def _swap(z: Rows, rng: np.random.Generator) -> Rows:
    other = z[rng.permutation(len(z))]
    return np.where(rng.random(z.shape) < 0.5, other, z)


def _shuffle(z: Rows, rng: np.random.Generator) -> Rows:
    return np.stack([z[rng.permutation(len(z)), j] for j in range(z.shape[1])], axis=1)


def _noise(z: Rows, rng: np.random.Generator) -> Rows:
    return z + rng.normal(size=z.shape)


def _shift(z: Rows, rng: np.random.Generator) -> Rows:
    k = max(1, round(z.shape[1] * SHIFTED_SHARE))
    moved = z.copy()
    for row in moved:
        row[rng.choice(z.shape[1], k, replace=False)] += rng.choice([-SHIFT, SHIFT], k)
    return moved


def _scale(z: Rows, rng: np.random.Generator) -> Rows:
    return 2.0 * z


# Each kind works on standardised rows (z-scores of the training rows).
KINDS: dict[str, Maker] = {
    "swap": _swap,
    "shuffle": _shuffle,
    "noise": _noise,
    "shift": _shift,
    "scale": _scale,
}


def synthetic(x: Rows, mean: Rows, std: Rows, seed: int) -> dict[str, Rows]:
    """The rows x made anomalous each way, in x's own units; one generator, seeded, for all."""
    rng = np.random.default_rng(seed)
    z = (x - mean) / std
    return {kind: (make(z, rng) * std + mean).astype(np.float32) for kind, make in KINDS.items()}


def choose(synthetic_auroc: dict[str, dict[str, float]]) -> str:
    """The score with the highest mean AUROC over the kinds of synthetic anomaly."""
    scores = next(iter(synthetic_auroc.values()))
    return max(scores, key=lambda s: float(np.mean([k[s] for k in synthetic_auroc.values()])))


def run_seed(name: str, seed: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    table = DATASETS[name](seed)
    csv_path = write_csv(work / f"{name}-{seed}.csv", table)
    artifact, _ = train_artifact(csv_path, table, seed, args, work)
    data = load_table(csv_path, None, options(table, seed, args))
    assert data.test_is_anomaly is not None
    vae = VAEService.load(artifact, device="cpu")
    # The artifact's own validation rows, as its trainer drew them from the same table.
    cfg = TrainConfig.from_dict(vae.manifest["training"])
    splits = split(data, cfg, vae.likelihood, torch.device("cpu"))
    x_train, x_val = splits.x_train.numpy(), splits.val_served.numpy()

    def scores(x: Rows) -> dict[str, np.ndarray]:
        return vae.anomaly_scores(x, 16, seed=0, ll_samples=100, ratio=True)

    normal = scores(x_val)
    made = synthetic(x_val, x_train.mean(0), x_train.std(0).clip(1e-6), seed)
    synthetic_auroc = {}
    for kind, rows in made.items():
        anomalous = scores(rows)
        synthetic_auroc[kind] = {
            s: round(auroc(signed(s, normal[s]), signed(s, anomalous[s])), 4) for s in normal
        }
    test, a = scores(data.x_test), data.test_is_anomaly
    test_auroc = {s: round(auroc(signed(s, v[~a]), signed(s, v[a])), 4) for s, v in test.items()}
    chosen = choose(synthetic_auroc)
    log.info("%s seed %d: chose %s, test AUROC %.3f; the default %s, %.3f", name, seed, chosen,
             test_auroc[chosen], vae.decision_score, test_auroc[vae.decision_score])  # fmt: skip
    return {"seed": seed, "validation_rows": len(x_val), "default": vae.decision_score,
            "chosen": chosen, "synthetic_auroc": synthetic_auroc,
            "test_auroc": test_auroc}  # fmt: skip


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per score, the mean synthetic AUROC (over kinds and seeds) and the mean test AUROC; and
    the test AUROC of the per-artifact choice beside the default decision's."""
    scores = list(runs[0]["test_auroc"])
    return {
        "scores": {
            s: {
                "synthetic": float(
                    np.mean([k[s] for r in runs for k in r["synthetic_auroc"].values()])
                ),
                "test": float(np.mean([r["test_auroc"][s] for r in runs])),
            }
            for s in scores
        },
        "chosen_test": float(np.mean([r["test_auroc"][r["chosen"]] for r in runs])),
        "default_test": float(np.mean([r["test_auroc"][r["default"]] for r in runs])),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        prog="python -m training.benchmark_selection",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", choices=sorted(DATASETS), nargs="+",
                   default=["wine", "iris", "breast_cancer", "digits"])  # fmt: skip
    p.add_argument("--seeds", type=int, default=None,
                   help="seeds 0..N-1, one split and model each (default: as the tabular "
                   "benchmark runs each table, 6 of wine and iris, 5 of the others)")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("runs/benchmark_selection.json"))
    p.add_argument("--test-fraction", type=float, default=0.3,
                   help="share of the normal rows held out for testing")  # fmt: skip
    p.add_argument("--train-args", default="", help="more flags for python -m training")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("app").setLevel(logging.WARNING)
    result: dict[str, Any] = {
        "command": " ".join(["python -m training.benchmark_selection", *argv]),
        "machine": machine(),
        "kinds": list(KINDS),
        "datasets": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.dataset:
            seeds = args.seeds or DESIGN_SEEDS.get(name, 5)
            runs = [run_seed(name, seed, args, Path(tmp)) for seed in range(seeds)]
            result["datasets"][name] = {"runs": runs, "summary": summarise(runs)}
    write_result(args.out, result)
    for name, d in result["datasets"].items():
        s = d["summary"]
        print(f"{name}: chosen {s['chosen_test']:.3f}, default {s['default_test']:.3f}")
    print(f"raw results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
