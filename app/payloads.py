"""Request bodies in, response bodies out: JSON straight to numpy, and binary .npy.

Valid JSON takes a fast path: orjson parses it and numpy builds the array, with no pydantic
float per number. Anything the fast path cannot vouch for (NaN literals, booleans, strings,
ragged or mixed nesting, unknown fields, malformed JSON) is re-read by the pydantic model, so
a 422 is exactly as precise as pydantic's own, and the OpenAPI schema stays the model's.

A body sent as `application/x-npy` is one .npy array (N x D, or N x H x W for images); the
request's other options come as query parameters. `Accept: application/x-npy` asks for the
array outputs as .npy: one array, or a structured array with one field per output.

For image models, /encode and /anomaly-score also take PNG or JPEG uploads as
`multipart/form-data`, and /sample and /decode answer `Accept: image/png` with one PNG grid
(the pictures themselves: app/images.py).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from typing import Any, TypeVar

import anyio
import numpy as np
import orjson
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from app import images
from app.common import JSON, MULTIPART, NPY, PNG
from app.errors import InvalidInputError, UnsupportedMediaTypeError, VAEServiceError
from app.model import VAEService
from app.validation import float32
from scoring.artifact import REDRAWN_RESIDUAL

UPLOAD_FIELD = "file"

P = TypeVar("P", bound=BaseModel)

# All an array of plain numbers is made of, in JSON: the fast path's one check.
_NUMERIC = b"0123456789.,-+eE[] \n\r\t"


async def read_array_request(
    request: Request,
    params_model: type[P],
    full_model: type[BaseModel],
    field: str,
    own_query: tuple[str, ...] = (),
) -> tuple[P, np.ndarray | list[Any]]:
    """The request's options and its array field (`instances` or `latents`).

    The array comes back as numpy whenever the body allowed it, else as the list pydantic
    validated (e.g. flat and nested instances mixed), for the model-aware checks to place.
    Options come in the body or the query string, whatever the body's type (`with_query`).
    `own_query` names query parameters the caller reads itself (e.g. a PNG's `scale`).
    """
    kind = _content_type(request)
    raw = await request.body()
    _refuse_empty(raw)
    if kind == NPY:
        return _validate(params_model, query_options(request, own_query)), _load_npy(raw)
    fast = _fast_json(raw, params_model, field)
    if fast is not None:
        return with_query(request, fast[0], own_query), fast[1]
    _refuse_duplicate_keys(raw, full_model)
    try:
        full = full_model.model_validate_json(raw)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None
    values = full.model_dump(exclude_unset=True)  # what the body set: the query may add to it
    array = values.pop(field, None)
    records = values.pop("records", None)  # the table models' other form: validation.py
    params = with_query(request, params_model.model_validate(values), own_query)
    return params, records if array is None else array


async def read_json_request(request: Request, model: type[P], own_query: tuple[str, ...] = ()) -> P:
    """A JSON-only body, read like the array bodies: the same 415, the same duplicate-key
    refusal, the same one-sentence 422s and the same options from the query string."""
    if _content_type(request) != JSON:
        raise UnsupportedMediaTypeError(f"This route takes {JSON} only.")
    raw = await request.body()
    _refuse_empty(raw)
    _refuse_duplicate_keys(raw, model)
    try:
        body = model.model_validate_json(raw)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None
    return with_query(request, body, own_query)


def query_options(request: Request, own_query: tuple[str, ...]) -> dict[str, str]:
    """The query string's options, each given once, without those the caller reads itself."""
    query: dict[str, str] = {}
    if not request.scope.get("query_string"):  # the common case: skip parsing nothing
        return query
    for key, value in request.query_params.multi_items():
        if key in query:
            raise InvalidInputError(f"The query gives the option '{key}' more than once.")
        if key not in own_query:
            query[key] = value
    return query


def with_query(request: Request, params: P, own_query: tuple[str, ...]) -> P:
    """One rule for every body: an option may come in the body or in the query string, not in
    both (a 422 names it), and an unknown query parameter is a 422 as an unknown field is."""
    query = query_options(request, own_query)
    if not query:
        return params
    both = sorted(query.keys() & params.model_fields_set)
    if both:
        raise InvalidInputError(f"The option '{both[0]}' is given both in the query and the body.")
    from_query = _validate(type(params), query).model_dump(exclude_unset=True)
    return params.model_copy(update=from_query)


def accepts_npy(request: Request) -> bool:
    return NPY in request.headers.get("accept", "")


def accepts_only_npy(request: Request) -> bool:
    """The client takes .npy and no JSON. /anomaly-score answers .npy only then: its decision
    settings (score, threshold, L, K) have no place in a .npy record, so a client that also
    takes JSON, as vae-service-client does, keeps getting the whole answer."""
    accepted = _accepted(request)
    json_q = max(accepted.get(m, 0.0) for m in (JSON, "application/*", "*/*"))
    return accepted.get(NPY, 0.0) > 0.0 and json_q <= 0.0


def array_response(request: Request, payload: Mapping[str, Any]) -> Response:
    """JSON by default; .npy when the client accepts it (array outputs only)."""
    if accepts_npy(request):
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


def _refuse_empty(raw: bytes) -> None:
    if not raw.strip():  # JSON parsers call this invalid JSON, which hides what is wrong
        raise InvalidInputError("The request body is missing or empty.")


def _refuse_duplicate_keys(raw: bytes, model: type[BaseModel]) -> None:
    """422 for a body that gives one key twice, which JSON parsers (orjson, pydantic) settle
    silently by keeping the last; a record (table models) that gives a feature twice is named
    by its index. Counting the field names costs a few microseconds; only a body where one
    appears twice, with escapes that could spell one, or with records is parsed again."""
    fields = model.model_fields
    if (
        b"\\u" not in raw
        and b'"records"' not in raw
        and all(raw.count(b'"%s"' % f.encode()) < 2 for f in fields)
    ):
        return
    try:
        body = json.loads(raw, object_pairs_hook=_Pairs)
    except (ValueError, RecursionError):  # not JSON, or too deep: the parsers that follow
        return  # say so precisely
    records = dict(body).get("records") if isinstance(body, _Pairs) else None
    for i, record in enumerate(records if isinstance(records, list) else []):
        name = _repeated_key(record) if isinstance(record, _Pairs) else None
        if name is not None:
            raise InvalidInputError(f"records[{i}] gives the feature '{name}' more than once.")
    key = _repeated_key(body)
    if key is not None:
        raise InvalidInputError(f"The request body gives the key '{key}' more than once.")


class _Pairs(list[tuple[str, Any]]):
    """A JSON object as parsed, keys in order and repeats kept."""


def _repeated_key(value: Any) -> str | None:
    """The first key given twice in one object, innermost objects first, anywhere in value."""
    children = [v for _, v in value] if isinstance(value, _Pairs) else value
    if isinstance(children, list):
        for child in children:
            if (key := _repeated_key(child)) is not None:
                return key
    if isinstance(value, _Pairs):
        seen: set[str] = set()
        for key, _ in value:
            if key in seen:
                return key
            seen.add(key)
    return None


def _fast_json(raw: bytes, params_model: type[P], field: str) -> tuple[P, np.ndarray] | None:
    """The common body, `{"<field>": [[numbers...]], <options>}`, without pydantic: None for
    anything else, which the precise path then reads.

    One pass over the bytes vouches for the array: between the field's first `[` and the
    body's last `]` there must be nothing but numbers, brackets, commas and whitespace (no
    string, true, false, null, NaN, object or second key). The few bytes around it must hold
    exactly the quotes of the keys and string values orjson returns, and no escape, so no key
    is given twice (orjson would keep the last silently). This replaces a scan per field name
    and one per suspect token, which cost more than parsing the numbers."""
    at = raw.find(b'"%s"' % field.encode())
    start = raw.find(b"[", at + 1)
    end = raw.rfind(b"]") + 1
    if at < 0 or start < 0 or end <= start or raw[start:end].translate(None, _NUMERIC):
        return None
    head, tail = raw[:start], raw[end:]
    if b"\\" in head or b"\\" in tail:
        return None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if type(body) is not dict or field not in body:
        return None
    strings = sum(type(v) is str for v in body.values())
    if head.count(b'"') + tail.count(b'"') != 2 * (len(body) + strings):
        return None
    try:
        array = float32(body.pop(field))
    except (ValueError, TypeError):  # ragged, or flat and nested mixed
        return None
    if array.ndim < 2 or array.size == 0 or not np.isfinite(array).all():
        return None  # pydantic's path names the bad instance (e.g. 1e300 overflows float32)
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


# -- images: uploads in, PNG grids out (image models only) --------------------------------------

# Picture work runs in threads, at most two at once: decoding a 4096 x 4096 RGBA upload peaks near
# 0.2 GB, so concurrent uploads must not multiply that. Requests wait here without holding a
# thread, so the pool that serves plain `def` routes (/health) never fills up with them.
_PICTURE_WORK = anyio.CapacityLimiter(2)


class NotAcceptableError(VAEServiceError):
    """The client accepts only a representation this model cannot give (406)."""

    status_code = 406


async def read_instances_request(
    request: Request,
    params_model: type[P],
    full_model: type[BaseModel],
    vae: VAEService,
    max_images: int,
    own_query: tuple[str, ...] = (),
) -> tuple[P, np.ndarray | list[Any]]:
    """/encode's and /anomaly-score's input: JSON or .npy as `read_array_request` reads them,
    or, for an image model, images uploaded as multipart/form-data (options in the form or
    the query string, as for the other bodies)."""
    media = request.headers.get("content-type", JSON).split(";")[0].strip().lower()
    if media != MULTIPART:
        return await read_array_request(request, params_model, full_model, "instances", own_query)
    if not images.is_image_shape(vae.input_shape):
        raise UnsupportedMediaTypeError(
            f"This model takes vectors of {vae.input_dim} values, not images; send {JSON} or {NPY}."
        )
    form = await _read_form(request, max_images)
    try:
        uploads, options = _split_form(form, query_options(request, own_query))
        if len(uploads) > max_images:
            raise InvalidInputError(
                f"{len(uploads)} images is over the limit of {max_images} (VAE_MAX_INSTANCES)."
            )
        invert = {k: options.pop(k) for k in images.UploadOptions.model_fields if k in options}
        upload_options = _validate_options(images.UploadOptions, invert, request)
        params = _validate_options(params_model, options, request)
        files = [(_label(i, u), await u.read()) for i, u in enumerate(uploads)]
    finally:
        await form.close()
    shape = (vae.input_shape[0], vae.input_shape[1])
    # Off the event loop: a 4096 x 4096 upload takes most of a second to decode and resize.
    pixels = await anyio.to_thread.run_sync(
        images.read_images, files, shape, upload_options.invert, limiter=_PICTURE_WORK
    )
    return params, images.to_instances(pixels, _value_range(vae))


def png_scale(
    request: Request,
    vae: VAEService,
    n: int,
    cell: tuple[int, int] | None = None,
    legend: bool = False,
) -> int | None:
    """The scale of a PNG answer when the client asks for image/png, else None.

    Checked before the model runs: a vector model cannot draw (406, unless the client accepts
    JSON or .npy too, which it then gets), and the grid must fit images.MAX_SIDE."""
    # The option is checked whenever it is given, so a bad one never passes unnoticed.
    query = {k: v for k, v in request.query_params.items() if k in images.PngOptions.model_fields}
    scale = _validate(images.PngOptions, query).scale
    accepted = _accepted(request)
    if max(accepted.get(PNG, 0.0), accepted.get("image/*", 0.0)) <= 0.0:
        return None
    if not images.is_image_shape(vae.input_shape):
        if any(accepted.get(m, 0.0) > 0.0 for m in (JSON, NPY, "application/*", "*/*")):
            return None
        raise NotAcceptableError(
            f"This model's outputs are vectors of {vae.input_dim} values, not images; "
            f"accept {JSON} or {NPY}."
        )
    images.check_grid(n, cell or (vae.input_shape[0], vae.input_shape[1]), scale, legend)
    return scale


async def png_response(outputs: np.ndarray, vae: VAEService, scale: int) -> Response:
    """One PNG grid of the outputs, (N, D), drawn in the model's shape."""
    pixels = images.to_pixels(outputs, (vae.input_shape[0], vae.input_shape[1]), _value_range(vae))
    body = await anyio.to_thread.run_sync(images.png_grid, pixels, scale, limiter=_PICTURE_WORK)
    return Response(body, media_type=PNG)


async def heat_map_response(
    x: np.ndarray, attribution: np.ndarray, vae: VAEService, scale: int
) -> Response:
    """One PNG grid with a cell per instance: the input, and beside it its attribution as a heat
    map in inferno's colours, with the colour scale below.

    Format 6's residual from x redrawn is drawn on its own fixed scale, from black (as the model
    redraws it) to pale yellow (off by the whole [0, 1] range), so maps compare across calls.
    The standardised maps of formats 2 to 5 run from black (no more unlikely than in normal
    data) to the grid's most anomalous pixel, labelled in spreads (standard deviations of
    -log p(x_d|z*) in normal data) above normal, on a log scale, log(1 + a): a pixel that normal
    data never gets wrong stands a hundred spreads above the rest, and on a linear scale would
    leave every other one black."""
    shape = (vae.input_shape[0], vae.input_shape[1])
    inputs = images.as_rgb(images.to_pixels(x, shape, _value_range(vae)))
    if vae.attribution_method == REDRAWN_RESIDUAL:
        heat = images.heat_colours(images.to_pixels(attribution, shape, (0.0, 1.0)))
        legend = images.Legend(("as redrawn", "0.5", "1"))
        return await _heat_grid(images.side_by_side(inputs, heat), scale, legend)
    # Not finite (an input beyond what the model represents): as anomalous as the grid gets.
    above = np.nan_to_num(np.maximum(attribution, 0.0), nan=np.inf)
    top = float(above[np.isfinite(above)].max(initial=0.0))
    levels = np.log1p(np.minimum(above, top))
    levels[np.isinf(above)] = max(float(levels.max()), 1.0)
    heat = images.heat_colours(images.to_pixels(levels, shape, (0.0, None)))
    mid = math.sqrt(1.0 + top) - 1.0  # where log(1 + a) is half of log(1 + top)
    legend = images.Legend(("normal", f"{mid:.2g}", f"{top:.3g} sd"))
    return await _heat_grid(images.side_by_side(inputs, heat), scale, legend)


async def _heat_grid(cells: np.ndarray, scale: int, legend: images.Legend) -> Response:
    body = await anyio.to_thread.run_sync(
        images.png_grid, cells, scale, legend, limiter=_PICTURE_WORK
    )
    return Response(body, media_type=PNG)


def _value_range(vae: VAEService) -> images.ValueRange:
    # The exporter always writes input_range; without it only a Bernoulli model's is known.
    bernoulli = vae.likelihood == "bernoulli"
    lo, hi = vae.manifest.get("input_range") or ((0.0, 1.0) if bernoulli else (None, None))
    return (None if lo is None else float(lo)), (None if hi is None else float(hi))


def _accepted(request: Request) -> dict[str, float]:
    """The Accept header as {media range: q}, e.g. {"image/png": 1.0, "*/*": 0.1}."""
    out: dict[str, float] = {}
    for item in request.headers.get("accept", "").split(","):
        media, *params = (p.strip() for p in item.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0  # a q we cannot read: do not guess that it is welcome
        if media:
            out[media.lower()] = q
    return out


async def _read_form(request: Request, max_images: int) -> FormData:
    # One file over the limit still parses, so the refusal can name the limit; beyond that the
    # parser stops reading. Option fields are few and short.
    parser = MultiPartParser(
        request.headers, request.stream(), max_files=max_images + 1, max_fields=16,
        max_part_size=4096,
    )  # fmt: skip
    try:
        return await parser.parse()
    except MultiPartException as e:
        if e.message.startswith("Too many files"):
            reason = f"it holds more than {max_images} files (VAE_MAX_INSTANCES)"
        else:
            reason = e.message.rstrip(".").lower()
        raise InvalidInputError(f"The {MULTIPART} body cannot be read: {reason}.") from None


def _split_form(form: FormData, query: dict[str, str]) -> tuple[list[UploadFile], dict[str, str]]:
    """The uploads in the `file` field, and the options from the form and the query string."""
    uploads: list[UploadFile] = []
    options: dict[str, str] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            if key != UPLOAD_FIELD:
                raise InvalidInputError(
                    f"The form has a file in the field '{key}'; send images in '{UPLOAD_FIELD}'."
                )
            uploads.append(value)
        elif key == UPLOAD_FIELD:
            raise InvalidInputError(
                f"The form field '{UPLOAD_FIELD}' holds text, not a file; upload the image "
                f"itself (curl -F {UPLOAD_FIELD}=@digit.png)."
            )
        elif key in options:
            raise InvalidInputError(f"The form gives the field '{key}' more than once.")
        else:
            options[key] = value
    if not uploads:
        raise InvalidInputError(
            f"The form has no '{UPLOAD_FIELD}' field; upload one or more images in it "
            f"(curl -F {UPLOAD_FIELD}=@digit.png)."
        )
    both = sorted(options.keys() & query.keys())
    if both:
        raise InvalidInputError(f"The option '{both[0]}' is given both in the query and the body.")
    return uploads, options | query


def _validate_options(model: type[P], values: dict[str, str], request: Request) -> P:
    """Options from a form and the query string, text all of them; an error names the query
    parameter, or the form field as a field of the body."""
    try:
        return model.model_validate(values, strict=False)
    except ValidationError as e:
        query = request.query_params
        errors = [
            {
                **err,
                "loc": ("query" if err["loc"] and err["loc"][0] in query else "body", *err["loc"]),
            }
            for err in e.errors()
        ]
        raise RequestValidationError(errors) from None


def _label(i: int, upload: UploadFile) -> str:
    name = (upload.filename or "").strip()
    if len(name) > 60:
        name = name[:57] + "..."
    return f"{UPLOAD_FIELD}[{i}] ({name})" if name else f"{UPLOAD_FIELD}[{i}]"
