"""A Python client for vae-service: numpy arrays in and out, over httpx.

    from vae_service_client import VAEClient

    with VAEClient("http://127.0.0.1:8000", api_key="...") as vae:
        enc = vae.encode(x, samples=4, seed=0)      # Encoded(mean, std, samples)
        out = vae.decode(enc.mean)                  # (B, D) float32
        scores = vae.anomaly_score(x)               # AnomalyScores(..., is_anomaly, ...)

`AsyncVAEClient` has the same methods as coroutines. This module imports only httpx and numpy
(no torch, no FastAPI), so a calling service pays for nothing else.

Many models: a server with a model repository serves each model (and each of its versions)
under /models/{name}[/versions/{version}]/... . `VAEClient(url, model="a", version=2)` sends
its model calls there; `vae.model("b")` is a client bound to another model that shares the
first one's connection pool and settings; `models()`, `load_model()` and `unload_model()` list
and control the repository (the last two need an admin key). Without a model every call goes
to the routes of the server's one (or default) model, as before.

Binary: a regular numeric array goes to the server as one float32 .npy body (the options in the
query string), and array answers are asked for as .npy with `Accept`, so no float is printed
and re-parsed on either side. Every release of the server reads .npy (.npy bodies predate
this client's first release), so there is no probe of the OpenAPI document first: that would
cost a round trip per client and fail where /openapi.json is hidden. Answers are read by their
Content-Type, so a JSON answer works as well. Input that no regular array can hold (flat and
nested instances mixed, say) goes as JSON, for the server to accept or to reject by index;
`binary=False` sends everything as JSON.

Retries: on 503 (not ready, queue full, draining) and on failures to connect, with exponential
backoff and jitter, or after the server's `Retry-After` up to a cap. Every model endpoint is a
pure function of its request (a `seed` pins even the random ones), so sending a request twice
is safe; load_model and unload_model are retried the same way (a 503 or a refused connect
means the server did nothing, and a second load of the same files changes nothing). Nothing
else is retried: a 4xx will not change, a 504 or a client timeout means the server is slow and
a repeat would add load, and a connection lost mid-answer is reported.
"""

from __future__ import annotations

import copy
import email.utils
import io
import json
import logging
import math
import random
import re
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
    "ModelSummary",
    "ModelVersionState",
    "RetryPolicy",
    "Samples",
    "ScorePercentiles",
    "VAEAuthError",
    "VAEClient",
    "VAEConnectionError",
    "VAEError",
    "VAENotFoundError",
    "VAETimeoutError",
    "VAEUnavailableError",
    "VAEValidationError",
]

log = logging.getLogger("vae_service_client")

JSON = "application/json"
NPY = "application/x-npy"
# .npy preferred for array answers; errors (and /anomaly-score) come back as JSON regardless.
ACCEPT_NPY = f"{NPY}, {JSON};q=0.5"
# Format-2 to format-9 scores: None from servers or artifacts without them.
NEW_SCORES = ("input_complexity", "likelihood_ratio", "dose", "latent_distance",
              "latent_polar_distance", "rapp", "input_distance", "feature_distance",
              "ensemble")  # fmt: skip

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
    "latent_polar_distance",
    "rapp",
    "input_distance",
    "feature_distance",
    "ensemble",
]
# The state of a model in the repository, or of one of its versions: READY serves, LOADING is
# being read and warmed up, UNAVAILABLE was refused by its last load, UNLOADED is on disk only.
ModelState = Literal["READY", "LOADING", "UNAVAILABLE", "UNLOADED"]
VersionState = ModelState
# The server's rule for model names; a name that passes needs no quoting in a path.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


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
    """The API key is missing or wrong (401), or not allowed (403): an /admin route wants an
    admin key."""


