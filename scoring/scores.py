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

And one from the latent space, where a likelihood cannot look (format 3):

- **latent distance**: how far the posterior mean's direction lies from those of the training
  data, the mean chord distance between unit vectors to its k nearest training means (a k-NN
  detector on the representation, as in Sun et al., ICML 2022). A digit the model never saw
  is reconstructed well, so its likelihood looks normal, but its code falls between the
  training digits' codes; the direction, not the length, carries the class;
- **latent polar distance** (format 5): the same k-NN distance with the mean's length kept as
  well as its direction, in polar coordinates (the unit vector and the log of the length). On
  one digit learnt, an unseen digit's code often points where the digit's do but lies further
  out or nearer in; on nine digits learnt, it adds the length to what the direction tells;
- **rapp** (format 4; Kim et al., ICLR 2020, "RaPP"): the input is reconstructed, both go
  through the encoder, and the differences between their hidden activations, layer by layer,
  are measured in the coordinates of the training rows' own differences, each direction
  scaled by its spread (the paper's NAP). Where a pixel-wise reconstruction error sees a
  well-drawn unseen digit as normal, its features still do not come back the same;
- **ensemble**: a combination of calibrated percentiles, so an input is as anomalous as its
  scores together say. Format 3 takes the larger of DoSE's and the latent distance's; format 4
  adds the tails of DoSE's, the latent distance's and RaPP's, -log(1 - p) each (Fisher's
  method), so two scores that are both somewhat alarmed outweigh one that is not; format 5
  adds the polar distance's and, for data in [0, 1], the input complexity's. The distance
  misses what only its length gives away (a blank image, noise), DoSE an unseen digit drawn
  well, RaPP what the model reproduces in its own terms (docs/benchmarks/anomaly.md).

