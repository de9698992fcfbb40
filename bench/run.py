"""`python -m bench`: the ceiling, the naive baseline, in-process compute and the service.

Order of a run, so no two of our own measurements share the CPU: build (or take) the artifact,
time `encode` in-process, then one server at a time (ceiling, naive, service), each scenario
with a warm-up wrk run first, then the memory run against a fresh service process. Every
server is stopped in a `finally` (the `with` blocks), whatever fails.

On a shared 2-core machine the numbers move with other people's work: each scenario records
how many cores the server, wrk and everything else used while it ran ("other" should be near
0 for a clean number), and the load average is recorded at the start and the end.
"""

from __future__ import annotations

import argparse
import atexit
import io
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from bench import report
from bench.artifact import Bodies, build_artifact, load_module, make_bodies
from bench.compute import encode_throughput
from bench.servers import REPO, Server, Stack, free_port, machine_busy_seconds
from bench.wrk import WrkResult, ensure_wrk, run_wrk, write_script, wrk_version

SINGLE_LEVELS = (1, 16, 64)  # concurrency for single-instance /encode: idle, busy, overloaded
HEADLINE_LEVEL = 16  # the level the ratios compare at
BATCH = 256
ANOMALY_SAMPLES = 16
# One wrk thread for every run: one thread drives far more req/s than a Python server does on
# these cores (the ceiling tops out well below wrk's per-thread rate), and a second thread
# would only take CPU from the server on a 2-core machine.
WRK_THREADS = 1
# Other processes' CPU (in cores) during a measurement above which the report warns.
OTHER_CORES_WARN = 0.25
# One at a time, in this order.
SERVERS = ("bare", "ceiling", "naive", "litserve", "litserve-batch", "service", "service-2w",
           "baseline")  # fmt: skip
# The service answers these when it cannot take a body format: report "unsupported".
UNSUPPORTED = (415, 422)
NPY = "application/x-npy"
# LitServe's dynamic batching as its docs set it up: a batch of up to 16, waiting at most 1 ms.
LITSERVE_BATCHING = ["--max-batch-size", "16", "--batch-timeout", "0.001"]


