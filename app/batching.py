"""Dynamic micro-batching: one inference thread per device merges concurrent requests.

Handlers submit a job and await it; the inference thread takes the oldest job, gathers queued
jobs with the same key (the same model, operation and options) until `max_batch_size` instances or
`max_delay` has passed, runs the model once, and hands each job its rows back.

Seeded jobs are never merged: oneDNN's matrix kernels round a row differently depending on how
many rows share the call, so a seeded answer must always be computed alone to stay
byte-identical. Unseeded jobs, where no such promise exists, are the ones that batch.

A job whose request has gone (timed out, or the client hung up) before its turn is dropped
unrun, so a backlog of abandoned work cannot keep the thread busy.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

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
        on_batch: Callable[[str, int, float, list[float]], None] | None = None,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.on_batch = on_batch  # (operation, rows, seconds, each job's wait): the metrics
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._held: collections.deque[_Job | None] = collections.deque()  # taken, not yet run
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # rows per forward

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    async def submit(self, key: Hashable | None, x: Array, op: Op, name: str) -> Outputs:
        """Run `op` on `x` (B, ...), merged with other jobs of the same `key` when not None.
        `name` labels the job's metrics (the operation: encode, decode, ...)."""
        loop = asyncio.get_running_loop()
        job = _Job(key, name, x, op, loop.create_future(), loop)
        self._queue.put(job)
        return await job.future

    # -- the inference thread ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            job = self._held.popleft() if self._held else self._queue.get()
            if job is None:
                return
            if job.future.cancelled():  # read across threads: at worst one job runs in vain
                continue
            batch = self._gather(job)
            self._execute(batch)

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
        xs = [job.x for job in batch]
        start = time.perf_counter()
        try:
            out = batch[0].op(np.concatenate(xs) if len(xs) > 1 else xs[0])
        except Exception as e:  # delivered to each waiting request, which maps it to HTTP
            for job in batch:
                job.loop.call_soon_threadsafe(_set_exception, job.future, e)
            return
        n_rows = sum(len(x) for x in xs)
        self.batch_sizes[n_rows] += 1
        if self.on_batch is not None:
            waits = [start - job.queued_at for job in batch]
            self.on_batch(batch[0].name, n_rows, time.perf_counter() - start, waits)
        bounds = np.cumsum([len(x) for x in xs])[:-1]
        parts = {name: np.split(value, bounds) for name, value in out.items()}
        for i, job in enumerate(batch):
            rows = {name: parts[name][i] for name in out}
            job.loop.call_soon_threadsafe(_set_result, job.future, rows)


def _set_result(future: asyncio.Future[Outputs], value: Outputs) -> None:
    if not future.done():  # the client may have gone away
        future.set_result(value)


def _set_exception(future: asyncio.Future[Outputs], exc: Exception) -> None:
    if not future.done():
        future.set_exception(exc)
