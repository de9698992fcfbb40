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
            scores[name] = ScoreCalibration(q.astype(np.float32), higher, samples)
        return cls(levels.astype(np.float32), scores)

    def percentile(self, name: str, values: Array) -> Array:
        """The share of normal data less anomalous than each value, in [0, 1]."""
        cal = self.scores[name]
        below = _share_below(values, cal.quantiles, self.levels)
        return below if cal.higher_is_anomalous else (1.0 - below).astype(np.float32)


def _share_below(values: Array, quantiles: Array, levels: Array) -> Array:
    # Quantiles repeat where the normal data has ties, and np.interp needs increasing x: keep
    # each distinct quantile with the highest level at which it appears.
    q, first = np.unique(quantiles, return_index=True)
    if len(q) == 1:
        return np.asarray(values > q[0], dtype=np.float32)
    top = np.append(first[1:] - 1, len(quantiles) - 1)
    return np.asarray(np.interp(values, q, levels[top], left=0.0), dtype=np.float32)
