"""V2 request bodies to numpy and numpy to V2 responses: JSON tensors and the binary tensor
data extension, each check failing with one sentence in V2's error shape."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson
from fastapi import Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from app import operations
from app.common import JSON, OCTET, Arrays, listing
from app.errors import error_payload
from app.model import VAEService
from app.v2.protocol import (
    DATATYPES,
    HEADER_LENGTH,
    NEEDS,
    ProtocolError,
    V2InferenceRequest,
    V2Model,
    V2RequestInput,
)


def error_response(
    message: str, status_code: int, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(
        orjson.dumps(error_payload(message, v2=True)), status_code, headers, media_type=JSON
    )


def split_body(raw: bytes, header: str | None) -> tuple[memoryview, memoryview | None]:
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


def parse_request(head: memoryview, split: bool) -> V2InferenceRequest:
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


def parameters(req: V2InferenceRequest, model: V2Model) -> tuple[Any, bool]:
    """The operation's options, validated as REST validates them, and binary_data_output."""
    given = dict(req.parameters or {})
    binary_output = given.pop("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise ProtocolError("parameters.binary_data_output must be true or false.")
    if "top_features" in given and model.operation == "anomaly":
        # V2 answers tensors only: a ranked list of named features has no tensor to go in.
        raise ProtocolError(
            "parameters.top_features is a REST option; over V2 ask for the 'attribution' "
            "output, one value per feature, and rank it."
        )
    allowed = [f for f in model.params.model_fields if f != "top_features"]
    allowed.append("binary_data_output")
    unknown = [k for k in given if k not in allowed]
    if unknown:
        raise ProtocolError(
            f"Unknown parameter '{unknown[0]}'; model '{model.name}' takes {listing(allowed)}."
        )
    try:
        return model.params.model_validate(given), binary_output
    except ValidationError as e:
        raise RequestValidationError(
            [{**err, "loc": ("body", "parameters", *err["loc"])} for err in e.errors()]
        ) from None


def input_tensor(
    req: V2InferenceRequest,
    model: V2Model,
    binary: memoryview | None,
    *,
    has_bools: bool,
    features: tuple[str, ...] | None = None,
) -> np.ndarray:
    """The one input as float32, shaped as sent and checked for size, rank and finiteness;
    or, for a model trained on a table, one input per feature, named by it (`features`)."""
    names = [inp.name for inp in req.inputs]
    if features and model.operation != "decode" and names and model.input not in names:
        return _feature_inputs(req, model, features, binary, has_bools=has_bools)
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
    dtype = _dtype(inp)
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


def _dtype(inp: V2RequestInput) -> np.dtype[Any]:
    dtype = DATATYPES.get(inp.datatype)
    if dtype is None:
        raise ProtocolError(
            f"Input '{inp.name}' has datatype '{inp.datatype}'; this server takes "
            f"{listing(list(DATATYPES), 'or')}."
        )
    return dtype


def _feature_inputs(
    req: V2InferenceRequest,
    model: V2Model,
    features: tuple[str, ...],
    binary: memoryview | None,
    *,
    has_bools: bool,
) -> np.ndarray:
    """(N, D) from one JSON input of shape [N] (or [N, 1]) per feature, every feature once, the
    V2 form of REST's records. Binary inputs are not taken here: the one-tensor form has them."""
    if binary:
        raise ProtocolError("Inputs named by feature take JSON data only; send one binary input.")
    wanted = set(features)
    columns: dict[str, np.ndarray] = {}
    for inp in req.inputs:
        if inp.name not in wanted:
            raise ProtocolError(
                f"Model '{model.name}' has no input '{inp.name}'; its inputs are "
                f"'{model.input}' or one per feature (GET /model lists them)."
            )
        if inp.name in columns:
            raise ProtocolError(f"Input '{inp.name}' is given more than once.")
        dtype = _dtype(inp)
        if len(inp.shape) not in (1, 2) or inp.shape[1:] not in ([], [1]) or not inp.shape[0]:
            raise ProtocolError(f"Input '{inp.name}' must have shape [N] or [N, 1], N >= 1.")
        if inp.data is None:
            raise ProtocolError(f"Input '{inp.name}' has no data.")
        arr = _json_tensor(
            inp.name, inp.datatype, dtype, inp.shape, inp.data, has_bools=has_bools
        ).reshape(-1)
        first = next(iter(columns.values()), arr)
        if len(arr) != len(first):
            raise ProtocolError(f"Input '{inp.name}' has {len(arr)} rows, the others {len(first)}.")
        columns[inp.name] = arr
    missing = next((f for f in features if f not in columns), None)
    if missing is not None:
        raise ProtocolError(f"The request lacks the input for the feature '{missing}'.")
    with np.errstate(over="ignore", invalid="ignore"):  # overflow: reported by index, later
        return np.stack([columns[f] for f in features], axis=1).astype(np.float32)


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


def data_has_bools(raw: bytes, n: int, req: V2InferenceRequest) -> bool:
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


async def anomaly(scored: operations.Scored) -> tuple[Arrays, dict[str, Any]]:
    """V2 has tensors only: each percentile and `is_anomaly` become outputs of their own, and
    the decision settings go in the response parameters."""
    plan = scored.plan
    arrays: Arrays = dict(scored.scores)
    arrays |= {f"{name}_percentile": p for name, p in scored.percentiles.items()}
    arrays["is_anomaly"] = scored.is_anomaly
    if scored.attribution is not None:
        arrays["attribution"] = scored.attribution
    extra: dict[str, Any] = {
        "decision_score": plan.decision_score,
        "threshold_percentile": plan.threshold,
        "samples": plan.samples,
    }
    if plan.ll_samples:
        extra["log_likelihood_samples"] = plan.ll_samples
    # V2's parameters are scalars: the lists as one string each.
    if scored.uncalibrated:
        extra["uncalibrated"] = ",".join(scored.uncalibrated)
    if scored.warnings:
        extra["warnings"] = " ".join(scored.warnings)
    return arrays, extra


# -- the response ------------------------------------------------------------------------------


def wanted_outputs(
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


def check_output_names(req: V2InferenceRequest, model: V2Model, vae: VAEService) -> None:
    known = model.outputs(vae)
    names = [out.name for out in req.outputs or []]
    for i, name in enumerate(names):
        if name not in known:
            raise ProtocolError(
                f"Model '{model.name}' has no output '{name}'; its outputs are "
                f"{listing(list(known))}."
            )
        if name in names[:i]:
            raise ProtocolError(f"Output '{name}' is requested twice.")


def infer_response(
    model_name: str,
    model_version: int,
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
    body: dict[str, Any] = {"model_name": model_name, "model_version": str(model_version)}
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
