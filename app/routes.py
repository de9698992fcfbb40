"""Thin handlers: validate against the loaded model, call VAEService, shape the answer.

Torch never runs on the event loop: `async` handlers parse the body there (fast) and hand the
model call to the batcher's inference thread; plain `def` handlers run in FastAPI's thread
pool. So /health answers at once while a long /anomaly-score runs.
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from app import images, operations
from app.batching import Batcher
from app.errors import (
    AUTH_RESPONSES,
    VALIDATION_RESPONSES,
    ErrorResponse,
    ModelLoadError,
    NotReadyError,
    ReloadRefusedError,
)
from app.lifecycle import Lifecycle, reload_model
from app.model import Array, VAEService
from app.observability import Metrics
from app.payloads import (
    JSON,
    MULTIPART,
    NPY,
    PNG,
    UPLOAD_FIELD,
    array_response,
    json_response,
    png_response,
    png_scale,
    read_array_request,
    read_instances_request,
    read_json_request,
)
from app.schemas import (
    AnomalyScoreParams,
    AnomalyScoreRequest,
    AnomalyScoreResponse,
    DecodeParams,
    DecodeRequest,
    DecodeResponse,
    EncodeParams,
    EncodeRequest,
    EncodeResponse,
    HealthResponse,
    ModelResponse,
    ReloadResponse,
    SampleRequest,
    SampleResponse,
)
from app.settings import Settings
from app.validation import check_samples


# The dependencies are `async` on purpose: FastAPI runs a plain `def` dependency in its thread
# pool, which costs a thread hand-off per dependency per request.
async def get_vae(request: Request) -> VAEService:
    vae: VAEService | None = request.app.state.vae
    if vae is None or not request.app.state.ready:
        raise NotReadyError("The model is not loaded yet; try again shortly.")
    return vae


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_batcher(request: Request) -> Batcher:
    batcher: Batcher | None = request.app.state.batcher
    if batcher is None:
        raise NotReadyError("The model is not loaded yet; try again shortly.")
    return batcher


VaeDep = Annotated[VAEService, Depends(get_vae)]
BatcherDep = Annotated[Batcher, Depends(get_batcher)]
SettingsDep = Annotated[Settings, Depends(get_settings)]

router = APIRouter()
model_router = APIRouter(responses=VALIDATION_RESPONSES)
admin_router = APIRouter(prefix="/admin", tags=["admin"])


def body_doc(request_model: type[BaseModel], array_doc: str) -> dict[str, Any]:
    """OpenAPI for a body read by `read_array_request`: the model as JSON, or a .npy array."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                JSON: {"schema": {"$ref": f"#/components/schemas/{request_model.__name__}"}},
                NPY: {
                    "schema": {"type": "string", "format": "binary"},
                    "description": f"{array_doc} The other options go in the query string.",
                },
            },
        }
    }


NPY_OUT: dict[int | str, dict[str, Any]] = {
    200: {"content": {NPY: {"schema": {"type": "string", "format": "binary"}}}}
}


def upload_doc(params_model: type[BaseModel], doc: dict[str, Any]) -> dict[str, Any]:
    """`doc` (a `body_doc`) with an image upload added: Swagger UI shows a file picker and the
    options as form fields."""
    fields: dict[str, Any] = {
        UPLOAD_FIELD: {
            "type": "string",
            "format": "binary",
            "description": "A PNG or JPEG image; repeat the field to send several. It is made "
            "greyscale and resized to the model's input shape.",
        }
    }
    for model in (images.UploadOptions, params_model):
        for name, prop in model.model_json_schema()["properties"].items():
            # A form field is text or absent; `anyOf [X, null]` only confuses the form.
            branches = [b for b in prop.get("anyOf", []) if b.get("type") != "null"]
            if len(branches) == 1:
                outer = {k: v for k, v in prop.items() if k not in ("anyOf", "default")}
                prop = outer | branches[0]
            fields[name] = prop
    doc["requestBody"]["content"][MULTIPART] = {
        "schema": {"type": "object", "required": [UPLOAD_FIELD], "properties": fields},
        "encoding": {UPLOAD_FIELD: {"contentType": "image/png, image/jpeg"}},
    }
    return doc


