"""`python -m bench.soak`: mixed load for a while, bad requests among it, a reload in the middle.

The soak is about correctness and leaks, not speed: a real service process (bench/servers.py)
serving an untrained MNIST-sized artifact (bench/artifact.py) gets N concurrent clients sending
a weighted mix of the model routes (REST and V2, JSON and .npy) and the probes, about 2% of
them deliberately bad. Half-way through (--reload-at), a different artifact replaces the file
and /admin/reload swaps it in under load. RSS is read from /proc every second.

PASS needs all of: no 5xx (503s from the VAE_MAX_IN_FLIGHT bound are backpressure, counted
apart and retried, not errors); no dropped request (connection error, timeout, cut-off read);
every good request a 2xx with a well-formed body, every bad one a 4xx; the reload changed the
sha256 /model reports and the answers themselves; RSS at the end within 10% of RSS after
warm-up. Exit status 0 on PASS, 1 on FAIL.

Warm-up and load are one continuous run of the same workers; a request belongs to the phase
it started in. Warm-up matters because the first seconds grow RSS for good reasons (allocator
arenas, torch's per-batch-size buffers, the thread pool), which a leak check must not count.
The warm-up reloads once too, a third artifact, at its first second: holding two models at
once during a load raises the allocator's high-water mark a step (20 to 45 MB for this
artifact) that later reloads reuse rather than add to. Taken after the warm-up, that one step
alone read as 9 to 10% growth; taken before, the base includes it, and growth per reload or per
request is what the 10% bounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from enum import Enum
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson

from bench.artifact import build_artifact, mnist_like
from bench.servers import REPO, SERVICE_STACK, Server, ServerError, free_port

API_KEY = "soak-key"  # the server gets it via VAE_API_KEYS; it never leaves this machine
ADMIN_KEY = "soak-admin-key"  # VAE_ADMIN_KEYS: the only key /admin/reload takes
NPY = "application/x-npy"
JSON = "application/json"
RSS_LIMIT = 1.10  # RSS at the end over RSS after warm-up
MAX_RETRIES = 5  # backpressure 503s retried per request before it counts as an error
CLIENT_TIMEOUT_S = 30.0  # above the server's VAE_REQUEST_TIMEOUT_S, so a slow answer is a 504
SERVER_TIMEOUT_S = 20.0
ERROR_EXAMPLES = 20  # errors kept verbatim in the JSON, for diagnosis

Check = Callable[[httpx.Response], str | None]  # a problem with a 2xx answer, or None


# -- the requests ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Call:
    """One kind of request, with its body prebuilt: the client only sends bytes."""

    kind: str
    path: str
    body: bytes | None = None  # None: GET
    content_type: str = JSON
    accept: str | None = None
    key: bool = True  # send the API key
    bad: bool = False  # must be refused with a 4xx
    check: Check | None = None

    def headers(self) -> dict[str, str]:
        h = {"content-type": self.content_type} if self.body is not None else {}
        if self.accept:
            h["accept"] = self.accept
        if self.key:
            h["authorization"] = f"Bearer {API_KEY}"
        return h

    def judge(self, r: httpx.Response) -> tuple[Outcome, str]:
        """What the server's answer to this call means for the verdict (see `classify`)."""
        problem = None
        if not self.bad and self.check is not None and 200 <= r.status_code < 300:
            try:
                problem = self.check(r)
            except (ValueError, KeyError, TypeError, AttributeError) as e:  # orjson: ValueError
                problem = f"unreadable answer: {type(e).__name__}: {e}"
        return classify(self.bad, r.status_code, _detail(r), problem)


def _j(obj: object) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _rows(field_name: str, n: int, width: int) -> Check:
    """A JSON answer whose `field_name` is n rows of `width` numbers."""

    def check(r: httpx.Response) -> str | None:
        value = orjson.loads(r.content).get(field_name)
        if not isinstance(value, list) or len(value) != n:
            return f"'{field_name}' is not {n} rows"
        if width and any(len(row) != width for row in value):
            return f"'{field_name}' rows are not {width} wide"
        return None

    return check


