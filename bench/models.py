"""`python -m bench.models`: many models in one server, what one costs and what loading one does
to the others.

Two measurements on one real `python -m app` process serving a model repository (explicit
control, so nothing but model `a` loads at start), every model a copy of the shipped MNIST
artifact (`models/default/vae.pt`), the size a user's image model has:

- **Latency of model A while model B loads.** wrk at 16 connections on `POST /models/a/encode`
  (one MNIST image, JSON) for `--duration` seconds with nothing else happening; then while a
  client loads and unloads model B back to back (`/admin/models/b/load`: read, check, warm-up),
  the worst case; then for as long as one load takes under that traffic, while B loads once.
  The verdict is the p99 while B loads once over the p99 alone, both measured in this run: at
  most 2 (the issue's bound); the back-to-back ratio is reported beside it.
- **Memory per model.** The server's RSS after loading `--copies` more copies one by one (each
  its own name, each a full model in memory): the slope of RSS against models held, by least
  squares, beside the artifact's size on disk.

Writes one JSON file (`--out`) with the machine; docs/benchmarks/models.md shows it
(scripts/docs_figures.py). Exit status 1 when the p99 ratio is over 2 or a request failed.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.run import loadavg, machine_info
from bench.servers import REPO, SERVICE_STACK, Server, free_port
from bench.wrk import ensure_wrk, run_wrk, write_script

ADMIN_KEY = "bench-admin-key"  # VAE_ADMIN_KEYS of the server below; it never leaves this machine
AS_ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
ARTIFACT = REPO / "models" / "default" / "vae.pt"
P99_BOUND = 2.0
CONNECTIONS = 16


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.models", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "docs" / "benchmark" / "models.json")
    p.add_argument("--duration", type=int, default=15, help="seconds of each wrk run")
    p.add_argument("--copies", type=int, default=8, help="models loaded for the memory slope")
    p.add_argument("--artifact", type=Path, default=ARTIFACT)
    return p.parse_args(argv)


def build_repository(root: Path, artifact: Path, copies: int) -> list[str]:
    names = ["a", "b", *(f"m{i}" for i in range(copies))]
    for name in names:
        (root / name / "1").mkdir(parents=True)
        shutil.copy(artifact, root / name / "1" / "vae.pt")
    return names


def churn(url: str, stop: threading.Event, loads: list[float], failures: list[str]) -> None:
    """Load and unload model B until told to stop; each load's seconds."""
    with httpx.Client(base_url=url, headers=AS_ADMIN, timeout=120) as http:
        while not stop.is_set():
            start = time.monotonic()
            r = http.post("/admin/models/b/load")
            if r.status_code != 200:
                failures.append(f"load b: {r.status_code} {r.text}")
                return
            loads.append(time.monotonic() - start)
            r = http.post("/admin/models/b/unload")
            if r.status_code != 200:
                failures.append(f"unload b: {r.status_code} {r.text}")
                return


