"""The latent as features: is the VAE's posterior mean a useful representation of a digit?

A linear probe answers it. The shipped artifact encodes each image to its latent mean (32
values, the mean of q(z|x)), and a multinomial logistic regression learns the digit from them,
with few labels or many; the same classifier on the 784 raw pixels is the baseline. The VAE saw
the training images without their labels, so the question is what its unsupervised training
gives a classifier that only has N labelled images. Test accuracy is on MNIST's test set,
which the VAE never saw.

The N labelled images are the first N of a seeded permutation of the training images (not
stratified: with N=100 a digit can be missing, about 3 times in 10,000; each run records how
many digits it saw). Sizes below the whole set repeat over --seeds permutations and report the
mean and the sample standard deviation. The latent means are standardised (their units differ:
the active units spread about 1, the collapsed ones about 0.01); the pixels, all in [0, 1],
are used as they are, as a linear baseline on MNIST usually is. Both use the L2 penalty at
C=1 and lbfgs, with no tuning, and each run records whether lbfgs converged.

The images go to the encoder in grey levels, as a client sends them to /encode.

    python -m training.benchmark_latent --data-dir ../shared/datasets/mnist
    python -m training.benchmark_latent --sizes 100 300 --seeds 1 --test-images 1000
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import sklearn
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from app.model import VAEService
from training.data import default_data_dir, load_data

log = logging.getLogger("training")

FEATURES = ("latent_mean", "raw_pixels")
MAX_ITER = 2000  # lbfgs needs about 210 iterations on the raw pixels of all 22,699 images
ENCODE_BATCH = 1000


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m training.benchmark_latent",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data-dir", type=Path, default=default_data_dir())
    p.add_argument("--artifact", type=Path, default=Path("models/default/vae.pt"))
    p.add_argument("--out", type=Path, default=Path("docs/benchmark/latent_features.json"))
    p.add_argument(
        "--sizes",
        nargs="+",
        default=["100", "1000", "all"],
        help="labelled training images per fit: numbers, or 'all'",
    )
    p.add_argument("--seeds", type=int, default=5, help="subsets per size below 'all'")
    p.add_argument("--test-images", type=int, help="score only the first N test images")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def resolve_sizes(sizes: list[str], available: int) -> list[int]:
    """The sizes as numbers of images, 'all' as `available`; a size over that is an error."""
    out = []
    for s in sizes:
        n = available if s == "all" else int(s)
        if not 0 < n <= available:
            raise ValueError(f"size {s}: there are {available} labelled training images.")
        out.append(n)
    return out


def subset(n: int, available: int, seed: int) -> npt.NDArray[np.int64]:
    """The first n of a seeded permutation of range(available); all of it, in order, at n ==
    available."""
    if n == available:
        return np.arange(available, dtype=np.int64)
    return np.random.default_rng(seed).permutation(available)[:n].astype(np.int64)


def encode_means(vae: VAEService, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """The posterior means (N, Z), through the service's own encode (under torch.no_grad)."""
    parts = [vae.encode(x[i : i + ENCODE_BATCH]).mean for i in range(0, len(x), ENCODE_BATCH)]
    return np.concatenate(parts)


def classifier(features: str) -> Pipeline | LogisticRegression:
    clf = LogisticRegression(C=1.0, max_iter=MAX_ITER)
    return make_pipeline(StandardScaler(), clf) if features == "latent_mean" else clf


def fit_and_score(
    features: str,
    x_train: npt.NDArray[np.float32],
    y_train: npt.NDArray[np.int64],
    x_test: npt.NDArray[np.float32],
    y_test: npt.NDArray[np.int64],
) -> dict[str, Any]:
    model = classifier(features)
    t0 = time.perf_counter()
    model.fit(x_train, y_train)
    seconds = time.perf_counter() - t0
    clf = model[-1] if isinstance(model, Pipeline) else model
    iterations = int(np.max(clf.n_iter_))
    return {
        "accuracy": float(model.score(x_test, y_test)),
        "fit_seconds": round(seconds, 3),
        "iterations": iterations,
        "converged": iterations < MAX_ITER,
    }