def _npy_rows(n: int) -> Check:
    def check(r: httpx.Response) -> str | None:
        if not r.headers.get("content-type", "").startswith(NPY):
            return f"content-type {r.headers.get('content-type')!r}, not {NPY}"
        a = np.load(io.BytesIO(r.content), allow_pickle=False)
        return None if a.shape[:1] == (n,) else f".npy answer has shape {a.shape}, not ({n}, ...)"

    return check


def _v2_output(name: str, shape: list[int]) -> Check:
    def check(r: httpx.Response) -> str | None:
        outs = {o["name"]: o for o in orjson.loads(r.content).get("outputs", [])}
        if name not in outs or outs[name].get("shape") != shape:
            return f"V2 answer has no output '{name}' of shape {shape}"
        return None

    return check


def _has(key: str) -> Check:
    def check(r: httpx.Response) -> str | None:
        return None if key in orjson.loads(r.content) else f"answer has no '{key}'"

    return check


def _v2(name: str, shape: list[int], data: np.ndarray, **params: Any) -> bytes:
    tensor = {"name": name, "shape": shape, "datatype": "FP32", "data": data.ravel().tolist()}
    return _j({"inputs": [tensor], **({"parameters": params} if params else {})})


def build_calls(
    dim: int, latent: int, *, seed: int = 0
) -> tuple[list[Call], list[int], list[Call]]:
    """The good calls and their weights, and the bad calls (picked uniformly among themselves).

    Sizes are modest on purpose: the client and the server share two cores, and a soak wants
    many requests of every kind more than it wants big ones.
    """
    one = mnist_like(1, dim, seed=seed + 1)
    few = mnist_like(4, dim, seed=seed + 2)
    batch = mnist_like(64, dim, seed=seed + 3)
    z = np.random.default_rng(seed).standard_normal((8, latent)).astype(np.float32)
    weighted = [
        (30, Call("encode.json.1", "/encode", _j({"instances": one}),
                  check=_rows("mean", 1, latent))),
        (5, Call("encode.json.64", "/encode", _j({"instances": batch}),
                 check=_rows("std", 64, latent))),
        (8, Call("encode.npy.64", "/encode", _npy(batch), NPY, NPY, check=_npy_rows(64))),
        (5, Call("encode.json.1+samples", "/encode", _j({"instances": one, "samples": 4}),
                 check=_rows("samples", 1, 4))),
        (10, Call("decode.json.8", "/decode", _j({"latents": z}), check=_rows("outputs", 8, dim))),
        (4, Call("decode.npy.8", "/decode", _npy(z), NPY, NPY, check=_npy_rows(8))),
        (8, Call("sample.8", "/sample", _j({"n": 8}), check=_rows("outputs", 8, dim))),
        (8, Call("anomaly.json.1", "/anomaly-score", _j({"instances": one, "samples": 4}),
                 check=_rows("kl_divergence", 1, 0))),
        (3, Call("anomaly.npy.4", "/anomaly-score?samples=4", _npy(few), NPY,
                 check=_rows("reconstruction_log_prob", 4, 0))),
        (6, Call("v2.vae.4", "/v2/models/vae/infer", _v2("instances", [4, dim], few),
                 check=_v2_output("mean", [4, latent]))),
        (3, Call("v2.decode.8", "/v2/models/vae-decode/infer", _v2("latents", [8, latent], z),
                 check=_v2_output("outputs", [8, dim]))),
        (3, Call("v2.anomaly.1", "/v2/models/vae-anomaly/infer",
                 _v2("instances", [1, dim], one, samples=4), check=_v2_output("is_anomaly", [1]))),
        (5, Call("health", "/health", check=_has("status"))),
        (2, Call("model", "/model", check=_has("sha256"))),
    ]  # fmt: skip
    nan_npy = few.copy()
    nan_npy[2, -1] = np.nan
    text = json.dumps({"instances": one.tolist()})  # has 0.0s, one of which becomes NaN
    v2_bytes = {"name": "instances", "shape": [1, 1], "datatype": "BYTES", "data": ["x"]}
    bad = [
        Call("bad.json.malformed", "/encode", text[: len(text) // 2].encode()),
        Call("bad.json.nan", "/encode", text.replace("0.0", "NaN", 1).encode()),
        Call("bad.json.shape", "/encode", _j({"instances": one[:, :-1].copy()})),
        Call("bad.json.range", "/encode", _j({"instances": one * 0 + 2.0})),
        Call("bad.json.unknown-field", "/encode", _j({"instance": one})),
        Call("bad.json.duplicate-key", "/decode", b'{"latents": [[0.0]], "latents": [[1.0]]}'),
        Call("bad.decode.width", "/decode", _j({"latents": z[:, :-1].copy()})),
        Call("bad.sample.zero", "/sample", _j({"n": 0})),
        Call("bad.anomaly.samples", "/anomaly-score", _j({"instances": one, "samples": -1})),
        Call("bad.npy.garbage", "/encode", b"\x93NUMPY\x01\x00garbage", NPY),
        Call("bad.npy.nan", "/encode", _npy(nan_npy), NPY),
        Call("bad.npy.shape", "/encode", _npy(np.zeros((3, dim + 1), np.float32)), NPY),
        Call("bad.content-type", "/encode", b"instances=1", "text/plain"),
        Call("bad.v2.datatype", "/v2/models/vae/infer", _j({"inputs": [v2_bytes]})),
        Call("bad.v2.model", "/v2/models/nope/infer", _v2("instances", [1, dim], one)),
        Call("bad.no-key", "/encode", _j({"instances": one}), key=False),
    ]
    return (
        [c for _, c in weighted],
        [w for w, _ in weighted],
        [dataclasses.replace(c, bad=True) for c in bad],
    )


# -- outcomes ----------------------------------------------------------------------------------


class Outcome(Enum):
    OK = "ok"  # a good request answered 2xx with a sound body, or a bad one refused with 4xx
    BACKPRESSURE = "backpressure"  # 503 from the in-flight bound: retried, not an error
    ERROR = "error"


def classify(
    bad: bool, status: int, detail: str, problem: str | None = None
) -> tuple[Outcome, str]:
    """What one answer means for the verdict, and why when it is an error.

    `detail` is the answer's `detail` text (empty when none), `problem` what the body check
    found wrong with a 2xx answer to a good request.
    """
    if status == 503 and "VAE_MAX_IN_FLIGHT" in detail:
        return Outcome.BACKPRESSURE, ""
    if status >= 500:
        return Outcome.ERROR, f"{status}: {detail}"
    if bad:
        if 400 <= status < 500:
            return Outcome.OK, ""
        return Outcome.ERROR, f"a bad request got {status}, not a 4xx"
    if not 200 <= status < 300:
        return Outcome.ERROR, f"a good request got {status}: {detail}"
    if problem:
        return Outcome.ERROR, f"malformed answer: {problem}"
    return Outcome.OK, ""


@dataclasses.dataclass
class KindStats:
    requests: int = 0  # answers and drops, each retry counted
    statuses: Counter[int] = dataclasses.field(default_factory=Counter)
    backpressure: int = 0
    dropped: int = 0
    errors: int = 0  # answers that broke the contract (5xx included); drops are apart
    latencies_ms: list[float] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        lat = sorted(self.latencies_ms)
        return {
            "requests": self.requests,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "5xx": sum(v for k, v in self.statuses.items() if k >= 500),
            "backpressure_503": self.backpressure,
            "dropped": self.dropped,
            "errors": self.errors,
            "p50_ms": round(lat[len(lat) // 2], 2) if lat else None,
            "p99_ms": round(lat[int(len(lat) * 0.99)], 2) if lat else None,
        }


@dataclasses.dataclass
class Tally:
    """Everything counted in one phase (warm-up or load)."""

    kinds: dict[str, KindStats] = dataclasses.field(default_factory=dict)
    examples: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def stats(self, kind: str) -> KindStats:
        return self.kinds.setdefault(kind, KindStats())

    def example(self, kind: str, reason: str, t: float) -> None:
        if len(self.examples) < ERROR_EXAMPLES:
            self.examples.append({"t_s": round(t, 3), "kind": kind, "reason": reason[:300]})

    def totals(self) -> dict[str, int]:
        ks = self.kinds.values()
        total = {
            "requests": sum(k.requests for k in ks),
            "2xx": sum(v for k in ks for s, v in k.statuses.items() if 200 <= s < 300),
            "4xx": sum(v for k in ks for s, v in k.statuses.items() if 400 <= s < 500),
            "5xx": sum(v for k in ks for s, v in k.statuses.items() if s >= 500),
            "backpressure_503": sum(k.backpressure for k in ks),
            "dropped": sum(k.dropped for k in ks),
            "errors": sum(k.errors for k in ks),
            "bad_sent": sum(
                k.requests for name, k in self.kinds.items() if name.startswith("bad.")
            ),
        }
        # A backpressure 503 is counted among the 5xx statuses; the verdict's 5xx is the rest.
        total["5xx_not_backpressure"] = total["5xx"] - total["backpressure_503"]
        return total


# -- the verdict -------------------------------------------------------------------------------


def verdict(summary: dict[str, Any]) -> list[str]:
    """Every reason the soak fails; an empty list is a PASS."""
    failures = []
    for phase in ("warmup", "load"):
        t = summary[phase]["totals"]
        if t["5xx_not_backpressure"]:
            failures.append(f"{phase}: {t['5xx_not_backpressure']} answers were 5xx")
        if t["dropped"]:
            failures.append(f"{phase}: {t['dropped']} requests were dropped")
        if contract := t["errors"] - t["5xx_not_backpressure"]:
            failures.append(f"{phase}: {contract} other answers broke the contract (see examples)")
    load = summary["load"]["totals"]
    if load["requests"] == 0:
        failures.append("load: no request was answered")
    if load["bad_sent"] == 0:
        failures.append("load: no bad request was sent, so none was checked")
    for name in ("warmup_reload", "reload"):
        reload = summary.get(name)
        if reload is None and name == "warmup_reload":  # a soak with --warmup 0 has none
            continue
        reload = reload or {}
        label = name.replace("_", " ")
        if not reload.get("sha_changed"):
            why = f": {reload['problem']}" if reload.get("problem") else ""
            failures.append(f"{label}: /model's sha256 did not change{why}")
        if not reload.get("answers_changed"):
            failures.append(f"{label}: the same seeded /encode answered the same after it")
    rss = summary["rss"]
    if rss["ratio"] > RSS_LIMIT:
        failures.append(
            f"RSS grew {rss['ratio']:.3f}x after warm-up ({_mb(rss['after_warmup'])} -> "
            f"{_mb(rss['end'])} MB), over {RSS_LIMIT}x"
        )
    if not summary["ready_at_end"]:
        failures.append("the server was not ready at the end")
    return failures


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f}"


# -- the run -----------------------------------------------------------------------------------


class Soak:
    def __init__(
        self,
        args: argparse.Namespace,
        server: Server,
        model_path: Path,
        warmup_path: Path,
        next_path: Path,
    ) -> None:
        self.args = args
        self.server = server
        self.model_path = model_path
        self.warmup_path = warmup_path
        self.next_path = next_path
        self.warmup = Tally()
        self.load = Tally()
        self.rss: list[tuple[float, int]] = []
        self.reload: dict[str, Any] = {}  # the one under load, which the verdict checks
        self.warmup_reload: dict[str, Any] | None = None  # none without a warm-up
        self.warmed = asyncio.Event()  # the warm-up's reload is over
        self.t0 = 0.0
        self.load_from = 0.0  # monotonic time the load phase starts

    def tally(self, started: float) -> Tally:
        return self.warmup if started < self.load_from else self.load

    async def run(self) -> dict[str, Any]:
        args = self.args
        limits = httpx.Limits(
            max_connections=args.concurrency + 2, max_keepalive_connections=args.concurrency + 2
        )
        async with httpx.AsyncClient(
            base_url=self.server.url, timeout=CLIENT_TIMEOUT_S, limits=limits
        ) as client:
            info = (await client.get("/model", headers=_auth())).raise_for_status().json()
            manifest = info["manifest"]
            calls = build_calls(manifest["input_dim"], manifest["latent_dim"], seed=args.seed)
            probe = Call(
                "probe",
                "/encode",
                _j({"instances": mnist_like(1, manifest["input_dim"]), "seed": 7}),
            )
            rss_ready = self.server.rss_bytes()

            self.t0 = time.monotonic()
            self.load_from = self.t0 + args.warmup
            end = self.load_from + args.duration
            sampler = asyncio.create_task(self.sample_rss())
            reloader = asyncio.create_task(self.reloads(client, info["sha256"], probe))
            workers = [
                asyncio.create_task(
                    self.worker(client, *calls, random.Random(args.seed * 1000 + i), end)
                )
                for i in range(args.concurrency)
            ]
            await asyncio.sleep(max(0.0, self.load_from - time.monotonic()))
            await self.warmed.wait()  # a slow warm-up reload delays the base, never splits it
            rss_warm = self.server.rss_bytes()
            print(f"  warm-up done: RSS {_mb(rss_warm)} MB", flush=True)
            await asyncio.gather(*workers)
            rss_end = self.server.rss_bytes()
            await reloader
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
            try:
                ready = (await client.get("/ready")).status_code == 200
            except httpx.TransportError:
                ready = False

        peak = max([r for _, r in self.rss] + [rss_end])
        return {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "warmup": self.phase(self.warmup, args.warmup),
            "load": self.phase(self.load, args.duration),
            "warmup_reload": self.warmup_reload,
            "reload": self.reload,
            "rss": {
                "ready": rss_ready,
                "after_warmup": rss_warm,
                "end": rss_end,
                "peak": peak,
                "ratio": rss_end / rss_warm if rss_warm else math.inf,
                "samples": [[round(t, 2), r] for t, r in self.rss],
            },
            "ready_at_end": ready,
        }

    @staticmethod
    def phase(tally: Tally, seconds: float) -> dict[str, Any]:
        totals = tally.totals()
        return {
            "seconds": seconds,
            "totals": totals,
            "requests_per_s": round(totals["requests"] / seconds, 1) if seconds else None,
            "kinds": {k: v.as_dict() for k, v in sorted(tally.kinds.items())},
            "error_examples": tally.examples,
        }

    async def worker(
        self,
        client: httpx.AsyncClient,
        good: Sequence[Call],
        weights: Sequence[int],
        bad: Sequence[Call],
        rng: random.Random,
        end: float,
    ) -> None:
        while time.monotonic() < end:
            call = (
                rng.choice(bad)
                if rng.random() < self.args.bad_share
                else rng.choices(good, weights)[0]
            )
            await self.send(client, call)

    async def send(self, client: httpx.AsyncClient, call: Call) -> None:
        for _ in range(MAX_RETRIES + 1):
            started = time.monotonic()
            tally = self.tally(started)
            stats = tally.stats(call.kind)
            stats.requests += 1
            try:
                r = await client.request(
                    "POST" if call.body is not None else "GET",
                    call.path,
                    content=call.body,
                    headers=call.headers(),
                )
            except httpx.TransportError as e:  # connect, timeouts, a read cut off, protocol
                stats.dropped += 1
                tally.example(call.kind, f"dropped: {type(e).__name__}: {e}", started - self.t0)
                await asyncio.sleep(0.1)  # a dead server must not turn this into a busy loop
                return
            stats.latencies_ms.append((time.monotonic() - started) * 1000)
            stats.statuses[r.status_code] += 1
            outcome, reason = call.judge(r)
            if outcome is Outcome.BACKPRESSURE:
                stats.backpressure += 1
                await asyncio.sleep(min(1.0, float(r.headers.get("retry-after", "1"))))
                continue
            if outcome is Outcome.ERROR:
                stats.errors += 1
                tally.example(call.kind, reason, started - self.t0)
            return
        stats.errors += 1
        tally.example(call.kind, f"still refused after {MAX_RETRIES} retries", started - self.t0)

    async def sample_rss(self) -> None:
        while True:  # until cancelled, once the load is over
            self.rss.append((time.monotonic() - self.t0, self.server.rss_bytes()))
            await asyncio.sleep(1.0)

    async def reloads(self, client: httpx.AsyncClient, sha: str, probe: Call) -> None:
        """The warm-up's reload (when there is a warm-up), then the one under load."""
        if self.args.warmup > 0:
            at = self.t0 + min(1.0, self.args.warmup / 10)
            self.warmup_reload = await self.do_reload(client, sha, probe, self.warmup_path, at)
            sha = self.warmup_reload.get("served_sha256") or sha
        self.warmed.set()
        at = self.load_from + self.args.reload_at * self.args.duration
        self.reload = await self.do_reload(client, sha, probe, self.next_path, at)

    async def do_reload(
        self, client: httpx.AsyncClient, old_sha: str, probe: Call, path: Path, at: float
    ) -> dict[str, Any]:
        """At `at`, swap the artifact at `path` in at the model path, under load, and check it
        serves: /model's sha256 and a seeded answer must change."""
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        new_sha = hashlib.sha256(path.read_bytes()).hexdigest()
        t = time.monotonic()
        reload: dict[str, Any] = {
            "at_s": round(t - self.t0, 2),
            "old_sha256": old_sha,
            "new_sha256": new_sha,
        }
        try:
            before = await _answer(client, probe)
            rss_before = self.server.rss_bytes()
            os.replace(path, self.model_path)  # atomic: the server never reads half a file
            r = await client.post("/admin/reload", headers={"authorization": f"Bearer {ADMIN_KEY}"})
            took = time.monotonic() - t
            served = (await client.get("/model", headers=_auth())).json().get("sha256")
            after = await _answer(client, probe)
        except (httpx.HTTPError, ValueError) as e:  # a failed reload fails the soak, not the run
            reload["problem"] = f"{type(e).__name__}: {e}"
            print(f"  reload failed: {reload['problem']}", flush=True)
            return reload
        reload |= {
            "took_s": round(took, 3),
            # Loading a second model while the first serves raises the allocator's high-water
            # mark; these two figures show that step apart from any drift.
            "rss_before": rss_before,
            "rss_after": self.server.rss_bytes(),
            "status": r.status_code,
            "answer": r.text[:500],
            "served_sha256": served,
            "sha_changed": r.status_code == 200 and served == new_sha != old_sha,
            "answers_changed": after != before,
        }
        if not reload["sha_changed"]:
            reload["problem"] = f"reload answered {r.status_code}, /model says {served}"
        print(
            f"  reload at {reload['at_s']} s: {r.status_code} in {took:.2f} s, "
            f"sha {old_sha[:12]} -> {str(served)[:12]}",
            flush=True,
        )
        return reload


def _auth() -> dict[str, str]:
    return {"authorization": f"Bearer {API_KEY}"}


async def _answer(client: httpx.AsyncClient, call: Call) -> bytes:
    r = await client.post(call.path, content=call.body, headers=call.headers())
    r.raise_for_status()
    return r.content


def _detail(r: httpx.Response) -> str:
    if r.status_code < 400:
        return ""
    try:
        body = orjson.loads(r.content)
    except orjson.JSONDecodeError:
        return r.text[:200]
    # The service's errors are {"detail": ...}; V2's are {"error": ...}.
    return str(body.get("detail") or body.get("error") or "") if isinstance(body, dict) else ""


# -- report ------------------------------------------------------------------------------------


def print_report(summary: dict[str, Any], failures: list[str]) -> None:
    load = summary["load"]
    columns = ("requests", "2xx", "4xx", "5xx", "503bp", "drop", "err", "p50 ms", "p99 ms")
    print(f"\nload phase: {load['seconds']:g} s, {load['requests_per_s']} req/s")
    print("kind".ljust(24) + "".join(c.rjust(9) for c in columns))
    for kind, k in load["kinds"].items():
        st = {int(s): v for s, v in k["statuses"].items()}
        row = (
            k["requests"],
            sum(v for s, v in st.items() if 200 <= s < 300),
            sum(v for s, v in st.items() if 400 <= s < 500),
            k["5xx"] - k["backpressure_503"],
            k["backpressure_503"],
            k["dropped"],
            k["errors"],
            _ms(k["p50_ms"]),
            _ms(k["p99_ms"]),
        )
        print(kind.ljust(24) + "".join(str(v).rjust(9) for v in row))
    for phase in ("warmup", "load"):
        t = summary[phase]["totals"]
        print(
            f"{phase:<7} total: {t['requests']} requests, {t['2xx']} 2xx, {t['4xx']} 4xx "
            f"({t['bad_sent']} bad sent), {t['5xx_not_backpressure']} 5xx, "
            f"{t['backpressure_503']} backpressure 503, {t['dropped']} dropped, "
            f"{t['errors']} errors"
        )
    rss = summary["rss"]
    print(
        f"RSS: ready {_mb(rss['ready'])} MB, after warm-up {_mb(rss['after_warmup'])} MB, "
        f"end {_mb(rss['end'])} MB, peak {_mb(rss['peak'])} MB; "
        f"end/warm-up {rss['ratio']:.3f} (limit {RSS_LIMIT})"
    )
    for name in ("warmup_reload", "reload"):
        if rl := summary.get(name):
            print(
                f"{name.replace('_', ' ')}: at {rl.get('at_s')} s, {rl.get('status')} in "
                f"{rl.get('took_s')} s, RSS {_mb(rl.get('rss_before', 0))} -> "
                f"{_mb(rl.get('rss_after', 0))} MB, sha changed: {rl.get('sha_changed')}, "
                f"answers changed: {rl.get('answers_changed')}"
            )
    for ex in summary["load"]["error_examples"][:5] + summary["warmup"]["error_examples"][:5]:
        print(f"  error at {ex['t_s']} s, {ex['kind']}: {ex['reason']}")
    print("\nPASS" if not failures else "\nFAIL:\n  " + "\n  ".join(failures))


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description="Soak the service: mixed load with bad requests and a reload in the "
        "middle; checks for 5xx, dropped requests and RSS growth.",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=600.0,
        help="seconds of load after the warm-up (default: 600)",
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=10.0,
        help="seconds of the same load before RSS is taken as the base (default: 10)",
    )
    p.add_argument(
        "--concurrency", type=int, default=8, help="concurrent client workers (default: 8)"
    )
    p.add_argument(
        "--reload-at",
        type=float,
        default=0.5,
        help="when to reload, as a fraction of --duration (default: 0.5)",
    )
    p.add_argument(
        "--bad-share",
        type=float,
        default=0.02,
        help="share of deliberately bad requests (default: 0.02)",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the mix and the bodies (default: 0)")
    p.add_argument(
        "--out",
        type=Path,
        default=REPO / "build" / "soak.json",
        help="the JSON summary (default: build/soak.json); the server log goes beside it",
    )
    args = p.parse_args(argv)
    if args.duration <= 0 or args.warmup < 0 or args.concurrency < 1:
        p.error("--duration must be > 0, --warmup >= 0 and --concurrency >= 1")
    if not 0.0 <= args.reload_at < 1.0 or not 0.0 <= args.bad_share <= 1.0:
        p.error("--reload-at must be in [0, 1) and --bad-share in [0, 1]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vae-soak-") as tmp:
        model_path = build_artifact(Path(tmp) / "vae.pt", seed=args.seed)
        # Built now, not at reload time: the client should not run torch during the load.
        warmup_path = build_artifact(Path(tmp) / "vae-warmup.pt", seed=args.seed + 1)
        next_path = build_artifact(Path(tmp) / "vae-next.pt", seed=args.seed + 2)
        port = free_port()
        env = {
            "VAE_MODEL_PATH": str(model_path),
            "VAE_API_KEYS": API_KEY,
            "VAE_ADMIN_KEYS": ADMIN_KEY,
            "VAE_LOG_LEVEL": "warning",
            "VAE_REQUEST_TIMEOUT_S": str(SERVER_TIMEOUT_S),
        }
        server = Server(
            "soak-server",
            "app.main:create_app",
            SERVICE_STACK,
            port=port,
            ready_path="/ready",
            env=env,
            log_dir=args.out.parent,
        )
        print(
            f"soak: {args.warmup:g} s warm-up + {args.duration:g} s load, "
            f"{args.concurrency} workers, reload at {args.reload_at:.0%}",
            flush=True,
        )
        try:
            with server:
                print(f"  server up on port {port} in {server.startup_s:.1f} s", flush=True)
                summary = asyncio.run(Soak(args, server, model_path, warmup_path, next_path).run())
        except ServerError as e:
            print(f"FAIL: the server did not start: {e}", file=sys.stderr)
            return 1
    failures = verdict(summary)
    summary["verdict"] = "PASS" if not failures else "FAIL"
    summary["failures"] = failures
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print_report(summary, failures)
    print(f"summary: {args.out}; server log: {server.log}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
