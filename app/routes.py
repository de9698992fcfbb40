"""Thin handlers: validate against the loaded model, call VAEService, shape the answer.

Handlers are plain `def`s, so FastAPI runs them in its thread pool and torch never blocks the
event loop: /health answers at once while a long /anomaly-score runs.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from app.errors import VALIDATION_RESPONSES, ErrorResponse, NotReadyError
from app.model import VAEService
from app.schemas import (
    AnomalyScoreRequest,
    AnomalyScoreResponse,
    DecodeRequest,
    DecodeResponse,
    EncodeRequest,
    EncodeResponse,
    HealthResponse,
    ModelResponse,
    SampleRequest,
    SampleResponse,
    ScorePercentiles,
)
from app.settings import Settings
from app.validation import check_samples, instances_array, latents_array, plan_scores


def get_vae(request: Request) -> VAEService:
    vae: VAEService | None = request.app.state.vae
    if vae is None or not request.app.state.ready:
        raise NotReadyError("The model is not loaded yet; try again shortly.")
    return vae


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


VaeDep = Annotated[VAEService, Depends(get_vae)]
SettingsDep = Annotated[Settings, Depends(get_settings)]

router = APIRouter()
model_router = APIRouter(responses=VALIDATION_RESPONSES)


@model_router.post("/encode", tags=["model"])
def encode_instances(body: EncodeRequest, vae: VaeDep, settings: SettingsDep) -> EncodeResponse:
    """Encode inputs to their posterior q(z|x): mean, standard deviation, optional samples."""
    x = instances_array(body.instances, vae, settings)
    check_samples("samples", body.samples, settings, len(x))
    enc = vae.encode(x, body.samples, body.seed)
    return EncodeResponse(
        mean=enc.mean.tolist(),
        std=enc.std.tolist(),
        samples=None if enc.samples is None else enc.samples.tolist(),
    )


@model_router.post("/decode", tags=["model"])
def decode_latents(body: DecodeRequest, vae: VaeDep, settings: SettingsDep) -> DecodeResponse:
    """Decode latent vectors to outputs: the decoder's mean, or its most probable x."""
    z = latents_array(body.latents, vae, settings)
    return DecodeResponse(outputs=vae.decode(z, mode=body.output == "mode").tolist())


@model_router.post("/sample", tags=["model"])
def sample_prior(body: SampleRequest, vae: VaeDep, settings: SettingsDep) -> SampleResponse:
    """Draw n latents from the prior N(0, I) and decode them."""
    check_samples("n", body.n, settings)
    z, x = vae.sample(body.n, body.seed, mode=body.output == "mode")
    return SampleResponse(latents=z.tolist(), outputs=x.tolist())


@model_router.post("/anomaly-score", tags=["model"])
def score_anomalies(
    body: AnomalyScoreRequest, vae: VaeDep, settings: SettingsDep
) -> AnomalyScoreResponse:
    """Score inputs (KL, reconstruction probability, optionally log-likelihood) and decide."""
    x = instances_array(body.instances, vae, settings)
    plan = plan_scores(body, vae, settings, len(x))
    scores = vae.anomaly_scores(x, plan.samples, body.seed, plan.ll_samples)
    percentiles = {name: vae.calibration.percentile(name, v) for name, v in scores.items()}
    return AnomalyScoreResponse(
        **{name: v.tolist() for name, v in scores.items()},
        percentiles=ScorePercentiles(**{n: p.tolist() for n, p in percentiles.items()}),
        is_anomaly=(percentiles[plan.decision_score] > plan.threshold).tolist(),
        decision_score=plan.decision_score,
        threshold_percentile=plan.threshold,
        samples=plan.samples,
        log_likelihood_samples=plan.ll_samples or None,
    )


@router.get("/health", tags=["ops"])
def get_health() -> HealthResponse:
    """Liveness: 200 while the process is up."""
    return HealthResponse()


@router.get("/ready", tags=["ops"], responses={503: {"model": ErrorResponse}})
def get_ready(vae: VaeDep) -> HealthResponse:
    """Readiness: 200 once the model is loaded and warmed up, 503 before."""
    return HealthResponse()


@router.get("/model", tags=["ops"], responses={503: {"model": ErrorResponse}})
def get_model(vae: VaeDep, settings: SettingsDep) -> ModelResponse:
    """The artifact being served: its sha256 and the public part of its manifest."""
    return ModelResponse(
        sha256=vae.sha256,
        path=str(settings.model_path),
        device=str(vae.device),
        manifest=vae.public_manifest(),
    )
