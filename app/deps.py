"""The FastAPI dependencies every protocol's routes share, with their `Annotated` aliases.

They are `async` on purpose: FastAPI runs a plain `def` dependency in its thread pool, which
costs a thread hand-off per dependency per request.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.batching import Batcher
from app.errors import NotReadyError
from app.model import VAEService
from app.observability import Metrics
from app.repository import NOT_READY, ModelRepository, parse_version
from app.settings import Settings


async def get_vae(request: Request) -> VAEService:
    """The model this request runs on, taken once: the one its path names
    (/models/{model_name}[/versions/{model_version}]/...), else the default one."""
    models: ModelRepository = request.app.state.models
    params = request.path_params
    version = params.get("model_version")
    vae = models.serving(
        params.get("model_name"), None if version is None else parse_version(version)
    )
    request.state.model = vae  # for the metrics and the log line (Observe)
    return vae


async def get_batcher(request: Request) -> Batcher:
    batcher: Batcher | None = request.app.state.batcher
    if batcher is None:
        raise NotReadyError(NOT_READY)
    return batcher


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


VaeDep = Annotated[VAEService, Depends(get_vae)]
BatcherDep = Annotated[Batcher, Depends(get_batcher)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
