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

import contextlib
import itertools
import json
import logging
import os
import re
import secrets
import time
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from app.repository import ModelRepository

log = logging.getLogger("app.access")

# From 1 ms to 30 s: an encode of one image is about a millisecond, a big K a few seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0)  # fmt: skip
OP_LABELS = ["op", "model", "version"]
Labels = tuple[str, str, str]
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
            "vae_request_duration_seconds", "Time from request to answer, by route template "
            "and the model it ran on (empty for other routes).",
            ["route", "method", "status", "model", "version"], buckets=LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self._request_children: dict[tuple[str, str, int, str, str], Histogram] = {}
        self.inference_duration = Histogram(
            "vae_inference_duration_seconds", "Model time of one forward pass (one batch).",
            OP_LABELS, buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        sizes = sorted({2**i for i in range(max_batch_size.bit_length())} | {max_batch_size})
        self.batch_size = Histogram(
            "vae_batch_size", "Instances per forward pass, after merging requests.",
            OP_LABELS, buckets=sizes, registry=r,
        )  # fmt: skip
        self.queue_duration = Histogram(
            "vae_queue_duration_seconds", "Time a request waited for the inference thread.",
            OP_LABELS, buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.inline_jobs = Counter(
            "vae_inline_jobs_total", "Forward passes run on the event loop, over cheap jobs "
            "gathered there, skipping the inference thread (VAE_INLINE_MAX_MS).", OP_LABELS,
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
            ["score", "model", "version"], buckets=PERCENTILE_BUCKETS, registry=r,
        )  # fmt: skip
        self.model_info = Gauge(
            "vae_model_info", "The artifacts being served, one series per model version "
            "(value 1).",
            ["model", "version", "sha256", "format_version", "likelihood", "input_shape",
             "latent_dim", "device"],
            registry=r, multiprocess_mode="livemax",
        )  # fmt: skip

    def set_versions(
        self, name: str, before: dict[int, VAEService], after: dict[int, VAEService]
    ) -> None:
        """A model's versions changed (a load, reload or unload): one series per version
        serving. Workers' values live in files that remove() cannot reach: there a series
        that ends drops to 0 instead."""
        for vae in before.values():
            labels = _info_labels(vae)
            if self.multiprocess:
                self.model_info.labels(*labels).set(0)
            else:
                with contextlib.suppress(KeyError):
                    self.model_info.remove(*labels)
        for vae in after.values():
            self.model_info.labels(*_info_labels(vae)).set(1)

    def exposition(self) -> bytes:
        """The text a scrape gets: this process's metrics, or every worker's added up."""
        if not self.multiprocess:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        PlatformCollector(registry=registry)
        return generate_latest(registry)

    def observe_request(
        self, route: str, method: str, status: int, seconds: float, model: str, version: str
    ) -> None:
        # A label set's child, looked up once: `labels()` takes a lock and builds a tuple.
        key = (route, method, status, model, version)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.request_duration.labels(
                route, method, str(status), model, version
            )
        child.observe(seconds)

    def observe_batch(
        self, op: Labels, rows: int, seconds: float, waits: list[float], inline: bool = False
    ) -> None:
        """`op`: the operation, the model and its version (`op_labels`)."""
        if inline:
            self.inline_jobs.labels(*op).inc()
        self.inference_duration.labels(*op).observe(seconds)
        self.batch_size.labels(*op).observe(rows)
        queue = self.queue_duration.labels(*op)
        for wait in waits:
            queue.observe(wait)

    def observe_percentiles(self, percentiles: dict[str, Array], vae: VAEService) -> None:
        for name, values in percentiles.items():
            hist = self.anomaly_score.labels(name, vae.name, str(vae.version))
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
            vae = scope["state"].get("model")
            model, version = ("", "") if vae is None else (vae.name, str(vae.version))
            self.metrics.observe_request(route, method, status, seconds, model, version)
            if log.isEnabledFor(logging.INFO):  # else the line's fields are not even built
                log.info(
                    "%s %s %d %.1f ms", method, route, status, seconds * 1000,
                    extra={"request_id": request_id, "route": route, "method": method,
                           "status": status, "duration_ms": round(seconds * 1000, 3),
                           "model": model or None, "version": version or None,
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


def op_labels(op: str, vae: VAEService) -> Labels:
    """The labels of a forward pass's metrics: the operation, the model and its version."""
    return (op, vae.name, str(vae.version))


def startup_summary(models: ModelRepository) -> dict[str, Any]:
    """What an operator wants in the start-up log: the models loaded, and for the default
    one which artifact, trained on what, how good."""
    loaded = {name: sorted(versions) for name, versions in models.loaded().items()}
    summary: dict[str, Any] = {"models": loaded, "default_model": models.default}
    if models.default in loaded:
        summary |= model_summary(models.serving())
    return summary


def model_summary(vae: VAEService) -> dict[str, Any]:
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


def _info_labels(vae: VAEService) -> tuple[str, ...]:
    return (
        vae.name,
        str(vae.version),
        vae.sha256,
        str(vae.manifest["format_version"]),
        vae.likelihood,
        "x".join(map(str, vae.input_shape)),
        str(vae.latent_dim),
        str(vae.device),
    )
