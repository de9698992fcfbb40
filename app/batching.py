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

Cheap work runs where it arrives: on the event loop, in batches formed there. A job whose
estimated cost is at most `inline_max_s` joins the loop's gathering, and the first such job
schedules one flush with `call_soon`. The flush lets the loop turn while requests already at
the socket are read and join it (see `_flush`), so none waits for company that is not already
there. It runs each key's jobs as one forward pass (seeded jobs alone) when that pass's
estimated cost is within `inline_max_s`; a costlier batch goes to the thread, merged. For a
one-instance `encode` (tens of microseconds of model time) the hand-off to the thread and back
(100 to 200 microseconds in CPython) costs more than the work, and the two threads took turns
on the GIL. Costly work, such as an `/anomaly-score` with many samples, goes to the thread as
before, so the loop is held no longer than the threshold and /health answers at once beside
it.
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
Cost = Callable[[int], float]  # estimated seconds of one forward pass over so many rows
# Turns of the event loop a flush lets pass at most while requests keep joining (_flush).
FLUSH_MAX_TURNS = 8


@dataclass
class _Job:
    key: Hashable | None  # None: run alone
    name: Any  # what labels its metrics (the operation, the model, its version), passed as is
    x: Array
    op: Op
    future: asyncio.Future[Outputs]
    loop: asyncio.AbstractEventLoop
    cost: Cost
    queued_at: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(
        self,
        max_batch_size: int,
        max_delay_s: float,
        name: str = "inference",
        on_batch: Callable[[Any, int, float, list[float], bool], None] | None = None,
        inline_max_s: float = 0.0,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        # A batching window (max_delay_s > 0) asks jobs to wait for company: none runs inline.
        self.inline_max_s = inline_max_s if max_delay_s == 0 else -1.0
        # (operation, rows, seconds, each job's wait, ran inline): the metrics
        self.on_batch = on_batch
        self._gathering: list[_Job] = []  # cheap jobs of this loop iteration, for the flush
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
        self, key: Hashable | None, x: Array, op: Op, name: Any, cost: Cost | None = None
    ) -> Outputs:
        """Run `op` on `x` (B, ...), merged with other jobs of the same `key` when not None;
        on the event loop when its estimated `cost` (seconds for a pass over so many rows; none:
        infinite) is within `inline_max_s` (module doc).
        `name` labels the job's metrics, handed to `on_batch` as given (the service's: the
        operation, the model and its version)."""
        loop = asyncio.get_running_loop()
        job = _Job(key, name, x, op, loop.create_future(), loop, cost or _unknown)
        if job.cost(len(x)) <= self.inline_max_s:
            if not self._gathering:
                loop.call_soon(self._flush, 0, 0)
            self._gathering.append(job)
        else:
            self._queue.put(job)
        return await job.future

    def _flush(self, turns: int, seen: int) -> None:
        """Run what the loop gathered: per key, in order of arrival, batches of at most
        `max_batch_size` rows, on the loop when a batch's estimated cost is within
        `inline_max_s`, else merged on the thread. Seeded jobs (no key) run alone.

        It first lets the loop go round: one turn polls the sockets, the next runs the
        requests found there up to `submit`, so requests that had arrived, only not yet read,
        join the batch. It goes round again while the last turns brought more (at most
        FLUSH_MAX_TURNS). No turn waits for anything: with callbacks ready, the loop polls
        the sockets without blocking."""
        n = len(self._gathering)
        if turns < FLUSH_MAX_TURNS and (turns < 2 or n > seen) and n < self.max_batch_size:
            asyncio.get_running_loop().call_soon(self._flush, turns + 1, n)
            return
        jobs, self._gathering = self._gathering, []
        groups: dict[Hashable, list[_Job]] = {}
        for i, job in enumerate(jobs):
            if not job.future.cancelled():
                groups.setdefault(job.key if job.key is not None else (None, i), []).append(job)
        for group in groups.values():
            batch: list[_Job] = []
            rows = 0
            for job in group:
                if batch and rows + len(job.x) > self.max_batch_size:
                    self._run_gathered(batch, rows)
                    batch, rows = [], 0
                batch.append(job)
                rows += len(job.x)
            self._run_gathered(batch, rows)

    def _run_gathered(self, batch: list[_Job], rows: int) -> None:
        # One key, so one operation with one set of options: the first job's cost is theirs.
        if batch[0].cost(rows) <= self.inline_max_s:
            try:
                self._execute(batch, inline=True)
            except Exception as e:  # ours, not the model's: the requests fail, the loop goes on
                log.exception("an inline batch failed outside the model")
                for job in batch:
                    _set_exception(job.future, e)
        else:  # consecutive in the queue with one key: the thread merges them again
            for job in batch:
                self._queue.put(job)

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

    def _execute(self, batch: list[_Job], inline: bool = False) -> None:
        """One forward pass for the batch, each job's rows delivered to it, on the inference
        thread or (`inline`) the event loop. When a merged pass fails, each job runs again
        alone, so one bad request fails only itself."""
        deliver = _deliver_here if inline else _deliver
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
                        self._execute([job], inline)
                return
            deliver(batch[0], _set_exception, e)
            return
        n_rows = sum(len(x) for x in xs)
        self.batch_sizes[n_rows] += 1
        if self.on_batch is not None:
            waits = [start - job.queued_at for job in batch]
            try:
                self.on_batch(batch[0].name, n_rows, time.perf_counter() - start, waits, inline)
            except Exception:  # the metrics must never cost a request its answer
                log.exception("recording a batch's metrics failed")
        for i, job in enumerate(batch):
            deliver(job, _set_result, {name: parts[name][i] for name in out})


def _deliver(job: _Job, setter: Callable[[asyncio.Future[Outputs], Any], None], value: Any) -> None:
    # RuntimeError: the event loop has closed (shutdown), so nobody is waiting any more.
    with contextlib.suppress(RuntimeError):
        job.loop.call_soon_threadsafe(setter, job.future, value)


def _unknown(rows: int) -> float:
    return math.inf


def _deliver_here(
    job: _Job, setter: Callable[[asyncio.Future[Outputs], Any], None], value: Any
) -> None:
    setter(job.future, value)  # on the loop already


def _set_result(future: asyncio.Future[Outputs], value: Outputs) -> None:
    if not future.done():  # the client may have gone away
        future.set_result(value)


def _set_exception(future: asyncio.Future[Outputs], exc: Exception) -> None:
    if not future.done():
        future.set_exception(exc)
