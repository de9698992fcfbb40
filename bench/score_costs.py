"""What each anomaly score costs, artifact against artifact, in one process.

    python -m bench.score_costs models/default/vae.pt runs/default-format6.pt \\
        runs/default-format9.pt --data-dir ../shared/datasets/mnist \\
        --out docs/benchmark/score-costs.json

Each artifact is loaded by the service's own code (app/model.py) and scores the same grey test
digits in batches of 64, in-process: the default scores, then each costly option added (the
likelihood ratio, the log-likelihood, the attribution). Separate runs on a shared 2-core
machine put the same artifact a third apart, more than the formats differ by, so here the
artifacts take turns: each round times one pass of every artifact at each option, and each
figure is the best of the rounds (as timeit reports), beside its ratio to the first artifact's,
the baseline measured in the same rounds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from app.model import VAEService
from training.benchmark_latent import machine, write_result
from training.data import default_data_dir, load_data

BATCH = 64


def options(ll_samples: int) -> dict[str, dict[str, Any]]:
    """Each row of the table: its label and the keywords it adds to the default scores."""
    return {
        "default scores": {},
        "+ likelihood_ratio": {"ratio": True},
        f"+ log_likelihood (K={ll_samples})": {"ll_samples": ll_samples},
        "+ attribution": {"attribution": True},
    }


def one_pass(vae: VAEService, x: np.ndarray, samples: int, kw: dict[str, Any]) -> float:
    """Seconds to score x in batches of BATCH."""
    t0 = time.perf_counter()
    for start in range(0, len(x), BATCH):
        vae.anomaly_scores(x[start : start + BATCH], samples, 0, **kw)
    return time.perf_counter() - t0


def measure(
    vaes: dict[str, VAEService], x: np.ndarray, samples: int, ll_samples: int, rounds: int
) -> dict[str, dict[str, float]]:
    """Microseconds per instance: {option: {artifact: best of the rounds}}."""
    rows = options(ll_samples)
    for vae in vaes.values():  # TorchScript profiles each new shape on its first calls
        for kw in rows.values():
            for size in (BATCH, len(x) % BATCH or BATCH):
                vae.anomaly_scores(x[:size], samples, 0, **kw)
    seconds: dict[str, dict[str, list[float]]] = {o: {a: [] for a in vaes} for o in rows}
    for _ in range(rounds):
        for option, kw in rows.items():
            for name, vae in vaes.items():
                seconds[option][name].append(one_pass(vae, x, samples, kw))
    return {
        option: {name: round(min(t) / len(x) * 1e6, 1) for name, t in per.items()}
        for option, per in seconds.items()
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m bench.score_costs", description=__doc__)
    p.add_argument("artifacts", type=Path, nargs="+", help="the first is the baseline")
    p.add_argument("--data-dir", type=Path, default=default_data_dir())
    p.add_argument("--images", type=int, default=1000, help="grey test digits per pass")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--samples", type=int, default=16, help="L, as the service's default")
    p.add_argument("--ll-samples", type=int, default=100, help="K, as the service's default")
    p.add_argument("--out", type=Path, default=Path("build/score-costs.json"))
    args = p.parse_args(argv)
    x = np.asarray(load_data(args.data_dir).x_test[: args.images], np.float32)
    vaes: dict[str, VAEService] = {}
    for path in args.artifacts:
        vae = VAEService.load(path, device="cpu")
        vaes[f"format {vae.format_version}"] = vae
    if len(vaes) != len(args.artifacts):
        raise SystemExit("give one artifact of each format: the table names them by format")
    micro = measure(vaes, x, args.samples, args.ll_samples, args.rounds)
    baseline = next(iter(vaes))
    result = {
        "command": " ".join(["python -m bench.score_costs", *argv]),
        "machine": machine(),
        "artifacts": {name: str(path) for name, path in zip(vaes, args.artifacts, strict=True)},
        "images": len(x),
        "rounds": args.rounds,
        "microseconds_per_instance": micro,
        "ratio_to_baseline": {
            option: {name: round(v / per[baseline], 3) for name, v in per.items()}
            for option, per in micro.items()
        },
    }
    write_result(args.out, result)
    print(json.dumps(result["microseconds_per_instance"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
