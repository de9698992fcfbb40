"""The Open Inference Protocol (KServe "V2") over REST, beside the service's own API.

Endpoints: `GET /v2/health/live`, `GET /v2/health/ready`, `GET /v2` (server metadata),
`GET /v2/models/{name}` (model metadata), `GET /v2/models/{name}/ready` and
`POST /v2/models/{name}/infer`, with JSON tensors and the binary tensor data extension.

Design decisions:

* **Each operation is a model name**: `vae` encodes, `vae-decode` decodes, `vae-anomaly`
  scores. V2 model metadata describes one tensor signature per model, and generic V2 tools
  (perf_analyzer, model-agnostic clients) build their requests from it. The three
  operations take different inputs (x of length D, or z of length Z) and give different
  outputs, so a single model switched by an `operation` parameter could only advertise a
  signature that is wrong for two of the three. `vae` is the encoder because the
  representation q(z|x) is the model's primary output, and the issue names `/v2/models/vae`.
* **Options are request `parameters`**, validated by the very models the REST routes use
  (`EncodeParams`, `DecodeParams`, `AnomalyScoreParams`), so `seed`, `samples` and the rest
  mean and are bounded the same; `binary_data_output` is V2's own. Unknown parameters are
  refused, as unknown REST fields are.
* **The same path through the model as REST**: checks from `validation.py` (shapes, range,
  VAE_MAX_INSTANCES and the sample limits, with the same sentences) and the same batcher keys
  and operations, so V2 and REST requests for the same work share a forward pass.
* **Inputs**: FP32, and FP16, FP64 and the integer types converted to float32 (cheap, and
  what numpy-first clients send); shape [N, D] or [N, *input_shape]. Metadata advertises
  [-1, D], the one shape every artifact has. Data is flat or nested to the shape.
* **Outputs**: FP32 tensors (BOOL for `is_anomaly`); JSON `data` is flat, row-major. The
  anomaly model's scalars (decision score, threshold, L and K) come back as response
  `parameters`. No versioning: metadata lists no versions, answers carry no `model_version`.
* **Errors** are `{"error": "<one sentence>"}`. Bad input is a 400, the spec's "typically
  400", also for the checks REST answers with 422; an unknown model or endpoint is a 404, a
  wrong method a 405, a compressed body a 415. Not ready is a 503 (the spec says 4xx for
  "false"; 503 is what `/ready` answers, and Kubernetes and tritonclient read any non-200 as
  false). Health answers carry no body, as the spec asks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Header, HTTPException, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError
from starlette.routing import Match

from app import __version__, operations
from app.errors import NotReadyError, VAEServiceError, describe_validation_error
from app.model import VAEService
from app.routes import BatcherDep, SettingsDep, VaeDep, get_vae
from app.schemas import AnomalyScoreParams, DecodeParams, EncodeParams

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON = "application/json"
OCTET = "application/octet-stream"
PLATFORM = "pytorch_torchscript"  # the spec's platform name for TorchScript models
EXTENSIONS = ["binary_tensor_data"]

# The spec's datatypes this server takes, as little-endian numpy types (the binary
# extension's byte order); each becomes float32 before the model sees it.
DATATYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(code)
    for name, code in [
        ("FP32", "<f4"), ("FP16", "<f2"), ("FP64", "<f8"),
        ("INT8", "i1"), ("INT16", "<i2"), ("INT32", "<i4"), ("INT64", "<i8"),
        ("UINT8", "u1"), ("UINT16", "<u2"), ("UINT32", "<u4"), ("UINT64", "<u8"),
    ]
}  # fmt: skip
SCORES = ("kl_divergence", "reconstruction_log_prob", "log_likelihood")


class ProtocolError(VAEServiceError):
    """A request that breaks the protocol or this model's signature."""

    status_code = 400


class UnknownModelError(VAEServiceError):
    status_code = 404


class UnsupportedEncodingError(VAEServiceError):
    status_code = 415


# -- the operations as models ------------------------------------------------------------------


