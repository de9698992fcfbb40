"""The V2 routes: health, metadata, inference and the model repository extension, answering
failures in V2's error shape."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, Header, HTTPException, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.routing import Match

from app import __version__, operations
from app.common import JSON, OCTET, listing, shown
from app.deps import BatcherDep, MetricsDep, SettingsDep, take_model
from app.errors import NotReadyError, VAEServiceError, describe_validation_error
from app.model import VAEService
from app.openapi import error_responses, inline_schema
from app.repository import NAME_RULE, ModelRepository, check_name
from app.v2.codec import (
    anomaly,
    check_output_names,
    data_has_bools,
    error_response,
    infer_response,
    input_tensor,
    parameters,
    parse_request,
    split_body,
    wanted_outputs,
)
from app.v2.protocol import (
    EXTENSIONS,
    HEADER_LENGTH,
    MODELS,
    PLATFORM,
    SUFFIXES,
    ProtocolError,
    UnknownModelError,
    UnsupportedEncodingError,
    V2ErrorResponse,
    V2IndexRequest,
    V2InferenceRequest,
    V2InferenceResponse,
    V2LoadRequest,
    V2Model,
    V2ModelMetadata,
    V2RepositoryModel,
    V2ServerMetadata,
    V2TensorMetadata,
    readings,
)

MODEL_NAME = Path(
    description="A repository model's name `m` encodes, `m-decode` decodes, `m-anomaly` "
    "scores; "
    + " ".join(f"`{m.name}`: {m.description}" for m in MODELS.values())
    + " (the default model's).",
    examples=["vae"],
)
MODEL_VERSION = Path(description="One version of the model, a positive integer.", examples=["1"])


async def declare_version(model_version: Annotated[str, MODEL_VERSION]) -> None:
    """Declares the path's version for FastAPI and the docs; `get_v2_vae` reads it."""


@dataclass(frozen=True)
class V2Target:
    """What a V2 model name means here: an operation, on a repository model (None: the
    default one), under the name the request used."""

    model: V2Model
    name: str | None


async def get_v2_model(request: Request, model_name: Annotated[str, MODEL_NAME]) -> V2Target:
    return v2_target(request.app.state.models, model_name)


def v2_target(models: ModelRepository, v2_name: str) -> V2Target:
    """`m`, `m-decode` and `m-anomaly` for a model `m` held (loaded or loading); the default
    model's `vae` names; else a 404 that says what there is."""
    held = models.held()
    for name, base in readings(v2_name):
        if name in held:
            return V2Target(replace(MODELS[base], name=v2_name), name)
    if v2_name in MODELS:
        return V2Target(MODELS[v2_name], None)
    disk = models.on_disk()
    for name, _ in readings(v2_name):
        if name in disk:
            raise UnknownModelError(
                f"Model '{name}' is not loaded; load it with POST "
                f"/v2/repository/models/{name}/load."
            )
    # The default model's `vae` names first; VAE_MODEL_PATH's model, `default`, only by them.
    names = list(MODELS) if models.default is not None else []
    names += [n + suffix for n in sorted(held) if models.root is not None for suffix in SUFFIXES]
    served = f"the models are {listing(names)}" if names else "no model is loaded"
    raise UnknownModelError(f"Model '{shown(v2_name)}' is not served here; {served}.")


async def get_v2_vae(request: Request, target: V2Target) -> VAEService:
    """The model version a V2 request runs on, taken once (as REST's `get_vae`)."""
    return take_model(request, target.name)


# Resolved before the model version in each handler: an unknown model is a 404 even while
# the server starts.
ModelDep = Annotated[V2Target, Depends(get_v2_model)]


class V2Route(APIRoute):
    """Answers failures as `{"error": ...}`, the shape V2 clients read, instead of the
    service's `{"detail": ...}`; handlers and dependencies raise the usual exceptions."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as e:
                answer = v2_error_response(e)
                if answer is None:
                    raise
                return answer

        return handle


def v2_error_response(e: Exception) -> Response | None:
    """The V2 answer to an error a handler or dependency raised; None for one that is not the
    request's fault (Starlette's outermost layer answers it, 500)."""
    if isinstance(e, VAEServiceError):
        return error_response(e.detail, 400 if e.status_code == 422 else e.status_code)
    if isinstance(e, RequestValidationError):
        return error_response(describe_validation_error(e), 400)
    if isinstance(e, HTTPException):  # e.g. a limit enforced by a shared dependency
        return error_response(str(e.detail), e.status_code, e.headers)
    return None


M = TypeVar("M", bound=BaseModel)
REPOSITORY_NAME = Path(description=f"A model in the repository: {NAME_RULE}.", examples=["default"])

V2_ERRORS = error_responses(
    V2ErrorResponse,
    {
        400: "The request is not valid for this model.",
        404: "No such model.",
        503: "The model is not loaded yet.",
    },
)

router = APIRouter(route_class=V2Route, tags=["v2"])


# -- health and metadata -----------------------------------------------------------------------


async def _is_ready(request: Request, target: V2Target | None = None) -> bool:
    """Not draining, and the model (or every model asked for, without one) ready: what
    REST's /ready and /models/{name}/ready say too."""
    if request.app.state.lifecycle.draining:
        return False
    models: ModelRepository = request.app.state.models
    if target is None:
        return models.all_ready()
    try:
        await get_v2_vae(request, target)
    except NotReadyError:
        return False
    return True


