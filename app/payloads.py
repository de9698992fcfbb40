"""Request bodies in, response bodies out: JSON straight to numpy, and binary .npy.

Valid JSON takes a fast path: orjson parses it and numpy builds the array, with no pydantic
float per number. Anything the fast path cannot vouch for (NaN literals, booleans, strings,
ragged or mixed nesting, unknown fields, malformed JSON) is re-read by the pydantic model, so
a 422 is exactly as precise as pydantic's own, and the OpenAPI schema stays the model's.

A body sent as `application/x-npy` is one .npy array (N x D, or N x H x W for images); the
request's other options come as query parameters. `Accept: application/x-npy` asks for the
array outputs as .npy: one array, or a structured array with one field per output.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import Any, TypeVar

import numpy as np
import orjson
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from app.errors import InvalidInputError, UnsupportedMediaTypeError
from app.validation import float32

JSON = "application/json"
NPY = "application/x-npy"

P = TypeVar("P", bound=BaseModel)

# A JSON token the fast path would silently turn into a number: leave those to pydantic.
_SUSPECT = (b"true", b"false")


async def read_array_request(
    request: Request, params_model: type[P], full_model: type[BaseModel], field: str
) -> tuple[P, np.ndarray | list[Any]]:
    """The request's options and its array field (`instances` or `latents`).

    The array comes back as numpy whenever the body allowed it, else as the list pydantic
    validated (e.g. flat and nested instances mixed), for the model-aware checks to place.
    """
    kind = _content_type(request)
    raw = await request.body()
    if kind == NPY:
        params = _validate(params_model, dict(request.query_params))
        return params, _load_npy(raw)
    _refuse_duplicate_keys(raw, full_model)
    fast = _fast_json(raw, params_model, field)
    if fast is not None:
        return fast
    try:
        full = full_model.model_validate_json(raw)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None
    values = full.model_dump()
    array = values.pop(field)
    return params_model.model_validate(values), array


async def read_json_request(request: Request, model: type[P]) -> P:
    """A JSON-only body, read like the array bodies: the same 415, the same duplicate-key
    refusal and the same one-sentence 422s."""
    if _content_type(request) != JSON:
        raise UnsupportedMediaTypeError(f"This route takes {JSON} only.")
    raw = await request.body()
    _refuse_duplicate_keys(raw, model)
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None


def array_response(request: Request, payload: Mapping[str, Any]) -> Response:
    """JSON by default; .npy when the client accepts it (array outputs only)."""
    if NPY in request.headers.get("accept", ""):
        arrays = {k: v for k, v in payload.items() if isinstance(v, np.ndarray)}
        return Response(_npy_bytes(arrays), media_type=NPY)
    return json_response(payload)


def json_response(payload: Mapping[str, Any]) -> Response:
    body = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY, default=_to_list)
    return Response(body, media_type=JSON)


def _to_list(value: Any) -> Any:
    # orjson serialises C-contiguous float32/bool arrays itself; anything else comes here.
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    raise TypeError(f"cannot serialise {type(value).__name__}")


def _content_type(request: Request) -> str:
    value = request.headers.get("content-type", JSON).split(";")[0].strip().lower()
    if value == NPY:
        return NPY
    if value == JSON or (value.startswith("application/") and value.endswith("+json")):
        return JSON
    raise UnsupportedMediaTypeError(
        f"Content-Type '{value}' is not supported; send {JSON} or {NPY}."
    )


def _refuse_duplicate_keys(raw: bytes, model: type[BaseModel]) -> None:
    """422 for a body that gives one field twice, which JSON parsers (orjson, pydantic) settle
    silently by keeping the last. Counting the field names costs a few microseconds; only a
    body where one appears twice, or with escapes that could spell one, is parsed again."""
    if b"\\u" not in raw and all(raw.count(b'"%s"' % f.encode()) < 2 for f in model.model_fields):
        return
    try:
        json.loads(raw, object_pairs_hook=_unique_pairs)
    except _DuplicateKeyError as e:
        raise InvalidInputError(
            f"The request body gives the key '{e.key}' more than once."
        ) from None
    except (ValueError, RecursionError):  # not JSON, or too deep: the parsers that follow
        return  # say so precisely


class _DuplicateKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKeyError(key)
        seen[key] = value
    return seen


def _fast_json(raw: bytes, params_model: type[P], field: str) -> tuple[P, np.ndarray] | None:
    if any(token in raw for token in _SUSPECT):
        return None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if type(body) is not dict or field not in body:
        return None
    try:
        array = np.asarray(body.pop(field))
    except ValueError:  # ragged
        return None
    # Only a regular array of plain numbers (no strings, no objects), finite, and non-empty.
    if array.dtype.kind not in "fiu" or array.ndim < 2 or array.size == 0:
        return None
    array = float32(array)
    if not np.isfinite(array).all():  # e.g. 1e300 overflows float32: pydantic's path says where
        return None
    try:
        params = params_model.model_validate(body)
    except ValidationError:
        return None
    return params, array


def _validate(model: type[P], values: Mapping[str, Any]) -> P:
    try:
        return model.model_validate(values)
    except ValidationError as e:
        # Query parameters: point the client at where the option came from.
        errors = [{**err, "loc": ("query", *err["loc"])} for err in e.errors()]
        raise RequestValidationError(errors) from None


def _load_npy(raw: bytes) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        reason = str(e).split("\n")[0].rstrip(".")
        raise InvalidInputError(f"The request body is not a valid .npy array: {reason}.") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiu":
        raise InvalidInputError("The .npy array must hold plain numbers (float or integer).")
    if array.ndim < 2 or array.shape[0] == 0:
        raise InvalidInputError(
            f"The .npy array must be N x D or N x H x W with N >= 1; got shape {array.shape}."
        )
    array = float32(array)
    finite = np.isfinite(array.reshape(len(array), -1)).all(axis=1)
    if not finite.all():
        raise InvalidInputError(f"instances[{int(np.argmin(finite))}] has a non-finite value.")
    return array


def _npy_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    if len(arrays) == 1:
        np.save(buf, next(iter(arrays.values())), allow_pickle=False)
    else:
        # One record per instance, one field per output: np.load(...)["mean"] is (B, Z).
        n = len(next(iter(arrays.values())))
        dtype = np.dtype([(k, v.dtype, v.shape[1:]) for k, v in arrays.items()])
        record = np.empty(n, dtype=dtype)
        for k, v in arrays.items():
            record[k] = v
        np.save(buf, record, allow_pickle=False)
    return buf.getvalue()
