"""`python -m bench.ray`: /encode through Ray Serve's HTTP proxy against plain uvicorn.

One run, one machine, one artifact (the untrained MNIST-sized VAE `python -m bench` builds),
wrk at 16 connections: first plain uvicorn (`python -m app`'s stack, one worker), then a
one-node Ray cluster serving deploy/ray/serve.yaml with one replica given every core, so the
difference is what Ray's proxy and routing cost. Two scenarios each: single-image /encode (the
headline: the per-request cost is all there is) and 256-image .npy /encode (that cost spread
over a batch). Ray runs twice, without and then with the config's proxy retry middleware, so
its own cost shows too. Logging is the same on both sides: none per request. Writes
build/bench-ray.json.

`RayCluster` is also what tests/test_ray.py runs its two-node cluster with: `ray start` nodes on
this machine, in a temp dir of their own, torn down by killing exactly the processes they
started (never `ray stop`, which kills every Ray process of the user by name).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import yaml  # type: ignore[import-untyped]  # PyYAML, which Ray requires, ships no types

from bench.artifact import build_artifact, make_bodies
from bench.servers import REPO, SERVICE_STACK, Server, free_port, machine_busy_seconds, proc_table
from bench.wrk import WrkResult, ensure_wrk, run_wrk, write_script, wrk_version

CONFIG = REPO / "deploy" / "ray" / "serve.yaml"
APP = "vae"  # the application's name in the config files
DEPLOYMENT = "VAEService"  # app.ray_serve.DEPLOYMENT, without importing Ray here
BIN = Path(sys.executable).parent  # the `ray` and `serve` commands of this environment
CONNECTIONS = 16


# -- a Ray cluster of our own --------------------------------------------------------------------


@dataclass(frozen=True)
class Replica:
    pid: int
    node_id: str
    state: str


class RayCluster:
    """Ray nodes on this machine, one `ray start` each (the first is the head), as a context
    manager. Every node gets `cpus` CPUs and ports of its own."""

    def __init__(self, log_dir: Path, node_cpus: Sequence[int] = (1, 1)) -> None:
        # Short: Ray puts unix sockets under it, and those paths are limited to 107 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
        self.log_dir = log_dir
        self.node_cpus = tuple(node_cpus)
        self.gcs_port = free_port()
        self.dashboard = f"http://127.0.0.1:{free_port()}"
        self.sessions: list[int] = []  # each `ray start` runs in a session of its own
        # The workers import this checkout's `app`, whatever an editable install points at.
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "VAE_"))}
        self.env = base | {"PYTHONPATH": path, "RAY_USAGE_STATS_ENABLED": "0"}

    def __enter__(self) -> RayCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        head, *others = self.node_cpus
        dashboard_port = self.dashboard.rsplit(":", 1)[1]
        self._ray_start(
            "head", head, "--head", f"--port={self.gcs_port}", "--include-dashboard=true",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
            f"--ray-client-server-port={free_port()}", f"--temp-dir={self.temp_dir}",
        )  # fmt: skip
        for i, cpus in enumerate(others, start=2):
            self._ray_start(f"node{i}", cpus, f"--address=127.0.0.1:{self.gcs_port}")
        self._wait_for_dashboard()

    def _ray_start(self, name: str, cpus: int, *args: str) -> None:
        log = self.log_dir / f"ray-start-{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [str(BIN / "ray"), "start", *args, f"--num-cpus={cpus}", "--disable-usage-stats",
                 "--node-ip-address=127.0.0.1", "--object-store-memory=100000000",
                 # Nodes on one host: each one's agent needs a port of its own.
                 f"--dashboard-agent-listen-port={free_port()}"],
                env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.sessions.append(proc.pid)
        if proc.wait(timeout=120) != 0:
            raise RuntimeError(f"ray start ({name}) failed:\n{log.read_text()}")

    def _wait_for_dashboard(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.dashboard}/api/serve/applications/").status_code == 200:
                    return
            time.sleep(0.25)
        raise RuntimeError(f"the Ray dashboard did not answer in {timeout:.0f} s")

    def serve(self, *args: str) -> None:
        """A `serve` command against this cluster (deploy CONFIG, shutdown -y, ...)."""
        out = subprocess.run(
            [str(BIN / "serve"), *args, f"--address={self.dashboard}"],
            env=self.env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"serve {args[0]} failed:\n{out.stdout}{out.stderr}")

    def replicas(self, application: str = APP) -> tuple[str, list[Replica]]:
        """An application's status and its replicas, from Serve's REST API (what `serve
        status` reads)."""
        details = httpx.get(f"{self.dashboard}/api/serve/applications/", timeout=10).json()
        app = (details.get("applications") or {}).get(application)
        if app is None:
            return "NOT_STARTED", []
        deployment = app["deployments"].get(DEPLOYMENT, {"replicas": []})  # still building
        return app["status"], [
            Replica(r.get("pid") or 0, r.get("node_id") or "", r["state"])
            for r in deployment["replicas"]
        ]

    def wait_running(
        self, count: int, timeout: float = 120.0, exclude: int = 0, application: str = APP
    ) -> list[Replica]:
        """Wait until the application runs exactly `count` replicas, none of them `exclude`."""
        deadline = time.monotonic() + timeout
        status, replicas = "", list[Replica]()
        while time.monotonic() < deadline:
            status, replicas = self.replicas(application)
            running = [r for r in replicas if r.state == "RUNNING" and r.pid != exclude]
            if status == "RUNNING" and len(running) == count == len(replicas):
                return running
            if status == "DEPLOY_FAILED":
                break
            time.sleep(0.25)
        raise RuntimeError(
            f"not {count} replicas RUNNING in {timeout:.0f} s: {status} {replicas}\n"
            + self.serve_logs_tail()
        )

    def serve_logs_tail(self, lines: int = 40) -> str:
        found = sorted((self.temp_dir / "session_latest" / "logs" / "serve").glob("*.log"))
        return "\n".join(
            f"== {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-lines:])
            for p in found
        )

    def worker_log(self, pid: int) -> str:
        """What a worker process (a replica, say) wrote to stderr: the app's own log lines."""
        logs = (self.temp_dir / "session_latest" / "logs").glob(f"worker-*-{pid}.err")
        return "".join(p.read_text(errors="replace") for p in logs)

    def pids(self) -> list[int]:
        """Every process of this cluster: the sessions of our `ray start`s and all their
        descendants (the workers, which raylets fork into process groups of their own)."""
        table = proc_table()
        ours = {pid for pid, p in table.items() if p.sid in self.sessions}
        while True:
            children = {pid for pid, p in table.items() if p.ppid in ours} - ours
            if not children:
                return sorted(ours)
            ours |= children

    def cpu_seconds(self) -> float:
        table = proc_table()
        return sum(table[pid].cpu_s for pid in self.pids() if pid in table)

    def stop(self) -> None:
        """SIGKILL every process of this cluster, then remove its temp dir."""
        ours = self.pids()
        for pid in ours:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and _any_alive(ours):
            time.sleep(0.1)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _any_alive(pids: list[int]) -> bool:
    table = proc_table()
    return any(pid in table and table[pid].state != "Z" for pid in pids)