@router.get(
    "/v2/health/live",
    response_class=Response,  # an empty body: documented with no content type
    responses={200: {"description": "Live (empty body)."}},
)
async def get_v2_live() -> Response:
    """Server live: 200 while the process answers."""
    return Response(status_code=200)


READY_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Ready (empty body)."},
    503: {"description": "Not ready (empty body)."},
}


@router.get("/v2/health/ready", response_class=Response, responses=READY_RESPONSES)
async def get_v2_ready(request: Request) -> Response:
    """Server ready: 200 once every model asked for is loaded and warmed up, 503 before and
    while draining."""
    return Response(status_code=200 if await _is_ready(request) else 503)


@router.get("/v2")
@router.get("/v2/", include_in_schema=False)
async def get_v2_server_metadata() -> V2ServerMetadata:
    """Server metadata: name, version and the protocol extensions supported."""
    return V2ServerMetadata(name="vae-service", version=__version__, extensions=EXTENSIONS)


@router.get("/v2/models/{model_name}", responses={k: V2_ERRORS[k] for k in (404, 503)})
@router.get(
    "/v2/models/{model_name}/versions/{model_version}",
    dependencies=[Depends(declare_version)],
    responses={k: V2_ERRORS[k] for k in (400, 404, 503)},
)
async def get_v2_model_metadata(target: ModelDep, request: Request) -> V2ModelMetadata:
    """Model metadata: the model's one input and its outputs, shaped for its artifact (the
    highest version, or the one in the path), and the versions loaded."""
    vae = await get_v2_vae(request, target)
    model = target.model
    input_shape = [-1, vae.latent_dim if model.operation == "decode" else vae.input_dim]
    versions = request.app.state.models.loaded().get(vae.name, {})
    return V2ModelMetadata(
        name=model.name,
        versions=[str(v) for v in sorted(versions)],
        platform=PLATFORM,
        inputs=[V2TensorMetadata(name=model.input, datatype="FP32", shape=input_shape)],
        outputs=[
            V2TensorMetadata(name=name, datatype=datatype, shape=shape)
            for name, (datatype, shape) in model.outputs(vae).items()
        ],
    )


@router.get(
    "/v2/models/{model_name}/ready",
    response_class=Response,
    responses=READY_RESPONSES | {404: V2_ERRORS[404]},
)
@router.get(
    "/v2/models/{model_name}/versions/{model_version}/ready",
    dependencies=[Depends(declare_version)],
    response_class=Response,
    responses=READY_RESPONSES | {k: V2_ERRORS[k] for k in (400, 404)},
)
async def get_v2_model_ready(target: ModelDep, request: Request) -> Response:
    """Model ready: 200 once the model (or that version) is loaded and warmed up, 503 before
    and while draining; 404 for a model or version not loaded."""
    return Response(status_code=200 if await _is_ready(request, target) else 503)


# -- the model repository extension ------------------------------------------------------------

REPOSITORY_ERRORS = error_responses(
    V2ErrorResponse,
    {
        400: "The name is not a model name, or the body is not valid.",
        401: "A valid admin key is required.",
        403: "No admin key is configured, or the key sent is not an admin key.",
        404: "No such model in the repository.",
        409: "Refused: the artifact cannot be served, VAE_MAX_MODELS would be exceeded, or "
        "the server runs several workers.",
    },
)


async def _optional_body(request: Request, model: type[M]) -> M:
    """The body as `model`; an empty body (as tritonclient sends) is its defaults."""
    raw = await request.body()
    if not raw.strip():
        return model()
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise ProtocolError(describe_validation_error(RequestValidationError(e.errors()))) from None


@router.post(
    "/v2/repository/index",
    responses=REPOSITORY_ERRORS,
    openapi_extra={"requestBody": {"required": False, "content": {
        JSON: {"schema": inline_schema(V2IndexRequest)}}}},
)  # fmt: skip
async def post_repository_index(request: Request) -> list[V2RepositoryModel]:
    """Every model in the repository, one entry per version, with its state: READY,
    LOADING, UNAVAILABLE (with the reason) or UNLOADED. Needs an admin key."""
    body = await _optional_body(request, V2IndexRequest)
    models: ModelRepository = request.app.state.models
    return [
        V2RepositoryModel(name=e.name, version=str(v.version), state=v.state, reason=v.reason or "")
        for e in models.index()
        for v in e.versions
        if not body.ready or v.state == "READY"
    ]


LOAD_BODY = {"requestBody": {"required": False, "content": {
    JSON: {"schema": inline_schema(V2LoadRequest)}}}}  # fmt: skip


