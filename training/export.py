"""The artifact: one TorchScript archive with its manifest, the only interface to `app/`.

This is the one module in `training/` that calls `torch.jit` (script, save and load).
"""

from __future__ import annotations

import hashlib
import io
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

from scoring.artifact import (
    BACKGROUND,
    FEATURE_REFERENCE,
    GAP_PROJECTION,
    INPUT_REFERENCE,
    LATENT_LENGTHS,
    LATENT_REFERENCE,
    MANIFEST,
)
from scoring.scores import References
from training.model import VAE

# 2: the scores of scoring/scores.py (input complexity, DoSE, the likelihood ratio) and attribution;
# the background model travels as a TorchScript archive of its own, in BACKGROUND.
# 3: the latent distance and the ensemble; the training rows' latent means travel as an .npy
# file of their own, in LATENT_REFERENCE.
# 4: the calibration holds each score's sorted validation values, read as ranks (conservative
# percentiles, scoring/calibration.py), not 1001 interpolated quantiles.
# 5: the latent polar distance, its training rows' log lengths in LATENT_LENGTHS, in an ensemble
# of five scores.
# 6: an image model's attribution is the residual from x redrawn (scoring/artifact.py), with no
# per-feature statistics; a table model's is unchanged.
# 7: a table model adds the input distance (its training rows in INPUT_REFERENCE) and decides
# with the ensemble of it and DoSE; an image model's artifact is as format 6's.
# 8: the ensemble's calibration keeps each validation row's values of its parts, and the
# service reads the ensemble's percentile as a full conformal p-value (scoring/calibration.py).
# 9: an image model adds the feature distance (the encoder's first-layer features of its
# training rows, projected, in FEATURE_REFERENCE) and takes it into the ensemble twice over
# (the ensemble's `weights`).
FORMAT_VERSION = 9


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
    scoring: dict[str, Any] | None = None,
    features: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`scoring` adds what the format-2 scores need: the DoSE density, the attribution's
    per-feature statistics, the background model's recipe and the recommended decision score.
    `features` (tables): the column names in input order, with the training rows' mean and
    standard deviation, so that the service takes records keyed by name."""
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
        **(scoring or {}),
        **({"features": features} if features is not None else {}),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
    }


def export_artifact(
    model: VAE,
    manifest: dict[str, Any],
    path: Path,
    background: VAE | None = None,
    references: References | None = None,
) -> str:
    """Script `model`, save it with `manifest` (the scripted `background` model, for the
    likelihood ratio, and the `references`, for the distances and RaPP) to `path`
    atomically, and return its sha256."""
    extra: dict[str, Any] = {MANIFEST: json.dumps(manifest, indent=1)}  # str or bytes
    if references is not None and references.neighbours is not None:
        extra[LATENT_REFERENCE] = references.neighbours.to_bytes()
        if references.neighbours.log_lengths is not None:
            extra[LATENT_LENGTHS] = references.neighbours.lengths_to_bytes()
    if references is not None and references.gaps is not None:
        extra[GAP_PROJECTION] = references.gaps.to_bytes()
    if references is not None and references.inputs is not None:
        extra[INPUT_REFERENCE] = references.inputs.to_bytes()
    if references is not None and references.features is not None:
        extra[FEATURE_REFERENCE] = references.features.to_bytes()
    with _quiet_jit():
        scripted = torch.jit.script(model.cpu().eval())
        if background is not None:
            buffer = io.BytesIO()
            torch.jit.save(torch.jit.script(background.cpu().eval()), buffer)
            extra[BACKGROUND] = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    # A crash mid-save must never leave a half-written artifact where the service looks for one.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with _quiet_jit():
            torch.jit.save(scripted, tmp, _extra_files=extra)
        # mkstemp makes the file private (0600); an artifact is meant to be read by others, such
        # as a container's non-root user, so give it the mode a plain open() would (umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return sha256_of(path)


def load_artifact(path: Path) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """Load an artifact as the service does, for round-trip tests and evaluation."""
    module, extra = _load(path)
    return module, json.loads(extra[MANIFEST])


def load_weights(path: Path) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any]]:
    """The model's weights, the background model's (None without one) and the manifest, to
    re-export an artifact in the current format (training/upgrade.py)."""
    module, extra = _load(path, BACKGROUND)
    background = None
    if extra[BACKGROUND]:
        with _quiet_jit():
            background = torch.jit.load(io.BytesIO(extra[BACKGROUND]), map_location="cpu")
    return (
        module.state_dict(),
        None if background is None else background.state_dict(),
        json.loads(extra[MANIFEST]),
    )


def _load(path: Path, *files: str) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """The archive's module on the CPU, and its manifest and the named extra `files`."""
    extra: dict[str, Any] = dict.fromkeys((MANIFEST, *files), "")
    with _quiet_jit():
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return module, extra


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
