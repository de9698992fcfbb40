"""Percentiles and anomaly decisions: the calibration's arithmetic, and real decisions on MNIST."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from scoring.artifact import ModelLoadError
from scoring.calibration import Calibration, ScoreCalibration, tail_sentence
from scoring.scores import Ensemble
from tests.conftest import MNIST_DIR
from training.data import load_data
from training.evaluate import calibrate
from training.pipeline import ENSEMBLE, calibrate_with_ensemble, ensemble_of

LEVELS = np.linspace(0, 1, 1001).tolist()


def ranked(values: list[float], direction: str = "higher") -> Calibration:
    """A format-4 calibration of one score `s` on these validation values."""
    entry = {"anomalous_when": direction, "samples": 0, "values": sorted(values)}
    return Calibration.from_manifest(
        {"calibration": {"n": len(values), "scores": {"s": entry}}}, "m"
    )


def legacy(values: np.ndarray, direction: str = "higher") -> Calibration:
    """The format-1 to 3 calibration of the same values: 1001 interpolated quantiles."""
    entry = {"anomalous_when": direction, "samples": 0,
             "quantiles": np.quantile(values, LEVELS).tolist()}  # fmt: skip
    cal = {"n": len(values), "levels": LEVELS, "scores": {"s": entry}}
    return Calibration.from_manifest({"calibration": cal}, "m")


def test_percentile_counts_the_validation_values_strictly_below_out_of_v_plus_one() -> None:
    cal = ranked([1.0, 2.0, 3.0, 4.0])
    got = cal.percentile("s", np.array([0.0, 1.0, 2.5, 4.0, 9.0], dtype=np.float32))
    np.testing.assert_allclose(got, [0.0, 0.0, 2 / 5, 3 / 5, 4 / 5], atol=1e-7)


def test_percentile_counts_the_values_strictly_above_when_lower_is_anomalous() -> None:
    cal = ranked([1.0, 2.0, 3.0, 4.0], "lower")
    got = cal.percentile("s", np.array([9.0, 4.0, 2.5, 1.0, 0.0], dtype=np.float32))
    np.testing.assert_allclose(got, [0.0, 0.0, 2 / 5, 3 / 5, 4 / 5], atol=1e-7)


def test_tied_values_count_only_when_strictly_less_anomalous() -> None:
    cal = ranked([0.0, 0.0, 0.0, 5.0])  # three quarters of normal data score exactly 0
    got = cal.percentile("s", np.array([0.0, 1.0, 5.0, 6.0], dtype=np.float32))
    np.testing.assert_allclose(got, [0.0, 3 / 5, 3 / 5, 4 / 5], atol=1e-7)


@pytest.mark.parametrize("direction", ["higher", "lower"])
def test_a_score_that_is_not_finite_is_more_anomalous_than_all_normal_data(direction: str) -> None:
    cal = ranked([1.0, 2.0, 3.0], direction)
    got = cal.percentile("s", np.array([np.nan, np.inf, -np.inf], dtype=np.float32))
    assert got.tolist() == [1.0, 1.0, 1.0]
    assert cal.percentile("s", np.array([1e30, -1e30], np.float32)).max() < 1.0  # finite: < 1


@pytest.mark.parametrize("direction", ["higher", "lower"])
def test_legacy_quantiles_never_give_more_than_the_exact_rank(direction: str) -> None:
    values = np.random.default_rng(0).normal(size=300)
    x = np.random.default_rng(1).normal(scale=1.5, size=5000).astype(np.float32)
    exact = ranked(values.tolist(), direction).percentile("s", x)
    old = legacy(values, direction).percentile("s", x)
    assert (old <= exact + 1e-6).all()  # conservative: it flags no more than the exact rank
    assert (exact - old).max() <= 2 / 301 + 1e-6  # and loses at most a rank or two


@pytest.mark.parametrize("v", [99, 100, 300, 2000])
@pytest.mark.parametrize("direction", ["higher", "lower"])
def test_normal_data_is_flagged_at_most_the_nominal_share(v: int, direction: str) -> None:
    """By construction, not by luck: over 400 validation sets of v rows, 2,000 fresh normal
    rows each, the share above the 0.99 threshold t (lowered where v cannot resolve 1%) is
    within sampling error of its exact value (V + 1 - m) / (V + 1), m = floor(t (V + 1)) + 1,
    and that is at most 1%."""
    rng = np.random.default_rng(v)
    threshold = ranked(list(range(v))).effective_threshold(0.99)
    exact = (v + 1 - (np.floor(threshold * (v + 1)) + 1)) / (v + 1)
    assert exact <= 0.01
    flagged = []
    for _ in range(400):
        cal = ranked(rng.gumbel(size=v).tolist(), direction)
        flagged.append(np.mean(cal.percentile("s", rng.gumbel(size=2000)) > threshold))
    assert abs(np.mean(flagged) - exact) < 4 * np.std(flagged) / np.sqrt(len(flagged))


def test_a_small_validation_set_flags_only_beyond_its_last_row_and_says_so() -> None:
    cal = ranked(np.arange(30.0).tolist())  # 30 rows: no finite value reaches 0.99
    assert cal.resolvable_tail == 1 / 31
    threshold = cal.effective_threshold(0.99)
    assert threshold < 0.99
    got = cal.percentile("s", np.array([28.5, 29.0, 29.5], dtype=np.float32)) > threshold
    assert got.tolist() == [False, False, True]  # beyond every validation value only
    assert tail_sentence(cal, 0.99) == (
        "The calibration's 30 validation rows resolve a tail of 3.2% at the least, not the 1.0% "
        "the threshold 0.99 asks for: instances beyond every validation row are flagged."
    )
    assert tail_sentence(ranked(np.arange(200.0).tolist()), 0.99) is None


@pytest.mark.parametrize(("direction", "expected"), [("higher", 4.0), ("lower", 2.0)])
def test_threshold_is_the_value_beyond_which_instances_are_flagged(
    direction: str, expected: float
) -> None:
    cal = ranked([1.0, 2.0, 3.0, 4.0, 5.0], direction)
    assert cal.scores["s"].threshold(0.6) == expected
    beyond = expected + (0.5 if direction == "higher" else -0.5)
    at = cal.percentile("s", np.array([expected, beyond], dtype=np.float32))
    assert (at > 0.6).tolist() == [False, True]
    assert cal.scores["s"].threshold(0.9) is None  # 5 rows resolve no tail of 10%


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"values": [2.0, 1.0, 3.0]}, "must be its 3 finite, sorted validation values"),
        ({"values": [1.0, 2.0]}, "must be its 3 finite, sorted validation values"),
        ({"values": [1.0, float("nan"), 3.0]}, "must be its 3 finite, sorted validation values"),
    ],
)
def test_broken_calibration_is_refused(entry: dict[str, Any], message: str) -> None:
    cal = {"n": 3, "scores": {"s": {"anomalous_when": "higher", **entry}}}
    with pytest.raises(ModelLoadError, match=message):
        Calibration.from_manifest({"calibration": cal}, "m.pt")


@pytest.mark.parametrize(
    "quantiles",
    [np.linspace(0, 1, 1000).tolist(), np.linspace(1, 0, 1001).tolist(), [float("nan")] * 1001],
)
def test_broken_legacy_calibration_is_refused(quantiles: list[float]) -> None:
    entry = {"anomalous_when": "higher", "quantiles": quantiles}
    cal = {"n": 500, "levels": LEVELS, "scores": {"s": entry}}
    with pytest.raises(ModelLoadError, match="must be 1001 finite, non-decreasing quantiles"):
        Calibration.from_manifest({"calibration": cal}, "m.pt")


def test_missing_calibration_is_refused() -> None:
    with pytest.raises(ModelLoadError, match=r"m\.pt: the manifest has no score calibration"):
        Calibration.from_manifest({}, "m.pt")


# --- real decisions on a model trained on real MNIST ----------------------------------------


@pytest.fixture(scope="module")
def mnist_client(mnist_artifact: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(model_path=mnist_artifact))) as client:
        yield client


@pytest.fixture(scope="module")
def digits() -> list[list[float]]:
    x = load_data(MNIST_DIR).x_test[:300]
    # Binarised like the calibration data (fixed seed): the model was trained on binary images.
    return (np.random.default_rng(0).random(x.shape) < x).astype(np.float32).tolist()


@pytest.mark.slow
@pytest.mark.parametrize("score", ["kl_divergence", "reconstruction_log_prob", "log_likelihood"])
def test_decisions_flag_noise_and_pass_digits(
    mnist_client: TestClient, digits: list[list[float]], score: str
) -> None:
    noise = np.random.default_rng(1).random((100, 784)).round().tolist()
    body = {"decision_score": score, "seed": 0}
    normal = mnist_client.post("/anomaly-score", json={**body, "instances": digits}).json()
    anomalous = mnist_client.post("/anomaly-score", json={**body, "instances": noise}).json()
    assert normal["decision_score"] == score
    assert normal["threshold_percentile"] == 0.99
    assert all(anomalous["is_anomaly"])
    assert all(p > 0.999 for p in anomalous["percentiles"][score])
    # At the 99th percentile about 1% of normal digits are flagged; allow for sampling noise.
    assert np.mean(normal["is_anomaly"]) < 0.05
    assert 0.3 < np.median(normal["percentiles"][score]) < 0.7


@pytest.mark.slow
def test_threshold_can_be_set_per_request(
    mnist_client: TestClient, digits: list[list[float]]
) -> None:
    body = {"instances": digits, "seed": 0, "decision_score": "kl_divergence"}
    loose = mnist_client.post("/anomaly-score", json={**body, "threshold_percentile": 0.5}).json()
    strict = mnist_client.post("/anomaly-score", json=body).json()
    assert loose["threshold_percentile"] == 0.5
    assert 0.3 < np.mean(loose["is_anomaly"]) < 0.7
    assert sum(loose["is_anomaly"]) > sum(strict["is_anomaly"])
    flagged = np.array(loose["percentiles"]["kl_divergence"]) > 0.5
    assert loose["is_anomaly"] == flagged.tolist()


@pytest.mark.slow
def test_log_likelihood_is_returned_only_when_needed(
    mnist_client: TestClient, digits: list[list[float]]
) -> None:
    body = {"instances": digits[:5], "seed": 0, "decision_score": "kl_divergence"}
    without = mnist_client.post("/anomaly-score", json=body).json()
    assert without["log_likelihood"] is None
    assert without["percentiles"]["log_likelihood"] is None
    asked = mnist_client.post("/anomaly-score", json={**body, "log_likelihood_samples": 32}).json()
    assert asked["log_likelihood_samples"] == 32
    # The IWAE bound is at least the log reconstruction probability's ELBO-like value on average.
    assert len(asked["log_likelihood"]) == 5
    assert all(-400 < v < 0 for v in asked["log_likelihood"])


def ensemble_false_alarms(taken: str, v: int = 100, trials: int = 200) -> float:
    """The share of fresh normal rows the format-5 ensemble flags at 0.99, calibrated as the
    trainer calibrates it (training/pipeline.py): five scores' sorted validation values, the
    ensemble's own values on the same v rows and the rows' values of its parts. The
    percentile is the conformal one (`taken` = "conformal", format 8), or the rank among the
    ensemble's validation values, taken each against the other rows ("held out", formats 4
    to 7) or against all of them ("against all"). The rows are exchangeable, heavy-tailed."""
    rng = np.random.default_rng(0)
    combined = ensemble_of(dict.fromkeys(ENSEMBLE))
    names = combined.scores
    flagged = []
    for _ in range(trials):
        val = {n: rng.lognormal(size=v).astype(np.float32) for n in names}
        manifest = {"calibration": calibrate_with_ensemble(val, {}, combined)}
        cal = Calibration.from_manifest(manifest, "m")
        if taken == "against all":
            val["ensemble"] = combined.score(val, cal.scores)
            manifest["calibration"]["scores"] |= calibrate({"ensemble": val["ensemble"]}, {})[
                "scores"
            ]
        new = {n: rng.lognormal(size=50).astype(np.float32) for n in names}
        new["ensemble"] = combined.score(new, cal.scores)
        if taken == "conformal":
            percentiles = cal.percentiles(new)["ensemble"]
        else:
            ranks = Calibration.from_manifest(manifest, "m").scores["ensemble"]
            percentiles = ranks.percentile(new["ensemble"])
        flagged.append(np.mean(percentiles > cal.effective_threshold(0.99)))
    return float(np.mean(flagged))


def test_the_ensemble_flags_new_normal_data_at_its_share() -> None:
    """A new row lies beyond one score's last validation value 1 time in V + 1, where its
    tail grows with the distance. With the ensemble's percentile a conformal p-value, every
    one of the V + 1 sums taken alike, the 0.99 threshold flags 1 / (V + 1) of normal data
    (0.99% at V = 100; sd of the mean over 200 sets, about 0.07%). Ranked among the
    validation rows' sums each taken against the other rows (formats 4 to 7), fewer; ranked
    among sums taken against all rows, about three times as many."""
    conformal = ensemble_false_alarms("conformal")
    assert 0.0085 < conformal < 0.0115
    assert ensemble_false_alarms("held out") < conformal
    assert ensemble_false_alarms("against all") > 0.02


def test_held_out_tails_are_each_value_against_the_others() -> None:
    values = np.array([3.0, 1.0, 7.0, 2.0, *range(10, 30)], dtype=np.float32)
    cal = ranked(values.tolist()).scores["s"]
    got = cal.held_out_log_tails(values)
    for i, v in enumerate(values):
        others = ranked(np.delete(values, i).tolist()).scores["s"]
        assert got[i] == others.log_tail(np.array([v]))[0]
    # The largest value lies beyond all the others: its tail goes on past ln(V) = ln(23 + 1).
    assert got[-1] > np.log(24)
    with pytest.raises(ValueError, match="not one of the calibration's validation values"):
        cal.held_out_log_tails(np.array([4.5]))


def conformal_calibration(
    val: dict[str, np.ndarray], weights: tuple[float, ...] | None = None
) -> tuple[Calibration, Ensemble]:
    combined = Ensemble(tuple(val), "fisher", weights)
    manifest = {"calibration": calibrate_with_ensemble(dict(val), {}, combined)}
    return Calibration.from_manifest(manifest, "m"), combined


@pytest.mark.parametrize("weights", [None, (1.0, 1.0, 2.0)])
@pytest.mark.parametrize("v", [5, 10, 37, 120])
def test_the_conformal_percentile_takes_each_validation_row_against_the_others_and_the_new_one(
    v: int, weights: tuple[float, ...] | None
) -> None:
    """Checked against the definition, row by row: each validation row's tails against its V
    references (the other V - 1 and the new row, ScoreCalibration.log_tail as a new row's
    are taken), times their weights (format 9), summed, and the share of the V + 1 sums
    below the new row's. One part is anomalous when lower, one has its top value tied (no
    tail fitted to it) and counts twice where weighted, and new rows tie validation values or
    reach beyond their range."""
    rng = np.random.default_rng(v)
    val = {
        "dose": rng.lognormal(size=v).astype(np.float32),
        "reconstruction_log_prob": rng.normal(size=v).astype(np.float32),
        "rapp": rng.gumbel(size=v).astype(np.float32),
    }
    val["rapp"][0] = val["rapp"].max()  # a tie at the top
    cal, combined = conformal_calibration(val, weights)
    # Half of them validation values themselves (ties), half beyond their range.
    stretch = np.where(np.arange(40) < 20, 1.0, 1.5).astype(np.float32)
    new = {n: stretch * rng.choice(values, 40) for n, values in val.items()}
    new["ensemble"] = combined.score(new, cal.scores)
    got = cal.percentiles(new)["ensemble"]
    for j in range(40):
        sums = np.zeros(v)
        for name, weight in zip(combined.scores, weights or (1.0, 1.0, 1.0), strict=True):
            part = cal.scores[name]
            for i in range(v):
                references = np.sort(np.append(np.delete(val[name], i), new[name][j]))
                peer = ScoreCalibration.of_values(references, part.higher_is_anomalous, 0)
                sums[i] += weight * peer.log_tail(val[name][i : i + 1])[0]
        assert got[j] == np.float32(np.sum(sums < new["ensemble"][j]) / (v + 1))
    # Not the rank among the stored values, each validation row against the other V - 1.
    assert np.any(got != cal.scores["ensemble"].percentile(new["ensemble"]))


def test_a_conformal_percentile_is_one_where_a_part_is_not_finite() -> None:
    rng = np.random.default_rng(0)
    cal, combined = conformal_calibration(
        {"dose": rng.lognormal(size=30), "rapp": rng.lognormal(size=30)}
    )
    new = {"dose": np.array([1.0, np.nan, np.inf]), "rapp": np.array([np.inf, 1.0, 1.0])}
    new["ensemble"] = combined.score(new, cal.scores)
    assert cal.percentiles(new)["ensemble"].tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"parts": ["dose", "nowhere"]}, "of calibrated scores"),
        ({"rows": [[1.0, 2.0]]}, "must be 30 rows of 2 finite values"),
        ({"rows": [[1.0, float("nan")]] * 30}, "must be 30 rows of 2 finite values"),
        ({"rows": [[1.0, 2.0]] * 30}, "the validation values dose was calibrated on"),
        ({"weights": [1.0]}, "weights must be 2 positive finite numbers"),
        ({"weights": [1.0, 0.0]}, "weights must be 2 positive finite numbers"),
        ({"weights": [1.0, "two"]}, "weights must be 2 positive finite numbers"),
    ],
)
def test_broken_ensemble_rows_are_refused(change: dict[str, Any], message: str) -> None:
    rng = np.random.default_rng(0)
    val = {"dose": rng.lognormal(size=30), "rapp": rng.lognormal(size=30)}
    manifest = {"calibration": calibrate_with_ensemble(val, {}, Ensemble(("dose", "rapp")))}
    manifest["calibration"]["scores"]["ensemble"] |= change
    with pytest.raises(ModelLoadError, match=message):
        Calibration.from_manifest(manifest, "m")
