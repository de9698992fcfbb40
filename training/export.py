"""The artifact: one TorchScript archive with its manifest, the only interface to `app/`.

This is the one module in `training/` that calls `torch.jit` (script, save and load).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from training.model import VAE

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


@contextmanager
def _quiet_jit() -> Iterator[None]:
    # torch 2.13 deprecates TorchScript; the artifact format still depends on it, so silence
    # exactly those DeprecationWarnings and nothing else.
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning
        )
        yield


def build_manifest(
    model: VAE,
    *,
    input_shape: tuple[int, ...],
    model_config: dict[str, Any],
    train_config: dict[str, Any],
    dataset: dict[str, Any],
    metrics: dict[str, Any],
    calibration: dict[str, Any],
) -> dict[str, Any]:
    bernoulli = model_config["likelihood"] == "bernoulli"
    return {
        "format_version": FORMAT_VERSION,
        "input_shape": list(input_shape),
        "input_dim": model_config["input_dim"],
        "latent_dim": model_config["latent_dim"],
        "likelihood": model_config["likelihood"],
        # JSON has no infinity: null means unbounded.
        "input_range": [0.0, 1.0] if bernoulli else [None, None],
        "model": model_config,
        "training": train_config,
        "dataset": dataset,
        "metrics": metrics,
        "calibration": calibration,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
    }


def export_artifact(model: VAE, manifest: dict[str, Any], path: Path) -> str:
    """Script `model`, save it with `manifest` to `path` atomically, and return its sha256."""
    model = model.cpu().eval()
    with _quiet_jit():
        scripted = torch.jit.script(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A crash mid-save must never leave a half-written artifact where the service looks for one.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with _quiet_jit():
            torch.jit.save(scripted, tmp, _extra_files={MANIFEST: json.dumps(manifest, indent=1)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return sha256_of(path)


def load_artifact(path: Path) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """Load an artifact as the service does, for round-trip tests and evaluation."""
    extra = {MANIFEST: ""}
    with _quiet_jit():
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return module, json.loads(extra[MANIFEST])


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
