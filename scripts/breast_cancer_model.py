"""Rebuild the table model that ships in models/breast-cancer/, from data inside scikit-learn.

    .venv/bin/python scripts/breast_cancer_model.py

Writes scikit-learn's Wisconsin breast-cancer table (569 rows, 30 named features, a `label`
column of `benign` or `malignant`) to data/breast_cancer.csv, the way the tabular benchmark
writes it, then trains on it through the real CLI with its default flags (the seed alone is
given), as the tabular benchmark does, so the shipped table model is one of the configurations
docs/benchmarks/tables.md measures. Benign rows are normal; the trainer holds out a seeded 20%
of them, and every malignant row, as the test set. Last, models/breast-cancer/manifest.json is
written beside the artifact, as for models/default/. Needs the `dev` extra (scikit-learn);
about half a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a file, `app` and `training` are not on the path otherwise

from scripts.model_summary import main as write_summary  # noqa: E402
from training.__main__ import main as train  # noqa: E402
from training.benchmark_tabular import LABEL, breast_cancer, write_csv  # noqa: E402

# The trainer's defaults: the 286 benign rows left after the test split keep 86 (30%) to
# calibrate on, which resolve a tail of 1.1%, and 200 to learn from.
TRAIN_FLAGS = ("--seed", "0")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=REPO / "data" / "breast_cancer.csv")
    parser.add_argument("--out", type=Path, default=REPO / "models" / "breast-cancer" / "vae.pt")
    args = parser.parse_args(argv)
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    write_csv(args.csv, breast_cancer(seed=0))
    with tempfile.TemporaryDirectory() as checkpoints:  # nothing beside the artifact but it
        status = train(
            ["--data", str(args.csv), "--label-column", LABEL, "--normal-value", "benign",
             *TRAIN_FLAGS, "--checkpoint-dir", checkpoints, "--no-progress",
             "--out", str(args.out)]
        )  # fmt: skip
    if status == 0:
        write_summary(args.out)
    return status


if __name__ == "__main__":
    sys.exit(main())
