"""The model under test and the request bodies.

By default an untrained MNIST-sized VAE (784-512-256-32, Bernoulli) exported by the real
exporter: an untrained model costs exactly what a trained one does per call, and building it
takes seconds instead of a training run on a CPU other people are timing trainings on.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from training.config import ModelConfig, TrainConfig
from training.export import build_manifest, export_artifact
from training.model import VAE
from training.pipeline import Splits, calibration

Array = npt.NDArray[np.float32]

# MNIST: about 19% of pixels are non-zero, and about a third of those are saturated (255).
_NONZERO_SHARE = 0.19
_SATURATED_SHARE = 0.3


def build_artifact(path: Path, *, seed: int = 0) -> Path:
    """Export an untrained 28x28 VAE with the model defaults, calibrated like a real run.

    Calibration uses the service defaults (L=16, K=100 from TrainConfig), so /anomaly-score
    without explicit K computes the same log-likelihood a trained artifact would make it do.
    """
    torch.manual_seed(seed)
    cfg = ModelConfig(input_dim=784, hidden_dims=(512, 256), latent_dim=32)
    model = VAE(cfg).eval()
    background = VAE(cfg).eval()
    x_val = torch.from_numpy(mnist_like(256, seed=seed))
    splits = Splits(x_val, x_val, x_val, binarize=False)
    calibrated, scoring, refs = calibration(model, splits, TrainConfig(), background)
    manifest = build_manifest(
        model,
        input_shape=(28, 28),
        model_config=cfg.to_dict(),
        train_config={"preset": "bench-untrained"},
        dataset={"name": "mnist-like random", "train_size": 0, "val_size": 256, "test_size": 0},
        metrics={},
        calibration=calibrated,
        scoring=scoring,
    )
    export_artifact(model, manifest, path, background, refs)
    return path


def load_module(path: Path) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """The artifact as `app/model.py` loads it: TorchScript on CPU plus its manifest."""
    extra = {"manifest.json": ""}
    with warnings.catch_warnings():
        # torch 2.13 deprecates TorchScript; the artifact format is TorchScript, so silence
        # exactly that warning and nothing else.
        warnings.filterwarnings(
            "ignore", message=r"`torch\.jit\.load` is deprecated", category=DeprecationWarning
        )
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    module.eval()
    manifest: dict[str, Any] = json.loads(extra["manifest.json"])
    return module, manifest


def mnist_like(n: int, dim: int = 784, *, seed: int = 0) -> Array:
    """`n` images with MNIST's sparsity and its k/255 grey levels, deterministic.

    The pixel layout is random (a dense MLP does not care); what matters is the JSON size:
    one image is about 6 KB, as a real MNIST digit sent by a client is.
    """
    rng = np.random.default_rng(seed)
    levels = rng.integers(1, 255, size=(n, dim))
    levels[rng.random((n, dim)) < _SATURATED_SHARE] = 255
    levels[rng.random((n, dim)) >= _NONZERO_SHARE] = 0
    return (levels / 255.0).astype(np.float32)


@dataclass(frozen=True)
class Bodies:
    """Request bodies as bytes; `single` is also the ceiling's body, so both parse the same."""

    single: bytes  # {"instances": [one image]}
    anomaly: bytes  # {"instances": [one image], "samples": 16}
    batch_json: bytes  # {"instances": [256 images]}
    batch_npy: bytes  # np.save of the same (256, 784) float32 array
    single_array: Array
    batch_array: Array


def make_bodies(dim: int, batch: int, *, anomaly_samples: int = 16) -> Bodies:
    one = mnist_like(1, dim, seed=1)
    many = mnist_like(batch, dim, seed=2)
    buf = io.BytesIO()
    np.save(buf, many, allow_pickle=False)
    return Bodies(
        single=_json({"instances": _plain(one)}),
        anomaly=_json({"instances": _plain(one), "samples": anomaly_samples}),
        batch_json=_json({"instances": _plain(many)}),
        batch_npy=buf.getvalue(),
        single_array=one,
        batch_array=many,
    )


def _plain(a: Array) -> list[list[float]]:
    # k/255 in float64 prints as its shortest repr (0.4980392156862745), as a client computing
    # pixel / 255 in Python would send it; float32 values would print longer and distort sizes.
    rows: list[list[float]] = (np.round(a.astype(np.float64) * 255.0) / 255.0).tolist()
    return rows


def _json(obj: object) -> bytes:
    # json.dumps defaults (", " between numbers), as `requests.post(json=...)` sends it.
    return json.dumps(obj).encode()
