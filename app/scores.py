"""The anomaly scores the literature adds where likelihood alone fails, computed in numpy from
the model's outputs, and the per-feature attribution.

Likelihood ranks simple inputs (an all-black image, a thin 1) as the most normal of all. Two
corrections are built here:

- **input complexity** (Serrà et al., ICLR 2020): S(x) = -log2 p(x) - L(x), where L(x) is the
  length in bits of a lossless compression of x: zlib of x in bytes (thresholded at 0.5 first
  for a Bernoulli model). A simple input is cheap to compress, so it loses the bonus its high
  likelihood gave it;
- **DoSE** (Morningstar et al., AISTATS 2021): a kernel density over the validation set's vectors
  of summary statistics (the scores, the compressed length, the posterior's size); the score is
  -log density, so an input that is too typical is as suspect as one too unlikely.

No FastAPI and no torch here: the trainer calibrates these scores with these very functions, so
the quantiles in the manifest and the scores the service computes cannot drift apart.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.common import Array

LN2 = math.log(2.0)
_CHUNK = 256  # rows per KDE block: (256, N, F) float64 stays near 12 MB for N = 2000, F = 3


def complexity_bits(x: Array, binary: bool = False) -> Array:
    """L(x): the bits of zlib (level 9) of each row quantised to 8 bits; (B, D) in [0, 1] -> (B,).

    `binary` first thresholds x at 0.5, the view a Bernoulli model takes of its data: it was
    calibrated on binarised images, and the grey levels of the same digit would otherwise
    cost hundreds of bits more and look anomalous. Rows are compressed flat, in the model's
    feature order."""
    levels = (np.asarray(x) >= 0.5) if binary else np.clip(x, 0.0, 1.0)
    q = np.round(levels * 255.0).astype(np.uint8)
    return np.array([8 * len(zlib.compress(row.tobytes(), 9)) for row in q], dtype=np.float32)


def input_complexity(log_px: Array, bits: Array) -> Array:
    """S(x) = -log2 p(x) - L(x) in bits (Serrà et al. 2020); higher is more anomalous."""
    return np.asarray(-log_px / LN2 - bits, dtype=np.float32)


@dataclass(frozen=True)
class Density:
    """DoSE's density: a Gaussian kernel density over standardised summary statistics.

    `reference` holds the validation set's statistics, standardised by `mean` and `scale`; the
    bandwidth is Scott's rule, n^(-1/(F+4)), in standardised units."""

    features: tuple[str, ...]
    mean: np.ndarray  # (F,)
    scale: np.ndarray  # (F,)
    reference: np.ndarray  # (N, F), standardised
    bandwidth: float

    @classmethod
    def fit(cls, stats: Mapping[str, Array], features: tuple[str, ...]) -> Density:
        raw = _stack(stats, features)
        mean, scale = raw.mean(0), raw.std(0)
        scale = np.where(scale > 0.0, scale, 1.0)
        n, f = raw.shape
        return cls(features, mean, scale, (raw - mean) / scale, float(n ** (-1.0 / (f + 4))))

    def score(self, stats: Mapping[str, Array]) -> Array:
        """-log density of each instance's statistics; higher is more anomalous."""
        return self._score((_stack(stats, self.features) - self.mean) / self.scale, loo=False)

    def reference_scores(self) -> Array:
        """The reference points' own scores, each left out of its own density (leave-one-out),
        for calibration: a point's own kernel would make it look more normal than it is."""
        return self._score(self.reference, loo=True)

    def _score(self, points: np.ndarray, *, loo: bool) -> Array:
        n, f = self.reference.shape
        h = self.bandwidth
        out = []
        for start in range(0, len(points), _CHUNK):
            block = points[start : start + _CHUNK]
            d2 = ((block[:, None, :] - self.reference[None, :, :]) ** 2).sum(-1)  # (b, N)
            logk = -0.5 * d2 / h**2
            if loo:
                idx = np.arange(start, start + len(block))
                logk[np.arange(len(block)), idx] = -np.inf
            norm = math.log(n - 1 if loo else n) + f * math.log(h) + 0.5 * f * math.log(2 * math.pi)
            out.append(-(np.logaddexp.reduce(logk, axis=1) - norm))
        return np.concatenate(out).astype(np.float32)

    def to_manifest(self) -> dict[str, Any]:
        return {
            "features": list(self.features),
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "bandwidth": self.bandwidth,
            "reference": np.round(self.reference, 5).tolist(),
        }

    @classmethod
    def from_manifest(cls, entry: Mapping[str, Any]) -> Density:
        features = tuple(str(f) for f in entry["features"])
        reference = np.asarray(entry["reference"], dtype=np.float64)
        mean = np.asarray(entry["mean"], dtype=np.float64)
        scale = np.asarray(entry["scale"], dtype=np.float64)
        f = len(features)
        if reference.ndim != 2 or reference.shape[1] != f or len(reference) < 2:
            raise ValueError(f"the density's reference must be N x {f} with N >= 2")
        if mean.shape != (f,) or scale.shape != (f,) or np.any(scale <= 0):
            raise ValueError(f"the density needs {f} means and {f} positive scales")
        bandwidth = float(entry["bandwidth"])
        if not bandwidth > 0.0 or not np.all(np.isfinite(reference)):
            raise ValueError("the density's bandwidth and reference must be finite and positive")
        return cls(features, mean, scale, reference, bandwidth)


def _stack(stats: Mapping[str, Array], features: tuple[str, ...]) -> np.ndarray:
    return np.stack([np.asarray(stats[f], dtype=np.float64) for f in features], axis=1)