No FastAPI here, and no model: the trainer calibrates these scores with these very functions, so
the quantiles in the manifest and the scores the service computes cannot drift apart. (The
latent distance borrows torch's matrix product; see Neighbours.score.)
"""

from __future__ import annotations

import functools
import io
import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from scoring import Array
from scoring.calibration import ScoreCalibration, ensemble_weights

LN2 = math.log(2.0)
# Rows per block: DoSE's (256, N, F) float64 stays near 12 MB for N = 2000, F = 3; the latent
# distance's (256, N) similarities near 42 MB for the shipped model's N = 20,699.
_CHUNK = 256
# The neighbours latent_distance averages over: 1 was worse on held-out digits, 3 to 10 alike.
NEIGHBOURS = 5
# The directions the feature distance projects the encoder's first hidden layer on (format 9).
FEATURE_RANK = 128
# The scores the format-3 ensemble takes the larger percentile of.
ENSEMBLE = ("dose", "latent_distance")


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


@dataclass(frozen=True)
class Neighbours:
    """The latent distances' reference: the training rows' posterior means as unit vectors
    (N, Z), and (format 5) the logs of their lengths (N,), for the polar distance.

    Each travels in the artifact as an .npy file of its own (N x Z floats are too many for the
    JSON manifest); the manifest says k and N."""

    reference: torch.Tensor  # (N, Z) float64, unit rows, on the CPU
    k: int = NEIGHBOURS
    log_lengths: torch.Tensor | None = None  # (N,) float64; format 5

    @classmethod
    def fit(cls, means: Array, k: int = NEIGHBOURS) -> Neighbours:
        return cls(_unit(means), k, _log_length(means))

    def score(self, means: Array) -> Array:
        """Mean chord distance ||u - v|| = sqrt(2 - 2 u.v) from each unit posterior mean u to
        its k nearest reference rows v; in [0, 2], higher is more anomalous."""
        return self.distances(means)[0]

    def polar_score(self, means: Array) -> Array:
        """Mean Euclidean distance from each posterior mean to its k nearest reference rows in
        polar coordinates, (unit vector, log length): sqrt(||u - v||^2 + (log r - log s)^2).
        Higher is more anomalous. Needs the reference's lengths (format 5)."""
        polar = self.distances(means)[1]
        if polar is None:
            raise ValueError("the polar distance needs the reference's lengths")
        return polar

    def distances(self, means: Array) -> tuple[Array, Array | None]:
        """The chord distance and, where the reference has its lengths (format 5), the polar
        one, from one product of the means with the reference: it reads the whole reference,
        which for a single request is most of what a latent distance costs."""
        # torch's matrix product, not numpy's: numpy's BLAS threads, woken right after torch's
        # own have run the model, fought them for the cores and took 50 times as long.
        unit = _unit(means)
        lengths = None if self.log_lengths is None else _log_length(means)
        chords, polars = [], []
        for start in range(0, len(unit), _CHUNK):
            similarity = unit[start : start + _CHUNK] @ self.reference.T  # (b, N)
            nearest = torch.topk(similarity, self.k, dim=1).values
            chords.append(torch.sqrt(torch.clamp(2.0 - 2.0 * nearest, min=0.0)).mean(1))
            if lengths is not None and self.log_lengths is not None:
                gap = lengths[start : start + _CHUNK, None] - self.log_lengths[None, :]  # (b, N)
                squared = torch.clamp(2.0 - 2.0 * similarity, min=0.0) + gap**2
                closest = torch.topk(squared, self.k, dim=1, largest=False).values
                polars.append(torch.sqrt(closest).mean(1))
        return _joined(chords), None if lengths is None else _joined(polars)

    def to_bytes(self) -> bytes:
        return _npy(self.reference)

    def lengths_to_bytes(self) -> bytes:
        assert self.log_lengths is not None
        return _npy(self.log_lengths)

    @classmethod
    def from_bytes(
        cls, raw: bytes, k: int, latent_dim: int, raw_lengths: bytes | None = None
    ) -> Neighbours:
        reference = np.load(io.BytesIO(raw), allow_pickle=False)
        if reference.ndim != 2 or reference.shape[1] != latent_dim or len(reference) < k:
            raise ValueError(f"the latent reference must be N x {latent_dim} with N >= k = {k}")
        if not np.all(np.isfinite(reference)):
            raise ValueError("the latent reference must be finite")
        log_lengths = None
        if raw_lengths is not None:
            lengths = np.load(io.BytesIO(raw_lengths), allow_pickle=False)
            if lengths.shape != (len(reference),) or not np.all(np.isfinite(lengths)):
                raise ValueError(f"the latent lengths must be {len(reference)} finite values")
            log_lengths = torch.from_numpy(lengths.astype(np.float64))
        return cls(torch.from_numpy(reference.astype(np.float64)), int(k), log_lengths)


@dataclass(frozen=True)
class FeatureNeighbours:
    """The feature distance's reference (format 9, models of [0, 1] data): the training rows'
    activations in the encoder's first hidden layer, as unit vectors, projected on the FEATURE_RANK
    right singular vectors of their matrix (uncentred, so the projection keeps what the
    directions share) and made unit vectors again. The score is the k-NN chord distance
    between such vectors, as the latent distance's between posterior means (Sun et al., ICML
    2022, take a classifier's penultimate features).

    The first layer keeps more of the digit than the 32 numbers of the mean: on the design
    split (training images only), its distance alone reached a mean AUROC of 0.963 with one
    digit learnt, where the latent distance had 0.857, and held the unseen 1 that the latent
    distance misses (docs/benchmarks/anomaly.md). Projected on 128 directions it scored within
    0.005 of the 512 units it comes from, at a quarter of the reference's size and cost.

    It travels in the artifact as an .npz file of its own. The basis and the rows are float32
    there, and are rounded to float32 here as well, so the trainer calibrates on exactly what
    the service reads."""

    basis: torch.Tensor  # (H, R) float64
    neighbours: Neighbours  # its reference: (N, R) unit rows, no lengths

    @classmethod
    def fit(
        cls, features: Array, k: int = NEIGHBOURS, rank: int = FEATURE_RANK
    ) -> FeatureNeighbours:
        unit = _unit(features)
        _, _, vh = torch.linalg.svd(unit, full_matrices=False)
        basis = _f32(vh[:rank].T)
        return cls(basis, Neighbours(_f32(_unit((unit @ basis).numpy())), min(k, len(unit))))

    def distances(self, features: Array) -> Array:
        """Mean chord distance from each row's projected features (B, H) to its k nearest
        reference rows; (B,), in [0, 2], higher is more anomalous."""
        return self.neighbours.score((_unit(features) @ self.basis).numpy())

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        f32 = np.float32
        np.savez(buffer, basis=self.basis.numpy().astype(f32),
                 rows=self.neighbours.reference.numpy().astype(f32))  # fmt: skip
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, raw: bytes, k: int, width: int) -> FeatureNeighbours:
        with np.load(io.BytesIO(raw), allow_pickle=False) as parts:
            basis, rows = parts["basis"], parts["rows"]
        if basis.ndim != 2 or basis.shape[0] != width:
            raise ValueError(f"the feature basis must be {width} x R")
        if rows.ndim != 2 or rows.shape[1] != basis.shape[1] or len(rows) < k or k < 1:
            raise ValueError(
                f"the feature reference must be N x {basis.shape[1]}, N >= k = {k} >= 1"
            )
        if not (np.all(np.isfinite(basis)) and np.all(np.isfinite(rows))):
            raise ValueError("the feature reference must be finite")
        f64 = torch.float64
        reference = torch.from_numpy(rows).to(f64)
        return cls(torch.from_numpy(basis).to(f64), Neighbours(reference, int(k)))


