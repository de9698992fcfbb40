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

from app.common import Array, Arrays
from app.costs import Costs
from scoring.artifact import (
    ATTRIBUTION_METHOD,
    BACKGROUND,
    FEATURE_REFERENCE,
    GAP_PROJECTION,
    INPUT_REFERENCE,
    LATENT_LENGTHS,
    LATENT_REFERENCE,
    MANIFEST,
    PROJECTION_STEPS,
    REDRAW_ROUNDS,
    REDRAW_STEPS,
    REDRAWN_RESIDUAL,
    REQUIRED_KEYS,
    REQUIRED_METHODS,
    SUPPORTED_FORMAT_VERSIONS,
    ModelLoadError,
    projected_feature_nll,
    redrawn_residual,
)
from scoring.calibration import Calibration
from scoring.scores import (
    Density,
    Ensemble,
    FeatureNeighbours,
    GapProjection,
    InputNeighbours,
    Neighbours,
    References,
    complexity_bits,
    input_complexity,
)

log = logging.getLogger(__name__)


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
        background: torch.jit.ScriptModule | None = None,
        references: References | None = None,
    ) -> None:
        self.module = module
        # Where the repository holds it (app/repository.py): the labels of its metrics.
        self.name, self.version = "default", 1
        self.artifact = "vae.pt"  # its file, as /model shows it (never where it lies)
        self.manifest = manifest
        self.sha256 = sha256
        self.device = device
        self.input_shape: tuple[int, ...] = tuple(manifest["input_shape"])
        self.input_dim: int = manifest["input_dim"]
        self.latent_dim: int = manifest["latent_dim"]
        self.likelihood: str = manifest["likelihood"]
        self.calibration = calibration
        self.format_version: int = manifest["format_version"]
        self.background = background
        references = references or References()
        self.neighbours = references.neighbours  # format 3
        self.gaps = references.gaps  # format 4
        self.inputs = references.inputs  # format 7, table models
        self.features = references.features  # format 9, image models
        self.ensemble = Ensemble.from_manifest(manifest)
        if "ensemble" in calibration.scores:
            lacking = [n for n in self.ensemble.scores if n not in calibration.scores]
            if lacking:
                raise ValueError(f"the ensemble combines {', '.join(lacking)}, not calibrated")
        conformal = calibration.conformal  # format 8: its validation rows are of its own parts
        if conformal is not None and conformal.parts != self.ensemble.scores:
            raise ValueError("the ensemble's validation rows are not of the scores it combines")
        if conformal is not None and tuple(conformal.weights) != self.ensemble.tail_weights:
            raise ValueError(
                "the ensemble's validation rows are weighted otherwise than its scores"
            )
        # Format 2: what its scores need, checked by load(); absent from format 1.
        self.density = Density.from_manifest(manifest["dose"]) if "dose" in manifest else None
        # How the attribution is computed: format 2 averages -log p(x_d|z) over the posterior
        # samples, format 3 reads it at the trimmed projection ("projection"); both standardise
        # it per feature. Format 6 draws an image model's as the residual from x redrawn.
        attribution = manifest.get("attribution")
        self.attribution_method: str | None = None
        self.attribution_stats: tuple[Array, Array] | None = None
        if attribution is not None and hasattr(module, ATTRIBUTION_METHOD):
            self.attribution_method = attribution.get("method", "samples")
            if self.attribution_method != REDRAWN_RESIDUAL:
                mean = np.asarray(attribution["mean"], dtype=np.float32)
                # A floor on the spread: a pixel that is always 0 in normal data has none, and
                # one stray value there must rank high, not infinitely high.
                scale = np.maximum(np.asarray(attribution["scale"], dtype=np.float32), 0.05)
                self.attribution_stats = (mean, scale)
        # A table's column names, in input order: the keys of /encode's and /anomaly-score's
        # records, and the names the attribution is reported by.
        features = manifest.get("features")
        self.feature_names: tuple[str, ...] | None = None
        self.feature_index: dict[str, int] = {}
        if features is not None:
            self.feature_names = tuple(str(n) for n in features["names"])
            if len(self.feature_names) != self.input_dim:
                raise ValueError(
                    f"{len(self.feature_names)} feature names for {self.input_dim} inputs"
                )
            self.feature_index = {name: i for i, name in enumerate(self.feature_names)}
        # Measured by warm_up; until then every job's cost is infinite: none runs inline.
        self.costs = Costs()
        # The score the artifact recommends deciding with; format 1 predates the choice.
        self.decision_score: str = manifest.get("decision_score", "reconstruction_log_prob")

    @classmethod
    def load(
        cls,
        path: Path,
        device: str = "auto",
        expected_sha256: str | None = None,
        pinned_by: str = "VAE_MODEL_SHA256",
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
                f"{path}: its sha256 is {sha256}, but {pinned_by} pins "
                f"{expected_sha256.lower()}; refusing to serve it."
            )
        extra: dict[str, Any] = dict.fromkeys(
            (
                MANIFEST,
                BACKGROUND,
                LATENT_REFERENCE,
                LATENT_LENGTHS,
                GAP_PROJECTION,
                INPUT_REFERENCE,
                FEATURE_REFERENCE,
            ),
            "",
        )
        # From the bytes already read: the sha256 reported is of exactly what runs.
        module = _jit_load(path, data, dev, extra)
        manifest = _parse_manifest(path, extra[MANIFEST])
        calibration = Calibration.from_manifest(manifest, str(path))
        missing = [m for m in REQUIRED_METHODS if not hasattr(module, m)]
        if missing:
            raise ModelLoadError(f"{path}: the artifact lacks the methods {', '.join(missing)}.")
        module.eval()
        background = None
        if "likelihood_ratio" in calibration.scores:
            if not extra[BACKGROUND]:
                raise ModelLoadError(f"{path}: the likelihood ratio needs {BACKGROUND}, absent.")
            background = _jit_load(path, extra[BACKGROUND], dev, {}).eval()
        needs = (
            ("latent_distance", LATENT_REFERENCE),
            ("latent_polar_distance", LATENT_REFERENCE),
            ("latent_polar_distance", LATENT_LENGTHS),
            ("rapp", GAP_PROJECTION),
            ("input_distance", INPUT_REFERENCE),
            ("feature_distance", FEATURE_REFERENCE),
        )
        for score, file in needs:
            if score in calibration.scores and not extra[file]:
                raise ModelLoadError(f"{path}: the {score} score needs {file}, absent.")
        for score, method in (("rapp", "hidden_gap"), ("feature_distance", "features")):
            if score in calibration.scores and not hasattr(module, method):
                raise ModelLoadError(
                    f"{path}: the {score} score needs the method {method}, absent."
                )
        try:
            neighbours = gaps = inputs = features = None
            if "latent_distance" in calibration.scores:
                k, z = manifest["latent_distance"]["k"], manifest["latent_dim"]
                polar = "latent_polar_distance" in calibration.scores
                lengths = extra[LATENT_LENGTHS] if polar else None
                neighbours = Neighbours.from_bytes(extra[LATENT_REFERENCE], k, z, lengths)
            if "rapp" in calibration.scores:
                width = sum(manifest["model"]["hidden_dims"])
                gaps = GapProjection.from_bytes(extra[GAP_PROJECTION], width)
            if "input_distance" in calibration.scores:
                k, width = manifest["input_distance"]["k"], manifest["input_dim"]
                inputs = InputNeighbours.from_bytes(extra[INPUT_REFERENCE], k, width)
            if "feature_distance" in calibration.scores:
                k, width = manifest["feature_distance"]["k"], manifest["model"]["hidden_dims"][0]
                features = FeatureNeighbours.from_bytes(extra[FEATURE_REFERENCE], k, width)
            references = References(neighbours, gaps, inputs, features)
            service = cls(module, manifest, sha256, dev, calibration, background, references)
        except (KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"{path}: the manifest's scoring data is invalid ({e}).") from None
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
    # An input far beyond the training data overflows the model's arithmetic to inf or NaN; the
    # scores then carry it, and the calibration flags it (scoring/calibration.py), without warnings.
    @np.errstate(over="ignore", invalid="ignore", divide="ignore")
    def anomaly_scores(
        self,
        x: Array,
        samples: int,
        seed: int | None = None,
        ll_samples: int = 0,
        *,
        ratio: bool = False,
        attribution: bool = False,
    ) -> Arrays:
        """Each (B,): KL and the log reconstruction probability over L=`samples`; where the
        artifact has them, the input complexity, DoSE, the latent distances, RaPP, the input
        distance and the ensemble (of the percentiles its manifest names); with `ratio`, the
        likelihood ratio against the background model; with K=`ll_samples` > 0, the
        importance-sampled log-likelihood; with `attribution`, (B, D): per feature,
        -log p(x_d|z) standardised, or for format 6's image models the residual from x redrawn.

        The ratio and the attribution reuse the reconstruction's L samples, and the K samples
        are drawn after them, so asking for more never changes a seeded answer's other scores."""
        xt = self._tensor(x)
        g = self._generator(seed)
        eps = self._eps((samples, x.shape[0], self.latent_dim), g)  # (L, B, Z)
        recon = _numpy(self.module.reconstruction_log_prob(xt, eps))
        scores = {
            "kl_divergence": _numpy(self.module.kl_divergence(xt)),
            "reconstruction_log_prob": recon,
        }
        offered = self.calibration.scores
        if "input_complexity" in offered or self.density is not None:
            stats = (
                scores | {"complexity_bits": complexity_bits(x, binary=True)}
                if self.likelihood == "bernoulli"
                else scores
            )
            if "input_complexity" in offered:
                scores["input_complexity"] = input_complexity(recon, stats["complexity_bits"])
            if self.density is not None:
                scores["dose"] = self.density.score(stats)
        if self.neighbours is not None:
            mean, _ = self.module.encode(xt)
            chord, polar_distance = self.neighbours.distances(_numpy(mean))
            scores["latent_distance"] = chord
            if polar_distance is not None:
                scores["latent_polar_distance"] = polar_distance
        if self.gaps is not None:
            scores["rapp"] = self.gaps.score(_numpy(self.module.hidden_gap(xt)))
        if self.inputs is not None:
            scores["input_distance"] = self.inputs.distances(x)
        if self.features is not None:
            scores["feature_distance"] = self.features.distances(_numpy(self.module.features(xt)))
        if "ensemble" in offered:
            scores["ensemble"] = self.ensemble.score(scores, self.calibration.scores)
        if ratio and self.background is not None:
            scores["likelihood_ratio"] = recon - _numpy(
                self.background.reconstruction_log_prob(xt, eps)
            )
        if attribution and self.attribution_method == REDRAWN_RESIDUAL:
            scores["attribution"] = _numpy(redrawn_residual(self.module, xt))
        elif attribution and self.attribution_stats is not None:
            mean, scale = self.attribution_stats
            if self.attribution_method == "projection":
                nll = _numpy(projected_feature_nll(self.module, xt))
            else:  # format 2: averaged over the reconstruction's L posterior samples
                nll = -_numpy(getattr(self.module, ATTRIBUTION_METHOD)(xt, eps))
            scores["attribution"] = (nll - mean) / scale
        if ll_samples:
            eps = self._eps((ll_samples, x.shape[0], self.latent_dim), g)  # (K, B, Z)
            scores["log_likelihood"] = _numpy(self.module.log_likelihood(xt, eps))
        return scores

    def warm_up(self, max_batch_size: int = 1) -> None:
        """Run every operation at each batch size the batcher may form, so no request pays
        TorchScript's first-call profiling: every size up to 128, and beyond that the powers of
        two and the largest (a new shape costs about one extra millisecond, once). The
        projected attribution (50 steps a call, dear to warm at every size) at one row only."""
        powers = {2**i for i in range(max_batch_size.bit_length())}
        sizes = sorted(set(range(1, min(max_batch_size, 128) + 1)) | powers | {max_batch_size})
        for size in (s for s in sizes if s <= max_batch_size):
            x = np.full((size, self.input_dim), 0.5, dtype=np.float32)
            attribution = size == 1 or self.attribution_method == "samples"
            for _ in range(2):  # the profiling executor specialises on the second call
                self.encode(x, samples=2, seed=0)
                self.decode(np.zeros((size, self.latent_dim), dtype=np.float32))
                self.anomaly_scores(x, 2, 0, ll_samples=2, ratio=True, attribution=attribution)
        self.sample(2, seed=0)
        self.costs = Costs.measure(self)

    def attribution_passes(self, samples: int) -> int:
        """The attribution's cost in units of the scores' L decoder passes, for `cost_s`: one
        more for format 2's; for a projection, about three passes (forward, backward, and the
        encoder's share) per step, whatever L is; format 6 projects REDRAW_ROUNDS + 1 times."""
        if self.attribution_method == "samples":
            return 1
        steps = PROJECTION_STEPS
        if self.attribution_method == REDRAWN_RESIDUAL:
            steps = (REDRAW_ROUNDS + 1) * REDRAW_STEPS
        return math.ceil(3 * steps / max(samples, 1))

    def public_manifest(self) -> dict[str, Any]:
        """The manifest without the bulky calibration quantiles and training history."""
        m = {k: v for k, v in self.manifest.items() if k != "calibration"}
        if "metrics" in m:
            m["metrics"] = {k: v for k, v in m["metrics"].items() if k != "history"}
        if "calibration" in self.manifest:
            cal = self.manifest["calibration"]
            m["calibration"] = {k: v for k, v in cal.items() if k not in ("levels", "scores")}
            m["calibration"]["n"] = self.calibration.n
            m["calibration"]["scores"] = sorted(cal.get("scores", {}))
            # The smallest share of normal data a threshold can single out: 1 / (n + 1).
            m["calibration"]["resolvable_tail"] = round(self.calibration.resolvable_tail, 6)
        if "dose" in m:  # the reference points stay out; how the density was built stays in
            m["dose"] = {k: v for k, v in m["dose"].items() if k != "reference"}
            m["dose"]["n"] = len(self.manifest["dose"]["reference"])
        if "attribution" in m:  # how it is computed, without the per-feature statistics
            m["attribution"] = {
                k: v for k, v in m["attribution"].items() if k not in ("mean", "scale")
            }
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


def _jit_load(
    path: Path, data: bytes, device: torch.device, extra: dict[str, Any]
) -> torch.jit.ScriptModule:
    try:
        with warnings.catch_warnings():
            # torch 2.13 deprecates TorchScript; silence exactly that warning.
            warnings.filterwarnings(
                "ignore", message=r"`torch\.jit\.load` is deprecated", category=DeprecationWarning
            )
            module: torch.jit.ScriptModule = torch.jit.load(
                io.BytesIO(data), map_location=device, _extra_files=extra
            )
            return module
    except Exception as e:  # torch raises RuntimeError or ValueError with C++ traces
        raise ModelLoadError(
            f"{path}: not a readable TorchScript artifact ({type(e).__name__})."
        ) from e


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
