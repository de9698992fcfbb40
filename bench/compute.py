"""The compute floor: TorchScript `encode` in this process, no HTTP, no JSON."""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from bench.artifact import Array
from bench.servers import machine_busy_seconds

# The profiling executor specialises a TorchScript graph after its first calls; time after.
_WARMUP_CALLS = 5


@dataclass(frozen=True)
class ComputeResult:
    batch: int
    calls: int
    seconds: float
    calls_per_s: float
    images_per_s: float
    mean_ms: float
    p50_ms: float
    p99_ms: float
    torch_threads: int
    own_cores: float  # this process's CPU while timing: about torch_threads when undisturbed
    other_cores: float  # everyone else's: torch's threads wait for each other when it is high

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def encode_throughput(module: torch.jit.ScriptModule, x: Array, seconds: float) -> ComputeResult:
    """Call `module.encode` on the batch `x` back to back for about `seconds`."""
    xt = torch.from_numpy(x)
    times: list[float] = []
    with torch.no_grad():
        for _ in range(_WARMUP_CALLS):
            module.encode(xt)
        busy0, own0 = machine_busy_seconds(), _own_cpu()
        start = time.perf_counter()
        end = start + seconds
        now = start
        while now < end:
            module.encode(xt)
            t = time.perf_counter()
            times.append(t - now)
            now = t
        busy1, own1 = machine_busy_seconds(), _own_cpu()
    elapsed = now - start
    own = own1 - own0
    per_call = np.array(times)
    return ComputeResult(
        batch=len(x),
        calls=len(times),
        seconds=elapsed,
        calls_per_s=len(times) / elapsed,
        images_per_s=len(times) * len(x) / elapsed,
        mean_ms=float(per_call.mean() * 1e3),
        p50_ms=float(np.percentile(per_call, 50) * 1e3),
        p99_ms=float(np.percentile(per_call, 99) * 1e3),
        torch_threads=torch.get_num_threads(),
        own_cores=own / elapsed,
        other_cores=max(0.0, (busy1 - busy0) - own) / elapsed,
    )


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
