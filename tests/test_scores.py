"""scoring/scores.py: the input complexity, DoSE's density, the latent and input distances and
the ensemble, against direct computations."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

from scoring.calibration import Calibration, ScoreCalibration
from scoring.scores import (
    Density,
    Ensemble,
    FeatureNeighbours,
    GapProjection,
    InputNeighbours,
    Neighbours,
    complexity_bits,
    input_complexity,
)


def test_complexity_is_the_zlib_length_of_the_8_bit_input_in_bits() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (3, 784)).astype(np.float32)
    want = [8 * len(zlib.compress(bytes(np.round(row * 255).astype(np.uint8)), 9)) for row in x]
    assert complexity_bits(x).tolist() == want


def test_a_blank_input_is_simpler_than_a_noisy_one() -> None:
    blank, noise = np.zeros((1, 784), np.float32), np.random.default_rng(0).uniform(size=(1, 784))
    assert complexity_bits(blank)[0] < 200 < 6000 < complexity_bits(noise.astype(np.float32))[0]


def test_input_complexity_is_minus_log2_likelihood_minus_the_bits() -> None:
    log_px, bits = np.array([-69.3, -10.0], np.float32), np.array([800.0, 100.0], np.float32)
    want = [69.3 / math.log(2) - 800, 10.0 / math.log(2) - 100]
    np.testing.assert_allclose(input_complexity(log_px, bits), want, rtol=1e-5)


def gaussian_kde_nll(ref: np.ndarray, point: np.ndarray, h: float) -> float:
    """-log of (1/N) sum_i N(point; ref_i, h^2 I), written out."""
    d = ref.shape[1]
    dens = np.mean(np.exp(-0.5 * ((point - ref) ** 2).sum(1) / h**2)) / (2 * np.pi * h**2) ** (
        d / 2
    )
    return float(-np.log(dens))


def test_density_score_is_the_kde_of_the_standardised_statistics() -> None:
    rng = np.random.default_rng(1)
    stats = {"a": rng.normal(5, 2, 300), "b": rng.normal(-1, 0.5, 300)}
    density = Density.fit(stats, ("a", "b"))
    assert density.bandwidth == pytest.approx(300 ** (-1 / 6))
    query = {"a": np.array([5.0, 15.0]), "b": np.array([-1.0, -1.0])}
    got = density.score(query)
    ref = density.reference
    for i in range(2):
        point = (np.array([query["a"][i], query["b"][i]]) - density.mean) / density.scale
        assert got[i] == pytest.approx(gaussian_kde_nll(ref, point, density.bandwidth), rel=1e-4)
    assert got[1] > got[0]  # far from the normal data is more anomalous


def test_too_typical_is_suspect_too() -> None:
    """A ring of normal statistics: its empty centre, the 'most typical' mean, scores high."""
    t = np.linspace(0, 2 * np.pi, 400, endpoint=False)
    density = Density.fit({"a": np.cos(t), "b": np.sin(t)}, ("a", "b"))
    centre, on_ring = density.score({"a": np.array([0.0, 1.0]), "b": np.array([0.0, 0.0])})
    assert centre > on_ring


def test_reference_scores_leave_each_point_out_of_its_own_density() -> None:
    stats = {"a": np.random.default_rng(2).normal(size=50)}
    density = Density.fit(stats, ("a",))
    loo = density.reference_scores()
    ref, h = density.reference, density.bandwidth
    for i in (0, 17):
        want = gaussian_kde_nll(np.delete(ref, i, axis=0), ref[i], h)
        assert loo[i] == pytest.approx(want, rel=1e-4)
    assert (loo > density.score(stats)).all()  # without its own kernel, each looks rarer


def test_density_round_trips_through_the_manifest() -> None:
    stats = {"a": np.arange(10.0), "b": np.arange(10.0) ** 2}
    density = Density.fit(stats, ("a", "b"))
    again = Density.from_manifest(density.to_manifest())
    np.testing.assert_allclose(again.score(stats), density.score(stats), rtol=1e-4)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"reference": [[0.0, 1.0]]}, "N x 2"),
        ({"scale": [1.0, 0.0]}, "positive scales"),
        ({"bandwidth": 0.0}, "bandwidth"),
    ],
)
def test_a_broken_density_is_refused(change: dict[str, object], message: str) -> None:
    entry = Density.fit({"a": np.arange(5.0), "b": np.arange(5.0)}, ("a", "b")).to_manifest()
    with pytest.raises(ValueError, match=message):
        Density.from_manifest(entry | change)


def test_a_bernoulli_models_view_thresholds_grey_levels_first() -> None:
    """Calibrated on binarised digits, the grey levels of the same digit must not cost more."""
    grey = np.random.default_rng(3).uniform(0, 1, (4, 784)).astype(np.float32)
    binary = (grey >= 0.5).astype(np.float32)
    np.testing.assert_array_equal(complexity_bits(grey, binary=True), complexity_bits(binary))
    assert (complexity_bits(grey) > complexity_bits(grey, binary=True)).all()


def test_latent_distance_is_the_mean_chord_to_the_k_nearest_directions() -> None:
    rng = np.random.default_rng(0)
    train = rng.normal(size=(300, 6)).astype(np.float32)
    query = rng.normal(size=(4, 6)).astype(np.float32) * 3.0  # the length must not matter
    got = Neighbours.fit(train, k=5).score(query)
    unit_t = train / np.linalg.norm(train, axis=1, keepdims=True)
    for q, d in zip(query, got, strict=True):
        chords = np.sort(np.linalg.norm(unit_t - q / np.linalg.norm(q), axis=1))
        assert d == pytest.approx(chords[:5].mean(), rel=1e-5)
    np.testing.assert_allclose(Neighbours.fit(train).score(query / 3.0), got, rtol=1e-6)


def test_a_training_direction_is_at_distance_zero_from_itself() -> None:
    train = np.eye(6, dtype=np.float32)
    assert Neighbours.fit(train, k=1).score(train * 7.0).tolist() == [0.0] * 6
    # The opposite direction is the farthest there is: a chord of 2.
    assert Neighbours.fit(train[:1], k=1).score(-train[:1]).tolist() == [2.0]


def test_a_batch_scores_each_row_as_it_scores_alone() -> None:
    rng = np.random.default_rng(1)
    ref = Neighbours.fit(rng.normal(size=(1000, 32)).astype(np.float32))
    batch = rng.normal(size=(300, 32)).astype(np.float32)  # more than one block of rows
    alone = np.concatenate([ref.score(row[None]) for row in batch])
    np.testing.assert_array_equal(ref.score(batch), alone)


def test_the_reference_round_trips_through_npy_bytes() -> None:
    ref = Neighbours.fit(np.random.default_rng(2).normal(size=(50, 4)).astype(np.float32))
    back = Neighbours.from_bytes(ref.to_bytes(), k=5, latent_dim=4)
    np.testing.assert_allclose(back.reference, ref.reference, rtol=1e-6)
    with pytest.raises(ValueError, match=r"N x 3"):
        Neighbours.from_bytes(ref.to_bytes(), k=5, latent_dim=3)
    with pytest.raises(ValueError, match=r"N >= k = 60"):
        Neighbours.from_bytes(ref.to_bytes(), k=60, latent_dim=4)


def test_the_polar_distance_sees_the_length_the_direction_ignores() -> None:
    rng = np.random.default_rng(3)
    train = rng.normal(size=(300, 6)).astype(np.float32)
    ref = Neighbours.fit(train, k=5)
    query = rng.normal(size=(4, 6)).astype(np.float32)
    got = ref.polar_score(query)

    # By hand: Euclidean in (unit vector, log length) coordinates, the 5 nearest averaged.
    def polar(a: np.ndarray) -> np.ndarray:
        length = np.linalg.norm(a, axis=1, keepdims=True)
        return np.hstack([a / length, np.log(length)])

    for q, d in zip(polar(query), got, strict=True):
        dist = np.sort(np.linalg.norm(polar(train) - q, axis=1))
        assert d == pytest.approx(dist[:5].mean(), rel=1e-5)
    # The same directions ten times as long: the chord is the same, the polar distance grows
    # by about log 10 (the neighbours' own lengths vary around the query's).
    np.testing.assert_allclose(ref.score(query * 10.0), ref.score(query), rtol=1e-6)
    assert (ref.polar_score(query * 10.0) > got + 1.0).all()
    # A training row is at distance zero from itself, length and all.
    np.testing.assert_allclose(Neighbours.fit(train, k=1).polar_score(train[:3]), 0.0, atol=1e-7)


def test_the_lengths_round_trip_and_are_checked() -> None:
    ref = Neighbours.fit(np.random.default_rng(4).normal(size=(50, 4)).astype(np.float32))
    back = Neighbours.from_bytes(ref.to_bytes(), 5, 4, ref.lengths_to_bytes())
    assert back.log_lengths is not None
    np.testing.assert_allclose(back.log_lengths, ref.log_lengths, rtol=1e-6)
    # Format 3 and 4 references have none: their polar distance does not exist.
    with pytest.raises(ValueError, match="needs the reference's lengths"):
        Neighbours.from_bytes(ref.to_bytes(), 5, 4).polar_score(np.ones((1, 4)))
    short = Neighbours.fit(np.ones((49, 4), np.float32)).lengths_to_bytes()
    with pytest.raises(ValueError, match="50 finite values"):
        Neighbours.from_bytes(ref.to_bytes(), 5, 4, short)


def ranks(*names: str, n: int = 100) -> dict[str, ScoreCalibration]:
    """Format-4 calibrations of these scores on the validation values 0, 1, ..., n - 1: a value
    between k - 1 and k has the percentile k / (n + 1)."""
    entry = {"anomalous_when": "higher", "samples": 0, "values": list(map(float, range(n)))}
    cal = {"n": n, "scores": dict.fromkeys(names, entry)}
    return Calibration.from_manifest({"calibration": cal}, "m").scores


def test_the_format_3_ensemble_is_the_larger_percentile() -> None:
    scores = {"dose": np.array([19.5, 98.5]), "latent_distance": np.array([69.5, 9.5])}
    got = Ensemble().score(scores, ranks("dose", "latent_distance"))
    assert got.tolist() == pytest.approx([70 / 101, 99 / 101])


def test_the_format_4_ensemble_sums_the_tails_and_is_infinite_beyond_normal_data() -> None:
    ensemble = Ensemble(("dose", "latent_distance", "rapp"), "fisher")
    cal = ranks(*ensemble.scores)
    scores = {"dose": np.array([49.5, 89.5, 49.5]), "latent_distance": np.array([49.5, 89.5, np.nan]),
              "rapp": np.array([49.5, 49.5, 49.5])}  # fmt: skip
    got = ensemble.score(scores, cal)
    half, ninety = -np.log1p(-50 / 101), -np.log1p(-90 / 101)
    assert got[:2].tolist() == pytest.approx([3 * half, 2 * ninety + half], rel=1e-6)
    assert got[2] == np.inf  # a score that is not finite: beyond all normal data
    # Two scores somewhat alarmed (p = 0.95) outweigh one alarmed a little more (p = 0.99).
    rows = {"dose": np.array([98.5, 94.5]), "latent_distance": np.array([49.5, 94.5]),
            "rapp": np.array([49.5, 49.5])}  # fmt: skip
    one, two = ensemble.score(rows, cal)
    assert two > one
    by_max = Ensemble(("dose", "latent_distance", "rapp"), "max").score(rows, cal)
    assert by_max[0] > by_max[1]
    assert Ensemble.from_manifest({"ensemble": ensemble.to_manifest()}) == ensemble
    assert Ensemble.from_manifest({}) == Ensemble()  # format 3: the larger of two


def test_a_weighted_ensemble_counts_each_tail_its_weight_times() -> None:
    """Format 9: each tail times its weight; the weights travel with the recipe, and a recipe
    whose weights cannot be summed as tails is refused."""
    ensemble = Ensemble(("dose", "latent_distance", "rapp"), "fisher", (1.0, 1.0, 2.0))
    cal = ranks(*ensemble.scores)
    scores = {"dose": np.array([49.5, 89.5]), "latent_distance": np.array([49.5, 49.5]),
              "rapp": np.array([89.5, 49.5])}  # fmt: skip
    half, ninety = -np.log1p(-50 / 101), -np.log1p(-90 / 101)
    got = ensemble.score(scores, cal)
    assert got.tolist() == pytest.approx([2 * half + 2 * ninety, ninety + 3 * half], rel=1e-6)
    # The rapp-alarmed row outranks the dose-alarmed one, where unweighted they tie.
    assert got[0] > got[1]
    unweighted = Ensemble(ensemble.scores, "fisher").score(scores, cal)
    assert unweighted[0] == pytest.approx(unweighted[1], rel=1e-6)
    entry = ensemble.to_manifest()
    assert entry["weights"] == [1.0, 1.0, 2.0]
    assert Ensemble.from_manifest({"ensemble": entry}) == ensemble
    assert "weights" not in Ensemble(ensemble.scores, "fisher").to_manifest()  # formats 4 to 8
    for bad in ({**entry, "weights": [1.0, 2.0]}, {**entry, "weights": [1.0, 1.0, -2.0]},
                {**entry, "weights": [1.0, 1.0, float("inf")]}, {**entry, "combine": "max"}):  # fmt: skip
        with pytest.raises(ValueError, match="weights"):
            Ensemble.from_manifest({"ensemble": bad})


def test_one_score_far_beyond_all_normal_data_outweighs_two_at_its_edge() -> None:
    """The rank stops at the last validation value (ln(V + 1) = 4.6 here); beyond it the tail
    goes on growing, so one score far out cannot be outvoted by two that see nothing."""
    ensemble = Ensemble(("dose", "latent_distance", "rapp"), "fisher")
    cal = ranks(*ensemble.scores)
    rows = {"dose": np.array([99.5, 400.0]), "latent_distance": np.array([99.5, 49.5]),
            "rapp": np.array([99.5, 49.5])}  # fmt: skip
    edge, far = ensemble.score(rows, cal)
    assert far > edge
    tails = cal["dose"].log_tail(np.array([98.5, 99.5, 150.0, 400.0], dtype=np.float32))
    assert tails[0] < tails[1] < tails[2] < tails[3]  # one curve, on and beyond the values
    assert tails[1] == pytest.approx(np.log(101) + 0.5 / 4.5, rel=1e-6)  # top tenth: mean 4.5


def test_the_gap_projection_whitens_the_gaps_of_its_training_rows() -> None:
    rng = np.random.default_rng(0)
    # Gaps with one wide direction and one narrow one: a step along the narrow one is rare.
    gaps = rng.normal(size=(2000, 2)) * np.array([10.0, 0.1]) + np.array([3.0, -1.0])
    projection = GapProjection.fit(gaps)
    own = projection.score(gaps)
    assert own.mean() == pytest.approx(2.0, rel=1e-6)  # whitened: one per direction
    along = projection.score(np.array([[3.0 + 10.0, -1.0], [3.0, -1.0 + 10.0]]))
    assert along[1] > 1000 * along[0]  # the same step counts for more where normal data is narrow
    again = GapProjection.from_bytes(projection.to_bytes(), width=2)
    np.testing.assert_allclose(again.score(gaps), own, rtol=1e-4)
    with pytest.raises(ValueError, match="over 3 hidden units"):
        GapProjection.from_bytes(projection.to_bytes(), width=3)


def test_the_input_distance_is_the_mean_euclidean_distance_to_the_k_nearest_standardised_rows() -> (
    None
):
    rng = np.random.default_rng(3)
    # Columns on scales 1,000 apart: standardised, neither outweighs the other.
    rows = rng.normal(size=(400, 2)) * np.array([1000.0, 1.0]) + np.array([5000.0, -3.0])
    ref = InputNeighbours.fit(rows)
    queries = rng.normal(size=(300, 2)) * np.array([1000.0, 1.0]) + np.array([5000.0, -3.0])
    z_rows = (rows - rows.mean(0)) / rows.std(0)
    z_queries = (queries - rows.mean(0)) / rows.std(0)
    direct = np.linalg.norm(z_queries[:, None, :] - z_rows[None], axis=-1)
    expected = np.sort(direct, axis=1)[:, :5].mean(1)
    np.testing.assert_allclose(ref.distances(queries), expected, rtol=1e-4, atol=1e-5)
    # A batch scores each row as it scores alone (300 rows: more than one block).
    alone = np.concatenate([ref.distances(q[None]) for q in queries])
    np.testing.assert_array_equal(ref.distances(queries), alone)
    # The same raw step of 10 from the centre: 10 spreads in the second column, far out; a
    # hundredth of one in the first, among the rows.
    narrow, wide = ref.distances(np.array([[5000.0, -3.0 + 10.0], [5000.0 + 10.0, -3.0]]))
    assert narrow > 5.0 > 0.5 > wide


def test_the_input_reference_round_trips_and_is_checked() -> None:
    ref = InputNeighbours.fit(np.random.default_rng(4).normal(size=(50, 3)) * 7.0 + 2.0)
    back = InputNeighbours.from_bytes(ref.to_bytes(), k=5, width=3)
    x = np.random.default_rng(5).normal(size=(20, 3)).astype(np.float32)
    # The trainer's reference is already what the float32 file holds: the same scores.
    np.testing.assert_array_equal(back.distances(x), ref.distances(x))
    with pytest.raises(ValueError, match=r"N x 4"):
        InputNeighbours.from_bytes(ref.to_bytes(), k=5, width=4)
    with pytest.raises(ValueError, match=r"N >= k = 60"):
        InputNeighbours.from_bytes(ref.to_bytes(), k=60, width=3)
    assert InputNeighbours.fit(np.ones((3, 2)) * np.arange(3)[:, None]).k == 3  # fewer rows than k


def test_the_feature_distance_is_the_chord_distance_to_the_k_nearest_projected_directions() -> None:
    rng = np.random.default_rng(6)
    # Non-negative features, as a ReLU layer gives, of 40 units, on three rank-4 clusters.
    centres = rng.uniform(0, 1, (3, 40))
    rows = np.abs(centres[rng.integers(0, 3, 600)] + 0.1 * rng.normal(size=(600, 40)))
    ref = FeatureNeighbours.fit(rows, rank=8)
    assert ref.basis.shape == (40, 8)
    assert len(ref.neighbours.reference) == 600
    queries = np.abs(rng.normal(size=(300, 40)))
    # Directly: unit rows, their uncentred top-8 right singular vectors, unit again, the mean
    # of the 5 smallest chord distances.
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    basis = np.linalg.svd(unit, full_matrices=False)[2][:8].T

    def projected(a: np.ndarray) -> np.ndarray:
        p = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ basis
        return p / np.linalg.norm(p, axis=1, keepdims=True)

    chords = np.linalg.norm(projected(queries)[:, None] - projected(rows)[None], axis=-1)
    expected = np.sort(chords, axis=1)[:, :5].mean(1)
    # The basis's signs are the SVD's choice, and each is rounded to float32: the distances
    # agree to float32's precision.
    np.testing.assert_allclose(ref.distances(queries), expected, rtol=1e-4, atol=1e-5)
    # The direction counts, not the size: a training row scaled up is as near as itself.
    near, far = ref.distances(np.stack([rows[0] * 5.0, queries[0]]))
    assert near < 0.1 < far
    # A batch scores each row as it scores alone (300 rows: more than one block).
    alone = np.concatenate([ref.distances(q[None]) for q in queries])
    np.testing.assert_array_equal(ref.distances(queries), alone)


def test_the_feature_reference_round_trips_and_is_checked() -> None:
    rows = np.abs(np.random.default_rng(7).normal(size=(50, 12)))
    ref = FeatureNeighbours.fit(rows, rank=6)
    back = FeatureNeighbours.from_bytes(ref.to_bytes(), k=5, width=12)
    x = np.abs(np.random.default_rng(8).normal(size=(20, 12))).astype(np.float32)
    # The trainer's reference is already what the float32 file holds: the same scores.
    np.testing.assert_array_equal(back.distances(x), ref.distances(x))
    with pytest.raises(ValueError, match=r"13 x R"):
        FeatureNeighbours.from_bytes(ref.to_bytes(), k=5, width=13)
    with pytest.raises(ValueError, match=r"N >= k = 60"):
        FeatureNeighbours.from_bytes(ref.to_bytes(), k=60, width=12)
    # Fewer rows than k or than the rank: all of them, and as many directions as there are.
    few = FeatureNeighbours.fit(rows[:3], rank=6)
    assert few.neighbours.k == 3
    assert few.basis.shape == (12, 3)
