"""Thin handlers: validate against the loaded model, call VAEService, shape the answer.

Torch never runs on the event loop: `async` handlers parse the body there (fast) and hand the
model call to the batcher's inference thread; plain `def` handlers run in FastAPI's thread
pool. So /health answers at once while a long /anomaly-score runs.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from app import images, operations
from app.common import SCORES
from app.deps import BatcherDep, MetricsDep, SettingsDep, VaeDep, get_vae
from app.errors import ErrorResponse, NotReadyError, ReloadRefusedError
from app.lifecycle import Lifecycle, reload_model, reload_siblings
from app.model import VAEService
from app.openapi import (
    AUTH_RESPONSES,
    HEAT_MAP_OUT,
    IMAGE_OUT,
    NPY_OUT,
    SCALE_PARAM,
    UPLOAD_RESPONSES,
    VALIDATION_RESPONSES,
    array_body,
    error_responses,
    json_body,
    upload_body,
)
from app.payloads import (
    accepts_only_npy,
    array_response,
    heat_map_response,
    json_response,
    png_response,
    png_scale,
    read_array_request,
    read_instances_request,
    read_json_request,
)
from app.repository import (
    NOT_READY,
    LoadRefusedError,
    ModelEntry,
    ModelRepository,
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
    FeatureInfo,
    HealthResponse,
    ModelEntryResponse,
    ModelResponse,
    ModelsResponse,
    ReloadResponse,
    SampleRequest,
    SampleResponse,
    VersionInfo,
)
from scoring.artifact import ModelLoadError

# The query parameters of a PNG answer, read by png_scale, beside the operation's own options.
PNG_QUERY = tuple(images.PngOptions.model_fields)

MISSING_MODEL = error_responses(
    ErrorResponse, {404: "No default model, or the model named is not loaded."}
)
router = APIRouter()
models_router = APIRouter(tags=["models"])
# A model route may also answer 404: no default model (several in the repository, none named
# by VAE_DEFAULT_MODEL), or the one it names is not loaded.
model_router = APIRouter(responses=VALIDATION_RESPONSES | MISSING_MODEL)
admin_router = APIRouter(prefix="/admin", tags=["admin"])


@model_router.post(
    "/encode",
    tags=["model"],
    response_model=EncodeResponse,
    responses={**NPY_OUT, **UPLOAD_RESPONSES},
    openapi_extra=upload_body(
        EncodeParams, array_body(EncodeRequest, "A .npy array of instances, N x D or N x H x W.")
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
    openapi_extra=array_body(DecodeRequest, "A .npy array of latents, N x Z.") | SCALE_PARAM,
)
async def decode_latents(
    request: Request, vae: VaeDep, batcher: BatcherDep, settings: SettingsDep
) -> Response:
    """Decode latent vectors to outputs: the decoder's mean, or its most probable x."""
    params, latents = await read_array_request(
        request, DecodeParams, DecodeRequest, "latents", PNG_QUERY
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
    openapi_extra=json_body(SampleRequest) | SCALE_PARAM,
)
async def sample_prior(
    request: Request, vae: VaeDep, batcher: BatcherDep, settings: SettingsDep
) -> Response:
    """Draw n latents from the prior N(0, I) and decode them."""
    body = await read_json_request(request, SampleRequest, PNG_QUERY)
    request.state.instances = body.n
    scale = png_scale(request, vae, body.n)
    out = await operations.sample(body, vae, batcher, settings)
    if scale is not None:
        return await png_response(out["outputs"], vae, scale)
    return array_response(request, out)


