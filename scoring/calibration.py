"""Percentiles and anomaly decisions from the manifest's calibration: conservative by rank.

An instance's percentile is the share of held-out normal data that is strictly less anomalous
than it, counted as a rank among V validation scores and divided by V + 1: for a score where
higher is anomalous (KL) the values below it, for one where lower is anomalous (the
reconstruction probability) the values above it. A new normal instance's rank is then uniform
on 0..V (the validation rows and it are exchangeable), so flagging percentiles above q flags
normal data at most 1 - q of the time, whatever V is: the conformal bound (Vovk et al. 2005).
The linear interpolation of earlier releases did not hold it: at V = 100 it flagged 1.97% of
normal data at q = 0.99.

The smallest share this can resolve is 1 / (V + 1), the share of normal data above every
validation score: a threshold beyond V / (V + 1) could flag nothing finite, so it is lowered
to flag exactly those (`effective_threshold`), and the answer says so.

A score that is not finite (an input so far out that the model's arithmetic overflows) is more
anomalous than anything normal data gave: its percentile is 1.0.

Format 4 stores each score's sorted validation values. Formats 1 to 3 stored 1001 quantiles at
levels 0, 0.001, ..., 1 of V values; from those, the count strictly below any value above
quantile l is at least floor(l (V - 1)) + 1, and that lower bound is what they are read with,
so their percentiles are conservative too.

Format 8 keeps, beside the ensemble's, each validation row's values of the ensemble's parts,
and reads the ensemble's percentile as a full conformal p-value (ConformalEnsemble): the
ensemble is a sum of tails taken against the validation rows, so the rows' own sums are the
new row's peers only when taken the same way, against the others and it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from scoring import Array
from scoring.artifact import ModelLoadError


@dataclass(frozen=True)
class ScoreCalibration:
    """One score's step function: for a value beyond points[j] (above it when higher is
    anomalous, below it otherwise), at least counts[j] validation values are less anomalous."""

    points: np.ndarray  # (P,) float64, non-decreasing
    counts: np.ndarray  # (P,) float64
    n: int  # V, the validation values behind it
    higher_is_anomalous: bool
    samples: int  # the L or K it was computed with (0: none drawn)
    levels: np.ndarray | None = None  # formats 1 to 3: the levels of the quantiles in `points`

    def percentile(self, values: Array) -> Array:
        """The share of normal data (of V + 1) less anomalous than each value; 1.0 for a value
        that is not finite."""
        x = np.asarray(values, dtype=np.float64)
        if self.higher_is_anomalous:
            at = np.searchsorted(self.points, x, side="left") - 1  # the last point below x
            below = np.where(at >= 0, self.counts[np.maximum(at, 0)], 0.0)
        else:
            at = np.searchsorted(self.points, x, side="right")  # the first point above x
            below = np.where(
                at < len(self.points), self.counts[np.minimum(at, len(self.points) - 1)], 0.0
            )
        share = below / (self.n + 1)
        return np.where(np.isfinite(x), share, 1.0).astype(np.float32)

    def as_trained(self, values: Array) -> Array:
        """The percentile as the trainer of this artifact computed it: formats 1 to 3 by
        linear interpolation between quantiles (their ensemble was calibrated on those),
        format 4 by rank. For the ensemble's inputs only; decisions use `percentile`."""
        if self.levels is None:
            return self.percentile(values)
        q, first = np.unique(self.points, return_index=True)  # np.interp needs increasing x
        top = np.append(first[1:] - 1, len(self.points) - 1)
        below = np.interp(values, q, self.levels[top], left=0.0) if len(q) > 1 else values > q[0]
        share = np.asarray(below if self.higher_is_anomalous else 1.0 - below, np.float32)
        return np.where(np.isfinite(values), share, 1.0).astype(np.float32)

    def log_tail(self, values: Array) -> np.ndarray:
        """-log(1 - p) for each value, p its percentile, the ensemble's input (format 4), with
        the tail carried on beyond the most anomalous validation value: the rank stops there
        (at ln(V + 1)), so one score far beyond all normal data would count no more than one
        just past it, and the other two could outvote it. Beyond it, the tail of an exponential
        fitted to the validation's top tenth (at least 10 values) grows linearly with the
        distance. Infinite for a value that is not finite."""
        x = np.asarray(values, dtype=np.float64)
        with np.errstate(divide="ignore"):
            tail = -np.log1p(-self.percentile(values).astype(np.float64))
        if self.levels is not None or self.n < 10:  # no values to fit a tail to: the rank alone
            return tail
        k = max(10, self.n // 10)
        top = self.points[-k:] if self.higher_is_anomalous else -self.points[:k][::-1]
        scale = float(np.mean(top - top[0]))  # the exponential's mean excess over top[0]
        beyond = (x if self.higher_is_anomalous else -x) - top[-1]
        if scale <= 0.0:
            return tail
        extended = math.log(self.n + 1) + beyond / scale
        return np.where(np.isfinite(x) & (beyond > 0), extended, tail)

    def held_out_log_tails(self, values: Array) -> np.ndarray:
        """For the validation values this calibration was built from (format 4, in any order),
        each one's log_tail against the other V - 1, as a new value's is taken against all V.
        The ensemble is calibrated on these. Taken against all V, no validation value would lie
        beyond the last one, where log_tail grows with the distance, while new normal data
        does 1 time in V + 1 for each score: the ensemble's threshold would then flag new
        normal data more often than its share (1.59% at 0.99 on one-digit MNIST models, V
        about 230). Held out, validation values and new ones are alike, as the bound needs."""
        if self.levels is not None:
            raise ValueError("held-out tails need the validation values themselves (format 4)")
        out = np.empty(len(values), dtype=np.float64)
        for i, v in enumerate(np.asarray(values, dtype=np.float64)):
            # The points are float32 values, as calibrate() stores them: find v's own.
            j = int(np.searchsorted(self.points, np.float32(v)))
            if j == len(self.points) or self.points[j] != np.float32(v):
                raise ValueError(f"{v} is not one of the calibration's validation values")
            others = ScoreCalibration.of_values(
                np.delete(self.points, j), self.higher_is_anomalous, self.samples
            )
            out[i] = others.log_tail(np.array([v]))[0]
        return out

    @classmethod
    def of_values(cls, points: np.ndarray, higher: bool, samples: int) -> ScoreCalibration:
        """Format 4's calibration of one score from its sorted validation values: a value
        beyond the j-th (from 1, in the anomalous direction) is beyond j of them."""
        n = len(points)
        ranks = np.arange(1, n + 1, dtype=np.float64)
        return cls(points, ranks if higher else n - ranks + 1.0, n, higher, samples)

    def threshold(self, q: float) -> float | None:
        """The score value beyond which an instance's percentile exceeds q, or None when no
        finite value does."""
        over = np.flatnonzero(self.counts / (self.n + 1) > q)
        if not over.size:
            return None
        j = over[0] if self.higher_is_anomalous else over[-1]
        return float(self.points[j])


@dataclass(frozen=True)
class ConformalEnsemble:
    """Format 8: the ensemble's percentile as a full conformal p-value (Vovk et al. 2005).

    The ensemble sums its parts' tails. A new row's are taken against all V validation rows.
    Formats 4 to 7 ranked that sum among the validation rows' own sums, each row's tails taken
    against the other V - 1 (held_out_log_tails). Those sums are not the new row's peers: had
    the new row been among the references, a validation row it outranks on one part would
    have had a rank of V - 1 in V + 1 there, not V - 1 in V. The validation sums ran high, and
    the threshold flagged normal data less often than its share: on 20 breast-cancer splits 8
    held-out benign rows of 2,140, where this flags 11 (the bound: 1.3%, 28 rows).

    Here each validation row's tails are taken against the other V - 1 and the new row, per
    new row, so that all V + 1 sums are computed alike and, the rows being exchangeable, the
    new row's rank among them is uniform: the threshold then flags normal data at most
    1 - q of the time, and, at the tail V resolves, 1 / (V + 1) of it (no ties). That needs
    each validation row's values of the parts together, not only each part's sorted values:
    the manifest's `rows`, beside the ensemble's calibration.

    A validation value's rank among its V references is its rank among the other V - 1, plus
    one where the new value is less anomalous: two tails, both known before any request
    (`base`, `step`). Only the most anomalous value of a part, beyond all V references when
    the new value is below it, has a tail that depends on the new value itself (log_tail's
    exponential, fitted to the top of those references). So a new row costs V x S
    comparisons, about 10,000 for an image model."""

    parts: tuple[str, ...]
    weights: np.ndarray  # (S,): each part's tail counts this many times in the sum (format 9)
    signs: np.ndarray  # (S,): 1, or -1 for a part where lower is anomalous
    signed: np.ndarray  # (V, S): each validation row's values of the parts, times their signs
    base: np.ndarray  # (V,): each row's sum of tails where the new row outranks it on every part
    step: np.ndarray  # (V, S): what each part's tail gains where the new row is below it
    tops: tuple[_TopTail | None, ...]  # per part: its most anomalous value's own tail

    @classmethod
    def of_rows(
        cls,
        parts: tuple[str, ...],
        rows: np.ndarray,
        calibration: Mapping[str, ScoreCalibration],
        weights: np.ndarray | None = None,
    ) -> ConformalEnsemble:
        n = len(rows)
        w = np.ones(len(parts)) if weights is None else np.asarray(weights, dtype=np.float64)
        # The tail of a rank c among V references, as percentile() rounds it and log_tail()
        # takes it: -log(1 - c / (V + 1)), for c = 0..V.
        p = (np.arange(n + 1) / (n + 1)).astype(np.float32).astype(np.float64)
        with np.errstate(divide="ignore"):
            tail_of_rank = -np.log1p(-p)
        signs = np.array([1.0 if calibration[n].higher_is_anomalous else -1.0 for n in parts])
        signed = rows * signs
        step = np.empty_like(rows)
        base = np.zeros(n)
        tops = []
        for s in range(len(parts)):
            v = signed[:, s]
            ranked = np.sort(v)  # the more anomalous, the further right
            below = np.searchsorted(ranked, v, side="left")  # the others less anomalous than v
            base += w[s] * tail_of_rank[below]
            step[:, s] = w[s] * (tail_of_rank[below + 1] - tail_of_rank[below])
            top = int(np.argmax(v))
            # log_tail fits no tail below 10 references, and none to a top value that is tied.
            fits = n >= 10 and below[top] == n - 1
            k = max(10, n // 10)
            tops.append(_TopTail(top, float(v[top]), ranked[:-1][-k:], k) if fits else None)
        return cls(parts, w, signs, signed, base, step, tuple(tops))

    def percentile(self, combined: Array, scores: Mapping[str, Array]) -> Array:
        """The share of the V + 1 sums (the validation rows' and this one's) that are less
        anomalous than each new row's `combined` ensemble value, whose parts are in `scores`;
        1.0 for a value that is not finite."""
        e_new = np.asarray(combined, dtype=np.float64)
        n = len(self.signed)
        out = np.empty(len(e_new), dtype=np.float64)
        at_once = max(1, _CONFORMAL_CELLS // max(1, n))
        for start in range(0, len(e_new), at_once):
            block = slice(start, start + at_once)
            sums = np.broadcast_to(self.base, (len(e_new[block]), n)).copy()
            for s, name in enumerate(self.parts):
                x = self.signs[s] * np.asarray(scores[name][block], dtype=np.float64)
                outranked = x[:, None] < self.signed[None, :, s]  # NaN outranks nothing
                sums += outranked * self.step[:, s]
                if (top := self.tops[s]) is not None:
                    sums[:, top.row] += self.weights[s] * top.extension(x)
            out[block] = np.sum(sums < e_new[block, None], axis=1) / (n + 1)
        return np.where(np.isfinite(e_new), out, 1.0).astype(np.float32)


@dataclass(frozen=True)
class _TopTail:
    """A part's most anomalous validation value (in `row`), and the top of the others below it:
    where a new value lies below it too, it is beyond all V references, and log_tail carries
    its tail on by an exponential fitted to the top k of them (the others' and the new one)."""

    row: int
    value: float  # its signed value
    others: np.ndarray  # the top k of the other V - 1 signed values, ascending (k - 1 if V = 10)
    k: int  # how many of the V references log_tail fits its exponential to

    def extension(self, x: np.ndarray) -> np.ndarray:
        """(B,): what the top value's tail gains over its rank's, for each new signed value x."""
        candidates = np.concatenate(
            [np.broadcast_to(self.others, (len(x), len(self.others))), x[:, None]], 1
        )
        with np.errstate(invalid="ignore"):
            candidates.sort(axis=1)
            head = candidates[:, -self.k :]  # the top k of the V references
            scale = np.mean(head - head[:, :1], axis=1)
            gain = (self.value - head[:, -1]) / scale
        return np.where((x < self.value) & (scale > 0.0), gain, 0.0)


# The (new rows x validation rows) cells one pass of ConformalEnsemble.percentile holds in a
# float64 array: 8 MB.
_CONFORMAL_CELLS = 1_000_000


@dataclass(frozen=True)
class Calibration:
    n: int  # V, the validation rows every score was calibrated on
    scores: dict[str, ScoreCalibration]
    conformal: ConformalEnsemble | None = None  # format 8: the ensemble's validation rows

    def percentiles(self, scores: Mapping[str, Array]) -> dict[str, Array]:
        """Each calibrated score's percentile; the ensemble's, where the calibration holds its
        validation rows (format 8), as a conformal p-value from its parts' values."""
        return {
            name: self.conformal.percentile(v, scores)
            if name == "ensemble" and self.conformal is not None
            else self.percentile(name, v)
            for name, v in scores.items()
            if name in self.scores
        }

    @property
    def resolvable_tail(self) -> float:
        """The smallest share of normal data a threshold can single out: 1 / (V + 1)."""
        return 1.0 / (self.n + 1)

    def effective_threshold(self, q: float) -> float:
        """q, or, when V is too small to resolve the tail q asks for, the threshold that flags
        what lies beyond every validation value (a false-alarm share of 1 / (V + 1))."""
        top = self.n / (self.n + 1)  # the highest percentile a finite value reaches
        return q if q < top else (self.n - 0.5) / (self.n + 1)

    def percentile(self, name: str, values: Array) -> Array:
        return self.scores[name].percentile(values)

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], where: str) -> Calibration:
        """Parse and check the calibration: sorted finite values (format 4) or monotone
        quantiles (formats 1 to 3), a size, and a known direction for every score."""
        cal = manifest.get("calibration")
        if not isinstance(cal, dict) or not cal.get("scores"):
            raise ModelLoadError(f"{where}: the manifest has no score calibration.")
        levels = None if "levels" not in cal else _levels(cal["levels"], where)
        n = cal.get("n")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            if levels is None:
                raise ModelLoadError(f"{where}: the calibration does not say its size n.")
            n = len(levels)  # the oldest artifacts: the quantiles as if they were the values
        scores = {}
        for name, entry in cal["scores"].items():
            if entry.get("anomalous_when") not in ("higher", "lower"):
                raise ModelLoadError(f"{where}: calibration of {name} has no direction.")
            higher = entry["anomalous_when"] == "higher"
            bad = f"{where}: calibration of {name} must be"
            samples = int(entry.get("samples", 0))
            if levels is None:
                message = f"{bad} its {n} finite, sorted validation values."
                points = _finite_rising(entry.get("values", []), n, message)
                scores[name] = ScoreCalibration.of_values(points, higher, samples)
            else:
                message = f"{bad} {len(levels)} finite, non-decreasing quantiles."
                points = _finite_rising(entry.get("quantiles", []), len(levels), message)
                counts = _quantile_counts(levels, n, higher)
                scores[name] = ScoreCalibration(points, counts, n, higher, samples, levels)
        entry = cal["scores"].get("ensemble", {})
        conformal = None if "rows" not in entry else _conformal(entry, scores, n, where)
        return cls(n, scores, conformal)


def _conformal(
    entry: Mapping[str, Any], scores: Mapping[str, ScoreCalibration], n: int, where: str
) -> ConformalEnsemble:
    """Format 8's validation rows of the ensemble's parts: each part a calibrated score, and
    each column, sorted, that part's own validation values, so the two cannot disagree."""
    parts = tuple(str(p) for p in entry.get("parts", []))
    bad = f"{where}: the ensemble's validation rows must be"
    if not parts or any(p not in scores or p == "ensemble" for p in parts):
        raise ModelLoadError(f"{bad} of calibrated scores, named in its `parts`.")
    message = f"{bad} {n} rows of {len(parts)} finite values ({', '.join(parts)})."
    try:
        rows = np.asarray(entry["rows"], dtype=np.float64)
    except (TypeError, ValueError):
        raise ModelLoadError(message) from None
    if rows.shape != (n, len(parts)) or not np.all(np.isfinite(rows)):
        raise ModelLoadError(message)
    for s, part in enumerate(parts):
        if not np.array_equal(np.sort(rows[:, s]), scores[part].points):
            raise ModelLoadError(f"{bad} the validation values {part} was calibrated on.")
    return ConformalEnsemble.of_rows(parts, rows, scores, _weights(entry, len(parts), where))


def ensemble_weights(raw: Any, size: int) -> np.ndarray:
    """Format 9's weights of the ensemble's `size` parts, as its recipe and its calibration
    entry both hold them: one positive finite number each, or a ValueError."""
    message = f"the ensemble's weights must be {size} positive finite numbers"
    try:
        weights = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(message) from None
    if weights.shape != (size,) or not np.all(np.isfinite(weights)) or np.any(weights <= 0):
        raise ValueError(message)
    return weights


def _weights(entry: Mapping[str, Any], size: int, where: str) -> np.ndarray | None:
    """The calibration entry's weights; None (each part once) where it has none, as formats
    4 to 8 had."""
    if entry.get("weights") is None:
        return None
    try:
        return ensemble_weights(entry["weights"], size)
    except ValueError as e:
        raise ModelLoadError(f"{where}: {e}.") from None


def _levels(raw: Any, where: str) -> np.ndarray:
    levels = np.asarray(raw, dtype=np.float64)
    if levels.size < 2 or levels[0] != 0.0 or levels[-1] != 1.0 or np.any(np.diff(levels) <= 0):
        raise ModelLoadError(f"{where}: calibration levels must rise from 0 to 1.")
    return levels


def _finite_rising(raw: Any, size: int, message: str) -> np.ndarray:
    try:
        points = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError):
        raise ModelLoadError(message) from None
    if points.shape != (size,) or not np.all(np.isfinite(points)) or np.any(np.diff(points) < 0):
        raise ModelLoadError(message)
    return points


def _quantile_counts(levels: np.ndarray, n: int, higher: bool) -> np.ndarray:
    """Formats 1 to 3: numpy's linear quantile at level l lies between the sorted values at
    positions floor and ceil of l (n - 1) (from 0). A value above it is above the first
    floor(l (n - 1)) + 1 of them; a value below it is below the last n - ceil(l (n - 1))."""
    pos = levels * (n - 1)
    if higher:
        return np.floor(pos + 1e-9) + 1.0
    return n - np.ceil(pos - 1e-9)


def tail_sentence(calibration: Calibration, q: float) -> str | None:
    """Why the threshold was lowered, when it was: one sentence, else None."""
    if calibration.effective_threshold(q) == q:
        return None
    return (
        f"The calibration's {calibration.n} validation rows resolve a tail of "
        f"{_percent(calibration.resolvable_tail)} at the least, not the {_percent(1 - q)} the "
        f"threshold {q:g} asks for: instances beyond every validation row are flagged."
    )


def _percent(share: float) -> str:
    digits = max(0, 1 - math.floor(math.log10(share * 100))) if share > 0 else 0
    return f"{share * 100:.{digits}f}%"