def serve_config(
    model_path: Path,
    port: int,
    *,
    replicas: int | None = None,
    replica_cpus: float | None = None,
    retry: bool = True,
    quiet: bool = False,
) -> dict[str, Any]:
    """deploy/ray/serve.yaml for a cluster on this one machine: the proxy on 127.0.0.1:`port`
    and only on the head (nodes here share one host, so only one can bind the port).

    `quiet` logs what the benchmark's uvicorn logs (`--log-level warning --no-access-log`,
    VAE_LOG_LEVEL=warning): no line per request from the proxy, the replicas or the app.
    """
    config: dict[str, Any] = yaml.safe_load(CONFIG.read_text())
    config["http_options"] |= {"host": "127.0.0.1", "port": port}
    config["proxy_location"] = "HeadOnly"
    if not retry:
        del config["controller_options"]
    (app,) = config["applications"]
    app["runtime_env"]["env_vars"]["VAE_MODEL_PATH"] = str(model_path)
    if quiet:
        config["logging_config"] = {"log_level": "WARNING", "enable_access_log": False}
        app["runtime_env"]["env_vars"]["VAE_LOG_LEVEL"] = "warning"
    (deployment,) = app["deployments"]
    if replicas is not None:
        deployment["num_replicas"] = replicas
        deployment.pop("max_replicas_per_node", None)  # one node may hold them all
    if replica_cpus is not None:
        deployment["ray_actor_options"]["num_cpus"] = replica_cpus
    return config