@router.post(
    "/v2/repository/models/{model_name}/load",
    response_class=Response,
    responses=REPOSITORY_ERRORS | {200: {"description": "Loaded (empty body)."}},
    openapi_extra=LOAD_BODY,
)
async def post_repository_load(
    request: Request, model_name: Annotated[str, REPOSITORY_NAME]
) -> Response:
    """Load every version of a repository model, or load it again (versions whose file is
    unchanged keep serving as they are); a refused load changes nothing. Needs an admin
    key."""
    await _repository_call(request, model_name, "load")
    return Response(status_code=200)


@router.post(
    "/v2/repository/models/{model_name}/unload",
    response_class=Response,
    responses=REPOSITORY_ERRORS | {200: {"description": "Unloaded (empty body)."}},
    openapi_extra=LOAD_BODY,
)
async def post_repository_unload(
    request: Request, model_name: Annotated[str, REPOSITORY_NAME]
) -> Response:
    """Stop serving a model: requests in flight finish on it, later ones get 404. Needs an
    admin key."""
    await _repository_call(request, model_name, "unload")
    return Response(status_code=200)


async def _repository_call(request: Request, name: str, action: Literal["load", "unload"]) -> None:
    check_name(name)  # before the body: a bad name is the first thing to say
    await _optional_body(request, V2LoadRequest)
    models: ModelRepository = request.app.state.models
    await (models.load(name) if action == "load" else models.unload(name))


# -- inference ---------------------------------------------------------------------------------

INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            JSON: {"schema": inline_schema(V2InferenceRequest)},
            OCTET: {
                "schema": {"type": "string", "format": "binary"},
                "description": f"Binary extension: the JSON request, {HEADER_LENGTH} bytes "
                "long, then each input's raw bytes (parameters.binary_data_size).",
            },
        },
    }
}


INFER_RESPONSES = V2_ERRORS | {
    200: {
        "content": {OCTET: {"schema": {"type": "string", "format": "binary"}}},
        "description": f"JSON, or with binary outputs the JSON response ({HEADER_LENGTH} "
        "bytes) followed by each binary output's bytes.",
    },
    **error_responses(V2ErrorResponse, {415: "A compressed body."}),
}


@router.post(
    "/v2/models/{model_name}/versions/{model_version}/infer",
    dependencies=[Depends(declare_version)],
    response_model=V2InferenceResponse,
    responses=INFER_RESPONSES,
    openapi_extra=INFER_BODY,
)
@router.post(
    "/v2/models/{model_name}/infer",
    response_model=V2InferenceResponse,
    responses=INFER_RESPONSES,
    openapi_extra=INFER_BODY,
)
async def infer_v2(
    target: ModelDep,
    request: Request,
    batcher: BatcherDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    header_length: Annotated[
        str | None,
        Header(
            alias=HEADER_LENGTH,
            description="Binary extension: the JSON part's length; binary tensors follow it.",
        ),
    ] = None,
) -> Response:
    """Inference: run the model's operation on one input tensor (JSON or binary), on the
    highest version, or the one in the path."""
    vae = await get_v2_vae(request, target)
    model = target.model
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", ""):
        raise UnsupportedEncodingError(
            f"Content-Encoding '{encoding}' is not supported; send the body uncompressed."
        )
    raw = await request.body()
    head, tail = split_body(raw, header_length)
    req = parse_request(head, header_length is not None)
    params, binary_output = parameters(req, model)
    arr = input_tensor(
        req, model, tail, has_bools=data_has_bools(raw, len(head), req),
        features=vae.feature_names,
    )  # fmt: skip
    check_output_names(req, model, vae)  # before the model runs, not after
    request.state.instances = len(arr)
    # The same operations as REST, so V2 and REST requests batch together.
    extra: dict[str, Any] = {}
    if model.operation == "encode":
        arrays = dict(await operations.encode(arr, params, vae, batcher, settings))
    elif model.operation == "decode":
        arrays = dict(await operations.decode(arr, params, vae, batcher, settings))
    else:
        scored = await operations.score(arr, params, vae, batcher, settings, metrics)
        arrays, extra = await anomaly(scored)
    wanted = wanted_outputs(req, model, vae, arrays, binary_output)
    return infer_response(model.name, vae.version, req.id, arrays, wanted, extra)


@router.api_route(
    "/v2{path:path}",
    methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"],
    include_in_schema=False,
)
async def unknown_v2_endpoint(path: str, request: Request) -> Response:
    """Any other /v2 path or method, answered in V2's error shape (tritonclient reads `error`)."""
    allowed = sorted(
        method
        for route in router.routes
        if isinstance(route, APIRoute) and route.endpoint is not unknown_v2_endpoint
        # PARTIAL: the path matches, the method does not.
        if route.matches(request.scope)[0] == Match.PARTIAL
        for method in route.methods or ()
    )
    where = f"/v2{path}"
    if allowed:
        message = f"{request.method} is not allowed on {where}; use {listing(allowed, 'or')}."
        return error_response(message, 405, {"Allow": ", ".join(allowed)})
    message = f"No V2 endpoint answers {request.method} {where}."
    return error_response(message, 404)