@model_router.post(
    "/anomaly-score",
    tags=["model"],
    response_model=AnomalyScoreResponse,
    responses={**UPLOAD_RESPONSES, **HEAT_MAP_OUT},
    openapi_extra=upload_body(
        AnomalyScoreParams,
        array_body(AnomalyScoreRequest, "A .npy array of instances, as for /encode."),
    )
    | SCALE_PARAM,
)
async def score_anomalies(
    request: Request, vae: VaeDep, batcher: BatcherDep, settings: SettingsDep, metrics: MetricsDep
) -> Response:
    """Score inputs (every score the artifact offers; the costly ones when asked) and decide;
    with `attribution`, which features made each one anomalous, as numbers or a heat map."""
    params, instances = await read_instances_request(
        request, AnomalyScoreParams, AnomalyScoreRequest, vae, settings.max_instances, PNG_QUERY
    )
    request.state.instances = len(instances)
    # A PNG answer (image models only) draws each input beside its heat map.
    cell = images.pair_shape((vae.input_shape[0], vae.input_shape[-1]))
    scale = png_scale(request, vae, len(instances), cell, legend=True)
    if scale is not None:  # a heat map is drawn from the attribution
        params = params.model_copy(update={"attribution": True})
    scored = await operations.score(instances, params, vae, batcher, settings, metrics)
    plan = scored.plan
    if scale is not None and scored.attribution is not None:
        return await heat_map_response(scored.inputs, scored.attribution, vae, scale)
    # top_features alone computes the attribution but returns only its top k.
    full = scored.attribution if params.attribution else None
    extra = {} if full is None else {"attribution": full}
    top = None
    if params.top_features is not None and scored.attribution is not None:
        top = operations.top_features(scored.attribution, params.top_features, vae.feature_names)
    if accepts_only_npy(request):  # one record per instance: scores, percentiles, decision
        percentiles = {f"{name}_percentile": p for name, p in scored.percentiles.items()}
        flat = {**scored.scores, **percentiles, "is_anomaly": scored.is_anomaly, **extra}
        return array_response(request, flat)
    # Scores not computed keep their keys in the answer, as null.
    absent: dict[str, None] = {name: None for name in SCORES if name not in scored.scores}
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
            "attribution": full,
            "top_features": top,
            "uncalibrated": scored.uncalibrated,
            "warnings": scored.warnings,
        }
    )


@router.get("/health", tags=["ops"])
def get_health() -> HealthResponse:
    """Liveness: 200 while the process is up."""
    return HealthResponse()


@router.get("/ready", tags=["ops"], responses={503: {"model": ErrorResponse}})
async def get_ready(request: Request) -> HealthResponse:
    """Readiness: 200 once every model the server was asked to serve is loaded and warmed
    up; 503 before, and while draining."""
    lifecycle: Lifecycle = request.app.state.lifecycle
    if lifecycle.draining:
        raise NotReadyError("The server is shutting down.")
    if not request.app.state.models.all_ready():
        raise NotReadyError(NOT_READY)
    return HealthResponse()