@dataclass(frozen=True)
class V2Model:
    name: str
    operation: Literal["encode", "decode", "anomaly"]
    input: str  # the one input tensor's name, the REST field it mirrors
    params: type[BaseModel]
    description: str

    def outputs(self, vae: VAEService) -> dict[str, tuple[str, list[int]]]:
        """Every output this model can give: name -> (datatype, shape), -1 for any size."""
        z, d = vae.latent_dim, vae.input_dim
        if self.operation == "encode":
            return {"mean": ("FP32", [-1, z]), "std": ("FP32", [-1, z]),
                    "samples": ("FP32", [-1, -1, z])}  # fmt: skip
        if self.operation == "decode":
            return {"outputs": ("FP32", [-1, d])}
        outs = {name: ("FP32", [-1]) for name in SCORES}
        outs |= {f"{name}_percentile": ("FP32", [-1]) for name in SCORES}
        return outs | {"is_anomaly": ("BOOL", [-1])}


MODELS = {
    m.name: m
    for m in (
        V2Model("vae", "encode", "instances", EncodeParams,
                "Encode: the posterior q(z|x) as `mean` and `std` (and `samples` draws)."),
        V2Model("vae-decode", "decode", "latents", DecodeParams,
                "Decode: latents z to outputs (the decoder's mean, or with `output` mode)."),
        V2Model("vae-anomaly", "anomaly", "instances", AnomalyScoreParams,
                "Anomaly scores, their calibrated percentiles and `is_anomaly`."),
    )
}  # fmt: skip

# Outputs that exist only when a parameter asks for them, and what to ask.
NEEDS = {
    "samples": "parameters.samples > 0",
    "log_likelihood": "parameters.log_likelihood_samples, or decision_score log_likelihood",
    "log_likelihood_percentile": "parameters.log_likelihood_samples, or decision_score "
    "log_likelihood",
}


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
            f"Model '{model_name}' is not served here; the models are {_listing(list(MODELS))}."
        )
    return model


# Declared before VaeDep in each handler, and FastAPI resolves dependencies in order: an
# unknown model is a 404 even while the model loads.
ModelDep = Annotated[V2Model, Depends(get_v2_model)]


# -- the protocol's JSON objects ---------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class V2InputParameters(_Strict):
    binary_data_size: int | None = Field(
        None,
        ge=0,
        strict=True,
        description="Binary extension: the tensor's bytes follow the JSON header instead of "
        "`data`, little-endian, row-major.",
    )


class V2RequestInput(_Strict):
    name: StrictStr = Field(description="`instances` (vae, vae-anomaly) or `latents`.")
    shape: list[Annotated[int, Field(strict=True, ge=0)]] = Field(
        description="[N, D] or [N, *input_shape] for instances; [N, Z] for latents."
    )
    datatype: StrictStr = Field(
        description=f"FP32, or one of {', '.join(DATATYPES)}, converted to float32."
    )
    parameters: V2InputParameters | None = None
    # Any, not list[float]: the tensor is read by numpy, not one pydantic float at a time.
    data: Any = Field(
        None,
        description="The values, row-major: flat, or nested to `shape`. Absent when "
        "`parameters.binary_data_size` is given.",
        json_schema_extra={"type": "array", "items": {}},
    )


class V2OutputParameters(_Strict):
    binary_data: StrictBool | None = Field(
        None, description="Binary extension: return this output's bytes after the JSON header."
    )


class V2RequestOutput(_Strict):
    name: StrictStr
    parameters: V2OutputParameters | None = None