def _f32(t: torch.Tensor) -> torch.Tensor:
    """t rounded to float32 and held as float64: as the artifact's file holds it."""
    return t.to(torch.float32).to(torch.float64)


def _unit(a: Array) -> torch.Tensor:
    # float64, so a row's distance does not depend on the batch the product computed it in.
    rows = torch.as_tensor(np.asarray(a), dtype=torch.float64)
    unit: torch.Tensor = rows / torch.linalg.vector_norm(rows, dim=1, keepdim=True).clamp(min=1e-12)
    return unit


def _joined(blocks: list[torch.Tensor]) -> Array:
    return torch.cat(blocks).numpy().astype(np.float32) if blocks else np.zeros(0, np.float32)


def _log_length(a: Array) -> torch.Tensor:
    rows = torch.as_tensor(np.asarray(a), dtype=torch.float64)
    return torch.log(torch.linalg.vector_norm(rows, dim=1).clamp(min=1e-12))


def _npy(t: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, t.numpy().astype(np.float32), allow_pickle=False)
    return buffer.getvalue()


@dataclass(frozen=True)
class Ensemble:
    """Which scores' calibrated percentiles the ensemble combines, and how: the largest
    (`max`, format 3), or the sum of their tails -log(1 - p) (`fisher`, format 4), each times
    its weight (format 9; each once before), infinite where one of them lies beyond all normal
    data (p = 1). Format 4's manifest says which; format 3's is the largest of DoSE's and the
    latent distance's."""

    scores: tuple[str, ...] = ENSEMBLE
    combine: str = "max"
    # Format 9: how many times each score's tail counts in the sum; None counts each once.
    weights: tuple[float, ...] | None = None

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> Ensemble:
        entry = manifest.get("ensemble")
        if entry is None:
            return cls()
        combine = str(entry["combine"])
        if combine not in ("max", "fisher") or not entry["scores"]:
            raise ValueError("the ensemble combines its scores by max or fisher")
        scores = tuple(str(n) for n in entry["scores"])
        weights = None
        if entry.get("weights") is not None:
            if combine != "fisher":
                raise ValueError("the ensemble's weights are summed by fisher, not max")
            weights = tuple(ensemble_weights(entry["weights"], len(scores)).tolist())
        return cls(scores, combine, weights)

    @property
    def tail_weights(self) -> tuple[float, ...]:
        """Each score's weight in the sum of tails: its own (format 9), else 1."""
        return self.weights or (1.0,) * len(self.scores)

    def to_manifest(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"scores": list(self.scores), "combine": self.combine}
        if self.weights is not None:
            entry["weights"] = list(self.weights)
        return entry

    def score(
        self,
        scores: Mapping[str, Array],
        calibration: Mapping[str, ScoreCalibration],
        held_out: bool = False,
    ) -> Array:
        """The ensemble of its scores (each (B,)) by their `calibration`s; higher is more
        anomalous. `max` takes the percentiles as the artifact's trainer computed them
        (ScoreCalibration.as_trained), `fisher` sums their tails (ScoreCalibration.log_tail;
        with `held_out`, the scores are the calibration's own validation values, each taken
        against the others: ScoreCalibration.held_out_log_tails). Where one of them is not
        finite (an input beyond what the model represents) the ensemble is infinite: beyond
        all normal data, whatever the others say."""
        if self.combine == "max":
            parts = [calibration[n].as_trained(scores[n]).astype(np.float64) for n in self.scores]
            combined = np.maximum.reduce(parts)
        else:
            tails = [
                w
                * (
                    calibration[n].held_out_log_tails(scores[n])
                    if held_out
                    else calibration[n].log_tail(scores[n])
                )
                for n, w in zip(self.scores, self.tail_weights, strict=True)
            ]
            combined = np.sum(tails, axis=0)
        beyond = ~np.all([np.isfinite(scores[n]) for n in self.scores], axis=0)
        return np.where(beyond, np.inf, combined).astype(np.float32)


