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
    return take_model(request, request.path_params.get("model_name"))


def take_model(request: Request, name: str | None) -> VAEService:
    """Repository model `name` (None: the default one), at the path's version if it names
    one, as every protocol takes it: once per request, and remembered for the metrics and the
    log line (Observe)."""
    models: ModelRepository = request.app.state.models
    version = request.path_params.get("model_version")
    vae = models.serving(name, None if version is None else parse_version(version))
    request.state.model = vae
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
