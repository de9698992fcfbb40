"""A Python client for vae-service: numpy arrays in and out, over httpx.

    from vae_service_client import VAEClient

    with VAEClient("http://127.0.0.1:8000", api_key="...") as vae:
        enc = vae.encode(x, samples=4, seed=0)      # Encoded(mean, std, samples)
        out = vae.decode(enc.mean)                  # (B, D) float32
        scores = vae.anomaly_score(x)               # AnomalyScores(..., is_anomaly, ...)

`AsyncVAEClient` has the same methods as coroutines. This module imports only httpx and numpy
(no torch, no FastAPI), so a calling service pays for nothing else.

Binary: a regular numeric array goes to the server as one float32 .npy body (the options in the
query string), and array answers are asked for as .npy with `Accept`, so no float is printed
and re-parsed on either side. Every release of the server reads .npy (.npy bodies predate
this client's first release), so there is no probe of the OpenAPI document first: that would
cost a round trip per client and fail where /openapi.json is hidden. Answers are read by their
Content-Type, so a JSON answer works as well. Input that no regular array can hold (flat and
nested instances mixed, say) goes as JSON, for the server to accept or to reject by index;
`binary=False` sends everything as JSON.

Retries: on 503 (not ready, queue full, draining) and on failures to connect, with exponential
backoff and jitter, or after the server's `Retry-After` up to a cap. Every endpoint is a pure
function of its request (a `seed` pins even the random ones), so sending a request twice is
safe. Nothing else is retried: a 4xx will not change, a 504 or a client timeout means the
server is slow and a repeat would add load, and a connection lost mid-answer is reported.
"""

from __future__ import annotations

import email.utils
import io
import json
import logging
import math
import random
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import PurePath
from types import TracebackType
from typing import Any, Generic, Literal, Self, TypeVar

import anyio
import httpx
import numpy as np
import numpy.typing as npt

__version__ = "0.1.0"

__all__ = [
    "AnomalyScores",
    "AsyncVAEClient",
    "Encoded",
    "ModelInfo",
    "RetryPolicy",
    "Samples",
    "ScorePercentiles",
    "VAEAuthError",
    "VAEClient",
    "VAEConnectionError",
    "VAEError",
    "VAETimeoutError",
    "VAEUnavailableError",
    "VAEValidationError",
]

log = logging.getLogger("vae_service_client")

JSON = "application/json"
NPY = "application/x-npy"
# .npy preferred for array answers; errors (and /anomaly-score) come back as JSON regardless.
ACCEPT_NPY = f"{NPY}, {JSON};q=0.5"
# Format-2 to format-4 scores: None from servers or artifacts without them.
NEW_SCORES = ("input_complexity", "likelihood_ratio", "dose", "latent_distance", "rapp", "ensemble")

T = TypeVar("T")
Array = npt.NDArray[Any]
Output = Literal["mean", "mode"]
# Rows of a model trained on a table, keyed by feature name.
Records = Sequence[Mapping[str, float]] | None
ScoreName = Literal[
    "kl_divergence",
    "reconstruction_log_prob",
    "log_likelihood",
    "input_complexity",
    "likelihood_ratio",
    "dose",
    "latent_distance",
    "rapp",
    "ensemble",
]


# -- errors ------------------------------------------------------------------------------------


class VAEError(Exception):
    """Any failure of a call: `status_code` is the HTTP status (None when no answer came),
    `detail` the server's one-sentence reason, or ours when there was no answer."""

    def __init__(self, detail: str, status_code: int | None = None) -> None:
        super().__init__(detail if status_code is None else f"HTTP {status_code}: {detail}")
        self.detail = detail
        self.status_code = status_code


class VAEValidationError(VAEError):
    """The request itself is wrong (400, 413, 415, 422); sending it again cannot help."""


class VAEAuthError(VAEError):
    """The API key is missing or wrong (401), or not allowed (403)."""


class VAEUnavailableError(VAEError):
    """The server answered 503 (not ready, busy or draining) to every attempt."""


