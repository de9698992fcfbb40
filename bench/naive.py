"""The peer baseline: /encode as a first FastAPI version would write it.

A pydantic body, a plain `def` handler (FastAPI's thread pool), `torch.tensor` on the nested
lists, the TorchScript `encode` under `torch.no_grad()`, and `.tolist()` answers serialised by
FastAPI's defaults. The artifact comes from `BENCH_MODEL_PATH`.
"""

from __future__ import annotations

import os
import warnings

import torch
from fastapi import FastAPI
from pydantic import BaseModel

MODEL_PATH_ENV = "BENCH_MODEL_PATH"


class Instances(BaseModel):
    instances: list[list[float]]


def create_app() -> FastAPI:
    """Factory for `uvicorn --factory bench.naive:create_app`; loads the model before serving."""
    with warnings.catch_warnings():
        # torch 2.13 deprecates TorchScript; the artifact is TorchScript, so silence just that.
        warnings.filterwarnings(
            "ignore", message=r"`torch\.jit\.load` is deprecated", category=DeprecationWarning
        )
        module = torch.jit.load(os.environ[MODEL_PATH_ENV], map_location="cpu")
    module.eval()
    app = FastAPI(title="bench-naive")

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/encode")
    def encode(body: Instances) -> dict[str, list[list[float]]]:
        # The return annotation makes FastAPI validate and serialise with pydantic: its default.
        x = torch.tensor(body.instances)
        with torch.no_grad():
            mean, logvar = module.encode(x)
        std = torch.exp(0.5 * logvar)
        return {"mean": mean.tolist(), "std": std.tolist()}

    return app