@dataclass(frozen=True)
class InputNeighbours:
    """The input distance's reference (format 7, table models): training rows, each feature
    shifted by its mean over them and divided by its spread, so that no column outweighs the
    others by its unit. The score is the mean Euclidean distance to the k nearest of them, the
    k-NN detector of Ramaswamy et al. (SIGMOD 2000), PyOD's KNN. Where a table's anomaly sits
    among ordinary values in an odd combination, the VAE's summary statistics (DoSE's) may
    miss it and the rows' own geometry does not; on wine it is the better of the two, on iris
    DoSE is (docs/benchmarks/tables.md).

    It travels in the artifact as an .npz file of its own. The rows are float32 there, and are
    rounded to float32 here as well, so the trainer calibrates on exactly what the service
    reads. The artifact then holds these training rows, as any k-NN detector must."""

    reference: torch.Tensor  # (N, D) float64, standardised training rows
    shift: torch.Tensor  # (D,) float64
    scale: torch.Tensor  # (D,) float64, positive
    k: int = NEIGHBOURS

    @classmethod
    def fit(cls, rows: Array, k: int = NEIGHBOURS) -> InputNeighbours:
        x = np.asarray(rows, dtype=np.float64)
        shift, spread = x.mean(0), x.std(0)
        scale = np.where(spread > 0.0, spread, 1.0)

        def f32(a: np.ndarray) -> torch.Tensor:  # as the artifact's file holds it
            return torch.from_numpy(a.astype(np.float32).astype(np.float64))

        return cls(f32((x - shift) / scale), f32(shift), f32(scale), min(k, len(x)))

    def distances(self, x: Array) -> Array:
        """Mean Euclidean distance from each row of x (B, D), standardised as the reference
        is, to its k nearest reference rows; (B,), higher is more anomalous."""
        q = (torch.as_tensor(np.asarray(x), dtype=torch.float64) - self.shift) / self.scale
        ref_norms = self._reference_norms
        out = []
        for start in range(0, len(q), _CHUNK):
            block = q[start : start + _CHUNK]
            # ||a - b||^2 by one product: the (b, N, D) differences would not fit for large N.
            squared = (block**2).sum(1, keepdim=True) + ref_norms - 2.0 * block @ self.reference.T
            nearest = torch.topk(squared.clamp(min=0.0), self.k, dim=1, largest=False).values
            out.append(torch.sqrt(nearest).mean(1))
        return _joined(out)

    @functools.cached_property
    def _reference_norms(self) -> torch.Tensor:
        """||b||^2 of each reference row (N,): a pass over all N x D values, so once, not per
        request."""
        return (self.reference**2).sum(1)

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(
            buffer,
            rows=self.reference.numpy().astype(np.float32),
            shift=self.shift.numpy().astype(np.float32),
            scale=self.scale.numpy().astype(np.float32),
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, raw: bytes, k: int, width: int) -> InputNeighbours:
        with np.load(io.BytesIO(raw), allow_pickle=False) as parts:
            rows, shift, scale = parts["rows"], parts["shift"], parts["scale"]
        if rows.ndim != 2 or rows.shape[1] != width or len(rows) < k or k < 1:
            raise ValueError(f"the input reference must be N x {width} with N >= k = {k} >= 1")
        if shift.shape != (width,) or scale.shape != (width,) or not np.all(scale > 0):
            raise ValueError(
                f"the input reference needs {width} shifts and {width} positive scales"
            )
        if not all(np.all(np.isfinite(a)) for a in (rows, shift, scale)):
            raise ValueError("the input reference must be finite")
        f64 = torch.float64
        return cls(torch.from_numpy(rows).to(f64), torch.from_numpy(shift).to(f64),
                   torch.from_numpy(scale).to(f64), int(k))  # fmt: skip