class VAENotFoundError(VAEError):
    """404: no such route, or, on a server with a model repository, no such model or version,
    or one that is not loaded."""


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
    404: VAENotFoundError,
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
    latent_polar_distance: Array | None = None
    rapp: Array | None = None
    input_distance: Array | None = None
    feature_distance: Array | None = None
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
    latent_polar_distance: Array | None = None
    rapp: Array | None = None
    input_distance: Array | None = None
    feature_distance: Array | None = None
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
class ModelVersionState:
    """One version of a model in the server's repository: its number, its state (READY,
    LOADING, UNAVAILABLE, or UNLOADED: on disk, not loaded), why it is not READY (None when
    the server does not say) and the sha256 of the artifact serving it (None until loaded)."""

    version: int
    state: VersionState
    reason: str | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class ModelSummary:
    """One model of the server's repository (GET /models): its name, its state as a whole,
    its versions, and whether it is the default model (the one the un-namespaced routes,
    /encode and the rest, serve)."""

    name: str
    state: ModelState
    versions: tuple[ModelVersionState, ...]
    default: bool = False


@dataclass(frozen=True)
class ModelInfo:
    """The artifact being served: its sha256, its file name, the device, the manifest, and for
    a model trained on a table its features (name, training mean and std), in input order.
    From a server with a model repository also the model's name, the version answering and
    every version's state; None from older servers (and from /model where it omits them)."""

    sha256: str
    artifact: str
    device: str
    manifest: Mapping[str, Any]
    features: list[Mapping[str, Any]] | None = None
    name: str | None = None
    version: int | None = None
    versions: tuple[ModelVersionState, ...] | None = None


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
    versions = body.get("versions")
    return ModelInfo(
        # Older servers named the file by its whole path.
        str(body["sha256"]), str(body.get("artifact") or PurePath(body["path"]).name),
        str(body["device"]), body["manifest"],
        body.get("features"),
        name=None if body.get("name") is None else str(body["name"]),
        version=None if body.get("version") is None else int(body["version"]),
        versions=None if versions is None else _version_states(versions),
    )  # fmt: skip


def _version_states(entries: Sequence[Mapping[str, Any]]) -> tuple[ModelVersionState, ...]:
    return tuple(_version_state(v) for v in entries)


def _version_state(entry: Mapping[str, Any]) -> ModelVersionState:
    state: VersionState = entry["state"]
    return ModelVersionState(int(entry["version"]), state, entry.get("reason"), entry.get("sha256"))


def _summary(entry: Mapping[str, Any], default: str | None) -> ModelSummary:
    name = str(entry["name"])
    # The listing names the default model once; a single entry (load, unload) may say itself.
    is_default = entry["default"] if isinstance(entry.get("default"), bool) else name == default
    return ModelSummary(
        name=name,
        state=entry["state"],
        versions=_version_states(entry.get("versions") or []),
        default=is_default,
    )


def _read_models(response: httpx.Response) -> list[ModelSummary]:
    body = response.json()
    default = body.get("default")
    return [_summary(entry, default) for entry in body["models"]]


def _read_summary(response: httpx.Response) -> ModelSummary:
    return _summary(response.json(), None)


def _check_model(name: str) -> str:
    """The name, if it passes the server's rule for model names (ValueError otherwise)."""
    if not isinstance(name, str):
        raise TypeError(f"A model name is a str, not {type(name).__name__}.")
    if MODEL_NAME.fullmatch(name) is None:
        raise ValueError(
            f"Model name {name!r} breaks the server's rule ^[A-Za-z0-9][A-Za-z0-9_.-]{{0,63}}$: "
            "a letter or digit, then up to 63 letters, digits, '_', '.' or '-'."
        )
    return name


