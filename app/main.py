"""The app factory: `create_app(settings)`, its lifespan, error handlers and routers."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from starlette.concurrency import run_in_threadpool

from app import __version__
from app.batching import Batcher
from app.docs import install_docs
from app.errors import ModelLoadError, install_error_handlers
from app.lifecycle import Lifecycle, install_signal_handlers, load_model
from app.middleware import Guard, open_paths
from app.model import VAEService
from app.observability import Metrics, Observe, configure_logging
from app.routes import admin_router, model_router, router
from app.schemas import AnomalyScoreRequest, DecodeRequest, EncodeRequest, SampleRequest
from app.settings import Settings
from app.v2 import router as v2_router

log = logging.getLogger("app")

DESCRIPTION = """
Serves a trained Variational Autoencoder (Kingma & Welling 2013) from one TorchScript artifact.

* **/encode**: the posterior q(z|x), its mean is the representation.
* **/decode**, **/sample**: outputs from latents, or from prior draws.
* **/anomaly-score**: KL(q(z|x) || p(z)) and An & Cho's reconstruction probability.

A request with a `seed` gets a byte-identical answer every time.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    if not logging.getLogger().handlers:  # a uvicorn worker process: nobody configured it yet
        configure_logging(settings.log_level, settings.log_format)
    keys = settings.load_api_keys()  # a missing keys file stops here, not at the first request

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        if settings.torch_interop_threads:
            try:
                torch.set_num_interop_threads(settings.torch_interop_threads)
            except RuntimeError:  # torch allows it once per process, before any parallel work
                log.warning("torch inter-op threads were already set; keeping them")
        try:
            vae = await run_in_threadpool(load_model, settings)
        except ModelLoadError as e:
            log.error("cannot start: %s", e)
            raise
        metrics.set_model(vae)
        batcher = Batcher(
            settings.max_batch_size,
            settings.max_batch_delay_ms / 1000,
            on_batch=metrics.observe_batch,
        )
        batcher.start()
        app.state.vae, app.state.batcher = vae, batcher
        app.state.ready = True
        install_signal_handlers(app)
        # Move everything start-up made (torch, FastAPI, the model) out of the collector's
        # reach: full collections over it paused requests for up to ~100 ms under load; with
        # it frozen, p99 at 16 connections fell from 124 ms to 14 ms (python -m bench --quick).
        gc.freeze()
        log.info("ready", extra=_startup_summary(vae))
        yield
        app.state.ready = False
        batcher.stop()

    app = FastAPI(
        title="vae-service",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # app.docs serves /docs and /redoc with local assets instead
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.auth_enabled = bool(keys)
    app.state.vae = app.state.batcher = None
    app.state.ready = False
    app.state.lifecycle = lifecycle = Lifecycle()
    app.state.metrics = metrics = Metrics(settings.max_batch_size)
    metrics.in_flight.set_function(lambda: lifecycle.in_flight)
    install_error_handlers(app)
    app.include_router(model_router)
    app.include_router(router)
    app.include_router(admin_router)
    app.include_router(v2_router)
    install_docs(app)
    app.add_middleware(Guard, settings=settings, keys=keys)
    app.add_middleware(Observe, metrics=metrics)  # outside the Guard: sees its refusals too
    if settings.cors_origins:  # outermost, so refusals carry CORS headers too
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type", "Accept", "X-Request-ID"],
            expose_headers=["Retry-After", "X-Request-ID"],
        )
    app.openapi = lambda: _openapi_for_model(app)  # type: ignore[method-assign]
    return app


def _openapi_for_model(app: FastAPI) -> dict[str, Any]:
    """The schema, with the manually read request bodies in its components and examples sized
    to the loaded model, so "Try it out" works as it is."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    if app.state.auth_enabled:  # so "Authorize" on /docs can send a key
        _declare_api_keys(schema, open_paths(app.state.settings))
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (EncodeRequest, DecodeRequest, AnomalyScoreRequest, SampleRequest):
        model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        comps.update(model_schema.pop("$defs", {}))
        comps[model.__name__] = model_schema
    vae: VAEService | None = app.state.vae
    if vae is None:  # before the model loads: keep the static examples, don't cache
        return schema
    settings: Settings = app.state.settings
    instance = [0.0] * vae.input_dim
    for name in ("EncodeRequest", "AnomalyScoreRequest"):
        field = comps[name]["properties"]["instances"]
        field["examples"] = [[instance]]
        field.update(_instances_schema(vae, settings.max_instances))
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


def _startup_summary(vae: VAEService) -> dict[str, Any]:
    """What an operator wants in the start-up log: which artifact, trained on what, how good."""
    m = vae.manifest
    metrics = m.get("metrics", {})
    return {
        "sha256": vae.sha256,
        "device": str(vae.device),
        "format_version": m["format_version"],
        "input_shape": m["input_shape"],
        "latent_dim": m["latent_dim"],
        "likelihood": m["likelihood"],
        "dataset": m.get("dataset", {}).get("name"),
        "test_elbo": metrics.get("test_elbo"),
        "test_log_likelihood": metrics.get("test_log_likelihood"),
        "created_at": m.get("created_at"),
    }


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


def _set_maximum(field: dict[str, Any], limit: int) -> None:
    # Optional fields are anyOf [integer, null]: the bound goes on the integer branch.
    for branch in field.get("anyOf", [field]):
        if branch.get("type") == "integer":
            branch["maximum"] = limit
