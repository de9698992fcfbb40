"""The app factory, `create_app(settings)`, and its lifespan: threads, load, warm-up, ready."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from app import __version__
from app.batching import Batcher
from app.docs import install_docs
from app.errors import install_error_handlers
from app.hot_path import NAMED, VERSIONED, ServiceApp
from app.lifecycle import Lifecycle, fix_mmap_threshold, install_signal_handlers
from app.middleware import Guard
from app.model import VAEService
from app.observability import Metrics, Observe, configure_logging, startup_summary
from app.openapi import DESCRIPTION, install_openapi
from app.repository import ModelRepository
from app.routes import (
    NOT_FOUND,
    admin_router,
    model_router,
    models_router,
    named_model,
    router,
    versioned_model,
)
from app.settings import Settings
from app.v2 import router as v2_router
from app.workers import Siblings
from scoring.artifact import ModelLoadError

log = logging.getLogger("app")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    if not logging.getLogger().handlers:  # a uvicorn worker process: nobody configured it yet
        configure_logging(settings.log_level, settings.log_format)
    # A missing keys file stops here, not at the first request.
    keys, admin_keys = settings.load_api_keys(), settings.load_admin_keys()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The process's setting while the app runs, and back after (tests run apps in-process).
        torch_threads = torch.get_num_threads()
        torch.set_num_threads(settings.intra_op_threads())
        if settings.torch_interop_threads:
            try:
                torch.set_num_interop_threads(settings.torch_interop_threads)
            except RuntimeError:  # torch allows it once per process, before any parallel work
                log.warning("torch inter-op threads were already set; keeping them")
        fix_mmap_threshold()  # before the first model is loaded
        models = app.state.models
        try:
            await models.start()
        except ModelLoadError as e:
            log.error("cannot start: %s", e)
            raise
        siblings = app.state.siblings
        if siblings is not None and models.default is not None:
            siblings.record(models.serving().sha256)
        batcher = Batcher(
            settings.max_batch_size,
            settings.max_batch_delay_ms / 1000,
            on_batch=metrics.observe_batch,
            inline_max_s=settings.inline_max_ms / 1000,
        )
        batcher.start()
        app.state.batcher = batcher
        app.state.ready = True
        install_signal_handlers(app)
        # Move everything start-up made (torch, FastAPI, the model) out of the collector's
        # reach: full collections over it paused requests for up to ~100 ms under load; with
        # it frozen, p99 at 16 connections fell from 124 ms to 14 ms (python -m bench --quick).
        gc.freeze()
        log.info("ready", extra=startup_summary(models))
        yield
        app.state.ready = False
        batcher.stop()
        models.close()
        if siblings is not None:
            siblings.leave()
        torch.set_num_threads(torch_threads)

    app = ServiceApp(
        title="vae-service",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # app.docs serves /docs and /redoc with local assets instead
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.auth_enabled = bool(keys)
    app.state.batcher = None
    app.state.ready = False
    app.state.lifecycle = Lifecycle()
    # Several workers of `python -m app` (app/workers.py): the others, for reloads.
    app.state.siblings = Siblings.from_environ()
    app.state.metrics = metrics = Metrics(settings.max_batch_size)

    def swapped(name: str, before: dict[int, VAEService], after: dict[int, VAEService]) -> None:
        metrics.set_versions(name, before, after)
        app.openapi_schema = None  # its examples are sized to the default model

    app.state.models = ModelRepository(settings, on_swap=swapped)
    install_error_handlers(app)
    app.include_router(model_router)
    # The same model routes under each model's name, and under one version of it.
    app.include_router(
        model_router, prefix=NAMED, tags=["models"], responses=NOT_FOUND,
        dependencies=[Depends(named_model)],
    )  # fmt: skip
    app.include_router(
        model_router, prefix=VERSIONED, tags=["models"], responses=NOT_FOUND,
        dependencies=[Depends(versioned_model)],
    )  # fmt: skip
    app.include_router(models_router)
    app.include_router(router)
    app.include_router(admin_router)
    app.include_router(v2_router)
    install_docs(app)
    app.add_middleware(Guard, settings=settings, keys=keys, admin_keys=admin_keys)
    app.add_middleware(Observe, metrics=metrics)  # outside the Guard: sees its refusals too
    if settings.cors_origins:  # outermost, so refusals carry CORS headers too
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type", "Accept", "X-Request-ID"],
            expose_headers=["Retry-After", "X-Request-ID"],
        )
    install_openapi(app)
    return app
