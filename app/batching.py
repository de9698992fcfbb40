"""Dynamic micro-batching: one inference thread per device merges concurrent requests.

Handlers submit a job and await it; the inference thread takes the oldest job, gathers queued
jobs with the same key (the same model, operation and options) until `max_batch_size` instances or
`max_delay` has passed, runs the model once, and hands each job its rows back.

Seeded jobs are never merged: oneDNN's matrix kernels round a row differently depending on how
many rows share the call, so a seeded answer must always be computed alone to stay
byte-identical. Unseeded jobs, where no such promise exists, are the ones that batch.

A job whose request has gone (timed out, or the client hung up: the Guard cancels it) before
its turn is dropped unrun, so a backlog of abandoned work cannot keep the thread busy. Nothing
a batch raises stops the thread: a model error goes to the requests (each job of a merged
batch then runs alone, so one bad request fails only itself), anything else is logged.

Cheap work runs where it arrives. A job whose estimated cost is at most `inline_max_s`, when
it is the server's only request and the inference thread is idle, runs at once on the event
loop: for a one-instance `encode` (tens of microseconds of model time) the hand-off to the
thread and back costs more than the work, and the two threads' turns on the GIL kept a process
near 1.3 cores. It runs alone, as a seeded job does, so seeded answers stay byte-identical; and
it is short by construction, so the loop is held no longer than the threshold. Anything costlier, or
arriving beside other requests, goes to the thread as before, where concurrent jobs merge.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.common import Array

log = logging.getLogger(__name__)

Outputs = dict[str, Array]  # every array has one row per instance
Op = Callable[[Array], Outputs]


@dataclass
class _Job:
    key: Hashable | None  # None: run alone
    name: str  # the operation, for the metrics
    x: Array
    op: Op
    future: asyncio.Future[Outputs]
    loop: asyncio.AbstractEventLoop
    queued_at: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(
        self,
        max_batch_size: int,
        max_delay_s: float,
        name: str = "inference",
        on_batch: Callable[[str, int, float, list[float], bool], None] | None = None,
        inline_max_s: float = 0.0,
        in_flight: Callable[[], int] | None = None,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        # A batching window (max_delay_s > 0) asks jobs to wait for company: none runs inline.
        self.inline_max_s = inline_max_s if max_delay_s == 0 else -1.0
        # Requests the server holds (the Guard counts them): inline only for the only one.
        self.in_flight = in_flight or (lambda: 1)
        # (operation, rows, seconds, each job's wait, ran inline): the metrics
        self.on_batch = on_batch
        self._busy = False  # the inference thread is running a batch
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._held: collections.deque[_Job | None] = collections.deque()  # taken, not yet run
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # rows per forward

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    async def submit(
        self, key: Hashable | None, x: Array, op: Op, name: str, cost_s: float = math.inf
    ) -> Outputs:
        """Run `op` on `x` (B, ...), merged with other jobs of the same `key` when not None;
        inline, alone, when its estimated `cost_s` is within `inline_max_s` and `idle()`.
        `name` labels the job's metrics (the operation: encode, decode, ...)."""
        if cost_s <= self.inline_max_s:
            # One turn of the loop first: requests already read get to the Guard and count as
            # in flight, so a lone request runs inline and a crowd goes to the thread to merge.
            await asyncio.sleep(0)
            if self.idle():
                return self._inline(x, op, name)
        loop = asyncio.get_running_loop()
        job = _Job(key, name, x, op, loop.create_future(), loop)
        self._queue.put(job)
        return await job.future

    def idle(self) -> bool:
        """No other request in flight, and nothing queued, held or running (read across
        threads: a job that slips in between runs beside an inline one, which is safe, merely
        not merged). With company, jobs go to the thread, where they merge: run one by one
        inline, sixteen concurrent one-instance requests lost a fifth of their throughput
        (docs/performance.md)."""
        return self.in_flight() <= 1 and not self._busy and not self._held and self._queue.empty()

    def _inline(self, x: Array, op: Op, name: str) -> Outputs:
        start = time.perf_counter()
        out = op(x)
        self.batch_sizes[len(x)] += 1
        if self.on_batch is not None:
            self.on_batch(name, len(x), time.perf_counter() - start, [0.0], True)
        return out

    # -- the inference thread ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            job = self._held.popleft() if self._held else self._queue.get()
            if job is None:
                return
            if job.future.cancelled():  # read across threads: at worst one job runs in vain
                continue
            self._busy = True
            try:
                self._execute(self._gather(job))
            except Exception:  # not the model's (those go to the requests): ours; keep serving
                log.exception("the inference thread caught an error outside the model; it goes on")
            finally:
                self._busy = False

    def _gather(self, first: _Job) -> list[_Job]:
        batch, rows = [first], len(first.x)
        if first.key is None:
            return batch
        deadline = first.queued_at + self.max_delay_s
        while rows < self.max_batch_size:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                break
            if job is None:
                self._held.append(job)  # stop after this batch
                break
            if job.future.cancelled():
                continue
            if job.key == first.key and rows + len(job.x) <= self.max_batch_size:
                batch.append(job)
                rows += len(job.x)
            else:
                self._held.append(job)  # keeps its place for the next round
                break
        return batch

    def _execute(self, batch: list[_Job]) -> None:
        """One forward pass for the batch, each job's rows delivered to it. When a merged
        pass fails, each job runs again alone, so one bad request fails only itself."""
        xs = [job.x for job in batch]
        start = time.perf_counter()
        try:
            out = batch[0].op(np.concatenate(xs) if len(xs) > 1 else xs[0])
            bounds = np.cumsum([len(x) for x in xs])[:-1]
            parts = {name: np.split(value, bounds) for name, value in out.items()}
        except Exception as e:  # delivered to the waiting request, which maps it to HTTP
            if len(batch) > 1:
                for job in batch:
                    if not job.future.cancelled():
                        self._execute([job])
                return
            _deliver(batch[0], _set_exception, e)
            return
        n_rows = sum(len(x) for x in xs)
        self.batch_sizes[n_rows] += 1
        if self.on_batch is not None:
            waits = [start - job.queued_at for job in batch]
            try:
                self.on_batch(batch[0].name, n_rows, time.perf_counter() - start, waits, False)
            except Exception:  # the metrics must never cost a request its answer
                log.exception("recording a batch's metrics failed")
        for i, job in enumerate(batch):
            _deliver(job, _set_result, {name: parts[name][i] for name in out})


def _deliver(job: _Job, setter: Callable[[asyncio.Future[Outputs], Any], None], value: Any) -> None:
    # RuntimeError: the event loop has closed (shutdown), so nobody is waiting any more.
    with contextlib.suppress(RuntimeError):
        job.loop.call_soon_threadsafe(setter, job.future, value)


def _set_result(future: asyncio.Future[Outputs], value: Outputs) -> None:
    if not future.done():  # the client may have gone away
        future.set_result(value)


def _set_exception(future: asyncio.Future[Outputs], exc: Exception) -> None:
    if not future.done():
        future.set_exception(exc)