def _check_version(version: int) -> int:
    if isinstance(version, bool) or not isinstance(version, int):
        raise TypeError(f"A model version is an int, not {type(version).__name__}.")
    if version < 1:
        raise ValueError(f"A model version is an int >= 1, not {version}.")
    return version


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

    # Whether close() closes the httpx client: only a client's own, never in a model() view.
    _own: bool

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None,
        timeout: float | httpx.Timeout | None,
        retry: RetryPolicy | None,
        binary: bool,
        model: str | None,
        version: int | None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.binary = binary
        self._headers = {"user-agent": f"vae-service-client/{__version__}"}
        if api_key is not None:
            self._headers["authorization"] = f"Bearer {api_key}"
        self._bind(model, version)

    def _bind(self, model: str | None, version: int | None) -> None:
        if model is None and version is not None:
            raise ValueError("A version needs a model: give model= too.")
        self.model_name = None if model is None else _check_model(model)
        self.model_version = None if version is None else _check_version(version)
        # The path before each model route: "" (the server's one or default model), else the
        # namespaced routes. The name passed the server's rule, so nothing needs quoting.
        self._prefix = ""
        if model is not None:
            self._prefix = f"/models/{model}"
            if version is not None:
                self._prefix += f"/versions/{version}"

    def model(self, name: str, version: int | None = None) -> Self:
        """A client of this class bound to model `name` (and to one `version` of it; None:
        the version the server picks), for a server with a model repository.

        The view shares this client's httpx client (its connection pool), base URL, API key,
        timeout, retry policy and binary setting, and costs no connection of its own. Closing
        the view (or leaving its `with` block) leaves the shared pool open; closing this client
        closes it, after which no view can send anything. ValueError if the name breaks the
        server's rule or the version is below 1, before any request.
        """
        view = copy.copy(self)
        view._headers = dict(self._headers)
        view._own = False  # the pool stays this client's to close
        view._bind(name, version)
        return view

    # -- the calls ---------------------------------------------------------------------------

    def _encode(
        self, instances: npt.ArrayLike | None, records: Records, samples: int, seed: int | None
    ) -> _Call[Encoded]:
        options = _options(samples=samples, seed=seed)
        name, values = _inputs(instances, records)
        return self._array_call(self._prefix + "/encode", name, values, options, _read_encoded)

    def _decode(self, latents: npt.ArrayLike, output: Output) -> _Call[Array]:
        path = self._prefix + "/decode"
        return self._array_call(path, "latents", latents, {"output": output}, _read_outputs)

    def _sample(self, n: int, seed: int | None, output: Output) -> _Call[Samples]:
        body = json.dumps(_options(n=n, seed=seed, output=output)).encode()
        path = self._prefix + "/sample"
        return _Call("POST", path, _read_samples, content=body, headers=self._json_headers())

    def _anomaly_score(
        self, instances: npt.ArrayLike | None, records: Records, options: Mapping[str, object]
    ) -> _Call[AnomalyScores]:
        name, values = _inputs(instances, records)
        path = self._prefix + "/anomaly-score"
        return self._array_call(path, name, values, options, _read_scores)

    def _probe(self, path: str, own_statuses: Collection[int] = (503,)) -> _Call[bool]:
        # A probe reports the present: no retries, and "no answer" is an answer (False).
        return _Call(
            "GET", path, _read_ok, retry=False, own_statuses=own_statuses,
            unreachable=lambda: False,
        )  # fmt: skip

    def _ready(self) -> _Call[bool]:
        if not self._prefix:
            return self._probe("/ready")
        # A model's probe: 404 (unknown, or not loaded) is "not ready" as well.
        return self._probe(self._prefix + "/ready", own_statuses=(503, 404))

    def _model(self) -> _Call[ModelInfo]:
        return _Call("GET", self._prefix or "/model", _read_model)

    def _models(self) -> _Call[list[ModelSummary]]:
        return _Call("GET", "/models", _read_models, headers={"accept": JSON})

    def _control(self, name: str, action: Literal["load", "unload"]) -> _Call[ModelSummary]:
        # Retried as the model POSTs are, on 503 and failed connects only: neither means the
        # server acted, and loading a model again leaves unchanged versions as they are.
        path = f"/admin/models/{_check_model(name)}/{action}"
        return _Call("POST", path, _read_summary, headers={"accept": JSON})

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
    model: on a server with a model repository, the model the model calls (encode, decode,
        sample, anomaly_score, model_info, ready) go to, under /models/{model}/...; it must
        match the server's rule ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ (ValueError otherwise).
        None (the default): the server's one model, or its default model, as with older servers.
    version: with a model, one version of it (an int >= 1), under
        /models/{model}/versions/{version}/...; None: the version the server serves by default.

    `model(name, version)` gives a client bound to another model on the same connection pool.
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
        model: str | None = None,
        version: int | None = None,
        **httpx_options: Any,
    ) -> None:
        super().__init__(
            base_url, api_key=api_key, timeout=timeout, retry=retry, binary=binary, model=model,
            version=version,
        )  # fmt: skip
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
        """Whether the model is loaded and warmed up (no retries; 503 or no answer: False).
        Bound to a model: GET /models/{model}[/versions/{version}]/ready, where 404 (no such
        model or version, or not loaded) is False as well."""
        return self._run(self._ready())

    def model_info(self) -> ModelInfo:
        """The artifact being served (GET /model), or, bound to a model, that model's
        (GET /models/{model}[/versions/{version}]), with its name, version and versions."""
        return self._run(self._model())

    def models(self) -> list[ModelSummary]:
        """The models of the server's repository, their states and versions (GET /models)."""
        return self._run(self._models())

    def load_model(self, name: str) -> ModelSummary:
        """Load model `name` (POST /admin/models/{name}/load; needs an admin key as api_key)
        and return its entry. VAEAuthError without an admin key, VAENotFoundError for a model
        the repository does not hold, VAEError (409) where the server refuses."""
        return self._run(self._control(name, "load"))

    def unload_model(self, name: str) -> ModelSummary:
        """Unload model `name` (POST /admin/models/{name}/unload; needs an admin key) and
        return its entry; its model calls then answer 404 (VAENotFoundError)."""
        return self._run(self._control(name, "unload"))

    def close(self) -> None:
        """Close the httpx client, if it is this client's own (not a caller's, not a view's
        from model(): closing a view leaves the pool it shares open)."""
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
    httpx.AsyncClient as http_client, and model= and version=) and methods, as coroutines
    (but `model()`, which sends nothing, is a plain method); use it with `async with`, or
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
        model: str | None = None,
        version: int | None = None,
        **httpx_options: Any,
    ) -> None:
        super().__init__(
            base_url, api_key=api_key, timeout=timeout, retry=retry, binary=binary, model=model,
            version=version,
        )  # fmt: skip
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
        """Whether the model is loaded and warmed up (no retries; 503 or no answer: False).
        Bound to a model: GET /models/{model}[/versions/{version}]/ready, where 404 (no such
        model or version, or not loaded) is False as well."""
        return await self._run(self._ready())

    async def model_info(self) -> ModelInfo:
        """The artifact being served (GET /model), or, bound to a model, that model's
        (GET /models/{model}[/versions/{version}]), with its name, version and versions."""
        return await self._run(self._model())

    async def models(self) -> list[ModelSummary]:
        """The models of the server's repository, their states and versions (GET /models)."""
        return await self._run(self._models())

    async def load_model(self, name: str) -> ModelSummary:
        """Load model `name` (POST /admin/models/{name}/load; needs an admin key as api_key)
        and return its entry. VAEAuthError without an admin key, VAENotFoundError for a model
        the repository does not hold, VAEError (409) where the server refuses."""
        return await self._run(self._control(name, "load"))

    async def unload_model(self, name: str) -> ModelSummary:
        """Unload model `name` (POST /admin/models/{name}/unload; needs an admin key) and
        return its entry; its model calls then answer 404 (VAENotFoundError)."""
        return await self._run(self._control(name, "unload"))

    async def aclose(self) -> None:
        """Close the httpx client, if it is this client's own (not a caller's, not a view's
        from model(): closing a view leaves the pool it shares open)."""
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