class V2InferenceRequest(_Strict):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "id": "42",
                    "parameters": {"seed": 0},
                    "inputs": [
                        {
                            "name": "instances",
                            "shape": [1, 784],
                            "datatype": "FP32",
                            "data": [0.0] * 784,
                        }
                    ],
                    "outputs": [{"name": "mean"}],
                }
            ]
        },
    )

    id: StrictStr | None = Field(None, description="Echoed in the response.")
    parameters: dict[str, Any] | None = Field(
        None,
        description="The operation's options, as in the REST API: vae takes samples and seed; "
        "vae-decode output; vae-anomaly samples, log_likelihood_samples, "
        "threshold_percentile, decision_score and seed. All take binary_data_output.",
    )
    inputs: list[V2RequestInput] = Field(min_length=1)
    outputs: list[V2RequestOutput] | None = Field(
        None, description="Outputs to return; all that the request computes when absent."
    )


class V2ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = Field(
        None, description="`binary_data_size` when the bytes follow the JSON header."
    )
    data: list[Any] | None = Field(None, description="Flat, row-major; absent when binary.")


class V2InferenceResponse(BaseModel):
    model_name: str
    id: str | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="vae-anomaly: decision_score, threshold_percentile, samples (L) and "
        "log_likelihood_samples (K).",
    )  # fmt: skip
    outputs: list[V2ResponseOutput]


class V2TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 marks a dimension of any size.")


class V2ModelMetadata(BaseModel):
    name: str
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2ErrorResponse(BaseModel):
    error: str = Field(
        description="One sentence saying what was wrong.",
        examples=["Model 'vae' has no input 'x'; its input is 'instances'."],
    )


