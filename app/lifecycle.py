"""The process's serving life: load (and reload) the model, drain on SIGTERM, reload on SIGHUP.

Reload swaps `app.state.vae` in one assignment. A request takes its model once, at its start
(the `get_vae` dependency), and the batcher keys jobs by model too, so requests in flight
finish on the model they started with while new ones get the new model.

Drain: uvicorn on its own would stop listening at SIGTERM, so a request arriving then would
find the port closed. We first keep serving, answer new model requests with 503 (callers and
balancers retry elsewhere), let the accepted ones finish, and only then hand the signal to
uvicorn, leaving it a short grace for what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import hashlib
import logging
import os
import signal
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from app.errors import ModelLoadError
from app.model import VAEService
from app.settings import Settings
from app.workers import Siblings

log = logging.getLogger(__name__)

Handler = Callable[[int, FrameType | None], Any] | int | None


@dataclass
class Lifecycle:
    """Serving state shared by the middleware, the routes and the signal handlers."""

    in_flight: int = 0  # model requests accepted and not yet answered
    draining: bool = False
    reloading: asyncio.Future[Reloaded] | None = None  # the reload in progress, if any


@dataclass(frozen=True)
class Reloaded:
    sha256: str
    previous_sha256: str


def uvicorn_grace_s(settings: Settings) -> int:
    """What uvicorn gets after our drain, within VAE_SHUTDOWN_TIMEOUT_S: a tenth, 1 to 2 s
    (uvicorn counts whole seconds)."""
    return max(1, min(2, round(settings.shutdown_timeout_s / 10)))


def load_model(settings: Settings, expected_sha256: str | None = None) -> VAEService:
    """Load, check the pin (or the sha256 a sibling worker loaded), and warm up every batch
    size, before anyone is served by it."""
    pin = expected_sha256 or settings.model_sha256
    vae = VAEService.load(settings.model_path, settings.device, pin)
    vae.warm_up(settings.max_batch_size)
    return vae


async def reload_model(app: FastAPI, expected_sha256: str | None = None) -> Reloaded:
    """Load VAE_MODEL_PATH again and swap it in; a ModelLoadError leaves the old one serving.

    Reloads coalesce: one asked while another runs gets that one's outcome (ask again after it
    to pick up a file replaced meanwhile), so a burst of reloads costs one load. A file whose
    sha256 is the one serving returns at once, without a load or a warm-up."""
    lifecycle: Lifecycle = app.state.lifecycle
    if lifecycle.reloading is None:
        lifecycle.reloading = asyncio.ensure_future(_reload(app, expected_sha256))
        lifecycle.reloading.add_done_callback(lambda _: setattr(lifecycle, "reloading", None))
    # Shielded: a caller that goes away does not cancel the reload the others wait for.
    return await asyncio.shield(lifecycle.reloading)


async def _reload(app: FastAPI, expected_sha256: str | None) -> Reloaded:
    settings: Settings = app.state.settings
    old: VAEService = app.state.vae
    previous = old.sha256
    current = await run_in_threadpool(file_sha256, settings.model_path)
    if current == previous and expected_sha256 in (None, current):
        log.info("reload: %s is unchanged (sha256 %s)", settings.model_path, current)
        return Reloaded(current, previous)
    new = await run_in_threadpool(load_model, settings, expected_sha256)
    app.state.vae = new
    app.state.metrics.set_model(new)
    app.openapi_schema = None  # its examples are sized to the model
    if app.state.siblings is not None:
        app.state.siblings.record(new.sha256)
    # Loading and warming up ran on a pool thread, whose malloc arena keeps what torch freed
    # there; hand it back to the OS, or each reload would leave RSS a step higher. Requests
    # still in flight hold the old model, which is freed only when the last of them ends:
    # hand its memory back then too (in whichever thread drops it; malloc_trim is safe there).
    weakref.finalize(old, _trim_heap)
    del old
    gc.collect()
    _trim_heap()
    log.info("reloaded %s: sha256 %s (was %s)", settings.model_path, new.sha256, previous)
    return Reloaded(new.sha256, previous)


def file_sha256(path: Path) -> str | None:
    """The file's sha256, or None when it cannot be read (the load then says why)."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


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


def _trim_heap() -> None:
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim this way
        ctypes.CDLL("libc.so.6").malloc_trim(0)


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
    except ModelLoadError as e:
        log.error("SIGHUP reload refused, the old model keeps serving: %s", e)
