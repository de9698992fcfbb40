"""`python -m tests.gated_app`: the real service, exactly as `python -m app` runs it, with three
test-only controls, so that no verdict about timeouts, overload, drain, reload or inline work
depends on how fast the machine is.

- **A gate.** While the file named by TEST_GATE exists, every model call waits before it runs
  (in the inference thread). A test closes the gate, sends requests that then stay in flight
  for as long as it needs, checks what it wants, and opens the gate again.
- **A call log.** Each model call appends one line, `<operation> <rows>`, to the file named by
  TEST_CALLS when it reaches the gate, so a test knows a job really started (or never did).
- **Fixed costs.** With TEST_ROW_COST_S, the per-row costs that warm-up would time are set to
  that many seconds instead, so whether a job runs inline is arithmetic, not a measurement.
- **A load gate.** While the file named by TEST_LOAD_GATE exists, a warm-up (a reload's, once
  the server serves) waits before it starts, and logs `warm_up` to TEST_CALLS when it gets
  there: a reload stays in progress for as long as a test needs.

Warm-up (at start and at every reload) passes the gate and is not logged as a model call. With the gate in use
keep VAE_INLINE_MAX_MS=0 (the default here): a gated job run inline would hold the event loop.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.__main__ import main
from app.costs import Costs
from app.model import VAEService

GATE = Path(os.environ["TEST_GATE"]) if "TEST_GATE" in os.environ else None
CALLS = Path(os.environ["TEST_CALLS"]) if "TEST_CALLS" in os.environ else None
ROW_COST_S = float(os.environ["TEST_ROW_COST_S"]) if "TEST_ROW_COST_S" in os.environ else None
LOAD_GATE = Path(os.environ["TEST_LOAD_GATE"]) if "TEST_LOAD_GATE" in os.environ else None
_warming = threading.local()
_log_lock = threading.Lock()


def log_call(line: str) -> None:
    if CALLS is not None:
        with _log_lock, CALLS.open("a") as log:
            log.write(f"{line}\n")


def wait_while(gate: Path | None) -> None:
    while gate is not None and gate.exists():
        time.sleep(0.002)


def gated(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(self: VAEService, *args: Any, **kwargs: Any) -> Any:
        if not getattr(_warming, "on", False):
            log_call(f"{name} {len(args[0]) if name != 'sample' else args[0]}")
            wait_while(GATE)
        return method(self, *args, **kwargs)

    return call


def warming(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(self: VAEService, *args: Any, **kwargs: Any) -> Any:
        if LOAD_GATE is not None and LOAD_GATE.exists():
            log_call("warm_up")
            wait_while(LOAD_GATE)
        _warming.on = True
        try:
            return method(self, *args, **kwargs)
        finally:
            _warming.on = False

    return call


def fixed_costs(vae: VAEService, repeats: int = 21) -> Costs:
    assert ROW_COST_S is not None
    return Costs(0.0, ROW_COST_S, 0.0, ROW_COST_S, ROW_COST_S)


for _name in ("encode", "decode", "sample", "anomaly_scores"):
    setattr(VAEService, _name, gated(_name, getattr(VAEService, _name)))
VAEService.warm_up = warming(VAEService.warm_up)  # type: ignore[method-assign]
if ROW_COST_S is not None:
    Costs.measure = fixed_costs  # type: ignore[method-assign,assignment]
os.environ.setdefault("VAE_INLINE_MAX_MS", "0")

if __name__ == "__main__":
    main()
