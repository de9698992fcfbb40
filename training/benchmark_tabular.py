"""Tabular benchmark: vae-service against PyOD's detectors, on real data that ships with
scikit-learn, on the same splits in the same run.

For each seed, the data set is written to CSV and a VAE is trained on it through the real CLI
(`python -m training --data FILE --label-column ... --normal-value ...`), which holds out a
seeded share of the normal rows and every anomalous row for testing. The artifact is then
loaded and scored by the service's own code (app/model.py). On the very same split (the same
reader, training/tables.py, with the same seed), PyOD's IForest, OCSVM, LOF, KNN, ECOD,
AutoEncoder and VAE are fitted with their documented defaults on the normal training rows,
standardised as PyOD's own benchmark does. AUROC and average precision are reported per
detector and per vae-service score as mean ± sd over the seeds.

Data sets:
- `breast_cancer`: Wisconsin diagnostic breast cancer, 569 rows, 30 features; benign is
  normal, malignant (212 rows) the anomaly.
- `digits`: scikit-learn's 8x8 digits, 1,797 rows, 64 pixel features in 0..16; one digit is
  the anomaly class and the other nine are normal, each seed holding out the next digit.
  It adds a small image case with a natural anomaly class and three times the rows of
  breast_cancer.
- `wine` and `iris` (`--dataset wine iris`, the design tables): scikit-learn's wine data, 178
  rows of 13 chemical measurements, and Fisher's iris, 150 rows of 4 measurements; one class
  (a cultivar, a species) is the anomaly and the other two are normal, each seed holding out
  the next of the three. The default decision for tables is chosen on them, and reported on
  the two above. Iris, with 4 columns and 70 training rows, is also the smallest table a
  decision has to hold on.

    python -m training.benchmark_tabular --out docs/benchmark/tabular.json
    python -m training.benchmark_tabular --dataset wine iris --seeds 6 \
        --out docs/benchmark/tabular-design.json
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import logging
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from app.model import VAEService
from training.__main__ import main as train_main
from training.benchmark_anomaly import flagged
from training.benchmark_latent import machine, write_result
from training.evaluate import signed
from training.tables import TableOptions, load_table

log = logging.getLogger("training")

LABEL = "label"
DETECTORS = ("IForest", "OCSVM", "LOF", "KNN", "ECOD", "AutoEncoder", "VAE")


@dataclass(frozen=True)
class Table:
    names: list[str]
    x: npt.NDArray[np.float64]
    labels: list[str]
    normal: str  # the normal label; every other label is an anomaly


def breast_cancer(seed: int) -> Table:
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    labels = [str(d.target_names[t]) for t in d.target]
    return Table([str(n) for n in d.feature_names], d.data, labels, "benign")


def digits(seed: int) -> Table:
    from sklearn.datasets import load_digits

    d = load_digits()
    anomaly = seed % 10
    labels = ["anomaly" if t == anomaly else "normal" for t in d.target]
    # Pixels at the border are blank in nearly every image: the trainer refuses a column that
    # is constant over its training rows, so keep the pixels set in at least 1% of the normal
    # images (any training split then holds some).
    normal = d.target != anomaly
    keep = (d.data[normal] > 0).mean(axis=0) >= 0.01
    names = [f"pixel_{i // 8}_{i % 8}" for i in range(64) if keep[i]]
    return Table(names, d.data[:, keep], labels, "normal")


def wine(seed: int) -> Table:
    from sklearn.datasets import load_wine

    d = load_wine()
    anomaly = seed % 3
    labels = ["anomaly" if t == anomaly else "normal" for t in d.target]
    return Table([str(n) for n in d.feature_names], d.data, labels, "normal")


def iris(seed: int) -> Table:
    from sklearn.datasets import load_iris

    d = load_iris()
    anomaly = seed % 3
    labels = ["anomaly" if t == anomaly else "normal" for t in d.target]
    return Table([str(n) for n in d.feature_names], d.data, labels, "normal")


DATASETS: dict[str, Callable[[int], Table]] = {
    "breast_cancer": breast_cancer,
    "digits": digits,
    "wine": wine,
    "iris": iris,
}
# What the default run reports on. Wine and iris are the design tables: the table models'
# default decision is chosen on them, never on these two (docs/benchmarks/tables.md).
REPORTED = ("breast_cancer", "digits")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m training.benchmark_tabular",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", choices=sorted(DATASETS), nargs="+",
                   default=list(REPORTED))  # fmt: skip
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1, one split and model each")
    p.add_argument("--out", type=Path, default=Path("runs/benchmark_tabular.json"))
    p.add_argument("--detectors", nargs="*", default=list(DETECTORS), choices=DETECTORS)
    p.add_argument("--test-fraction", type=float, default=0.3,
                   help="share of the normal rows held out for testing")  # fmt: skip
    p.add_argument(
        "--train-args",
        default="",
        help="more flags for python -m training, as one string (default: none, the CLI's own)",
    )
    return p.parse_args(argv)


def write_csv(path: Path, table: Table) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*table.names, LABEL])
        for row, label in zip(table.x.tolist(), table.labels, strict=True):
            writer.writerow([*row, label])
    return path


def ranking_metrics(is_anomaly: npt.NDArray[np.bool_], higher: np.ndarray) -> dict[str, float]:
    """AUROC and average precision, higher scores flagging anomalies."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    return {
        "auroc": float(roc_auc_score(is_anomaly, higher)),
        "average_precision": float(average_precision_score(is_anomaly, higher)),
    }


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """PyOD's neural detectors print progress bars and warn about their defaults."""
    with (
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        yield


def pyod_detector(name: str, seed: int) -> Any:
    """PyOD's detector with its documented defaults (a seed where it takes one, and no
    progress output)."""
    from pyod.models.auto_encoder import AutoEncoder
    from pyod.models.ecod import ECOD
    from pyod.models.iforest import IForest
    from pyod.models.knn import KNN
    from pyod.models.lof import LOF
    from pyod.models.ocsvm import OCSVM
    from pyod.models.vae import VAE

    makers: dict[str, Callable[[], Any]] = {
        "IForest": lambda: IForest(random_state=seed),
        "OCSVM": OCSVM,
        "LOF": LOF,
        "KNN": KNN,
        "ECOD": ECOD,
        "AutoEncoder": lambda: AutoEncoder(random_state=seed, verbose=0),
        "VAE": lambda: VAE(random_state=seed, verbose=0),
    }
    return makers[name]()


def run_pyod(
    names: list[str], x_train: np.ndarray, x_test: np.ndarray, is_anomaly: np.ndarray, seed: int
) -> dict[str, dict[str, float]]:
    from pyod.utils.utility import standardizer

    train, test = standardizer(x_train, x_test)  # z-scores from the training rows
    out = {}
    for name in names:
        t0 = time.perf_counter()
        detector = pyod_detector(name, seed)
        with quiet():
            detector.fit(train)
            scores = detector.decision_function(test)
        out[name] = ranking_metrics(is_anomaly, scores) | {
            "seconds": round(time.perf_counter() - t0, 2)
        }
    return out


def train_artifact(
    csv_path: Path, table: Table, seed: int, args: argparse.Namespace, work: Path
) -> tuple[Path, float]:
    """Train on the table through the real CLI; the artifact's path and the seconds it took."""
    artifact = work / f"vae-{seed}.pt"
    argv = ["--data", str(csv_path), "--label-column", LABEL, "--normal-value", table.normal,
            "--test-fraction", str(args.test_fraction), "--seed", str(seed), "--out",
            str(artifact), "--no-progress", *args.train_args.split()]  # fmt: skip
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        if train_main(argv) != 0:
            raise SystemExit(f"training failed: python -m training {' '.join(argv)}")
    return artifact, time.perf_counter() - t0


def run_vae(
    csv_path: Path, table: Table, seed: int, args: argparse.Namespace, work: Path
) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    artifact, seconds = train_artifact(csv_path, table, seed, args, work)
    data = load_table(csv_path, None, options(table, seed, args))
    assert data.test_is_anomaly is not None
    vae = VAEService.load(artifact, device="cpu")
    scores = vae.anomaly_scores(data.x_test, 16, seed=0, ll_samples=100, ratio=True)
    out = {}
    for name, values in scores.items():
        out[name] = ranking_metrics(data.test_is_anomaly, signed(name, values))
    # The false alarms: the share of the held-out normal rows the default decision flags.
    decision, cal = vae.decision_score, vae.calibration
    alarms = flagged(cal, decision, {n: v[~data.test_is_anomaly] for n, v in scores.items()})
    info = {"train_seconds": round(seconds, 1), "decision_score": decision,
            "format_version": vae.format_version,
            "artifact_train_size": vae.manifest["dataset"]["train_size"],
            "calibration_rows": cal.n, "false_alarms": round(alarms, 4)}  # fmt: skip
    return out, info


def options(table: Table, seed: int, args: argparse.Namespace) -> TableOptions:
    """The reader's options, as the CLI builds them from the same flags: the same split."""
    return TableOptions(
        label_column=LABEL, normal_value=table.normal, test_fraction=args.test_fraction, seed=seed
    )


def run_dataset(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    runs = []
    for seed in range(args.seeds):
        table = DATASETS[name](seed)
        csv_path = write_csv(work / f"{name}-{seed}.csv", table)
        data = load_table(csv_path, None, options(table, seed, args))
        assert data.test_is_anomaly is not None
        vae, info = run_vae(csv_path, table, seed, args, work)
        pyod = run_pyod(args.detectors, data.x_train, data.x_test, data.test_is_anomaly, seed)
        runs.append({
            "seed": seed, "train_rows": len(data.x_train), "test_rows": len(data.x_test),
            "test_anomalies": int(data.test_is_anomaly.sum()), "vae_service": vae,
            "pyod": pyod, **info,
        })  # fmt: skip
        best = max(vae, key=lambda s: vae[s]["auroc"])
        pyod_best = max((p["auroc"] for p in pyod.values()), default=np.nan)
        log.info("%s seed %d: vae-service best %s %.3f; PyOD best %.3f", name, seed, best,
                 vae[best]["auroc"], pyod_best)  # fmt: skip
    return {"runs": runs, "summary": summarise(runs)}


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per method ("vae-service: dose", "PyOD: KNN"), each metric's mean and sd over seeds."""
    rows: dict[str, list[dict[str, float]]] = {}
    for run in runs:
        for score, m in run["vae_service"].items():
            rows.setdefault(f"vae-service: {score}", []).append(m)
        for detector, m in run["pyod"].items():
            rows.setdefault(f"PyOD: {detector}", []).append(m)
    return {
        method: {
            metric: {
                "mean": float(np.mean([r[metric] for r in results])),
                "sd": float(np.std([r[metric] for r in results], ddof=1))
                if len(results) > 1
                else 0.0,
            }
            for metric in ("auroc", "average_precision")
        }
        for method, results in rows.items()
    }


def markdown(name: str, summary: dict[str, dict[str, dict[str, float]]], seeds: int) -> str:
    lines = [f"**{name}** ({seeds} seeds; mean ± sd)", "",
             "| method | AUROC | average precision |", "| --- | --- | --- |"]  # fmt: skip
    ranked = sorted(summary.items(), key=lambda kv: -kv[1]["auroc"]["mean"])
    for method, m in ranked:
        a, p = m["auroc"], m["average_precision"]
        lines.append(
            f"| {method} | {a['mean']:.3f} ± {a['sd']:.3f} | {p['mean']:.3f} ± {p['sd']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("app").setLevel(logging.WARNING)
    results: dict[str, Any] = {
        "command": "python -m training.benchmark_tabular " + " ".join(argv or sys.argv[1:]),
        "machine": machine(),
        "test_fraction": args.test_fraction,
        "train_args": args.train_args,
        "datasets": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.dataset:
            results["datasets"][name] = run_dataset(name, args, Path(tmp))
            print(markdown(name, results["datasets"][name]["summary"], args.seeds) + "\n")
    write_result(args.out, results)
    print(f"raw results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