@dataclass(frozen=True)
class Scenario:
    key: str  # stable name in the JSON, e.g. "service.encode.x1@16"
    label: str  # the table's first column
    server: str  # "ceiling", "naive" or "service"
    path: str
    body: str  # a field of Bodies
    instances: int  # images per request
    concurrency: int
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})
    optional: bool = False  # a format the service may not support yet


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the VAE service against a do-nothing ceiling, a naive FastAPI "
        "baseline and in-process TorchScript, on this machine, in one run.",
    )
    p.add_argument(
        "--artifact",
        type=Path,
        help="serve this artifact instead of building an "
        "untrained MNIST-sized one (784-512-256-32)",
    )
    p.add_argument("--duration", type=int, default=10, help="seconds per scenario (default 10)")
    p.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="seconds of discarded load before each scenario (default 2)",
    )
    # The service's default loop (VAE_LOOP), for every server: the same stack throughout.
    p.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="asyncio")
    p.add_argument("--http", choices=("auto", "h11", "httptools"), default="auto")
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (default 1)")
    p.add_argument(
        "--batch-concurrency",
        type=int,
        default=1,
        help="connections for the 256-image scenarios (default 1: one stream, "
        "comparable with the one in-process caller)",
    )
    p.add_argument(
        "--memory-requests",
        type=int,
        default=100_000,
        help="single-instance /encode requests between the two RSS samples (default 100000)",
    )
    p.add_argument("--skip-memory", action="store_true", help="skip the memory run")
    p.add_argument(
        "--service-env",
        action="append",
        default=[],
        metavar="VAE_NAME=VALUE",
        help="a service setting to measure with (repeatable), e.g. VAE_MAX_BATCH_SIZE=32",
    )
    p.add_argument(
        "--servers",
        nargs="+",
        choices=SERVERS,
        default=list(SERVERS),
        help="measure only these servers (the ratios that need the others print n/a)",
    )
    p.add_argument(
        "--baseline",
        metavar="GIT_REF",
        help="also measure the service as it was at this commit (a git worktree), for the "
        "ratios against it",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: --duration 3, --skip-memory, ceiling and naive at 16 connections only",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("build/bench.json"),
        help="the JSON report (default build/bench.json)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.duration = 3
        args.skip_memory = True
    for name in ("duration", "workers", "batch_concurrency", "memory_requests"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        p.error("--warmup must be 0 or more")
    for item in args.service_env:
        if not item.startswith("VAE_") or "=" not in item:
            p.error(f"--service-env takes VAE_NAME=VALUE, not {item!r}")
    return args


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    # The ratios need the ceiling and naive at 16 connections; the full run adds 1 and 64 so
    # the tails compare too.
    peer_levels = (HEADLINE_LEVEL,) if args.quick else SINGLE_LEVELS
    out = [Scenario("bare.sink@16", "bare ASGI POST (x1 body)", "bare", "/sink", "single", 1,
                    HEADLINE_LEVEL)]  # fmt: skip
    out += [
        Scenario(
            f"ceiling.sink@{c}", "ceiling POST /sink (x1 body)", "ceiling", "/sink", "single", 1, c
        )
        for c in peer_levels
    ]
    out += [
        Scenario(
            f"naive.encode.x1@{c}", "naive /encode x1 json", "naive", "/encode", "single", 1, c
        )
        for c in peer_levels
    ]
    out += [
        Scenario(
            f"service.encode.x1@{c}",
            "service /encode x1 json",
            "service",
            "/encode",
            "single",
            1,
            c,
        )
        for c in SINGLE_LEVELS
    ]
    # Peers and scale-out at the headline level: LitServe without and with its batching, and
    # the service with two workers.
    out += [
        Scenario("litserve.encode.x1@16", "LitServe /predict x1 json, batching off", "litserve",
                 "/predict", "single", 1, HEADLINE_LEVEL),
        Scenario("litserve-batch.encode.x1@16", "LitServe /predict x1 json, batching on",
                 "litserve-batch", "/predict", "single", 1, HEADLINE_LEVEL),
        Scenario("service-2w.encode.x1@16", "service /encode x1 json, 2 workers", "service-2w",
                 "/encode", "single", 1, HEADLINE_LEVEL),
    ]  # fmt: skip
    if args.baseline:
        out += [
            Scenario("baseline.encode.x1@16", f"service at {args.baseline} /encode x1 json",
                     "baseline", "/encode", "single", 1, HEADLINE_LEVEL),
            Scenario("baseline.anomaly.x1", f"service at {args.baseline} /anomaly-score x1 "
                     f"L={ANOMALY_SAMPLES}", "baseline", "/anomaly-score", "anomaly", 1,
                     HEADLINE_LEVEL),
        ]  # fmt: skip
    bc = args.batch_concurrency
    out += [
        Scenario(
            "service.anomaly.x1",
            f"service /anomaly-score x1 L={ANOMALY_SAMPLES}",
            "service",
            "/anomaly-score",
            "anomaly",
            1,
            HEADLINE_LEVEL,
        ),
        Scenario(
            "service.encode.json256",
            f"service /encode x{BATCH} json",
            "service",
            "/encode",
            "batch_json",
            BATCH,
            bc,
        ),
        Scenario(
            "service.encode.npy256",
            f"service /encode x{BATCH} npy",
            "service",
            "/encode",
            "batch_npy",
            BATCH,
            bc,
            headers={"Content-Type": NPY, "Accept": NPY},
            optional=True,
        ),
    ]
    return out


class Bench:
    """State of one run: paths, bodies, the wrk binary, and the records collected."""

    def __init__(self, args: argparse.Namespace, work: Path, log_dir: Path) -> None:
        self.args = args
        self.work = work
        self.log_dir = log_dir
        self.stack = Stack(args.loop, args.http, args.workers)
        self.wrk = ensure_wrk()
        self.records: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.bodies: Bodies | None = None
        self.body_files: dict[str, Path] = {}
        self.baseline_dir = work / "baseline"

    def set_bodies(self, bodies: Bodies) -> None:
        self.bodies = bodies
        for name in ("single", "anomaly", "batch_json", "batch_npy"):
            path = self.work / f"{name}.body"
            path.write_bytes(getattr(bodies, name))
            self.body_files[name] = path

    def server(self, name: str, artifact: Path) -> Server:
        port = free_port()
        if name.startswith("litserve"):
            batching = LITSERVE_BATCHING if name == "litserve-batch" else []
            cmd = [sys.executable, "-m", "bench.litserve_peer", "--artifact", str(artifact),
                   "--port", str(port), *batching]  # fmt: skip
            return Server(name, "", self.stack, port=port, ready_path="/health", env={},
                          log_dir=self.log_dir, cmd=cmd, whole_session=True)  # fmt: skip
        if name == "baseline":  # the same service, from an older commit's worktree
            env = {**self.service_env(artifact, port), "PYTHONPATH": str(self.baseline_dir)}
            cmd = [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory",
                   "--host", "127.0.0.1", "--port", str(port), *self.stack.uvicorn_args(),
                   "--log-level", "warning", "--no-access-log"]  # fmt: skip
            return Server(name, "", self.stack, port=port, ready_path="/ready", env=env,
                          log_dir=self.log_dir, cmd=cmd, cwd=self.baseline_dir)  # fmt: skip
        if name == "service-2w":
            # Two workers the way operators run them: `python -m app` (app/workers.py).
            env = {**self.service_env(artifact, port), "VAE_WORKERS": "2"}
            stack = Stack(self.stack.loop, self.stack.http, 2)
            return Server(name, "", stack, port=port, ready_path="/ready", env=env,
                          log_dir=self.log_dir, cmd=[sys.executable, "-m", "app"])  # fmt: skip
        factory = {
            "bare": "bench.bare:create_app",
            "ceiling": "bench.ceiling:create_app",
            "naive": "bench.naive:create_app",
            "service": "app.main:create_app",
        }[name]
        env = {"BENCH_MODEL_PATH": str(artifact)} if name == "naive" else {}
        if name == "service":
            env = self.service_env(artifact, port)
        return Server(
            name,
            factory,
            self.stack,
            port=port,
            ready_path="/ready" if name == "service" else "/health",  # bare answers any path
            env=env,
            log_dir=self.log_dir,
        )

    def check_out_baseline(self, ref: str) -> dict[str, str]:
        """The service at `ref`, in a worktree of this repository (removed again at exit)."""
        git = ["git", "-C", str(REPO)]
        found = subprocess.run([*git, "rev-parse", "--verify", f"{ref}^{{commit}}"],
                               capture_output=True, text=True, check=True)  # fmt: skip
        commit = found.stdout.strip()
        subprocess.run([*git, "worktree", "add", "--detach", str(self.baseline_dir), commit],
                       capture_output=True, check=True)  # fmt: skip
        atexit.register(subprocess.run, [*git, "worktree", "remove", "--force",
                                         str(self.baseline_dir)], capture_output=True)  # fmt: skip
        return {"ref": ref, "commit": commit}

    def service_env(self, artifact: Path, port: int) -> dict[str, str]:
        """What the service reads (app/settings.py). HOST and PORT bind `python -m app`; under
        the uvicorn CLI its own --host/--port flags do."""
        return {
            "VAE_MODEL_PATH": str(artifact),
            "VAE_LOG_LEVEL": "warning",
            "VAE_HOST": "127.0.0.1",
            "VAE_PORT": str(port),
            **dict(item.split("=", 1) for item in self.args.service_env),
        }

    def run_scenario(self, sc: Scenario, server: Server) -> dict[str, Any]:
        body_path = self.body_files[sc.body]
        url = server.url + sc.path
        record: dict[str, Any] = {
            "key": sc.key,
            "label": sc.label,
            "server": sc.server,
            "path": sc.path,
            "concurrency": sc.concurrency,
            "instances_per_request": sc.instances,
            "request_headers": sc.headers,
            "body_bytes": body_path.stat().st_size,
        }
        print(f"  {sc.label} @{sc.concurrency} ...", end="", flush=True)
        probe = probe_once(url, body_path.read_bytes(), sc.headers)
        record["probe"] = probe
        if sc.optional and probe["status"] in UNSUPPORTED:
            record["outcome"] = f"unsupported ({probe['status']})"
            print(f" {record['outcome']}", flush=True)
            self.records.append(record)
            return record
        record["outcome"] = "ok" if probe["status"] == 200 else f"probe answered {probe['status']}"
        if probe["status"] != 200:
            self.notes.append(
                f"{sc.key}: a single request answered {probe['status']}: {probe.get('detail', '')}"
            )
        script = write_script(self.work / f"{sc.key}.lua", body_path, sc.headers)
        if self.args.warmup:
            warm, _ = run_wrk(
                self.wrk,
                url,
                script,
                connections=sc.concurrency,
                duration_s=self.args.warmup,
                threads=WRK_THREADS,
            )
            record["warmup"] = warm.to_dict()
        cpu0, busy0 = server.cpu_seconds(), machine_busy_seconds()
        result, text = run_wrk(
            self.wrk,
            url,
            script,
            connections=sc.concurrency,
            duration_s=self.args.duration,
            threads=WRK_THREADS,
        )
        cpu1, busy1 = server.cpu_seconds(), machine_busy_seconds()
        wall = result.duration_s or 1.0
        server_cpu = cpu1 - cpu0
        record["wrk"] = {
            **result.to_dict(),
            "errors": result.errors,
            "error_text": result.error_text(),
        }
        record["wrk_output"] = text
        record["images_per_s"] = result.rps * sc.instances
        record["cpu"] = {
            "server_cores": server_cpu / wall,
            "wrk_cores": result.wrk_cpu_s / wall,
            # Everything else on the machine: other people's trainings, mostly.
            "other_cores": max(0.0, (busy1 - busy0) - server_cpu - result.wrk_cpu_s) / wall,
        }
        if result.errors:
            self.notes.append(f"{sc.key}: {result.error_text()} of {result.requests} requests")
        print(
            f" {result.rps:,.0f} req/s, p99 {result.p99_ms:.1f} ms, errors {result.error_text()}",
            flush=True,
        )
        self.records.append(record)
        return record

    def memory_run(self, artifact: Path, rate_hint: float | None) -> dict[str, Any]:
        """RSS of a fresh service after warm-up, then after --memory-requests more requests."""
        target = self.args.memory_requests
        script = write_script(
            self.work / "memory.lua",
            self.body_files["single"],
            {"Content-Type": "application/json"},
        )
        samples: list[dict[str, float]] = []
        chunks: list[WrkResult] = []
        with self.server("service", artifact) as server:
            url = server.url + "/encode"
            warm, _ = run_wrk(
                self.wrk,
                url,
                script,
                connections=HEADLINE_LEVEL,
                duration_s=max(self.args.warmup, 1),
                threads=WRK_THREADS,
            )
            rss_before = server.rss_bytes()
            samples.append({"requests": 0, "rss_bytes": rss_before})
            rate = rate_hint or warm.rps
            sent = 0
            t0 = time.monotonic()
            # Five chunks: the RSS after each shows a trend (growth that levels off vs a leak)
            # rather than two points; each chunk's duration comes from the last measured rate.
            chunk = max(1, math.ceil(target / 5))
            while sent < target:
                want = min(chunk, target - sent)
                seconds = max(1, math.ceil(want / max(rate, 1.0)))
                result, _ = run_wrk(
                    self.wrk,
                    url,
                    script,
                    connections=HEADLINE_LEVEL,
                    duration_s=seconds,
                    threads=WRK_THREADS,
                )
                chunks.append(result)
                sent += result.requests
                samples.append({"requests": sent, "rss_bytes": server.rss_bytes()})
                if result.requests == 0:
                    self.notes.append("memory: a wrk run completed no requests; stopped early")
                    break
                rate = result.rps
            rss_after = server.rss_bytes()
        errors = sum(c.errors for c in chunks)
        if errors:
            self.notes.append(f"memory: {errors} errors in {sent} requests")
        return {
            "requests_target": target,
            "requests_sent": sent,
            "errors": errors,
            "seconds": time.monotonic() - t0,
            "concurrency": HEADLINE_LEVEL,
            "warmup_requests": warm.requests,
            "rss_before_bytes": rss_before,
            "rss_after_bytes": rss_after,
            "rss_ratio": rss_after / rss_before if rss_before else None,
            "samples": samples,
            "workers_summed": self.args.workers,
        }


def probe_once(url: str, body: bytes, headers: dict[str, str]) -> dict[str, Any]:
    """One request before the load: its status, and what came back (for checks and notes)."""
    r = httpx.post(url, content=body, headers=headers, timeout=120.0)
    probe: dict[str, Any] = {
        "status": r.status_code,
        "content_type": r.headers.get("content-type"),
        "response_bytes": len(r.content),
    }
    if r.status_code != 200:
        probe["detail"] = r.text[:300]
    return probe


def check_encode(url: str, bodies: Bodies, module: torch.jit.ScriptModule) -> dict[str, Any]:
    """Does the server's single-instance /encode agree with the model in-process?"""
    r = httpx.post(
        url, content=bodies.single, headers={"Content-Type": "application/json"}, timeout=60.0
    )
    if r.status_code != 200:
        return {"status": r.status_code, "detail": r.text[:300]}
    with torch.no_grad():
        mean, _ = module.encode(torch.from_numpy(bodies.single_array))
    got = np.asarray(r.json()["mean"], dtype=np.float32)
    return {"status": 200, "max_abs_diff_mean": float(np.abs(got - mean.numpy()).max())}


def check_npy(url: str, bodies: Bodies) -> dict[str, Any]:
    """What the binary /encode answers: its content type and the arrays in it."""
    r = httpx.post(
        url, content=bodies.batch_npy, headers={"Content-Type": NPY, "Accept": NPY}, timeout=60.0
    )
    out: dict[str, Any] = {"status": r.status_code, "content_type": r.headers.get("content-type")}
    if r.status_code != 200:
        out["detail"] = r.text[:300]
        return out
    try:
        loaded = np.load(io.BytesIO(r.content), allow_pickle=False)
    except (ValueError, OSError) as e:
        out["parsed"] = f"not .npy/.npz: {type(e).__name__}"
        return out
    if isinstance(loaded, np.ndarray):
        out["parsed"] = {"shape": list(loaded.shape), "dtype": str(loaded.dtype)}
    else:  # an .npz archive
        out["parsed"] = {
            k: {"shape": list(loaded[k].shape), "dtype": str(loaded[k].dtype)} for k in loaded.files
        }
    return out


def machine_info(wrk: str) -> dict[str, Any]:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kb = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    versions: dict[str, str | None] = {}
    for pkg in (
        "fastapi",
        "starlette",
        "uvicorn",
        "pydantic",
        "numpy",
        "uvloop",
        "httptools",
        "h11",
    ):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "cpu_model": model,
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "mem_total_gib": round(mem_kb / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "packages": versions,
        "wrk": wrk_version(wrk),
        "git": git_info(),
    }


def git_info() -> dict[str, Any]:
    # Others edit app/ and training/ while we run: record what the service code was.
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
        return out.stdout.strip()

    return {
        "commit": git("rev-parse", "HEAD") or None,
        "modified_files": git("status", "--porcelain", "--", "app", "training").splitlines(),
    }


def loadavg() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    out_path: Path = args.out
    log_dir = out_path.parent / "bench-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vae-bench-") as tmp:
        work = Path(tmp)
        bench = Bench(args, work, log_dir)
        machine = machine_info(bench.wrk)
        machine["loadavg_start"] = loadavg()
        print(
            f"machine: {machine['cpu_model']}, {machine['nproc']} cores, torch "
            f"{machine['torch']}, load {machine['loadavg_start']}",
            flush=True,
        )

        if args.artifact is None:
            artifact = build_artifact(work / "vae.pt")
            artifact_source = "built: untrained 784-512-256-32 Bernoulli, real exporter"
        else:
            artifact = args.artifact.resolve()
            artifact_source = "given"
        module, manifest = load_module(artifact)
        dim = int(manifest["input_dim"])
        bench.set_bodies(make_bodies(dim, BATCH, anomaly_samples=ANOMALY_SAMPLES))
        assert bench.bodies is not None
        artifact_info = {
            "path": str(artifact),
            "source": artifact_source,
            "bytes": artifact.stat().st_size,
            "input_shape": manifest["input_shape"],
            "latent_dim": manifest["latent_dim"],
            "hidden_dims": manifest.get("model", {}).get("hidden_dims"),
            "likelihood": manifest["likelihood"],
            "calibration_samples": {
                k: v.get("samples")
                for k, v in manifest.get("calibration", {}).get("scores", {}).items()
            },
        }

        print(f"in-process encode ({args.duration} s per batch size)", flush=True)
        compute = {}
        for batch, x in ((1, bench.bodies.single_array), (BATCH, bench.bodies.batch_array)):
            compute[batch] = encode_throughput(module, x, args.duration).to_dict()
            print(f"  batch {batch}: {compute[batch]['images_per_s']:,.0f} images/s", flush=True)

        plan = scenarios(args)
        checks: dict[str, Any] = {}
        server_info: dict[str, Any] = {}
        if args.baseline:
            machine["baseline"] = bench.check_out_baseline(args.baseline)
        for name in args.servers:
            if name == "baseline" and not args.baseline:
                continue
            print(f"{name}:", flush=True)
            with bench.server(name, artifact) as server:
                info: dict[str, Any] = {
                    "startup_s": server.startup_s,
                    "rss_ready_bytes": server.rss_bytes(),
                }
                if name not in ("bare", "ceiling"):
                    path = "/predict" if name.startswith("litserve") else "/encode"
                    checks[f"{name}_encode_vs_inprocess"] = check_encode(
                        server.url + path, bench.bodies, module
                    )
                if name == "service":
                    checks["service_npy"] = check_npy(server.url + "/encode", bench.bodies)
                for sc in plan:
                    if sc.server == name:
                        bench.run_scenario(sc, server)
                info["rss_end_bytes"] = server.rss_bytes()
                server_info[name] = info

        by_key = {r["key"]: r for r in bench.records}
        memory = None
        if not args.skip_memory:
            hint = by_key.get(f"service.encode.x1@{HEADLINE_LEVEL}", {}).get("wrk", {}).get("rps")
            print(f"memory: {args.memory_requests} single-instance /encode requests", flush=True)
            memory = bench.memory_run(artifact, hint)

        ratios = report.ratios(by_key, compute, memory)
        machine["loadavg_end"] = loadavg()
        for check, value in checks.items():
            diff = value.get("max_abs_diff_mean")
            if value.get("status") != 200 and check != "service_npy":
                bench.notes.append(f"check {check}: answered {value.get('status')}")
            elif diff is not None and diff > 1e-4:
                bench.notes.append(f"check {check}: means differ from in-process by {diff:.2g}")

        # Contamination: other people's jobs on a 2-core machine. Torch's intra-op threads wait
        # for each other at every op, so one busy core elsewhere can slow batch compute many-fold.
        measured = [(f"in-process batch {b}", c["other_cores"]) for b, c in compute.items()]
        measured += [(r["key"], r["cpu"]["other_cores"]) for r in bench.records if "cpu" in r]
        busiest = max(measured, key=lambda m: m[1])
        if busiest[1] > OTHER_CORES_WARN:
            bench.notes.append(
                f"other processes used up to {busiest[1]:.2f} cores (during {busiest[0]}): "
                "those numbers are lower than on an idle machine; see the 'other' cores column"
            )

        print()
        print(
            f"stack: loop={args.loop} http={args.http} workers={args.workers}; "
            f"{args.duration} s per scenario after {args.warmup} s warm-up; "
            f"wrk -t{WRK_THREADS}"
        )
        print(report.table(list(compute.values()), bench.records))
        print(
            "cores: CPU used while measuring by the server (this process, for in-process), "
            "wrk, and everything else on the machine"
        )
        print("\nratios:")
        print(report.ratio_lines(ratios))
        if memory is not None:
            print(
                f"  memory: {memory['requests_sent']} requests, RSS "
                f"{memory['rss_before_bytes'] / 2**20:.1f} -> "
                f"{memory['rss_after_bytes'] / 2**20:.1f} MiB"
            )
        if bench.notes:
            print("\nnotes:")
            for note in bench.notes:
                print(f"  - {note}")
        print(f"\nload average: start {machine['loadavg_start']}, end {machine['loadavg_end']}")

        result = {
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "elapsed_s": time.monotonic() - started,
            "command": [sys.executable, "-m", "bench", *(sys.argv[1:] if argv is None else argv)],
            "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "stack": {
                "loop": args.loop,
                "http": args.http,
                "workers": args.workers,
                "wrk_threads": WRK_THREADS,
            },
            "machine": machine,
            "artifact": artifact_info,
            "bodies_bytes": {name: p.stat().st_size for name, p in bench.body_files.items()},
            "in_process": {str(k): v for k, v in compute.items()},
            "servers": server_info,
            "scenarios": bench.records,
            "memory": memory,
            "ratios": ratios,
            "checks": checks,
            "notes": bench.notes,
            "logs": str(log_dir),
        }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out_path} ({time.monotonic() - started:.0f} s)")
    return 0