UPLOAD_RESPONSES: dict[int | str, dict[str, Any]] = {
    415: {
        "model": ErrorResponse,
        "description": "The body is not JSON, .npy or (image models only) a multipart image "
        "upload; or an upload is not a PNG or JPEG.",
    },
}
# PNG answers: the grid itself, its `scale`, and 406 for a model whose outputs are not images.
IMAGE_OUT: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {
            NPY: {"schema": {"type": "string", "format": "binary"}},
            PNG: {
                "schema": {"type": "string", "format": "binary"},
                "description": "Image models only: the outputs as one greyscale PNG grid, "
                "row-major, near-square, cells apart by a grey line.",
            },
        }
    },
    406: {"model": ErrorResponse, "description": "image/png asked of a model without images."},
}
SCALE_PARAM: dict[str, Any] = {
    "parameters": [
        {
            "name": "scale",
            "in": "query",
            "required": False,
            "schema": images.PngOptions.model_json_schema()["properties"]["scale"],
        }
    ]
}


@model_router.post(
    "/encode",
    tags=["model"],
    response_model=EncodeResponse,
    responses={**NPY_OUT, **UPLOAD_RESPONSES},
    openapi_extra=upload_doc(
        EncodeParams, body_doc(EncodeRequest, "A .npy array of instances, N x D or N x H x W.")
    ),
)
async def encode_instances(
    request: Request, vae: VaeDep, batcher: BatcherDep, settings: SettingsDep
) -> Response:
    """Encode inputs to their posterior q(z|x): mean, standard deviation, optional samples."""
    params, instances = await read_instances_request(
        request, EncodeParams, EncodeRequest, vae, settings.max_instances
    )
    request.state.instances = len(instances)
    out = await operations.encode(instances, params, vae, batcher, settings)
    return array_response(request, {"samples": None, **out})


@model_router.post(
    "/decode",
    tags=["model"],
    response_model=DecodeResponse,
    responses=IMAGE_OUT,
    openapi_extra=body_doc(DecodeRequest, "A .npy array of latents, N x Z.") | SCALE_PARAM,
)
async def decode_latents(
    request: Request, vae: VaeDep, batcher: BatcherDep, settings: SettingsDep
) -> Response:
    """Decode latent vectors to outputs: the decoder's mean, or its most probable x."""
    params, latents = await read_array_request(
        request, DecodeParams, DecodeRequest, "latents", own_query=("scale",)
    )
    request.state.instances = len(latents)
    scale = png_scale(request, vae, len(latents))
    out = await operations.decode(latents, params, vae, batcher, settings)
    if scale is not None:
        return await png_response(out["outputs"], vae, scale)
    return array_response(request, out)


@model_router.post(
    "/sample",
    tags=["model"],
    response_model=SampleResponse,
    responses=IMAGE_OUT,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {JSON: {"schema": {"$ref": "#/components/schemas/SampleRequest"}}},
        },
        **SCALE_PARAM,
    },
)
async def sample_prior(
    request: Request, vae: VaeDep, batcher: BatcherDep, settings: SettingsDep
) -> Response:
    """Draw n latents from the prior N(0, I) and decode them."""
    body = await read_json_request(request, SampleRequest)
    check_samples("n", body.n, settings)
    scale = png_scale(request, vae, body.n)

    def sample(_: Array) -> dict[str, Array]:
        z, x = vae.sample(body.n, body.seed, mode=body.output == "mode")
        return {"latents": z, "outputs": x}

    # No input rows: an empty (n, 0) array carries the count; sampling always runs alone.
    request.state.instances = body.n
    out = await batcher.submit(None, np.empty((body.n, 0), dtype=np.float32), sample, "sample")
    if scale is not None:
        return await png_response(out["outputs"], vae, scale)
    return array_response(request, out)


