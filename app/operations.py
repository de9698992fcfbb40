"""The model operations behind both protocols, REST (routes.py) and V2 (app/v2/): the checks
that need the model, the batcher key, and the call.

One definition on purpose: the batcher runs the first job's function for a whole merged batch,
so two requests that share a key must share the function too. The key carries the model
(requests in flight at a reload stay on theirs), the operation and the options; a seeded
request has no key and runs alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np

from app.batching import Batcher
from app.common import SCORES, Array, Arrays, listing
from app.model import VAEService
from app.observability import Metrics, op_labels
from app.schemas import AnomalyScoreParams, DecodeParams, EncodeParams, SampleRequest
from app.settings import Settings
from app.validation import ScorePlan, check_samples, instances_array, latents_array, plan_scores
from scoring.calibration import tail_sentence

Rows = Sequence[object] | np.ndarray
PERCENTILE = "percentile:"  # the batched pass's outputs that are a score's percentiles


@dataclass(frozen=True)
class Scored:
    scores: Arrays  # per score name, (B,)
    percentiles: Arrays  # per score name, (B,): the share of normal data less anomalous
    is_anomaly: np.ndarray  # (B,) bool
    plan: ScorePlan
    attribution: Array | None  # (B, D) when asked for
    inputs: Array  # (B, D), as scored
    uncalibrated: list[str]  # scores whose percentiles used another L or K than calibrated
    warnings: list[str]  # one sentence each: what the answer's percentiles cannot promise


async def encode(
    instances: Rows, params: EncodeParams, vae: VAEService, batcher: Batcher, settings: Settings
) -> Arrays:
    x = instances_array(instances, vae, settings)
    check_samples("samples", params.samples, settings, len(x))
    key = None if params.seed is not None else (vae, "encode", params.samples)

    def run(xb: Array) -> Arrays:
        enc = vae.encode(xb, params.samples, params.seed)
        out = {"mean": enc.mean, "std": enc.std}
        return out if enc.samples is None else out | {"samples": enc.samples}

    return await batcher.submit(
        key, x, run, op_labels("encode", vae), partial(vae.costs.cost_s, "encode")
    )


async def decode(
    latents: Sequence[Sequence[float]] | np.ndarray,
    params: DecodeParams,
    vae: VAEService,
    batcher: Batcher,
    settings: Settings,
) -> Arrays:
    z = latents_array(latents, vae, settings)
    mode = params.output == "mode"
    return await batcher.submit(
        (vae, "decode", mode), z, lambda zb: {"outputs": vae.decode(zb, mode)},
        op_labels("decode", vae),
        partial(vae.costs.cost_s, "decode"),
    )  # fmt: skip


async def sample(
    params: SampleRequest, vae: VAEService, batcher: Batcher, settings: Settings
) -> Arrays:
    check_samples("n", params.n, settings)

    def run(_: Array) -> Arrays:
        z, x = vae.sample(params.n, params.seed, mode=params.output == "mode")
        return {"latents": z, "outputs": x}

    # No input rows: an empty (n, 0) array carries the count; sampling always runs alone.
    empty = np.empty((params.n, 0), dtype=np.float32)
    return await batcher.submit(
        None, empty, run, op_labels("sample", vae), partial(vae.costs.cost_s, "sample")
    )


async def score(
    instances: Rows,
    params: AnomalyScoreParams,
    vae: VAEService,
    batcher: Batcher,
    settings: Settings,
    metrics: Metrics,
) -> Scored:
    x = instances_array(instances, vae, settings)
    plan = plan_scores(params, vae, settings, len(x))
    options = (plan.samples, plan.ll_samples, plan.ratio, plan.attribution)
    key = None if params.seed is not None else (vae, "anomaly", *options)

    def run(xb: Array) -> Arrays:
        out = vae.anomaly_scores(
            xb, plan.samples, params.seed, plan.ll_samples,
            ratio=plan.ratio, attribution=plan.attribution,
        )  # fmt: skip
        # The percentiles too, and their metrics: once per pass rather than once per request.
        # A score that is not finite (an input beyond what the model's arithmetic holds) gets
        # the percentile 1.0, so it is flagged: never a null decision.
        percentiles = vae.calibration.percentiles(
            {name: v for name, v in out.items() if name != "attribution"}
        )
        metrics.observe_percentiles(percentiles, vae)
        return out | {PERCENTILE + name: p for name, p in percentiles.items()}

    # The background model's L passes; the attribution's, or its projection's many steps.
    passes = 1 + plan.ratio + plan.attribution * vae.attribution_passes(plan.samples)

    def cost(rows: int) -> float:
        return vae.costs.cost_s("anomaly", rows, plan.samples, plan.ll_samples, passes)

    scores = await batcher.submit(key, x, run, op_labels("anomaly", vae), cost)
    attribution = scores.pop("attribution", None)
    percentiles = {
        n[len(PERCENTILE) :]: scores.pop(n) for n in list(scores) if n.startswith(PERCENTILE)
    }
    decided = percentiles[plan.decision_score] > plan.threshold
    uncalibrated = off_calibration(vae, plan, scores)
    notes = [note] if (note := tail_sentence(vae.calibration, plan.asked)) else []
    if uncalibrated:
        notes.append(uncalibrated_sentence(vae, plan, uncalibrated))
    notes += non_finite_sentences(scores)
    return Scored(scores, percentiles, decided, plan, attribution, x, uncalibrated, notes)


def off_calibration(vae: VAEService, plan: ScorePlan, scores: Arrays) -> list[str]:
    """The scores computed with another L (or K) than their calibration drew: their
    percentiles compare unlike with like (fewer samples lower the reconstruction probability,
    by Jensen's inequality, so more normal inputs look anomalous)."""
    out: list[str] = []
    for name in (s for s in SCORES if s in scores):  # in the order the answer lists them
        drawn = vae.calibration.scores[name].samples
        used = plan.ll_samples if name == "log_likelihood" else plan.samples
        if drawn and used != drawn:
            out.append(name)
    return out


def uncalibrated_sentence(vae: VAEService, plan: ScorePlan, names: list[str]) -> str:
    cal = vae.calibration.scores
    asked = [
        f"{option}={used}, not the calibrated {cal[score].samples}"
        for option, score, used in (
            ("samples", "reconstruction_log_prob", plan.samples),
            ("log_likelihood_samples", "log_likelihood", plan.ll_samples),
        )
        if score in names
    ]
    return (
        f"The percentiles of {listing(names)} are not calibrated ({'; '.join(asked)}): the "
        "false-alarm rate of a decision on them is not the threshold's."
    )


def non_finite_sentences(scores: Arrays) -> list[str]:
    """Per instance with a score that is not finite, one sentence naming them."""
    if all(np.isfinite(v).all() for v in scores.values()):  # the common case, cheaply
        return []
    bad = {name: ~np.isfinite(v) for name, v in scores.items()}
    rows = np.flatnonzero(np.any(np.stack(list(bad.values())), axis=0))
    out = []
    for i in rows:
        names = [n for n, b in bad.items() if b[i]]
        out.append(
            f"instances[{i}]: {listing(names)} {'is' if len(names) == 1 else 'are'} not finite, "
            "the input lying beyond what the model can represent, so each counts as more "
            "anomalous than any normal data (percentile 1.0)."
        )
    return out


def top_features(
    attribution: Array, k: int, names: Sequence[str] | None
) -> list[list[dict[str, object]]]:
    """Per instance, its k features of highest attribution, highest first: index, name (None
    for a model without names) and value."""
    k = min(k, attribution.shape[1])
    # A value that is not finite ranks first: the most anomalous a feature can be.
    ranked = np.where(np.isfinite(attribution), attribution, np.inf)
    top = np.argsort(-ranked, axis=1, kind="stable")[:, :k]
    return [
        [
            {
                "index": int(j),
                "feature": None if names is None else names[j],
                "attribution": float(row[j]) if np.isfinite(row[j]) else None,
            }
            for j in order
        ]
        for row, order in zip(attribution, top, strict=True)
    ]
