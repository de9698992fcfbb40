"""Prometheus metrics, request ids and one structured log line per request.

The metrics live in a registry of each app's own (not prometheus-client's global one), so
several apps in one process (tests) never collide. Every latency is a histogram, so p99 can
be combined across replicas. With several uvicorn workers each process keeps its own figures
and a scrape reaches one of them; run one worker per container to scrape them all.

`Observe` is the outermost middleware but CORS: it sees every answer, including the Guard's
refusals, gives each request an id (the caller's `X-Request-ID` when it is sane, else a new
one), echoes it, and logs one line without bodies, keys or query strings.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import secrets
import time
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    multiprocess,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.common import CLIENT_GONE, Array
from app.model import VAEService
from app.workers import PROMETHEUS_ENV

log = logging.getLogger("app.access")

# From 1 ms to 30 s: an encode of one image is about a millisecond, a big K a few seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0)  # fmt: skip
PERCENTILE_BUCKETS = (*(round(0.05 * i, 2) for i in range(1, 20)), 0.99, 0.999)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class Metrics:
    """The service's metrics. With several workers (app/workers.py sets
    PROMETHEUS_MULTIPROC_DIR for them), prometheus-client's multiprocess mode: each worker writes
    its values to the shared folder and `exposition` adds every worker's up, whichever worker is
    scraped. The process_* figures are then left out: they describe one process only."""

    def __init__(self, max_batch_size: int) -> None:
        self.multiprocess = bool(os.environ.get(PROMETHEUS_ENV))
        self.registry = CollectorRegistry()
        if not self.multiprocess:
            ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        r = self.registry
        self.request_duration = Histogram(
            "vae_request_duration_seconds", "Time from request to answer, by route template.",
            ["route", "method", "status"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self._request_children: dict[tuple[str, str, int], Histogram] = {}
        self.inference_duration = Histogram(
            "vae_inference_duration_seconds", "Model time of one forward pass (one batch).",
            ["op"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        sizes = sorted({2**i for i in range(max_batch_size.bit_length())} | {max_batch_size})
        self.batch_size = Histogram(
            "vae_batch_size", "Instances per forward pass, after merging requests.",
            ["op"], buckets=sizes, registry=r,
        )  # fmt: skip
        self.queue_duration = Histogram(
            "vae_queue_duration_seconds", "Time a request waited for the inference thread.",
            ["op"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.inline_jobs = Counter(
            "vae_inline_jobs_total", "Forward passes run on the event loop, over cheap jobs "
            "gathered there, skipping the inference thread (VAE_INLINE_MAX_MS).", ["op"],
            registry=r,
        )  # fmt: skip
        self.in_flight = Gauge(
            "vae_requests_in_flight", "Model requests accepted and not yet answered.",
            registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
        # The score as its calibrated percentile: the same buckets for every score and model,
        # and uniform on data like the validation split, so drift shows as a shape change.
        self.anomaly_score = Histogram(
            "vae_anomaly_score", "Anomaly scores, as the share of normal validation data "
            "scored less anomalous (0 to 1).",
            ["score"], buckets=PERCENTILE_BUCKETS, registry=r,
        )  # fmt: skip
        self.model_info = Gauge(
            "vae_model_info", "The artifact being served (value 1).",
            ["sha256", "format_version", "likelihood", "input_shape", "latent_dim", "device"],
            registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        self._model_labels: dict[str, str] | None = None

    def set_model(self, vae: VAEService) -> None:
        # One artifact at a time, also after a reload. Workers' values live in files that
        # clear() cannot reach: there the old series drops to 0 instead.
        if self.multiprocess and self._model_labels is not None:
            self.model_info.labels(**self._model_labels).set(0)
        self.model_info.clear()
        self._model_labels = {
            "sha256": vae.sha256,
            "format_version": str(vae.manifest["format_version"]),
            "likelihood": vae.likelihood,
            "input_shape": "x".join(map(str, vae.input_shape)),
            "latent_dim": str(vae.latent_dim),
            "device": str(vae.device),
        }
        self.model_info.labels(**self._model_labels).set(1)

    def exposition(self) -> bytes:
        """The text a scrape gets: this process's metrics, or every worker's added up."""
        if not self.multiprocess:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        PlatformCollector(registry=registry)
        return generate_latest(registry)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        # A label set's child, looked up once: `labels()` takes a lock and builds a tuple.
        key = (route, method, status)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.request_duration.labels(
                route, method, str(status)
            )
        child.observe(seconds)

    def observe_batch(
        self, op: str, rows: int, seconds: float, waits: list[float], inline: bool = False
    ) -> None:
        if inline:
            self.inline_jobs.labels(op).inc()
        self.inference_duration.labels(op).observe(seconds)
        self.batch_size.labels(op).observe(rows)
        queue = self.queue_duration.labels(op)
        for wait in waits:
            queue.observe(wait)

    def observe_percentiles(self, percentiles: dict[str, Array]) -> None:
        for name, values in percentiles.items():
            hist = self.anomaly_score.labels(name)
            for value in values.tolist():
                hist.observe(value)


def _request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The caller's X-Request-ID when it is well-formed, else a new one: this process's random
    prefix and a count, unique without a system call per request (uuid4 reads urandom)."""
    for key, value in headers:
        if key == b"x-request-id":
            given = value.decode("latin-1")
            if _REQUEST_ID.match(given):
                return given
            break
    return f"{_ID_PREFIX}{next(_ID_COUNT):016x}"


_ID_PREFIX = secrets.token_hex(8)  # a new one in every process, workers included
_ID_COUNT = itertools.count()


class Observe:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = _request_id(scope["headers"])
        status = 500  # what the client sees if the app fails before answering

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
                message = {**message, "headers": headers}
            await send(message)

        # The id travels with the request too, so an error answer can name it.
        scope.setdefault("state", {})["request_id"] = request_id
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if scope["state"].get("client_gone"):
                status = CLIENT_GONE
            seconds = time.perf_counter() - start
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope["method"]
            self.metrics.observe_request(route, method, status, seconds)
            if log.isEnabledFor(logging.INFO):  # else the line's fields are not even built
                log.info(
                    "%s %s %d %.1f ms", method, route, status, seconds * 1000,
                    extra={"request_id": request_id, "route": route, "method": method,
                           "status": status, "duration_ms": round(seconds * 1000, 3),
                           "instances": scope.get("state", {}).get("instances")},
                )  # fmt: skip


# -- logging ------------------------------------------------------------------------------------

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line |= {k: v for k, v in vars(record).items() if k not in _STANDARD}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(level: str, fmt: str) -> None:
    """JSON lines (VAE_LOG_FORMAT=json) or plain text, for our loggers and uvicorn's alike."""
    handler = logging.StreamHandler()
    formatter: logging.Formatter
    if fmt == "json":
        formatter = JsonFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):  # into ours: one format for every line
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


def startup_summary(vae: VAEService) -> dict[str, Any]:
    """What an operator wants in the start-up log: which artifact, trained on what, how good."""
    m = vae.manifest
    metrics = m.get("metrics", {})
    return {
        "sha256": vae.sha256,
        "device": str(vae.device),
        "format_version": m["format_version"],
        "input_shape": m["input_shape"],
        "latent_dim": m["latent_dim"],
        "likelihood": m["likelihood"],
        "dataset": m.get("dataset", {}).get("name"),
        "test_elbo": metrics.get("test_elbo"),
        "test_log_likelihood": metrics.get("test_log_likelihood"),
        "created_at": m.get("created_at"),
    }
