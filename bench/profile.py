"""Where a request's time goes: py-spy samples the service while wrk loads `/encode`.

    python -m bench.profile                 # /encode, 1 JSON instance, 16 connections, 10 s

It prints each thread's share of the samples, grouped by the layer that was running (our
request code, FastAPI/Starlette, uvicorn, the event loop, the batcher, the model), and writes
the raw py-spy stacks to build/profile-encode.txt for a flame graph. py-spy is installed with
pip when missing. Shares, not times: the machine's load moves absolute figures.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.artifact import build_artifact, make_bodies
from bench.servers import SERVICE_STACK, Server, free_port
from bench.wrk import ensure_wrk, run_wrk, write_script

REPO = Path(__file__).resolve().parents[1]
RATE_HZ = 250

# The first matching rule, walking from the innermost frame outwards, names the layer.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("model (VAEService, torch)", ("app/model.py", "torch/")),
    ("batcher (gather, concatenate, split, hand-off)", ("app/batching.py",)),
    ("our request code (parse JSON, check, respond)", ("app/",)),
    ("pydantic", ("pydantic",)),
    ("FastAPI / Starlette / anyio", ("fastapi/", "starlette/", "anyio/")),
    ("uvicorn HTTP protocol", ("uvicorn/",)),
    ("event loop", ("asyncio/", "uvloop", "selectors")),
    ("thread hand-off (queue, locks)", ("threading", "queue")),
)
_FRAME_FILE = re.compile(r"\(([^:()]+):\d+\)$")


def layer(frames: list[str]) -> str:
    for frame in reversed(frames):
        match = _FRAME_FILE.search(frame)
        path = match.group(1) if match else ""
        for name, prefixes in LAYERS:
            if path.startswith(prefixes):
                return name
    return "other"


def summarise(raw: Path, duration_s: float) -> str:
    by_thread: collections.Counter[str] = collections.Counter()
    by_layer: collections.Counter[tuple[str, str]] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, count = line.rsplit(" ", 1)
        frames = stack.split(";")
        thread = frames[0].split(": ", 1)[-1] if frames[0].startswith("thread") else "?"
        by_thread[thread] += int(count)
        by_layer[(thread, layer(frames[1:]))] += int(count)
    total = sum(by_thread.values())
    lines = [f"{total} samples at {RATE_HZ} Hz, active threads only", ""]
    lines += ["| thread | layer | share of samples |", "| --- | --- | --- |"]
    lines += [f"| {t} | {name} | {n / total:.0%} |" for (t, name), n in by_layer.most_common()]
    # A thread sampled at every tick for the whole run kept one core busy.
    lines += [""] + [
        f"{t}: {n / total:.0%} of samples; busy {n / (RATE_HZ * duration_s):.0%} of one core"
        for t, n in by_thread.most_common()
    ]
    return "\n".join(lines)


def ensure_py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=True)
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=int, default=10, help="seconds sampled (default 10)")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--out", type=Path, default=REPO / "build" / "profile-encode.txt")
    args = p.parse_args(argv)
    wrk, py_spy = ensure_wrk(), ensure_py_spy()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        artifact = build_artifact(work / "vae.pt")
        body = work / "single.json"
        body.write_bytes(make_bodies(784, 1).single)
        script = write_script(work / "encode.lua", body, {"Content-Type": "application/json"})
        port = free_port()
        env = {"VAE_MODEL_PATH": str(artifact), "VAE_LOG_LEVEL": "warning"}
        stack = SERVICE_STACK
        with Server(
            "service", "app.main:create_app", stack, port=port, ready_path="/ready", env=env,
            log_dir=work,
        ) as server:  # fmt: skip
            url = server.url + "/encode"
            run_wrk(wrk, url, script, connections=args.connections, duration_s=3)  # warm
            spy = subprocess.Popen(
                [py_spy, "record", "--pid", str(server.pid), "--duration", str(args.duration),
                 "--rate", str(RATE_HZ), "--format", "raw", "--threads", "--nonblocking",
                 "--output", str(args.out)],
                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            )  # fmt: skip
            result, _ = run_wrk(
                wrk, url, script, connections=args.connections, duration_s=args.duration + 1
            )
            spy.wait(timeout=60)
    print(f"/encode, 1 JSON instance, {args.connections} connections: {result.rps:,.0f} req/s\n")
    print(summarise(args.out, args.duration))
    print(f"\nraw stacks: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