@model_router.post(
    "/anomaly-score",
    tags=["model"],
    response_model=AnomalyScoreResponse,
    responses=UPLOAD_RESPONSES,
    openapi_extra=upload_doc(
        AnomalyScoreParams,
        body_doc(AnomalyScoreRequest, "A .npy array of instances, as for /encode."),
    ),
)
async def score_anomalies(
    request: Request, vae: VaeDep, batcher: BatcherDep, settings: SettingsDep
) -> Response:
    """Score inputs (KL, reconstruction probability, optionally log-likelihood) and decide."""
    params, instances = await read_instances_request(
        request, AnomalyScoreParams, AnomalyScoreRequest, vae, settings.max_instances
    )
    request.state.instances = len(instances)
    scored = await operations.score(
        instances, params, vae, batcher, settings, request.app.state.metrics
    )
    plan = scored.plan
    # Without K the log-likelihood is not computed, but its keys stay in the answer, as null.
    absent = {} if plan.ll_samples else {"log_likelihood": None}
    return json_response(
        {
            **scored.scores,
            **absent,
            "percentiles": scored.percentiles | absent,
            "is_anomaly": scored.is_anomaly,
            "decision_score": plan.decision_score,
            "threshold_percentile": plan.threshold,
            "samples": plan.samples,
            "log_likelihood_samples": plan.ll_samples or None,
        }
    )


@router.get("/health", tags=["ops"])
def get_health() -> HealthResponse:
    """Liveness: 200 while the process is up."""
    return HealthResponse()


@router.get("/ready", tags=["ops"], responses={503: {"model": ErrorResponse}})
async def get_ready(request: Request, vae: VaeDep) -> HealthResponse:
    """Readiness: 200 once the model is loaded and warmed up; 503 before, and while draining."""
    lifecycle: Lifecycle = request.app.state.lifecycle
    if lifecycle.draining:
        raise NotReadyError("The server is shutting down.")
    return HealthResponse()


@router.get(
    "/metrics",
    tags=["ops"],
    response_class=PlainTextResponse,
    responses={**AUTH_RESPONSES, 200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def get_metrics(request: Request) -> Response:
    """Prometheus metrics: request, inference, queue and batch histograms, anomaly-score
    percentiles, the model's identity, and the process's own figures."""
    metrics: Metrics = request.app.state.metrics
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/model", tags=["ops"], responses={**AUTH_RESPONSES, 503: {"model": ErrorResponse}})
def get_model(vae: VaeDep, settings: SettingsDep) -> ModelResponse:
    """The artifact being served: its sha256 and the public part of its manifest."""
    return ModelResponse(
        sha256=vae.sha256,
        path=str(settings.model_path),
        device=str(vae.device),
        manifest=vae.public_manifest(),
    )


@admin_router.post(
    "/reload",
    responses={
        401: {"model": ErrorResponse, "description": "A valid API key is required."},
        403: {"model": ErrorResponse, "description": "No API key is configured at all."},
        409: {"model": ErrorResponse, "description": "The new artifact was refused."},
        503: {"model": ErrorResponse, "description": "The model is not loaded yet."},
    },
)
async def reload(request: Request, vae: VaeDep) -> ReloadResponse:
    """Load the artifact at VAE_MODEL_PATH again and swap it in; requests in flight finish on
    the old one. A bad artifact is refused (409) and the old one keeps serving. SIGHUP does
    the same."""
    try:
        done = await reload_model(request.app)
    except ModelLoadError as e:
        raise ReloadRefusedError(f"Reload refused, the old model keeps serving: {e}") from None
    return ReloadResponse(
        sha256=done.sha256,
        previous_sha256=done.previous_sha256,
        changed=done.sha256 != done.previous_sha256,
    )