def load_once(url: str, failures: list[str]) -> None:
    with httpx.Client(base_url=url, headers=AS_ADMIN, timeout=120) as http:
        for action in ("load", "unload"):
            r = http.post(f"/admin/models/b/{action}")
            if r.status_code != 200:
                failures.append(f"{action} b: {r.status_code} {r.text}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wrk = ensure_wrk()
    machine = machine_info(wrk)
    machine["loadavg_start"] = loadavg()
    out_path: Path = args.out
    with tempfile.TemporaryDirectory(prefix="vae-models-") as tmp:
        work = Path(tmp)
        root = work / "repository"
        names = build_repository(root, args.artifact, args.copies)
        x = np.zeros((1, 784), np.float32)
        x[0, 300:480] = 1.0
        body = work / "encode.json"
        body.write_text(json.dumps({"instances": x.tolist()}))
        script = write_script(work / "encode.lua", body, {"Content-Type": "application/json"})
        port = free_port()
        env = {
            "VAE_MODEL_REPOSITORY": str(root),
            "VAE_MODEL_CONTROL": "explicit",
            "VAE_DEFAULT_MODEL": "a",
            "VAE_MAX_MODELS": str(len(names) + 1),
            "VAE_ADMIN_KEYS": ADMIN_KEY,
            "VAE_DEVICE": "cpu",
            "VAE_LOG_LEVEL": "warning",
            "VAE_LOG_FORMAT": "text",
            "VAE_HOST": "127.0.0.1",
            "VAE_PORT": str(port),
        }
        server = Server("models", "", SERVICE_STACK, port=port, ready_path="/ready", env=env,
                        log_dir=work, cmd=[sys.executable, "-m", "app"])  # fmt: skip
        with server:
            url = f"{server.url}/models/a/encode"
            print(f"warm-up: {args.duration} s of wrk on /models/a/encode", flush=True)
            run_wrk(wrk, url, script, connections=CONNECTIONS, duration_s=args.duration)
            print("model A alone", flush=True)
            alone, _ = run_wrk(wrk, url, script, connections=CONNECTIONS, duration_s=args.duration)
            print("model A while model B loads and unloads", flush=True)
            stop = threading.Event()
            loads: list[float] = []
            failures: list[str] = []
            loader = threading.Thread(target=churn, args=(server.url, stop, loads, failures))
            loader.start()
            try:
                loading, _ = run_wrk(
                    wrk, url, script, connections=CONNECTIONS, duration_s=args.duration
                )
            finally:
                stop.set()
                loader.join()
            # One load, the window as long as a load takes under this traffic.
            window = max(2, math.ceil(float(np.median(loads)))) if loads else args.duration
            print(f"model A while model B loads once ({window} s)", flush=True)
            one_failures: list[str] = []
            single = threading.Thread(
                target=load_once, args=(server.url, one_failures), daemon=True
            )
            timer = threading.Timer(0.2, single.start)
            timer.start()
            once, _ = run_wrk(wrk, url, script, connections=CONNECTIONS, duration_s=window)
            single.join()
            failures += one_failures
            memory = measure_memory(server, names[2:])
    ratio = once.p99_ms / alone.p99_ms
    churn_ratio = loading.p99_ms / alone.p99_ms
    errors = alone.errors + loading.errors + once.errors + len(failures)
    machine["loadavg_end"] = loadavg()
    result: dict[str, Any] = {
        "command": " ".join(
            ["python -m bench.models", *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": machine,
        "artifact": {
            "path": str(args.artifact.resolve().relative_to(REPO)),
            "bytes": args.artifact.stat().st_size,
        },
        "connections": CONNECTIONS,
        "duration_s": args.duration,
        "alone": alone.to_dict(),
        "while_one_load": once.to_dict(),
        "while_loading": loading.to_dict(),
        "loads": {"count": len(loads), "median_s": float(np.median(loads)) if loads else None},
        "p99_ratio": ratio,
        "p99_ratio_churn": churn_ratio,
        "p99_bound": P99_BOUND,
        "memory": memory,
        "failures": failures,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"p99 of A: {alone.p99_ms:.2f} ms alone, {once.p99_ms:.2f} ms while B loaded once: "
        f"{ratio:.2f}x (bound {P99_BOUND}x); {loading.p99_ms:.2f} ms while B loaded "
        f"{len(loads)} times back to back (median load {result['loads']['median_s'] or 0:.2f} "
        f"s): {churn_ratio:.2f}x; req/s {alone.rps:.0f} -> {once.rps:.0f} -> {loading.rps:.0f}\n"
        f"memory: {memory['per_model_mb']:.1f} MB per model (artifact "
        f"{args.artifact.stat().st_size / 1e6:.1f} MB on disk); wrote {out_path}",
        flush=True,
    )
    ok = ratio <= P99_BOUND and errors == 0
    print("PASS" if ok else f"FAIL ({errors} errors: {failures})", flush=True)
    return 0 if ok else 1


def measure_memory(server: Server, names: list[str]) -> dict[str, Any]:
    """RSS with 1 model held, then after each further load: the slope is one model's cost."""
    held, rss = [1], [server.rss_bytes()]
    with httpx.Client(base_url=server.url, headers=AS_ADMIN, timeout=120) as http:
        for name in names:
            r = http.post(f"/admin/models/{name}/load")
            r.raise_for_status()
            time.sleep(0.5)
            held.append(held[-1] + 1)
            rss.append(server.rss_bytes())
    slope, _ = np.polyfit(held, rss, 1)
    return {
        "models_held": held,
        "rss_bytes": rss,
        "per_model_mb": float(slope) / 1e6,
    }


if __name__ == "__main__":
    raise SystemExit(main())
