"""What the anomaly decision costs over HTTP: /anomaly-score throughput at 16 connections, one
JSON instance, for each way of scoring, against the format-1 default in the same run.

    python -m bench.anomaly --artifact models/default/vae.pt --baseline OLD.pt [--format2 F2.pt]

The baseline is a format-1 artifact (the shipped model before format 2, from git history:
`git show b67a85e:models/default/vae.pt > old.pt`), which computes KL and the reconstruction
probability only and decides with the latter, as the service did before. `--format2` adds the
format-2 default (`git show 46d4257:models/default/vae.pt > f2.pt`: the same weights as the
shipped model, deciding with DoSE). Each row is one server and one wrk run; the ratio is its
requests per second over the baseline's.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.run import machine_info
from bench.servers import SERVICE_STACK, Server, free_port
from bench.wrk import ensure_wrk, run_wrk, write_script

CONNECTIONS = 16


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.anomaly", description=__doc__)
    p.add_argument("--artifact", type=Path, default=Path("models/default/vae.pt"))
    p.add_argument("--baseline", type=Path, required=True, help="a format-1 artifact")
    p.add_argument("--format2", type=Path, help="a format-2 artifact, deciding with DoSE")
    p.add_argument("--duration", type=int, default=10, help="seconds per row")
    p.add_argument("--out", type=Path, default=Path("build/bench-anomaly.json"))
    return p.parse_args(argv)


def rows(args: argparse.Namespace) -> list[tuple[str, Path, dict[str, Any]]]:
    format2: list[tuple[str, Path, dict[str, Any]]] = [
        ("format 2: + input complexity + DoSE, deciding with DoSE", args.format2, {})
    ]
    return [
        ("format 1: KL + reconstruction (the format-1 default)", args.baseline, {}),
        *(format2 if args.format2 else []),
        ("format 3: + latent distance, the ensemble deciding (the default)", args.artifact, {}),
        ("format 3, + likelihood_ratio", args.artifact, {"scores": ["likelihood_ratio"]}),
        ("format 3, + attribution", args.artifact, {"attribution": True}),
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wrk = ensure_wrk()
    digit = np.zeros((28, 28), dtype=np.float32)
    digit[6:22, 12:16] = 1.0  # a plain 1
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for i, (label, artifact, options) in enumerate(rows(args)):
            body = work / f"body{i}.json"
            body.write_text(json.dumps({"instances": [digit.ravel().tolist()], **options}))
            script = write_script(work / f"s{i}.lua", body, {"Content-Type": "application/json"})
            env = {"VAE_MODEL_PATH": str(artifact.resolve()), "VAE_LOG_LEVEL": "warning"}
            server = Server(
                f"anomaly{i}", "app.main:create_app", SERVICE_STACK,
                port=free_port(), ready_path="/ready", env=env, log_dir=work,
            )  # fmt: skip
            with server:
                url = server.url + "/anomaly-score"
                run_wrk(wrk, url, script, connections=CONNECTIONS, duration_s=2)  # warm-up
                result, _ = run_wrk(
                    wrk, url, script, connections=CONNECTIONS, duration_s=args.duration
                )
            if result.errors:
                raise SystemExit(f"{label}: {result.error_text()}")
            results.append({"row": label, **result.to_dict()})
    base = results[0]["rps"]
    machine = machine_info(wrk)
    print(f"/anomaly-score, 1 JSON instance, {CONNECTIONS} connections, on "
          f"{machine['cpu_model']} ({machine['nproc']} cores)")  # fmt: skip
    print("| scoring | req/s | ratio to the old default | p50 ms | p99 ms |")
    print("| --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['row']} | {r['rps']:.0f} | {r['rps'] / base:.2f} | "
              f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} |")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "rows": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
