"""The V2 routes: health, metadata and inference, answering failures in V2's error shape."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.routing import Match

from app import __version__, operations
from app.common import JSON, OCTET, listing
from app.deps import BatcherDep, MetricsDep, SettingsDep, VaeDep, get_vae
from app.errors import NotReadyError, VAEServiceError, describe_validation_error
from app.openapi import error_responses, inline_schema
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
    UnknownModelError,
    UnsupportedEncodingError,
    V2ErrorResponse,
    V2InferenceRequest,
    V2InferenceResponse,
    V2Model,
    V2ModelMetadata,
    V2ServerMetadata,
    V2TensorMetadata,
)


async def get_v2_model(
    model_name: Annotated[
        str,
        Path(
            description=" ".join(f"`{m.name}`: {m.description}" for m in MODELS.values()),
            examples=["vae"],
        ),
    ],
) -> V2Model:
    model = MODELS.get(model_name)
    if model is None:
        raise UnknownModelError(
            f"Model '{model_name}' is not served here; the models are {listing(list(MODELS))}."
        )
    return model


# Declared before VaeDep in each handler, and FastAPI resolves dependencies in order: an
# unknown model is a 404 even while the model loads.
ModelDep = Annotated[V2Model, Depends(get_v2_model)]


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


async def _is_ready(request: Request) -> bool:
    """Loaded, warmed up, and not draining: what REST's /ready says too."""
    if request.app.state.lifecycle.draining:
        return False
    try:
        await get_vae(request)
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
    """Server ready: 200 once the model is loaded and warmed up, 503 before and while
    draining."""
    return Response(status_code=200 if await _is_ready(request) else 503)


@router.get("/v2")
@router.get("/v2/", include_in_schema=False)
async def get_v2_server_metadata() -> V2ServerMetadata:
    """Server metadata: name, version and the protocol extensions supported."""
    return V2ServerMetadata(name="vae-service", version=__version__, extensions=EXTENSIONS)


@router.get("/v2/models/{model_name}", responses={k: V2_ERRORS[k] for k in (404, 503)})
async def get_v2_model_metadata(model: ModelDep, vae: VaeDep) -> V2ModelMetadata:
    """Model metadata: the model's one input and its outputs, shaped for the loaded artifact."""
    input_shape = [-1, vae.latent_dim if model.operation == "decode" else vae.input_dim]
    return V2ModelMetadata(
        name=model.name,
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
async def get_v2_model_ready(model: ModelDep, request: Request) -> Response:
    """Model ready: 200 once the model is loaded and warmed up, 503 before and while
    draining."""
    return Response(status_code=200 if await _is_ready(request) else 503)


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


@router.post(
    "/v2/models/{model_name}/infer",
    response_model=V2InferenceResponse,
    responses=V2_ERRORS
    | {
        200: {
            "content": {OCTET: {"schema": {"type": "string", "format": "binary"}}},
            "description": f"JSON, or with binary outputs the JSON response ({HEADER_LENGTH} "
            "bytes) followed by each binary output's bytes.",
        },
        **error_responses(V2ErrorResponse, {415: "A compressed body."}),
    },
    openapi_extra=INFER_BODY,
)
async def infer_v2(
    model: ModelDep,
    vae: VaeDep,
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
    """Inference: run the model's operation on one input tensor (JSON or binary)."""
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
    return infer_response(model.name, req.id, arrays, wanted, extra)


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
    if "/versions/" in path:
        message = "This server does not version models; leave /versions/... out of the path."
    else:
        message = f"No V2 endpoint answers {request.method} {where}."
    return error_response(message, 404)
