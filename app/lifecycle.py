"""The process's serving life: load (and reload) the model, drain on SIGTERM, reload on SIGHUP.

Reload swaps the default model's versions in the repository (app/repository.py) in one
assignment. A request takes its model once, at its start (the `get_vae` dependency), and the
batcher keys jobs by model too, so requests in flight finish on the model they started with
while new ones get the new model.

Drain: uvicorn on its own would stop listening at SIGTERM, so a request arriving then would
find the port closed. We first keep serving, answer new model requests with 503 (callers and
balancers retry elsewhere), let the accepted ones finish, and only then hand the signal to
uvicorn, leaving it a short grace for what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

from fastapi import FastAPI

from app.errors import VAEServiceError
from app.repository import ModelRepository
from app.settings import Settings
from app.workers import Siblings
from scoring.artifact import ModelLoadError

log = logging.getLogger(__name__)

Handler = Callable[[int, FrameType | None], Any] | int | None


@dataclass
class Lifecycle:
    """Serving state shared by the middleware, the routes and the signal handlers."""

    in_flight: int = 0  # model requests accepted and not yet answered
    draining: bool = False


@dataclass(frozen=True)
class Reloaded:
    sha256: str
    previous_sha256: str


def uvicorn_grace_s(settings: Settings) -> int:
    """What uvicorn gets after our drain, within VAE_SHUTDOWN_TIMEOUT_S: a tenth, 1 to 2 s
    (uvicorn counts whole seconds)."""
    return max(1, min(2, round(settings.shutdown_timeout_s / 10)))


async def reload_model(app: FastAPI, expected_sha256: str | None = None) -> Reloaded:
    """Load the default model again (VAE_MODEL_PATH, or its versions in the repository) and
    swap it in; a refusal leaves the old one serving. Reloads coalesce, and a file whose sha256
    is the one serving returns at once (app/repository.py)."""
    models: ModelRepository = app.state.models
    if models.default is None:
        raise ModelLoadError("this server has no default model to reload (VAE_DEFAULT_MODEL)")
    swap = await models.load(models.default, expected_sha256, one_worker=False)
    if app.state.siblings is not None:
        app.state.siblings.record(swap.sha256)
    return Reloaded(swap.sha256, swap.previous_sha256 or swap.sha256)


async def reload_siblings(
    app: FastAPI, sha256: str, wait_s: float = 60.0, *, ask: bool = True
) -> tuple[int, int]:
    """After this worker reloaded: the other workers' turn (app/workers.py). Waits until all
    serve `sha256`, or `wait_s`; returns (workers serving it, workers). With `ask` false (the
    file was unchanged) nobody is signalled; the count says who serves it already."""
    siblings: Siblings | None = app.state.siblings
    if siblings is None:
        return 1, 1
    if not ask:
        serving = siblings.serving()
        return sum(sha == sha256 for sha in serving.values()), len(serving)
    siblings.ask_others_to_reload(sha256)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        serving = siblings.serving()
        done = sum(sha == sha256 for sha in serving.values())
        if done == len(serving) or loop.time() > deadline:
            return done, len(serving)
        await asyncio.sleep(0.05)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter, from <malloc.h>
MMAP_THRESHOLD = 1 << 20


def fix_mmap_threshold() -> None:
    """Serve every allocation of 1 MiB or more from its own mmap, as glibc's default did until
    its first free of one: glibc then raises the threshold to the freed size (up to 32 MiB), and
    from there on a model's weights and the warm-up's tensors come from the malloc arenas,
    where a reload's frees leave holes that the next load only partly reuses (docs/operations.md
    has the figures: CI's soak went from 1.09-1.10 times its base RSS to 1.04). Requests'
    tensors (a 64-row batch is 200 KB) stay below it, in the arenas, where they are cheap to
    allocate. An operator's MALLOC_MMAP_THRESHOLD_ wins: glibc read it at start-up, so we
    leave it be."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc: its own allocator's policy
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def install_signal_handlers(app: FastAPI) -> None:
    """SIGTERM drains, SIGHUP reloads. Only in the main thread (signals are delivered there;
    a test client that runs the lifespan elsewhere simply gets neither)."""
    if threading.current_thread() is not threading.main_thread():
        return
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()  # the loop keeps only weak references to tasks

    def spawn(coro_fn: Callable[[], Any]) -> None:
        def start() -> None:
            task = loop.create_task(coro_fn())
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        loop.call_soon_threadsafe(start)

    uvicorn_exit = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda sig, frame: spawn(lambda: _drain(app, uvicorn_exit, sig)))
    signal.signal(signal.SIGHUP, lambda sig, frame: spawn(lambda: _reload_on_signal(app)))


async def _drain(app: FastAPI, then: Handler, sig: int) -> None:
    lifecycle: Lifecycle = app.state.lifecycle
    if lifecycle.draining:
        return
    lifecycle.draining = True
    settings: Settings = app.state.settings
    budget = settings.shutdown_timeout_s - uvicorn_grace_s(settings)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget
    log.info("SIGTERM: draining %d request(s) in flight, for at most %g s",
             lifecycle.in_flight, budget)  # fmt: skip
    while lifecycle.in_flight and loop.time() < deadline:
        await asyncio.sleep(0.02)
    if lifecycle.in_flight:
        log.warning("drain timed out with %d request(s) in flight", lifecycle.in_flight)
    if callable(then):  # uvicorn's own handler: stop listening, close connections, exit
        then(sig, None)
    else:  # not under uvicorn: take the signal's default action
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)


async def _reload_on_signal(app: FastAPI) -> None:
    siblings: Siblings | None = app.state.siblings
    expected = siblings.expected_sha256() if siblings is not None else None
    try:
        await reload_model(app, expected)
    except (ModelLoadError, VAEServiceError) as e:
        log.error("SIGHUP reload refused, the old model keeps serving: %s", e)