def _inline(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with its $defs inlined: the infer body is read by hand (it may
    be binary), so its schema goes into openapi_extra, where refs to $defs would dangle."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return dict(resolve(schema))


# -- errors in V2's shape ----------------------------------------------------------------------


def error_response(
    message: str, status_code: int, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(orjson.dumps({"error": message}), status_code, headers, media_type=JSON)


class V2Route(APIRoute):
    """Answers failures as `{"error": ...}`, the shape V2 clients read, instead of the
    service's `{"detail": ...}`; handlers and dependencies raise the usual exceptions."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except VAEServiceError as e:
                status = 400 if e.status_code == 422 else e.status_code
                return error_response(e.detail, status)
            except RequestValidationError as e:
                return error_response(describe_validation_error(e), 400)
            except HTTPException as e:  # e.g. a limit enforced by a shared dependency
                return error_response(str(e.detail), e.status_code, e.headers)

        return handle


V2_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": V2ErrorResponse, "description": "The request is not valid for this model."},
    404: {"model": V2ErrorResponse, "description": "No such model."},
    503: {"model": V2ErrorResponse, "description": "The model is not loaded yet."},
}

router = APIRouter(route_class=V2Route, tags=["v2"])


# -- health and metadata -----------------------------------------------------------------------


async def _is_ready(request: Request) -> bool:
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
    """Server ready: 200 once the model is loaded and warmed up, 503 before."""
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
    """Model ready: 200 once the model is loaded and warmed up, 503 before."""
    return Response(status_code=200 if await _is_ready(request) else 503)


# -- inference ---------------------------------------------------------------------------------

INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            JSON: {"schema": _inline(V2InferenceRequest)},
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
        415: {"model": V2ErrorResponse, "description": "A compressed body."},
    },
    openapi_extra=INFER_BODY,
)
async def infer_v2(
    model: ModelDep,
    vae: VaeDep,
    request: Request,
    batcher: BatcherDep,
    settings: SettingsDep,
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
    head, tail = _split_body(raw, header_length)
    req = _parse_request(head, header_length is not None)
    params, binary_output = _parameters(req, model)
    arr = _input_tensor(req, model, tail, has_bools=_data_has_bools(raw, len(head), req))
    _check_output_names(req, model, vae)  # before the model runs, not after
    request.state.instances = len(arr)
    # The same operations as REST, so V2 and REST requests batch together.
    extra: dict[str, Any] = {}
    if model.operation == "encode":
        arrays = dict(await operations.encode(arr, params, vae, batcher, settings))
    elif model.operation == "decode":
        arrays = dict(await operations.decode(arr, params, vae, batcher, settings))
    else:
        metrics = request.app.state.metrics
        scored = await operations.score(arr, params, vae, batcher, settings, metrics)
        arrays, extra = await _anomaly(scored)
    wanted = _wanted_outputs(req, model, vae, arrays, binary_output)
    return _infer_response(model.name, req.id, arrays, wanted, extra)


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
        message = f"{request.method} is not allowed on {where}; use {_listing(allowed, 'or')}."
        return error_response(message, 405, {"Allow": ", ".join(allowed)})
    if "/versions/" in path:
        message = "This server does not version models; leave /versions/... out of the path."
    else:
        message = f"No V2 endpoint answers {request.method} {where}."
    return error_response(message, 404)


# -- the request, piece by piece ---------------------------------------------------------------


def _split_body(raw: bytes, header: str | None) -> tuple[memoryview, memoryview | None]:
    """The JSON part, and the binary part when the request has one."""
    view = memoryview(raw)
    if header is None:
        return view, None
    try:
        n = int(header)
    except ValueError:
        n = -1
    if not 0 < n <= len(raw):
        raise ProtocolError(
            f"{HEADER_LENGTH} must be a byte count from 1 to the body's {len(raw)}; got '{header}'."
        )
    return view[:n], view[n:]


def _parse_request(head: memoryview, split: bool) -> V2InferenceRequest:
    if not head:
        raise ProtocolError("The request body is empty; send a JSON inference request.")
    try:
        body = orjson.loads(head)
    except orjson.JSONDecodeError:
        where = f"The first {len(head)} bytes ({HEADER_LENGTH}) are" if split else "The body is"
        raise ProtocolError(f"{where} not a valid JSON inference request.") from None
    if type(body) is not dict:
        raise ProtocolError("The inference request must be a JSON object.")
    try:
        return V2InferenceRequest.model_validate(body)
    except ValidationError as e:
        # "body" first, as FastAPI places body errors, so the message reads like REST's.
        raise RequestValidationError(
            [{**err, "loc": ("body", *err["loc"])} for err in e.errors()]
        ) from None


def _parameters(req: V2InferenceRequest, model: V2Model) -> tuple[Any, bool]:
    """The operation's options, validated as REST validates them, and binary_data_output."""
    given = dict(req.parameters or {})
    binary_output = given.pop("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise ProtocolError("parameters.binary_data_output must be true or false.")
    allowed = [*model.params.model_fields, "binary_data_output"]
    unknown = [k for k in given if k not in allowed]
    if unknown:
        raise ProtocolError(
            f"Unknown parameter '{unknown[0]}'; model '{model.name}' takes {_listing(allowed)}."
        )
    try:
        return model.params.model_validate(given), binary_output
    except ValidationError as e:
        raise RequestValidationError(
            [{**err, "loc": ("body", "parameters", *err["loc"])} for err in e.errors()]
        ) from None


def _input_tensor(
    req: V2InferenceRequest, model: V2Model, binary: memoryview | None, *, has_bools: bool
) -> np.ndarray:
    """The one input as float32, shaped as sent and checked for size, rank and finiteness."""
    names = [inp.name for inp in req.inputs]
    unknown = [n for n in names if n != model.input]
    if unknown:
        raise ProtocolError(
            f"Model '{model.name}' has no input '{unknown[0]}'; its input is '{model.input}'."
        )
    if len(names) > 1:
        raise ProtocolError(
            f"Model '{model.name}' takes one input, '{model.input}'; the request has {len(names)}."
        )
    inp = req.inputs[0]
    name, shape = inp.name, inp.shape
    dtype = DATATYPES.get(inp.datatype)
    if dtype is None:
        raise ProtocolError(
            f"Input '{name}' has datatype '{inp.datatype}'; this server takes "
            f"{_listing(list(DATATYPES), 'or')}."
        )
    count = math.prod(shape)
    size = inp.parameters.binary_data_size if inp.parameters else None
    if size is not None and inp.data is not None:
        raise ProtocolError(f"Input '{name}' has both data and binary_data_size; send one.")
    if size is not None:
        if binary is None:
            raise ProtocolError(
                f"Input '{name}' has binary_data_size, but the request has no {HEADER_LENGTH} "
                "header to say where its bytes start."
            )
        if size != count * dtype.itemsize:
            raise ProtocolError(
                f"Input '{name}' is {inp.datatype} of shape {shape}, which is "
                f"{count * dtype.itemsize} bytes, but its binary_data_size is {size}."
            )
        if size != len(binary):
            raise ProtocolError(
                f"The body has {len(binary)} bytes after the JSON part, but binary_data_size "
                f"says {size}."
            )
        arr = np.frombuffer(binary, dtype=dtype).reshape(shape)
    elif inp.data is not None:
        if binary:
            raise ProtocolError(
                f"The body has {len(binary)} bytes after the JSON part, but no input has "
                "binary_data_size."
            )
        arr = _json_tensor(name, inp.datatype, dtype, shape, inp.data, has_bools=has_bools)
    else:
        raise ProtocolError(f"Input '{name}' has no data; give data or binary_data_size.")
    _check_rank(model, arr)
    if dtype.kind == "f":
        finite = np.isfinite(arr.reshape(len(arr), -1)).all(axis=1)
        if not finite.all():
            # JSON has no NaN or infinity, so there it is a number beyond the datatype.
            what = (
                "a non-finite value" if size is not None else f"values too large for {inp.datatype}"
            )
            raise ProtocolError(f"{name}[{int(np.argmin(finite))}] has {what}.")
    # A fresh, writable float32 copy (frombuffer's view is read-only, which torch warns about);
    # FP64 values beyond float32 become inf, which validation.py reports by index.
    with np.errstate(over="ignore", invalid="ignore"):
        return arr.astype(np.float32)


def _json_tensor(
    name: str, datatype: str, dtype: np.dtype[Any], shape: list[int], data: Any, *,
    has_bools: bool,
) -> np.ndarray:  # fmt: skip
    if not isinstance(data, list):
        raise ProtocolError(f"Input '{name}' data must be a JSON array.")
    try:
        arr = np.asarray(data)
    except ValueError:
        raise ProtocolError(
            f"Input '{name}' has ragged data; send it flat or nested to its shape {shape}."
        ) from None
    if arr.dtype.kind not in "iuf" or has_bools:
        raise ProtocolError(f"Input '{name}' data must hold only numbers.")
    if arr.ndim > 1 and list(arr.shape) != shape:
        raise ProtocolError(
            f"Input '{name}' data is nested as {list(arr.shape)}, not as its shape {shape}."
        )
    if arr.size != math.prod(shape):
        raise ProtocolError(
            f"Input '{name}' has shape {shape}, which is {math.prod(shape)} values, but its "
            f"data has {arr.size}."
        )
    if dtype.kind in "iu" and arr.size:
        if arr.dtype.kind == "f" and not np.array_equal(arr, np.trunc(arr)):
            raise ProtocolError(f"Input '{name}' is {datatype} but its data has fractions.")
        info = np.iinfo(dtype)
        if arr.min() < info.min or arr.max() > info.max:
            raise ProtocolError(f"Input '{name}' has data outside the range of {datatype}.")
    with np.errstate(over="ignore", invalid="ignore"):  # overflow: reported by index, later
        return arr.astype(dtype).reshape(shape)


def _data_has_bools(raw: bytes, n: int, req: V2InferenceRequest) -> bool:
    """Whether the input's data holds a JSON true or false, which numpy would read as 1 or 0.
    Counts the tokens in the JSON part and in the request without its data: tens of
    microseconds, where walking a large tensor's values would take tens of milliseconds."""
    in_raw = raw.count(b"true", 0, n) + raw.count(b"false", 0, n)
    if not in_raw:
        return False
    rest = orjson.dumps(req.model_dump(exclude={"inputs": {"__all__": {"data"}}}))
    return in_raw > rest.count(b"true") + rest.count(b"false")


def _check_rank(model: V2Model, arr: np.ndarray) -> None:
    """[N, ...] with N >= 1; the per-instance shape is validation.py's to judge and name."""
    name, shape = model.input, list(arr.shape)
    if model.operation == "decode" and arr.ndim != 2:
        raise ProtocolError(f"Input '{name}' must have shape [N, Z]; got {shape}.")
    if arr.ndim < 2:
        raise ProtocolError(
            f"Input '{name}' must have shape [N, D] or [N, *input_shape]; got {shape}."
        )
    if shape[0] == 0:
        raise ProtocolError(f"Input '{name}' has no rows; send at least one.")


# -- the operations: the same checks, batcher keys and model calls as app/routes.py ------------

Arrays = dict[str, np.ndarray]


async def _anomaly(scored: operations.Scored) -> tuple[Arrays, dict[str, Any]]:
    """V2 has tensors only: each percentile and `is_anomaly` become outputs of their own, and
    the decision settings go in the response parameters."""
    plan = scored.plan
    arrays: Arrays = dict(scored.scores)
    arrays |= {f"{name}_percentile": p for name, p in scored.percentiles.items()}
    arrays["is_anomaly"] = scored.is_anomaly
    extra: dict[str, Any] = {
        "decision_score": plan.decision_score,
        "threshold_percentile": plan.threshold,
        "samples": plan.samples,
    }
    if plan.ll_samples:
        extra["log_likelihood_samples"] = plan.ll_samples
    return arrays, extra


# -- the response ------------------------------------------------------------------------------


def _wanted_outputs(
    req: V2InferenceRequest, model: V2Model, vae: VAEService, arrays: Arrays, binary: bool
) -> list[tuple[str, bool]]:
    """(name, as binary) for each output to return, in order; all computed ones by default."""
    if req.outputs is None:
        return [(name, binary) for name in model.outputs(vae) if name in arrays]
    wanted: list[tuple[str, bool]] = []
    for out in req.outputs:
        if out.name not in arrays:
            raise ProtocolError(f"Output '{out.name}' needs {NEEDS[out.name]}.")
        flag = out.parameters.binary_data if out.parameters else None
        wanted.append((out.name, binary if flag is None else flag))
    return wanted


def _check_output_names(req: V2InferenceRequest, model: V2Model, vae: VAEService) -> None:
    known = model.outputs(vae)
    names = [out.name for out in req.outputs or []]
    for i, name in enumerate(names):
        if name not in known:
            raise ProtocolError(
                f"Model '{model.name}' has no output '{name}'; its outputs are "
                f"{_listing(list(known))}."
            )
        if name in names[:i]:
            raise ProtocolError(f"Output '{name}' is requested twice.")


def _infer_response(
    model_name: str,
    request_id: str | None,
    arrays: Arrays,
    wanted: list[tuple[str, bool]],
    parameters: dict[str, Any],
) -> Response:
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, binary in wanted:
        arr = np.ascontiguousarray(arrays[name])
        is_bool = arr.dtype == np.bool_
        entry: dict[str, Any] = {
            "name": name,
            "shape": list(arr.shape),
            "datatype": "BOOL" if is_bool else "FP32",
        }
        if binary:
            # The extension's layout: little-endian, row-major; BOOL is one byte, 0 or 1.
            raw = arr.astype(np.uint8 if is_bool else "<f4").tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = arr.reshape(-1)
        outputs.append(entry)
    body: dict[str, Any] = {"model_name": model_name}
    if request_id is not None:
        body["id"] = request_id
    if parameters:
        body["parameters"] = parameters
    body["outputs"] = outputs
    head = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return Response(head, media_type=JSON)
    return Response(
        b"".join([head, *chunks]), media_type=OCTET, headers={HEADER_LENGTH: str(len(head))}
    )


def _listing(names: list[str], conj: str = "and") -> str:
    return ", ".join(names[:-1]) + f" {conj} {names[-1]}" if len(names) > 1 else names[0]