def write_result(path: Path, result: dict[str, Any]) -> None:
    """A benchmark's raw result as the docs read it: indented JSON, its folder made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")


def machine() -> dict[str, Any]:
    """The hardware and the versions the figures depend on."""
    cpu = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next(
            (
                line.split(":", 1)[1].strip()
                for line in cpuinfo.read_text().splitlines()
                if line.startswith("model name")
            ),
            cpu,
        )
    return {
        "cpu_model": cpu,
        "machine": platform.machine(),
        "nproc": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "scikit-learn": sklearn.__version__,
        "numpy": metadata.version("numpy"),
    }


def summarise(runs: list[dict[str, Any]], sizes: list[int]) -> list[dict[str, Any]]:
    """Per size and feature set: the mean accuracy, its sample sd over seeds, the mean fit time."""
    rows = []
    for n in sizes:
        row: dict[str, Any] = {"train_images": n}
        for features in FEATURES:
            mine = [r for r in runs if r["train_images"] == n and r["features"] == features]
            acc = [r["accuracy"] for r in mine]
            row[features] = {
                "accuracy_mean": float(np.mean(acc)),
                "accuracy_sd": float(np.std(acc, ddof=1)) if len(acc) > 1 else None,
                "fit_seconds_mean": round(float(np.mean([r["fit_seconds"] for r in mine])), 3),
                "seeds": len(mine),
            }
        rows.append(row)
    return rows


def markdown_table(rows: list[dict[str, Any]], latent_dim: int, input_dim: int) -> str:
    def accuracy(cell: dict[str, Any]) -> str:
        sd = cell["accuracy_sd"]
        return f"{cell['accuracy_mean']:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")

    lines = [
        f"| labelled training images | seeds | latent means ({latent_dim}) "
        f"| raw pixels ({input_dim}) | fit seconds, latent / pixels |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        z, px = row["latent_mean"], row["raw_pixels"]
        lines.append(
            f"| {row['train_images']:,} | {z['seeds']} | {accuracy(z)} | {accuracy(px)} "
            f"| {z['fit_seconds_mean']:.2f} / {px['fit_seconds_mean']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    data = load_data(args.data_dir)
    if data.y_train is None or data.y_test is None:
        print(f"error: {args.data_dir}: the benchmark needs label files.", file=sys.stderr)
        return 2
    try:
        sizes = resolve_sizes(args.sizes, len(data.x_train))
    except ValueError as e:
        print(f"error: --sizes: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    vae = VAEService.load(args.artifact, device=args.device)
    x_test, y_test = data.x_test[: args.test_images], data.y_test[: args.test_images]
    inputs = {
        "latent_mean": (encode_means(vae, data.x_train), encode_means(vae, x_test)),
        "raw_pixels": (data.x_train, x_test),
    }
    runs: list[dict[str, Any]] = []
    for n in sizes:
        for seed in range(1 if n == len(data.x_train) else args.seeds):
            idx = subset(n, len(data.x_train), seed)
            y = data.y_train[idx]
            for features, (train, test) in inputs.items():
                run = fit_and_score(features, train[idx], y, test, y_test)
                runs.append(
                    {"train_images": n, "seed": seed, "features": features,
                     "classes_present": len(np.unique(y)), **run}
                )  # fmt: skip
                log.info("%d images, seed %d, %s: accuracy %.4f, fit %.2f s, %d iterations",
                         n, seed, features, run["accuracy"], run["fit_seconds"],
                         run["iterations"])  # fmt: skip
    rows = summarise(runs, sizes)
    hardware = machine()
    print(
        f"Linear probe (logistic regression) on {len(x_test):,} MNIST test images, on "
        f"{hardware['cpu_model']} ({hardware['nproc']} cores), the encoder on {vae.device}"
    )
    print(markdown_table(rows, vae.latent_dim, vae.input_dim))
    result = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "artifact_sha256": vae.sha256,
        "latent_dim": vae.latent_dim,
        "test_images": len(x_test),
        "machine": hardware,
        "rows": rows,
        "runs": runs,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
