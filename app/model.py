"""Load the artifact and run it: arrays in, arrays out. No FastAPI here.

This is the one module of `app/` that calls `torch.jit`. Every method is safe to call from many
threads at once: randomness comes from a per-request generator, never the global RNG, so a
request with a seed gets the same bytes back whatever else runs at that moment.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import secrets
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.calibration import Calibration
from app.common import Array, Arrays
from app.errors import ModelLoadError

log = logging.getLogger(__name__)

SUPPORTED_FORMAT_VERSIONS = {1}
REQUIRED_METHODS = (
    "encode",
    "decode",
    "kl_divergence",
    "reconstruction_log_prob",
    "log_likelihood",
)
REQUIRED_KEYS = ("format_version", "input_shape", "input_dim", "latent_dim", "likelihood")


@dataclass(frozen=True)
class Encoded:
    mean: Array  # (B, Z)
    std: Array  # (B, Z)
    samples: Array | None  # (B, S, Z)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"VAE_DEVICE={name} asks for CUDA, but CUDA is not available here."
            )
        index = torch.device(name).index or 0
        if index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"VAE_DEVICE={name} names a GPU that does not exist "
                f"({torch.cuda.device_count()} visible)."
            )
    return torch.device(name)


class VAEService:
    def __init__(
        self,
        module: torch.jit.ScriptModule,
        manifest: dict[str, Any],
        sha256: str,
        device: torch.device,
        calibration: Calibration,
    ) -> None:
        self.module = module
        self.manifest = manifest
        self.sha256 = sha256
        self.device = device
        self.input_shape: tuple[int, ...] = tuple(manifest["input_shape"])
        self.input_dim: int = manifest["input_dim"]
        self.latent_dim: int = manifest["latent_dim"]
        self.likelihood: str = manifest["likelihood"]
        self.calibration = calibration

    @classmethod
    def load(
        cls, path: Path, device: str = "auto", expected_sha256: str | None = None
    ) -> VAEService:
        """Load and check an artifact; every failure is a ModelLoadError naming the file.

        With `expected_sha256` (VAE_MODEL_SHA256), bytes that hash otherwise are refused
        before torch deserialises any of them."""
        dev = resolve_device(device)
        if not path.is_file():
            raise ModelLoadError(
                f"{path}: no artifact there; train one with "
                f"`python -m training --out {path}` or set VAE_MODEL_PATH."
            )
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ModelLoadError(f"{path}: cannot read the artifact ({e.strerror}).") from None
        sha256 = hashlib.sha256(data).hexdigest()
        if expected_sha256 is not None and sha256 != expected_sha256.lower():
            raise ModelLoadError(
                f"{path}: its sha256 is {sha256}, but VAE_MODEL_SHA256 pins "
                f"{expected_sha256.lower()}; refusing to serve it."
            )
        extra = {"manifest.json": ""}
        try:
            with warnings.catch_warnings():
                # torch 2.13 deprecates TorchScript; silence exactly that warning.
                warnings.filterwarnings(
                    "ignore",
                    message=r"`torch\.jit\.load` is deprecated",
                    category=DeprecationWarning,
                )
                # From the bytes already read: the sha256 reported is of exactly what runs.
                module = torch.jit.load(io.BytesIO(data), map_location=dev, _extra_files=extra)
        except Exception as e:  # torch raises RuntimeError or ValueError with C++ traces
            raise ModelLoadError(
                f"{path}: not a readable TorchScript artifact ({type(e).__name__})."
            ) from e
        manifest = _parse_manifest(path, extra["manifest.json"])
        calibration = Calibration.from_manifest(manifest, str(path))
        missing = [m for m in REQUIRED_METHODS if not hasattr(module, m)]
        if missing:
            raise ModelLoadError(f"{path}: the artifact lacks the methods {', '.join(missing)}.")
        module.eval()
        service = cls(module, manifest, sha256, dev, calibration)
        log.info(
            "loaded %s: sha256 %s, input %s, latent %d, %s decoder, on %s",
            path, service.sha256, service.input_shape, service.latent_dim, service.likelihood, dev,
        )  # fmt: skip
        return service

    # -- the operations ------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, x: Array, samples: int = 0, seed: int | None = None) -> Encoded:
        mean, logvar = self.module.encode(self._tensor(x))
        std = torch.exp(0.5 * logvar)
        drawn = None
        if samples > 0:
            eps = self._eps((x.shape[0], samples, self.latent_dim), self._generator(seed))
            drawn = _numpy(mean.unsqueeze(1) + std.unsqueeze(1) * eps)  # (B, S, Z)
        return Encoded(_numpy(mean), _numpy(std), drawn)

    @torch.no_grad()
    def decode(self, z: Array, mode: bool = False) -> Array:
        out = self.module.decode(self._tensor(z))
        if mode and self.likelihood == "bernoulli":
            out = torch.round(out)  # the most probable x of a Bernoulli decoder
        return _numpy(out)

    @torch.no_grad()
    def sample(self, n: int, seed: int | None = None, mode: bool = False) -> tuple[Array, Array]:
        z = self._eps((n, self.latent_dim), self._generator(seed))  # z ~ p(z) = N(0, I)
        return _numpy(z), self.decode(_numpy(z), mode)

    @torch.no_grad()
    def anomaly_scores(
        self, x: Array, samples: int, seed: int | None = None, ll_samples: int = 0
    ) -> Arrays:
        """KL, log reconstruction probability over L=`samples`, and with K=`ll_samples` > 0 the
        importance-sampled log-likelihood; each (B,)."""
        xt = self._tensor(x)
        g = self._generator(seed)
        eps = self._eps((samples, x.shape[0], self.latent_dim), g)  # (L, B, Z)
        scores = {
            "kl_divergence": _numpy(self.module.kl_divergence(xt)),
            "reconstruction_log_prob": _numpy(self.module.reconstruction_log_prob(xt, eps)),
        }
        if ll_samples:
            eps = self._eps((ll_samples, x.shape[0], self.latent_dim), g)  # (K, B, Z)
            scores["log_likelihood"] = _numpy(self.module.log_likelihood(xt, eps))
        return scores

    def warm_up(self, max_batch_size: int = 1) -> None:
        """Run every operation at each batch size the batcher may form, so no request pays
        TorchScript's first-call profiling: every size up to 128, and beyond that the powers of
        two and the largest (a new shape costs about one extra millisecond, once)."""
        powers = {2**i for i in range(max_batch_size.bit_length())}
        sizes = sorted(set(range(1, min(max_batch_size, 128) + 1)) | powers | {max_batch_size})
        for size in (s for s in sizes if s <= max_batch_size):
            x = np.full((size, self.input_dim), 0.5, dtype=np.float32)
            for _ in range(2):  # the profiling executor specialises on the second call
                self.encode(x, samples=2, seed=0)
                self.decode(np.zeros((size, self.latent_dim), dtype=np.float32))
                self.anomaly_scores(x, samples=2, seed=0, ll_samples=2)
        self.sample(2, seed=0)

    def public_manifest(self) -> dict[str, Any]:
        """The manifest without the bulky calibration quantiles and training history."""
        m = {k: v for k, v in self.manifest.items() if k != "calibration"}
        if "metrics" in m:
            m["metrics"] = {k: v for k, v in m["metrics"].items() if k != "history"}
        if "calibration" in self.manifest:
            cal = self.manifest["calibration"]
            m["calibration"] = {k: v for k, v in cal.items() if k not in ("levels", "scores")}
            m["calibration"]["scores"] = sorted(cal.get("scores", {}))
        return m

    # -- helpers -------------------------------------------------------------------------------

    def _tensor(self, a: Array) -> torch.Tensor:
        return torch.from_numpy(a).to(self.device)

    def _generator(self, seed: int | None) -> torch.Generator:
        # A CPU generator per request: reproducible, independent of other requests, and the same
        # numbers on every device. Unseeded requests get a fresh random seed.
        return torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)

    def _eps(self, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(self.device)


def _numpy(t: torch.Tensor) -> Array:
    return t.detach().to("cpu", torch.float32).contiguous().numpy()


def _parse_manifest(path: Path, raw: str | bytes) -> dict[str, Any]:
    if not raw:
        raise ModelLoadError(
            f"{path}: the artifact has no manifest.json; re-export it with training."
        )
    try:
        manifest = json.loads(raw)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both
        raise ModelLoadError(f"{path}: manifest.json is not valid JSON.") from e
    if not isinstance(manifest, dict):
        raise ModelLoadError(f"{path}: manifest.json is not a JSON object.")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ModelLoadError(f"{path}: manifest.json lacks {', '.join(missing)}.")
    version = manifest["format_version"]
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise ModelLoadError(
            f"{path}: unknown format_version {version!r}; this service reads "
            f"{sorted(SUPPORTED_FORMAT_VERSIONS)}."
        )
    if math.prod(manifest["input_shape"]) != manifest["input_dim"]:
        raise ModelLoadError(f"{path}: manifest input_shape does not match input_dim.")
    return manifest