class VAETimeoutError(VAEError):
    """No answer within the client's timeout (status_code None), or the server's own 504."""


class VAEConnectionError(VAEError):
    """The server could not be reached (after the retries), or the connection broke."""


_STATUS_ERRORS: dict[int, type[VAEError]] = {
    400: VAEValidationError,
    401: VAEAuthError,
    403: VAEAuthError,
    413: VAEValidationError,
    415: VAEValidationError,
    422: VAEValidationError,
    503: VAEUnavailableError,
    504: VAETimeoutError,
}


def error_from_response(response: httpx.Response) -> VAEError:
    """The typed error for an error answer, carrying the server's `detail`."""
    cls = _STATUS_ERRORS.get(response.status_code, VAEError)
    return cls(_detail(response), response.status_code)


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:  # not JSON: a proxy's HTML page, say
        body = None
    if isinstance(body, dict) and "detail" in body:
        detail = body["detail"]
        return detail if isinstance(detail, str) else json.dumps(detail)
    text = response.text.strip()
    return text[:500] if text else response.reason_phrase


def _error_from_transport(exc: httpx.TransportError, request: httpx.Request) -> VAEError:
    where, why = f"{request.method} {request.url}", str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return VAEConnectionError(f"Cannot connect for {where}: {why}.")
    if isinstance(exc, httpx.TimeoutException):
        return VAETimeoutError(f"No answer to {where} within the timeout ({type(exc).__name__}).")
    return VAEConnectionError(f"The connection for {where} failed: {why}.")


# -- retries -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to wait before sending a request again."""

    retries: int = 3  # attempts after the first
    backoff: float = 0.25  # seconds before the first retry; doubles each time
    max_backoff: float = 5.0
    max_retry_after: float = 30.0  # a server's Retry-After is honoured up to this

    def __post_init__(self) -> None:
        if self.retries < 0 or min(self.backoff, self.max_backoff, self.max_retry_after) < 0:
            raise ValueError("retries and the waits must not be negative")

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number `attempt` + 1 (attempt counts from 0)."""
        if retry_after is not None:
            # The server knows best when it will have room; the jitter keeps the clients it
            # turned away together from coming back together.
            return min(retry_after + random.uniform(0.0, self.backoff), self.max_retry_after)
        # "Equal jitter": never less than half the step, so the waits still grow.
        step = min(self.max_backoff, self.backoff * 2.0**attempt)
        return random.uniform(step / 2, step)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a Retry-After header: delay-seconds or an HTTP date (RFC 9110 10.2.3)."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


# -- results -----------------------------------------------------------------------------------
# eq=False: a field-wise == on numpy arrays is element-wise, which dataclasses cannot use.


@dataclass(frozen=True, eq=False)
class Encoded:
    """The posterior q(z|x): mean (B, Z), std (B, Z), and samples (B, S, Z) when asked for."""

    mean: Array
    std: Array
    samples: Array | None


@dataclass(frozen=True, eq=False)
class Samples:
    """Prior draws z ~ N(0, I), (n, Z), and their decoded outputs, (n, D)."""

    latents: Array
    outputs: Array


@dataclass(frozen=True, eq=False)
class ScorePercentiles:
    """Per score, the share of normal validation data less anomalous than each instance."""

    kl_divergence: Array
    reconstruction_log_prob: Array
    log_likelihood: Array | None
    input_complexity: Array | None = None
    likelihood_ratio: Array | None = None
    dose: Array | None = None
    latent_distance: Array | None = None
    rapp: Array | None = None
    ensemble: Array | None = None


@dataclass(frozen=True, eq=False)
class AnomalyScores:
    """/anomaly-score's answer: each score (B,), their percentiles, and the decision; scores
    the server did not compute (or an older server does not know) are None; a score that is
    not finite (an input beyond what the model represents) is NaN, its percentile 1.0.
    `uncalibrated` names the scores computed with another L or K than calibrated, and
    `warnings` says, one sentence each, what the answer cannot promise."""

    kl_divergence: Array
    reconstruction_log_prob: Array
    log_likelihood: Array | None
    percentiles: ScorePercentiles
    is_anomaly: Array
    decision_score: ScoreName
    threshold_percentile: float
    samples: int
    log_likelihood_samples: int | None
    input_complexity: Array | None = None
    likelihood_ratio: Array | None = None
    dose: Array | None = None
    latent_distance: Array | None = None
    rapp: Array | None = None
    ensemble: Array | None = None
    attribution: Array | None = None  # (B, D) when asked for
    top_features: list[list[FeatureShare]] | None = None  # per instance, when asked for
    uncalibrated: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FeatureShare:
    """One of an instance's most anomalous features: its position, its name (models trained on
    a table) and its attribution."""

    index: int
    feature: str | None
    attribution: float | None  # None where it is not finite (ranked first)


@dataclass(frozen=True)
class ModelInfo:
    """The artifact being served: its sha256, its file name, the device, the manifest, and for
    a model trained on a table its features (name, training mean and std), in input order."""

    sha256: str
    artifact: str
    device: str
    manifest: Mapping[str, Any]
    features: list[Mapping[str, Any]] | None = None


# -- requests and answers, shared by both clients -----------------------------------------------


@dataclass(frozen=True)
class _Call(Generic[T]):
    """One request, described without I/O, and how to read its answer."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    content: bytes | None = None
    params: Mapping[str, str] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    retry: bool = True
    # Statuses `parse` reads itself rather than raising (a probe's 503).
    own_statuses: Collection[int] = ()
    # A probe answers False when nothing answers, instead of raising.
    unreachable: Callable[[], T] | None = None


