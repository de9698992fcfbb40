"""Checks that need the loaded model, in one place, each failing with a one-sentence reason.

The body parser (payloads.py: numpy's fast path, or pydantic) has already checked types,
finiteness and the request's own bounds; what is left depends on the artifact (shapes, the
likelihood's range) or on settings (limits).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from app.common import SCORES, Array
from app.errors import InvalidInputError
from app.model import VAEService
from app.schemas import AnomalyScoreParams
from app.settings import Settings


def float32(values: object) -> Array:
    """float32 from lists or arrays; values beyond float32 become inf, which the finiteness
    checks then report by index (so numpy's overflow warning says nothing new)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(values, dtype=np.float32)


def instances_array(
    instances: Sequence[object] | np.ndarray, vae: VAEService, settings: Settings
) -> Array:
    """(B, D) float32 from flat or nested instances, or from records keyed by feature name;
    checks count, shape and range."""
    if not isinstance(instances, np.ndarray) and len(instances) and isinstance(instances[0], dict):
        return _records_array(instances, vae, settings)
    _check_count("instances", len(instances), settings.max_instances)
    shape, dim = vae.input_shape, vae.input_dim
    try:
        arr = float32(instances)
    except ValueError:  # ragged, or flat and nested instances mixed
        arr = None
    if arr is None or arr.shape[1:] not in ((dim,), shape):
        # The slow path: look at each instance, to name the first one that does not fit.
        rows = []
        for i, inst in enumerate(instances):
            one = _regular(inst)
            if one is None or one.shape not in ((dim,), shape):
                if one is None:
                    what = "ragged rows"
                elif one.ndim == 1:
                    what = f"{one.shape[0]} values"
                else:
                    what = f"shape {'x'.join(map(str, one.shape))}"
                nested = f" or a {'x'.join(map(str, shape))} array" if len(shape) > 1 else ""
                raise InvalidInputError(
                    f"instances[{i}] has {what}; this model takes {dim} values{nested}."
                )
            rows.append(one.reshape(dim))
        arr = np.stack(rows)
    return _check_values(arr.reshape(len(instances), dim), vae, "instances")


def _records_array(records: Sequence[object], vae: VAEService, settings: Settings) -> Array:
    """(B, D) from records, each naming every feature once (payloads.py refuses a feature
    given twice), in the model's input order."""
    _check_count("records", len(records), settings.max_instances)
    names, index = vae.feature_names, vae.feature_index
    if names is None:
        raise InvalidInputError(
            "This model has no feature names (it was not trained on a table); send instances."
        )
    rows = np.empty((len(records), len(names)), dtype=np.float64)
    for i, record in enumerate(records):
        assert isinstance(record, dict)  # the schema's Record
        for name, value in record.items():
            j = index.get(name)
            if j is None:
                raise InvalidInputError(
                    f"records[{i}] has the unknown feature '{name}'; GET /model lists this "
                    f"model's {len(names)} features."
                )
            rows[i, j] = value
        if len(record) < len(names):
            missing = next(n for n in names if n not in record)
            raise InvalidInputError(f"records[{i}] lacks the feature '{missing}'.")
    return _check_values(float32(rows), vae, "records")


def _check_values(arr: Array, vae: VAEService, field: str) -> Array:
    """Rows (B, D) within float32 (finite as JSON, but e.g. 1e39 is not) and, for a Bernoulli
    model, within [0, 1]; each failure names `field[i]`."""
    # Two reductions vouch for the common case; NaN fails both comparisons, so any doubt
    # goes to the checks that find the row.
    lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=0.0))
    if (lo >= 0.0 and hi <= 1.0) or (
        vae.likelihood != "bernoulli" and math.isfinite(lo) and math.isfinite(hi)
    ):
        return arr
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        raise InvalidInputError(
            f"{field}[{int(np.argmin(finite))}] has values too large for float32."
        )
    if vae.likelihood == "bernoulli":
        bad = np.flatnonzero(((arr < 0.0) | (arr > 1.0)).any(axis=1))
        if bad.size:
            raise InvalidInputError(
                f"{field}[{bad[0]}] has values outside [0, 1], which this Bernoulli model needs."
            )
    return arr


def latents_array(
    latents: Sequence[Sequence[float]] | np.ndarray, vae: VAEService, settings: Settings
) -> Array:
    """(B, Z) float32; checks count, each latent's length, and float32 range."""
    _check_count("latents", len(latents), settings.max_instances)
    for i, z in enumerate(latents):
        if len(z) != vae.latent_dim:
            raise InvalidInputError(
                f"latents[{i}] has {len(z)} values; this model's latent size is {vae.latent_dim}."
            )
    arr = float32(latents)
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        raise InvalidInputError(
            f"latents[{int(np.argmin(finite))}] has values too large for float32."
        )
    return arr


def check_samples(name: str, value: int, settings: Settings, instances: int = 1) -> None:
    if value > settings.max_samples:
        raise InvalidInputError(
            f"{name}={value} is over the limit of {settings.max_samples} (VAE_MAX_SAMPLES)."
        )
    if value * instances > settings.max_total_samples:
        raise InvalidInputError(
            f"{instances} instances x {name}={value} is over the limit of "
            f"{settings.max_total_samples} (VAE_MAX_TOTAL_SAMPLES)."
        )


@dataclass(frozen=True)
class ScorePlan:
    samples: int  # L
    ll_samples: int  # K, 0 when the log-likelihood is not computed
    decision_score: str
    threshold: float  # the one applied: `asked`, or lower where the calibration cannot resolve it
    asked: float  # the threshold the request or the settings asked for
    ratio: bool = False  # compute the likelihood ratio
    attribution: bool = False


def plan_scores(
    body: AnomalyScoreParams, vae: VAEService, settings: Settings, instances: int
) -> ScorePlan:
    """Resolve L, K, the scores, the decision score and threshold from the request, settings
    and artifact."""
    cal = vae.calibration.scores
    decision = body.decision_score or settings.anomaly_score or vae.decision_score
    asked = {decision, *(body.scores or ())}
    missing = [s for s in SCORES if s in asked and s not in cal]
    if missing:
        raise InvalidInputError(
            f"This artifact (format_version {vae.format_version}) has no {missing[0]} score; "
            f"it offers {', '.join(s for s in SCORES if s in cal)}."
        )
    attribution = body.attribution or body.top_features is not None
    if attribution and vae.attribution_method is None:
        raise InvalidInputError(
            f"This artifact (format_version {vae.format_version}) has no per-feature "
            "attribution; re-export it with the current trainer."
        )
    samples = body.samples or settings.default_anomaly_samples
    samples = samples or cal["reconstruction_log_prob"].samples or 16
    check_samples("samples", samples, settings, instances)
    ll_samples = body.log_likelihood_samples or 0
    if not ll_samples and "log_likelihood" in asked:
        ll_samples = settings.default_log_likelihood_samples or cal["log_likelihood"].samples or 100
    if ll_samples:
        check_samples("log_likelihood_samples", ll_samples, settings, instances)
    threshold = body.threshold_percentile or settings.anomaly_percentile
    applied = vae.calibration.effective_threshold(threshold)
    ratio = "likelihood_ratio" in asked
    return ScorePlan(samples, ll_samples, decision, applied, threshold, ratio, attribution)


def _check_count(name: str, n: int, limit: int) -> None:
    if n > limit:
        raise InvalidInputError(f"{n} {name} is over the limit of {limit} (VAE_MAX_INSTANCES).")


def _regular(inst: object) -> Array | None:
    try:
        return float32(inst)
    except ValueError:
        return None
