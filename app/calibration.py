"""Percentiles and anomaly decisions from the manifest's calibration quantiles.

Training stores, for each score, its quantiles on held-out normal data at levels 0, 0.001, ...,
1. An instance's percentile is the share of that normal data which is less anomalous than it:
for a score where higher is anomalous (KL) the share below it, for one where lower is anomalous
(reconstruction probability, log-likelihood) the share above it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from app.common import Array
from app.errors import ModelLoadError


@dataclass(frozen=True)
class ScoreCalibration:
    quantiles: Array  # (Q,), non-decreasing
    higher_is_anomalous: bool
    samples: int  # the L or K it was computed with
    # The curve percentiles interpolate on, built once at load rather than on every request
    # (the ensemble reads two percentiles more per instance): see _curve.
    distinct: Array
    at_level: Array


@dataclass(frozen=True)
class Calibration:
    levels: Array  # (Q,), 0 ... 1
    scores: dict[str, ScoreCalibration]

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], where: str) -> Calibration:
        """Parse and check the calibration: monotone, complete, and a known direction."""
        cal = manifest.get("calibration")
        if not isinstance(cal, dict) or not cal.get("scores"):
            raise ModelLoadError(f"{where}: the manifest has no score calibration.")
        levels = np.asarray(cal.get("levels", []), dtype=np.float64)
        if levels.size < 2 or levels[0] != 0.0 or levels[-1] != 1.0 or np.any(np.diff(levels) <= 0):
            raise ModelLoadError(f"{where}: calibration levels must rise from 0 to 1.")
        scores = {}
        for name, entry in cal["scores"].items():
            q = np.asarray(entry.get("quantiles", []), dtype=np.float64)
            if q.shape != levels.shape or not np.all(np.isfinite(q)) or np.any(np.diff(q) < 0):
                raise ModelLoadError(
                    f"{where}: calibration of {name} must be {levels.size} finite, "
                    "non-decreasing quantiles."
                )
            if entry.get("anomalous_when") not in ("higher", "lower"):
                raise ModelLoadError(f"{where}: calibration of {name} has no direction.")
            higher = entry["anomalous_when"] == "higher"
            samples = int(entry.get("samples", 0))
            q32 = q.astype(np.float32)
            distinct, at_level = _curve(q32, levels.astype(np.float32))
            scores[name] = ScoreCalibration(q32, higher, samples, distinct, at_level)
        return cls(levels.astype(np.float32), scores)

    def percentile(self, name: str, values: Array) -> Array:
        """The share of normal data less anomalous than each value, in [0, 1]."""
        cal = self.scores[name]
        if len(cal.distinct) == 1:
            below = np.asarray(values > cal.distinct[0], dtype=np.float32)
        else:
            below = np.interp(values, cal.distinct, cal.at_level, left=0.0).astype(np.float32)
        return below if cal.higher_is_anomalous else (1.0 - below).astype(np.float32)


def _curve(quantiles: Array, levels: Array) -> tuple[Array, Array]:
    # Quantiles repeat where the normal data has ties, and np.interp needs increasing x: keep
    # each distinct quantile with the highest level at which it appears.
    q, first = np.unique(quantiles, return_index=True)
    top = np.append(first[1:] - 1, len(quantiles) - 1)
    return q, levels[top]