# What reading an answer of the wrong shape raises (json and np.load included).
_BAD_ANSWER = (ValueError, KeyError, TypeError, AttributeError, EOFError, OSError)


@dataclass(frozen=True)
class _Retry:
    delay: float


def _float32(values: npt.ArrayLike) -> Array:
    # Values beyond float32 become inf, which the server then reports by index, as it does
    # when it converts them itself.
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(values, dtype=np.float32)


def _regular(values: npt.ArrayLike) -> Array | None:
    """The values as one numeric array, or None where no regular array holds them."""
    try:
        array = np.asarray(values)
    except ValueError:  # ragged: e.g. flat and nested instances mixed
        return None
    return _float32(array) if array.dtype.kind in "fiu" else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _npy(array: Array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _media_type(response: httpx.Response) -> str:
    value: str = response.headers.get("content-type", "")
    return value.split(";")[0].strip().lower()


def _arrays(response: httpx.Response, names: tuple[str, ...]) -> dict[str, Array | None]:
    """Named float32 outputs from a .npy answer (one array, or one field per output) or JSON."""
    if _media_type(response) == NPY:
        data = np.load(io.BytesIO(response.content), allow_pickle=False)
        if data.dtype.names is None:
            return {names[0]: data}
        # Fields of a structured array are strided views; give callers plain arrays.
        return {n: np.ascontiguousarray(data[n]) if n in data.dtype.names else None for n in names}
    body = response.json()
    return {n: None if body.get(n) is None else _float32(body[n]) for n in names}


def _required(arrays: Mapping[str, Array | None], name: str) -> Array:
    value = arrays[name]
    if value is None:
        raise KeyError(name)
    return value


def _optional_f32(values: Any) -> Array | None:
    return None if values is None else _float32(values)


def _read_encoded(response: httpx.Response) -> Encoded:
    a = _arrays(response, ("mean", "std", "samples"))
    return Encoded(_required(a, "mean"), _required(a, "std"), a["samples"])


def _read_outputs(response: httpx.Response) -> Array:
    return _required(_arrays(response, ("outputs",)), "outputs")


def _read_samples(response: httpx.Response) -> Samples:
    a = _arrays(response, ("latents", "outputs"))
    return Samples(_required(a, "latents"), _required(a, "outputs"))


def _read_scores(response: httpx.Response) -> AnomalyScores:
    body = response.json()
    pct = body["percentiles"]
    return AnomalyScores(
        kl_divergence=_float32(body["kl_divergence"]),
        reconstruction_log_prob=_float32(body["reconstruction_log_prob"]),
        log_likelihood=_optional_f32(body.get("log_likelihood")),
        percentiles=ScorePercentiles(
            kl_divergence=_float32(pct["kl_divergence"]),
            reconstruction_log_prob=_float32(pct["reconstruction_log_prob"]),
            log_likelihood=_optional_f32(pct.get("log_likelihood")),
            **{name: _optional_f32(pct.get(name)) for name in NEW_SCORES},
        ),
        **{name: _optional_f32(body.get(name)) for name in (*NEW_SCORES, "attribution")},
        top_features=None
        if body.get("top_features") is None
        else [[FeatureShare(**share) for share in row] for row in body["top_features"]],
        is_anomaly=np.asarray(body["is_anomaly"], dtype=bool),
        decision_score=body["decision_score"],
        threshold_percentile=float(body["threshold_percentile"]),
        samples=int(body["samples"]),
        log_likelihood_samples=body.get("log_likelihood_samples"),
        uncalibrated=list(body.get("uncalibrated", [])),
        warnings=list(body.get("warnings", [])),
    )


def _read_model(response: httpx.Response) -> ModelInfo:
    body = response.json()
    return ModelInfo(
        # Older servers named the file by its whole path.
        str(body["sha256"]), str(body.get("artifact") or PurePath(body["path"]).name),
        str(body["device"]), body["manifest"],
        body.get("features"),
    )  # fmt: skip


def _read_ok(response: httpx.Response) -> bool:
    return response.status_code == 200


def _inputs(instances: npt.ArrayLike | None, records: Records) -> tuple[str, Any]:
    """The request's input field: instances (arrays) or records (dicts keyed by feature)."""
    if (instances is None) == (records is None):
        raise TypeError("Give instances or records: exactly one of the two.")
    if records is not None:
        return "records", [dict(r) for r in records]
    return "instances", instances


def _options(**values: object) -> dict[str, object]:
    return {k: v for k, v in values.items() if v is not None}


def _own_client_options(options: dict[str, Any], timeout: float | httpx.Timeout | None) -> Any:
    """httpx's keyword arguments for a client of this one's own; base_url and headers are
    this client's, set on every request."""
    taken = sorted(options.keys() & {"base_url", "headers"})
    if taken:
        raise TypeError(f"{_names(taken)}: set by VAEClient itself (base_url, api_key).")
    return {"timeout": timeout, **options}


def _names(names: Collection[str]) -> str:
    return ", ".join(sorted(names))


class _ClientBase:
    """Settings, request building, answer reading and the retry decision: all but the I/O."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None,
        timeout: float | httpx.Timeout | None,
        retry: RetryPolicy | None,
        binary: bool,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.binary = binary
        self._headers = {"user-agent": f"vae-service-client/{__version__}"}
        if api_key is not None:
            self._headers["authorization"] = f"Bearer {api_key}"

    # -- the calls ---------------------------------------------------------------------------

    def _encode(
        self, instances: npt.ArrayLike | None, records: Records, samples: int, seed: int | None
    ) -> _Call[Encoded]:
        options = _options(samples=samples, seed=seed)
        name, values = _inputs(instances, records)
        return self._array_call("/encode", name, values, options, _read_encoded)

    def _decode(self, latents: npt.ArrayLike, output: Output) -> _Call[Array]:
        return self._array_call("/decode", "latents", latents, {"output": output}, _read_outputs)

    def _sample(self, n: int, seed: int | None, output: Output) -> _Call[Samples]:
        body = json.dumps(_options(n=n, seed=seed, output=output)).encode()
        return _Call("POST", "/sample", _read_samples, content=body, headers=self._json_headers())

    def _anomaly_score(
        self, instances: npt.ArrayLike | None, records: Records, options: Mapping[str, object]
    ) -> _Call[AnomalyScores]:
        name, values = _inputs(instances, records)
        return self._array_call("/anomaly-score", name, values, options, _read_scores)

    def _probe(self, path: str) -> _Call[bool]:
        # A probe reports the present: no retries, and "no answer" is an answer (False).
        return _Call(
            "GET", path, _read_ok, retry=False, own_statuses=(503,), unreachable=lambda: False
        )

    def _model(self) -> _Call[ModelInfo]:
        return _Call("GET", "/model", _read_model)

    def _array_call(
        self,
        path: str,
        name: str,
        values: npt.ArrayLike,
        options: Mapping[str, object],
        parse: Callable[[httpx.Response], T],
    ) -> _Call[T]:
        # Records travel as JSON: .npy has no place for their names.
        array = _regular(values) if self.binary and name != "records" else None
        if array is not None:
            params = {k: str(v) for k, v in options.items()}
            headers = {"content-type": NPY, "accept": ACCEPT_NPY}
            return _Call("POST", path, parse, content=_npy(array), params=params, headers=headers)
        body = json.dumps({name: _jsonable(values), **options}).encode()
        return _Call("POST", path, parse, content=body, headers=self._json_headers())

    def _json_headers(self) -> dict[str, str]:
        return {"content-type": JSON, "accept": ACCEPT_NPY if self.binary else JSON}

    def _request_args(self, call: _Call[Any]) -> dict[str, Any]:
        # Whole URLs, this client's headers and timeout on every request: the same whether the
        # httpx client is this one's own or the caller's.
        return {
            "method": call.method,
            "url": self.base_url + call.path,
            "content": call.content,
            "params": call.params,
            "headers": {**self._headers, **call.headers},
            "timeout": self.timeout,
        }

    # -- one attempt's outcome ----------------------------------------------------------------

    def _settle(
        self,
        call: _Call[T],
        request: httpx.Request,
        attempt: int,
        outcome: httpx.Response | httpx.TransportError,
    ) -> T | _Retry:
        """The call's result, a _Retry to wait for, or the typed error raised."""
        may_retry = call.retry and attempt < self.retry.retries
        if isinstance(outcome, httpx.TransportError):
            if call.unreachable is not None:
                return call.unreachable()
            # Refused or unanswered connects never reached the server: always safe to repeat.
            if may_retry and isinstance(outcome, httpx.ConnectError | httpx.ConnectTimeout):
                return self._retry_after(request, attempt, type(outcome).__name__, None)
            raise _error_from_transport(outcome, request) from outcome
        response = outcome
        log.debug(
            "%s %s (%s, %d bytes) -> %d (%s, %d bytes)",
            request.method, request.url.path, request.headers.get("content-type", "-"),
            len(call.content or b""), response.status_code, _media_type(response) or "-",
            len(response.content),
        )  # fmt: skip
        if response.is_success or response.status_code in call.own_statuses:
            try:
                return call.parse(response)
            except _BAD_ANSWER as e:
                raise VAEError(
                    f"The answer to {request.method} {request.url.path} is not what this client "
                    f"reads ({type(e).__name__}: {e}).",
                    response.status_code,
                ) from e
        if response.status_code == 503 and may_retry:
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            return self._retry_after(request, attempt, "503", retry_after)
        raise error_from_response(response)

    def _retry_after(
        self, request: httpx.Request, attempt: int, reason: str, retry_after: float | None
    ) -> _Retry:
        delay = self.retry.delay(attempt, retry_after)
        log.warning(
            "%s %s: %s; retry %d of %d in %.2f s",
            request.method, request.url.path, reason, attempt + 1, self.retry.retries, delay,
        )  # fmt: skip
        return _Retry(delay)


def _anomaly_options(
    samples: int | None,
    log_likelihood_samples: int | None,
    threshold_percentile: float | None,
    decision_score: ScoreName | None,
    seed: int | None,
    scores: Sequence[ScoreName] | None = None,
    attribution: bool = False,
    top_features: int | None = None,
) -> dict[str, object]:
    return _options(
        samples=samples,
        log_likelihood_samples=log_likelihood_samples,
        threshold_percentile=threshold_percentile,
        decision_score=decision_score,
        seed=seed,
        # A comma-separated string travels in a query (.npy bodies) as in JSON.
        scores=",".join(scores) if scores else None,
        attribution=True if attribution else None,
        top_features=top_features,
    )


# -- the clients: only the transport differs -----------------------------------------------------


class VAEClient(_ClientBase):
    """A blocking client for vae-service; use it as a context manager, or call close().

    base_url: the server, e.g. "http://127.0.0.1:8000" (a path prefix is kept).
    api_key: sent as `Authorization: Bearer <key>`.
    timeout: seconds (or an httpx.Timeout) for each attempt; None waits forever.
    retry: retries on 503 and failed connects (default: 3, from 0.25 s doubling to 5 s).
    binary: send and receive arrays as .npy (default); False sends and asks for JSON.
    http_client: an httpx.Client of your own (its pool, proxy, TLS, auth, event hooks); the
        caller closes it. Otherwise the keyword arguments left over go to httpx.Client, e.g.
        transport=, verify=, limits=, proxy=, auth=, cert=.
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = 30.0,
        retry: RetryPolicy | None = None,
        binary: bool = True,
        http_client: httpx.Client | None = None,
        **httpx_options: Any,
    ) -> None:
        super().__init__(base_url, api_key=api_key, timeout=timeout, retry=retry, binary=binary)
        self._own = http_client is None
        self._http = http_client or httpx.Client(**_own_client_options(httpx_options, timeout))
        if http_client is not None and httpx_options:
            raise TypeError(
                f"Give http_client or httpx options, not both ({_names(httpx_options)})."
            )

    def encode(
        self,
        instances: npt.ArrayLike | None = None,
        *,
        records: Records = None,
        samples: int = 0,
        seed: int | None = None,
    ) -> Encoded:
        """The posterior q(z|x) of each instance (flat, N x D, or shaped, N x H x W), or of
        each record (a dict keyed by feature name, for a model trained on a table)."""
        return self._run(self._encode(instances, records, samples, seed))

    def decode(self, latents: npt.ArrayLike, *, output: Output = "mean") -> Array:
        """Decoded outputs (B, D) of latents (B, Z): the decoder's mean, or its mode."""
        return self._run(self._decode(latents, output))

    def sample(self, n: int = 1, *, seed: int | None = None, output: Output = "mean") -> Samples:
        """n draws from the prior, decoded."""
        return self._run(self._sample(n, seed, output))

    def anomaly_score(
        self,
        instances: npt.ArrayLike | None = None,
        *,
        records: Records = None,
        samples: int | None = None,
        log_likelihood_samples: int | None = None,
        threshold_percentile: float | None = None,
        decision_score: ScoreName | None = None,
        seed: int | None = None,
        scores: Sequence[ScoreName] | None = None,
        attribution: bool = False,
        top_features: int | None = None,
    ) -> AnomalyScores:
        """Anomaly scores, their calibrated percentiles and the decision, per instance (or
        record); `scores` adds costly ones (log_likelihood, likelihood_ratio), `attribution`
        the per-feature attribution (B, D), `top_features` each one's k most anomalous
        features, by name for a table model."""
        options = _anomaly_options(
            samples, log_likelihood_samples, threshold_percentile, decision_score, seed,
            scores, attribution, top_features,
        )  # fmt: skip
        return self._run(self._anomaly_score(instances, records, options))

    def health(self) -> bool:
        """Whether the server process answers (no retries)."""
        return self._run(self._probe("/health"))

    def ready(self) -> bool:
        """Whether the model is loaded and warmed up (no retries; 503 or no answer: False)."""
        return self._run(self._probe("/ready"))

    def model_info(self) -> ModelInfo:
        """The artifact being served."""
        return self._run(self._model())

    def close(self) -> None:
        if self._own:  # a client the caller gave is the caller's to close
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _run(self, call: _Call[T]) -> T:
        attempt = 0
        while True:
            request = self._http.build_request(**self._request_args(call))
            try:
                outcome: httpx.Response | httpx.TransportError = self._http.send(request)
            except httpx.TransportError as e:
                outcome = e
            result = self._settle(call, request, attempt, outcome)
            if not isinstance(result, _Retry):
                return result
            time.sleep(result.delay)
            attempt += 1


class AsyncVAEClient(_ClientBase):
    """VAEClient's twin for async code, on httpx.AsyncClient: the same arguments (with an
    httpx.AsyncClient as http_client) and methods, as coroutines; use it with `async with`, or
    await aclose(). It runs wherever httpx does: asyncio and trio (it waits with anyio)."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = 30.0,
        retry: RetryPolicy | None = None,
        binary: bool = True,
        http_client: httpx.AsyncClient | None = None,
        **httpx_options: Any,
    ) -> None:
        super().__init__(base_url, api_key=api_key, timeout=timeout, retry=retry, binary=binary)
        self._own = http_client is None
        options = _own_client_options(httpx_options, timeout)
        self._http = http_client or httpx.AsyncClient(**options)
        if http_client is not None and httpx_options:
            raise TypeError(
                f"Give http_client or httpx options, not both ({_names(httpx_options)})."
            )

    async def encode(
        self,
        instances: npt.ArrayLike | None = None,
        *,
        records: Records = None,
        samples: int = 0,
        seed: int | None = None,
    ) -> Encoded:
        """The posterior q(z|x) of each instance (flat, N x D, or shaped, N x H x W), or of
        each record (a dict keyed by feature name, for a model trained on a table)."""
        return await self._run(self._encode(instances, records, samples, seed))

    async def decode(self, latents: npt.ArrayLike, *, output: Output = "mean") -> Array:
        """Decoded outputs (B, D) of latents (B, Z): the decoder's mean, or its mode."""
        return await self._run(self._decode(latents, output))

    async def sample(
        self, n: int = 1, *, seed: int | None = None, output: Output = "mean"
    ) -> Samples:
        """n draws from the prior, decoded."""
        return await self._run(self._sample(n, seed, output))

    async def anomaly_score(
        self,
        instances: npt.ArrayLike | None = None,
        *,
        records: Records = None,
        samples: int | None = None,
        log_likelihood_samples: int | None = None,
        threshold_percentile: float | None = None,
        decision_score: ScoreName | None = None,
        seed: int | None = None,
        scores: Sequence[ScoreName] | None = None,
        attribution: bool = False,
        top_features: int | None = None,
    ) -> AnomalyScores:
        """Anomaly scores, their calibrated percentiles and the decision, per instance (or
        record); `scores` adds costly ones (log_likelihood, likelihood_ratio), `attribution`
        the per-feature attribution (B, D), `top_features` each one's k most anomalous
        features, by name for a table model."""
        options = _anomaly_options(
            samples, log_likelihood_samples, threshold_percentile, decision_score, seed,
            scores, attribution, top_features,
        )  # fmt: skip
        return await self._run(self._anomaly_score(instances, records, options))

    async def health(self) -> bool:
        """Whether the server process answers (no retries)."""
        return await self._run(self._probe("/health"))

    async def ready(self) -> bool:
        """Whether the model is loaded and warmed up (no retries; 503 or no answer: False)."""
        return await self._run(self._probe("/ready"))

    async def model_info(self) -> ModelInfo:
        """The artifact being served."""
        return await self._run(self._model())

    async def aclose(self) -> None:
        if self._own:  # a client the caller gave is the caller's to close
            await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _run(self, call: _Call[T]) -> T:
        attempt = 0
        while True:
            request = self._http.build_request(**self._request_args(call))
            try:
                outcome: httpx.Response | httpx.TransportError = await self._http.send(request)
            except httpx.TransportError as e:
                outcome = e
            result = self._settle(call, request, attempt, outcome)
            if not isinstance(result, _Retry):
                return result
            await anyio.sleep(result.delay)  # asyncio's or trio's, whichever runs
            attempt += 1