@dataclass(frozen=True)
class References:
    """What the distances and RaPP measure an input against: the training rows' latent means,
    the projection of their hidden-space gaps, and (format 7, tables) the rows themselves. Each
    travels in the artifact as a file of its own (app/model.py names them); any is None where
    the format or the model has none."""

    neighbours: Neighbours | None = None
    gaps: GapProjection | None = None
    inputs: InputNeighbours | None = None
    features: FeatureNeighbours | None = None  # format 9, models of [0, 1] data


@dataclass(frozen=True)
class GapProjection:
    """RaPP's normalised aggregation (NAP): hidden-space reconstruction gaps (B, H), centred on
    the training rows' mean gap and measured along the right singular vectors of their matrix,
    each divided by its singular value, so a common direction of gap counts for little and a
    rare one for much. Directions whose singular value is below 1e-4 of the largest (numerical
    noise) are dropped. It travels in the artifact as an .npz file of its own."""

    mean: torch.Tensor  # (H,) float64
    basis: torch.Tensor  # (H, R) float64, orthonormal columns
    scale: torch.Tensor  # (R,) float64, positive

    @classmethod
    def fit(cls, gaps: Array) -> GapProjection:
        g = torch.as_tensor(np.asarray(gaps), dtype=torch.float64)
        mean = g.mean(0)
        _, s, vh = torch.linalg.svd(g - mean, full_matrices=False)
        keep = s > s.max() * 1e-4
        # Singular values of the N-row matrix; / sqrt(N) makes them per-row spreads.
        return cls(mean, vh[keep].T.contiguous(), s[keep] / math.sqrt(len(g)))

    def score(self, gaps: Array) -> Array:
        """Squared norm of the whitened gap; (B, H) -> (B,), higher is more anomalous."""
        g = torch.as_tensor(np.asarray(gaps), dtype=torch.float64)
        return (((g - self.mean) @ self.basis / self.scale) ** 2).sum(1).numpy().astype(np.float32)

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        f32 = np.float32
        np.savez(buffer, mean=self.mean.numpy().astype(f32), basis=self.basis.numpy().astype(f32),
                 scale=self.scale.numpy().astype(f32))  # fmt: skip
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, raw: bytes, width: int) -> GapProjection:
        with np.load(io.BytesIO(raw), allow_pickle=False) as parts:
            mean, basis, scale = parts["mean"], parts["basis"], parts["scale"]
        if mean.shape != (width,) or basis.ndim != 2 or basis.shape[0] != width:
            raise ValueError(f"the gap projection must be over {width} hidden units")
        if scale.shape != (basis.shape[1],) or not np.all(scale > 0):
            raise ValueError("the gap projection needs one positive scale per direction")
        if not all(np.all(np.isfinite(a)) for a in (mean, basis, scale)):
            raise ValueError("the gap projection must be finite")
        f64 = torch.float64
        return cls(torch.from_numpy(mean).to(f64), torch.from_numpy(basis).to(f64),
                   torch.from_numpy(scale).to(f64))  # fmt: skip
