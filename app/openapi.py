"""All OpenAPI shaping, in one place: the page's description, the documented error answers, the
request bodies that routes read by hand (JSON, .npy, image uploads), and the schema rewrite
that sizes every example and bound to the loaded model.

Routes read their bodies themselves (a fast path from JSON to numpy, .npy, multipart), so
FastAPI cannot infer those bodies; the helpers here declare them. Protocols pass their own
error model, so V2 documents `{"error": ...}` and REST `{"detail": ...}` with one helper.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from app import images
from app.common import JSON, MULTIPART, NPY, PNG
from app.errors import ErrorResponse
from app.middleware import open_paths
from app.model import VAEService
from app.payloads import UPLOAD_FIELD
from app.repository import ModelRepository
from app.schemas import AnomalyScoreRequest, DecodeRequest, EncodeRequest, SampleRequest
from app.settings import Settings

Responses = dict[int | str, dict[str, Any]]

DESCRIPTION = """
Serves a trained Variational Autoencoder (Kingma & Welling 2013) from one TorchScript artifact.

* **/encode**: the posterior q(z|x), its mean is the representation.
* **/decode**, **/sample**: outputs from latents, or from prior draws.
* **/anomaly-score**: KL(q(z|x) || p(z)) and An & Cho's reconstruction probability.

A request with a `seed` gets a byte-identical answer every time.
"""

# The bodies routes read by hand; FastAPI would not list them in the components otherwise.
_READ_BY_HAND = (EncodeRequest, DecodeRequest, AnomalyScoreRequest, SampleRequest)
_BINARY = {"type": "string", "format": "binary"}


def error_responses(model: type[BaseModel], described: Mapping[int, str]) -> Responses:
    """`{status: {"model": model, "description": ...}}`, the shape `responses=` takes."""
    return {status: {"model": model, "description": text} for status, text in described.items()}


# The refusals of app/middleware.py, which any route behind it can give.
AUTH_RESPONSES = error_responses(
    ErrorResponse, {401: "A valid API key is required (VAE_API_KEYS)."}
)
BUSY = (
    "The model is not loaded yet, the server is draining, or VAE_MAX_IN_FLIGHT requests are "
    "already in flight; retry after `Retry-After` seconds."
)
RETRY_AFTER = {"Retry-After": {"schema": {"type": "integer"}}}
# Documented on every model route, instead of FastAPI's list-shaped 422.
VALIDATION_RESPONSES: Responses = {
    **AUTH_RESPONSES,
    **error_responses(
        ErrorResponse,
        {
            413: "The body is over VAE_MAX_BODY_BYTES.",
            415: "The body is neither JSON nor .npy.",
            422: "The request is not valid for this model.",
            503: BUSY,
            504: "Over VAE_REQUEST_TIMEOUT_S.",
        },
    ),
}
VALIDATION_RESPONSES[503]["headers"] = RETRY_AFTER
UPLOAD_RESPONSES = error_responses(
    ErrorResponse,
    {
        415: "The body is not JSON, .npy or (image models only) a multipart image upload; or an "
        "upload is not a PNG or JPEG."
    },
)
NPY_OUT: Responses = {200: {"content": {NPY: {"schema": _BINARY}}}}
# PNG answers: the grid itself, its `scale`, and 406 for a model whose outputs are not images.
IMAGE_OUT: Responses = {
    200: {
        "content": {
            NPY: {"schema": _BINARY},
            PNG: {
                "schema": _BINARY,
                "description": "Image models only: the outputs as one greyscale PNG grid, "
                "row-major, near-square, cells apart by a grey line.",
            },
        }
    },
    **error_responses(ErrorResponse, {406: "image/png asked of a model without images."}),
}
# /anomaly-score: a record per instance as .npy, or each input beside its attribution heat map.
HEAT_MAP_OUT: Responses = {
    200: {
        "content": {
            NPY: {
                "schema": _BINARY,
                "description": "To a client that accepts .npy and not JSON: one record per "
                "instance, each score, `<score>_percentile`, `is_anomaly` and, when asked for, "
                "`attribution`.",
            },
            PNG: {
                "schema": _BINARY,
                "description": "Image models: each input beside its attribution heat map "
                "(log scale; white: the grid's most anomalous pixel), one cell per instance.",
            },
        }
    },
    **error_responses(ErrorResponse, {406: "image/png asked of a model without images."}),
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


def json_body(request_model: type[BaseModel]) -> dict[str, Any]:
    """A JSON body whose schema is a component (see `_READ_BY_HAND`)."""
    ref = {"$ref": f"#/components/schemas/{request_model.__name__}"}
    return {"requestBody": {"required": True, "content": {JSON: {"schema": ref}}}}


def array_body(request_model: type[BaseModel], array_doc: str) -> dict[str, Any]:
    """A body read by `payloads.read_array_request`: the model as JSON, or a .npy array."""
    doc = json_body(request_model)
    doc["requestBody"]["content"][NPY] = {
        "schema": _BINARY,
        "description": f"{array_doc} The other options go in the query string.",
    }
    return doc


def upload_body(params_model: type[BaseModel], doc: dict[str, Any]) -> dict[str, Any]:
    """`doc` (an `array_body`) with an image upload added: Swagger UI shows a file picker and
    the options as form fields."""
    fields: dict[str, Any] = {
        UPLOAD_FIELD: _BINARY
        | {
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


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with its $defs inlined, for a body declared in openapi_extra,
    where refs to the model's own $defs would dangle."""
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