@router.get(
    "/metrics",
    tags=["ops"],
    response_class=PlainTextResponse,
    responses={**AUTH_RESPONSES, 200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def get_metrics(metrics: MetricsDep) -> Response:
    """Prometheus metrics: request, inference, queue and batch histograms, anomaly-score
    percentiles, the model's identity, and the process's own figures."""
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get("/model", tags=["ops"], responses={**AUTH_RESPONSES, 503: {"model": ErrorResponse}})
def get_model(request: Request, vae: VaeDep) -> ModelResponse:
    """The artifact the routes without a model name serve: its sha256 and the public part of
    its manifest."""
    return describe(vae, request.app.state.models)


def describe(vae: VAEService, models: ModelRepository) -> ModelResponse:
    features = vae.manifest.get("features")
    return ModelResponse(
        name=vae.name,
        version=vae.version,
        versions=[VersionInfo(**asdict(v)) for v in models.entry(vae.name).versions],
        features=None
        if features is None
        else [
            FeatureInfo(name=n, mean=m, std=sd)
            for n, m, sd in zip(features["names"], features["mean"], features["std"], strict=True)
        ],
        sha256=vae.sha256,
        artifact=vae.artifact,
        device=str(vae.device),
        manifest=vae.public_manifest(),
    )


def entry_response(entry: ModelEntry, models: ModelRepository) -> ModelEntryResponse:
    return ModelEntryResponse(
        name=entry.name,
        state=entry.state,
        versions=[VersionInfo(**asdict(v)) for v in entry.versions],
        default=entry.name == models.default,
    )


# -- the repository: every model by name ---------------------------------------------------------

NAME_PARAM = Path(
    description="A model in the repository (docs/models.md); a name matches "
    "[A-Za-z0-9][A-Za-z0-9_.-]{0,63}.",
    examples=["default"],
)
VERSION_PARAM = Path(description="One version of the model, a positive integer.", examples=[1])
ModelName = Annotated[str, NAME_PARAM]
ModelVersion = Annotated[int, VERSION_PARAM]
# What a route under /models/{model_name} may answer beyond its own responses.
NOT_FOUND: dict[int | str, dict[str, Any]] = error_responses(
    ErrorResponse,
    {
        400: "The name is not a model name, or the version not a version.",
        404: "No such model or version, or not loaded.",
        422: "The request is not valid.",
    },
)


async def named_model(model_name: ModelName) -> None:
    """Declares the path's model name for FastAPI and the docs; `get_vae` reads it."""


async def versioned_model(model_name: ModelName, model_version: ModelVersion) -> None:
    """Declares the path's model name and version; `get_vae` reads them."""


@models_router.get("/models", responses=AUTH_RESPONSES)
async def list_models(request: Request) -> ModelsResponse:
    """Every model in the repository, loaded or not, with each version's state."""
    models: ModelRepository = request.app.state.models
    return ModelsResponse(
        default=models.default,
        models=[entry_response(e, models) for e in models.index()],
    )


@models_router.get("/models/{model_name}", responses={**AUTH_RESPONSES, **NOT_FOUND})
def get_named_model(request: Request, model_name: ModelName, vae: VaeDep) -> ModelResponse:
    """One model: its highest ready version's sha256 and manifest, and every version's
    state."""
    return describe(vae, request.app.state.models)


@models_router.get(
    "/models/{model_name}/versions/{model_version}", responses={**AUTH_RESPONSES, **NOT_FOUND}
)
def get_model_version(
    request: Request, model_name: ModelName, model_version: ModelVersion, vae: VaeDep
) -> ModelResponse:
    """One version of a model: its sha256 and manifest."""
    return describe(vae, request.app.state.models)


@models_router.get(
    "/models/{model_name}/ready", responses={503: {"model": ErrorResponse}, **NOT_FOUND}
)
async def get_model_ready(request: Request, model_name: ModelName) -> HealthResponse:
    """A model's readiness: 200 once a version of it serves; 503 while it first loads, and
    while the server drains; 404 when it is not loaded."""
    return await _ready(request)


@models_router.get(
    "/models/{model_name}/versions/{model_version}/ready",
    responses={503: {"model": ErrorResponse}, **NOT_FOUND},
)
async def get_version_ready(
    request: Request, model_name: ModelName, model_version: ModelVersion
) -> HealthResponse:
    """One version's readiness, as for the model."""
    return await _ready(request)


async def _ready(request: Request) -> HealthResponse:
    if request.app.state.lifecycle.draining:
        raise NotReadyError("The server is shutting down.")
    await get_vae(request)  # 503 while it first loads, 404 when it is not loaded
    return HealthResponse()


@admin_router.post(
    "/reload",
    responses=error_responses(
        ErrorResponse,
        {
            401: "A valid admin key is required.",
            403: "No admin key is configured, or the key sent is not an admin key.",
            409: "The new artifact was refused.",
            503: "The model is not loaded yet.",
        },
    ),
)
async def reload(request: Request, vae: VaeDep) -> ReloadResponse:
    """Load the default model's artifact (VAE_MODEL_PATH, or its versions in the repository)
    again and swap it in; requests in flight finish on the old one. A bad artifact is refused
    (409) and the old one keeps serving; an unchanged one returns at once, and concurrent
    reloads share one. Needs an admin key (VAE_ADMIN_KEYS). SIGHUP does the same."""
    try:
        done = await reload_model(request.app)
    except (ModelLoadError, LoadRefusedError) as e:
        detail = e.reason if isinstance(e, LoadRefusedError) else str(e)
        raise ReloadRefusedError(f"Reload refused, the old model keeps serving: {detail}") from None
    changed = done.sha256 != done.previous_sha256
    serving, total = await reload_siblings(request.app, done.sha256, ask=changed)
    return ReloadResponse(
        sha256=done.sha256,
        previous_sha256=done.previous_sha256,
        changed=changed,
        workers=total,
        workers_serving=serving,
    )


ADMIN_ERRORS = error_responses(
    ErrorResponse,
    {
        400: "The name is not a model name.",
        401: "A valid admin key is required.",
        403: "No admin key is configured, or the key sent is not an admin key.",
        404: "No such model in the repository.",
        409: "Refused: the artifact cannot be served, VAE_MAX_MODELS would be exceeded, or "
        "the server runs several workers.",
    },
)


@admin_router.post("/models/{model_name}/load", responses=ADMIN_ERRORS)
async def load_model(request: Request, model_name: ModelName) -> ModelEntryResponse:
    """Load every version of a repository model, or load it again: each is checked and
    warmed up before it serves, and versions whose file is unchanged keep serving as they
    are. A refused load changes nothing. Needs an admin key."""
    models: ModelRepository = request.app.state.models
    await models.load(model_name)
    return entry_response(models.entry(model_name), models)


@admin_router.post("/models/{model_name}/unload", responses=ADMIN_ERRORS)
async def unload_model(request: Request, model_name: ModelName) -> ModelEntryResponse:
    """Stop serving a model: requests in flight finish on it, later ones get 404. Needs an
    admin key."""
    models: ModelRepository = request.app.state.models
    await models.unload(model_name)
    return entry_response(models.entry(model_name), models)