# -- the benchmark ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    key: str
    label: str
    body: str  # a field of bench.artifact.Bodies
    images: int  # per request
    headers: dict[str, str]


JSON = {"Content-Type": "application/json"}
NPY = {"Content-Type": "application/x-npy", "Accept": "application/x-npy"}
SCENARIOS = (
    # The headline: one small image per request, so the per-request cost is all there is.
    Scenario("encode.x1", "/encode x1 json", "single", 1, JSON),
    # 256 images per request, binary both ways: the per-request cost is spread over them.
    Scenario("encode.npy256", "/encode x256 npy", "batch_npy", 256, NPY),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.ray",
        description="Throughput and p99 of /encode at 16 connections through Ray Serve's "
        "HTTP proxy, as ratios to plain uvicorn, on this machine in one run.",
    )
    p.add_argument("--artifact", type=Path, help="serve this artifact (default: build the "
                   "untrained MNIST-sized one `python -m bench` uses)")  # fmt: skip
    p.add_argument("--duration", type=int, default=10, help="seconds per scenario (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="seconds of discarded load first "
                   "(default 2)")  # fmt: skip
    p.add_argument("--replicas", type=int, default=1, help="Ray replicas, sharing the "
                   "cores (default 1: one replica with every core, as uvicorn's one worker "
                   "has)")  # fmt: skip
    p.add_argument("--skip-no-retry", action="store_true",
                   help="skip the run without the proxy retry middleware")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("build/bench-ray.json"),
                   help="the JSON report (default build/bench-ray.json)")  # fmt: skip
    args = p.parse_args(argv)
    for name in ("duration", "replicas"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    return args


@dataclass(frozen=True)
class Measured:
    stack: str  # uvicorn, ray, ray-no-retry
    scenario: Scenario
    result: WrkResult
    serving_cores: float  # CPU of the serving processes (uvicorn; every Ray process) per second
    other_cores: float  # everything else on the machine, wrk excluded

    def to_dict(self) -> dict[str, Any]:
        return {
            "stack": self.stack,
            "scenario": self.scenario.key,
            "images_per_s": self.result.rps * self.scenario.images,
            "wrk": self.result.to_dict() | {"errors": self.result.errors},
            "serving_cores": self.serving_cores,
            "other_cores": self.other_cores,
        }


class Run:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.wrk = ensure_wrk()
        self.measured: list[Measured] = []
        self.answers: dict[str, bytes] = {}  # stack -> its answer to a seeded call
        bodies = make_bodies(784, 256)
        self.scripts = {}
        for sc in SCENARIOS:
            body = work / f"{sc.key}.body"
            body.write_bytes(getattr(bodies, sc.body))
            self.scripts[sc.key] = write_script(work / f"{sc.key}.lua", body, sc.headers)
        # A seeded call with samples: every stack must answer the very same bytes.
        self.seeded = json.dumps(
            {"instances": bodies.single_array.tolist(), "samples": 2, "seed": 0}
        ).encode()

    def measure(self, stack: str, base_url: str, cpu: Callable[[], float]) -> None:
        r = httpx.post(base_url + "/encode", content=self.seeded, headers=JSON, timeout=60)
        r.raise_for_status()
        self.answers[stack] = r.content
        for sc in SCENARIOS:
            url, script = base_url + "/encode", self.scripts[sc.key]
            print(f"  {stack} {sc.label} ...", end="", flush=True)
            if self.args.warmup:
                run_wrk(self.wrk, url, script, connections=CONNECTIONS,
                        duration_s=self.args.warmup)  # fmt: skip
            cpu0, busy0 = cpu(), machine_busy_seconds()
            result, _ = run_wrk(self.wrk, url, script, connections=CONNECTIONS,
                                duration_s=self.args.duration)  # fmt: skip
            cpu1, busy1 = cpu(), machine_busy_seconds()
            wall = result.duration_s or 1.0
            serving = (cpu1 - cpu0) / wall
            other = max(0.0, (busy1 - busy0) - (cpu1 - cpu0) - result.wrk_cpu_s) / wall
            print(f" {result.rps:,.0f} req/s, p99 {result.p99_ms:.1f} ms, errors "
                  f"{result.error_text()}, {serving:.2f} cores", flush=True)  # fmt: skip
            self.measured.append(Measured(stack, sc, result, serving, other))

    def ratios(self) -> dict[str, dict[str, dict[str, float | None]]]:
        """stack -> scenario -> req/s and p99 over uvicorn's."""
        base = {m.scenario.key: m.result for m in self.measured if m.stack == "uvicorn"}
        out: dict[str, dict[str, dict[str, float | None]]] = {}
        for m in self.measured:
            b = base[m.scenario.key]
            if m.stack != "uvicorn":
                out.setdefault(m.stack, {})[m.scenario.key] = {
                    "rps": m.result.rps / b.rps if b.rps else None,
                    "p99": m.result.p99_ms / b.p99_ms if b.p99_ms else None,
                }
        return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    out_path: Path = args.out
    log_dir = out_path.parent / "bench-ray-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    nproc = len(os.sched_getaffinity(0))
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="vae-bench-ray-") as tmp:
        work = Path(tmp)
        run = Run(args, work)
        artifact = args.artifact.resolve() if args.artifact else build_artifact(work / "vae.pt")

        print(f"uvicorn (python -m app's stack, 1 worker), {nproc} cores:", flush=True)
        env = {"VAE_MODEL_PATH": str(artifact), "VAE_LOG_LEVEL": "warning", "VAE_DEVICE": "cpu"}
        with Server("uvicorn", "app.main:create_app", SERVICE_STACK,
                    port=free_port(), ready_path="/ready", env=env,
                    log_dir=log_dir) as server:  # fmt: skip
            run.measure("uvicorn", server.url, server.cpu_seconds)

        print(f"Ray Serve: one node, {args.replicas} replica(s) sharing {nproc} cores:")
        variants = [("ray-no-retry", False)] if not args.skip_no_retry else []
        variants.append(("ray", True))
        for stack, retry in variants:
            # A fresh cluster each: a second Serve on the same cluster (after `serve
            # shutdown`) measured about 20% slower than the first, whichever variant went first.
            with RayCluster(log_dir, node_cpus=(nproc,)) as cluster:
                port = free_port()
                config = serve_config(artifact, port, replicas=args.replicas,
                                      replica_cpus=nproc / args.replicas, retry=retry,
                                      quiet=True)  # fmt: skip
                path = work / f"{stack}.yaml"
                path.write_text(yaml.safe_dump(config))
                cluster.serve("deploy", str(path))
                cluster.wait_running(args.replicas)
                run.measure(stack, f"http://127.0.0.1:{port}", cluster.cpu_seconds)

    ratios = run.ratios()
    same = {stack: answer == run.answers["uvicorn"] for stack, answer in run.answers.items()}
    print()
    print(f"{CONNECTIONS} connections, {args.duration} s each after {args.warmup} s warm-up")
    print(f"{'stack':<13}{'scenario':<18}{'req/s':>8}{'images/s':>10}{'p50 ms':>8}"
          f"{'p99 ms':>8}{'errors':>7}{'cores':>6}{'other':>6}")  # fmt: skip
    for m in run.measured:
        r = m.result
        print(f"{m.stack:<13}{m.scenario.label:<18}{r.rps:>8,.0f}"
              f"{r.rps * m.scenario.images:>10,.0f}{r.p50_ms:>8.1f}{r.p99_ms:>8.1f}"
              f"{r.errors:>7}{m.serving_cores:>6.2f}{m.other_cores:>6.2f}")  # fmt: skip
    for stack, by_scenario in ratios.items():
        for key, ratio in by_scenario.items():
            rps, p99 = ratio["rps"], ratio["p99"]
            print(f"{stack} / uvicorn, {key}: req/s x{rps or 0:.3f}, p99 x{p99 or 0:.2f}")
    print(f"seeded answers equal to uvicorn's: {same}")
    report = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "elapsed_s": time.monotonic() - started,
        "command": [sys.executable, "-m", "bench.ray", *(sys.argv[1:] if argv is None else argv)],
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "connections": CONNECTIONS,
        "machine": {
            "nproc": nproc,
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
            "ray": metadata.version("ray"),
            "uvicorn": metadata.version("uvicorn"),
            "wrk": wrk_version(run.wrk),
        },
        "measured": [m.to_dict() for m in run.measured],
        "ratios_to_uvicorn": ratios,
        "answers_equal_uvicorn": same,
        "logs": str(log_dir),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out_path} ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