def install_openapi(app: FastAPI) -> None:
    app.openapi = lambda: _openapi_for_model(app)  # type: ignore[method-assign]


def _openapi_for_model(app: FastAPI) -> dict[str, Any]:
    """The schema, with the bodies read by hand in its components and examples sized to the
    loaded model, so "Try it out" works as it is."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    settings: Settings = app.state.settings
    if app.state.auth_enabled:  # so "Authorize" on /docs can send a key
        _declare_api_keys(schema, open_paths(settings))
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in _READ_BY_HAND:
        model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        comps.update(model_schema.pop("$defs", {}))
        comps[model.__name__] = model_schema
    models: ModelRepository = app.state.models
    if not models.started:  # before the models load: keep the static examples, don't cache
        return schema
    held = [vae for versions in models.loaded().values() for vae in versions.values()]
    if len(held) != 1:
        # Several models share these request schemas: sizes and limits fit no one of them.
        app.openapi_schema = schema
        return schema
    (vae,) = held
    for name in ("EncodeRequest", "AnomalyScoreRequest"):
        _inputs_schema(comps[name], vae, settings.max_instances)
    latents = comps["DecodeRequest"]["properties"]["latents"]
    latents["examples"] = [[[0.0] * vae.latent_dim]]
    latents.update(_rows_schema(vae.latent_dim, {"type": "number"}, settings.max_instances))
    # What the limits allow (instances x samples has a bound of its own, VAE_MAX_TOTAL_SAMPLES).
    limit = settings.max_samples
    for name, field in (("EncodeRequest", "samples"), ("SampleRequest", "n"),
                        ("AnomalyScoreRequest", "samples"),
                        ("AnomalyScoreRequest", "log_likelihood_samples")):  # fmt: skip
        _set_maximum(comps[name]["properties"][field], limit)
    anomaly = comps["AnomalyScoreRequest"]["properties"]
    for field, score in (
        ("samples", "reconstruction_log_prob"),
        ("log_likelihood_samples", "log_likelihood"),
    ):
        cal = vae.calibration.scores.get(score)
        if cal and cal.samples:
            anomaly[field]["examples"] = [min(cal.samples, limit)]
    app.openapi_schema = schema
    return schema


def _declare_api_keys(schema: dict[str, Any], open_routes: frozenset[str]) -> None:
    """Both ways to send a key, required everywhere but the routes the Guard leaves open."""
    schema.setdefault("components", {})["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "description": "An API key."},
        "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    }
    schema["security"] = [{"bearer": []}, {"apiKey": []}]
    for path, operations in schema["paths"].items():
        if path in open_routes:
            for operation in operations.values():
                operation["security"] = []


def _rows_schema(width: int, number: dict[str, Any], max_rows: int) -> dict[str, Any]:
    row = {"type": "array", "items": number, "minItems": width, "maxItems": width}
    return {"items": row, "minItems": 1, "maxItems": max_rows}


def _instances_schema(vae: VAEService, max_rows: int) -> dict[str, Any]:
    """Rows of exactly the model's width (flat), or of its image shape (nested), with values in
    [0, 1] for a Bernoulli model: the schema then says what the checks will accept."""
    number: dict[str, Any] = {"type": "number"}
    if vae.likelihood == "bernoulli":
        number |= {"minimum": 0.0, "maximum": 1.0}
    flat = _rows_schema(vae.input_dim, number, max_rows)
    if len(vae.input_shape) != 2:
        return flat
    height, width = vae.input_shape
    image = _rows_schema(width, number, height)
    image = {"type": "array", "items": image["items"], "minItems": height, "maxItems": height}
    return {"items": {"anyOf": [flat["items"], image]}, "minItems": 1, "maxItems": max_rows}


def _inputs_schema(request: dict[str, Any], vae: VAEService, max_rows: int) -> None:
    """`instances` sized to the model; `records` keyed by its feature names, where it has
    them, and gone where it has none; one of the two required."""
    fields = request["properties"]
    fields["instances"] = {
        **{k: v for k, v in fields["instances"].items() if k not in ("anyOf", "default")},
        **_instances_schema(vae, max_rows),
        "examples": [[[0.0] * vae.input_dim]],
    }
    names = vae.feature_names
    if names is None:
        del fields["records"]
        request["required"] = ["instances"]
        return
    means = vae.manifest["features"]["mean"]
    record = {
        "type": "object",
        "properties": {n: {"type": "number"} for n in names},
        "required": list(names),
        "additionalProperties": False,
    }
    fields["records"] = {
        **{k: v for k, v in fields["records"].items() if k not in ("anyOf", "default")},
        "type": "array",
        "items": record,
        "minItems": 1,
        "maxItems": max_rows,
        "examples": [[{n: round(float(m), 4) for n, m in zip(names, means, strict=True)}]],
    }
    request["oneOf"] = [{"required": ["instances"]}, {"required": ["records"]}]


def _set_maximum(field: dict[str, Any], limit: int) -> None:
    # Optional fields are anyOf [integer, null]: the bound goes on the integer branch.
    for branch in field.get("anyOf", [field]):
        if branch.get("type") == "integer":
            branch["maximum"] = limit
