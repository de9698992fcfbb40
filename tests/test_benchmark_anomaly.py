"""The anomaly benchmark run small (one digit, one epoch, a test subset): leave one digit out,
one class, the sanity sets, and the attribution's measures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import EVERY_SCORE, MNIST_DIR
from training.benchmark_anomaly import (
    ATTRIBUTION_SHAPES,
    PATCH,
    changed_found,
    main,
    normal_data,
    paste,
    paste_patches,
    per_pixel_ceiling,
)
from training.data import load_data


def test_leave_out_drops_exactly_one_digit_from_training() -> None:
    data = load_data(MNIST_DIR)
    held = normal_data(data, 3, "lodo")
    assert held.y_train is not None
    assert 3 not in set(held.y_train.tolist())
    assert len(held.x_train) == int((data.y_train != 3).sum())
    assert len(held.x_test) == len(data.x_test)  # the test set keeps every digit


def test_one_class_keeps_exactly_one_digit_for_training() -> None:
    data = load_data(MNIST_DIR)
    one = normal_data(data, 3, "oneclass")
    assert one.y_train is not None
    assert set(one.y_train.tolist()) == {3}
    assert len(one.x_train) == int((data.y_train == 3).sum())


@pytest.mark.slow
def test_benchmark_reports_auroc_per_score_and_digit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "lodo.json"
    args = ["--data-dir", str(MNIST_DIR), "--out", str(out), "--digits", "0", "--epochs", "1",
            "--test-images", "1000", "--samples", "4", "--ll-samples", "8"]  # fmt: skip
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert set(result["auroc"]["0"]) == set(EVERY_SCORE)  # every score, old and new
    assert result["best_score"] in EVERY_SCORE
    # After one epoch zeros already look unlike the other nine digits to the likelihood scores.
    assert result["auroc"]["0"]["reconstruction_log_prob"] > 0.5
    assert result["mean_auroc"] == result["auroc"]["0"]
    table = capsys.readouterr().out
    assert "| 0 |" in table
    assert "**mean**" in table
    assert np.isfinite(list(result["mean_auroc"].values())).all()
    assert result["decision_score"] == "ensemble"
    assert set(result["false_alarms"]["0"]) == {"grey", "binarised"}
    assert 0.0 <= result["mean_false_alarms"]["grey"] <= 1.0


@pytest.mark.slow
def test_one_class_benchmark_scores_the_other_nine_digits_as_anomalies(tmp_path: Path) -> None:
    out = tmp_path / "oneclass.json"
    args = ["--data-dir", str(MNIST_DIR), "--out", str(out), "--protocol", "oneclass",
            "--digits", "1", "--epochs", "2", "--test-images", "1000", "--samples", "4",
            "--ll-samples", "8"]  # fmt: skip
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result["protocol"] == "oneclass"
    # Ones are the simplest digit: every other digit is far from them already.
    assert result["auroc"]["1"]["ensemble"] > 0.8


@pytest.mark.slow
def test_sanity_sets_score_a_served_model(mnist_artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "sanity.json"
    args = ["--data-dir", str(MNIST_DIR), "--out", str(out), "--digits", "--artifact",
            str(mnist_artifact), "--test-images", "300", "--samples", "4", "--ll-samples", "8"]  # fmt: skip
    assert main(args) == 0
    sanity = json.loads(out.read_text())["sanity"]
    kinds = {"uniform noise", "inverted", "blurred", "8x8 patch"}
    assert set(sanity["auroc"]) == kinds
    normal = {"normal test digits", "normal test digits, binarised"}
    assert set(sanity["flagged"]) == kinds | normal | {"all black", "all white"}
    assert all(0.0 <= sanity["flagged"][n] <= 1.0 for n in normal)
    assert sanity["auroc"]["uniform noise"][sanity["decision_score"]] > 0.9
    assert set(sanity["attribution"]) == set(ATTRIBUTION_SHAPES)
    for hits in sanity["attribution"].values():
        assert 0.0 <= hits["in_shape"] <= 1.0
        assert 0.0 < hits["per_pixel_ceiling"] <= 1.0
        assert 0.0 <= hits["changed_found"] <= 1.0


def test_patches_are_white_squares_inside_the_image() -> None:
    x = np.zeros((50, 784))
    patched, mask = paste_patches(x, seed=0)
    assert (mask.sum(1) == PATCH * PATCH).all()
    assert (patched[mask] == 1.0).all()
    assert (patched[~mask] == 0.0).all()


def test_lines_lie_across_in_even_rows_and_down_in_odd_ones() -> None:
    patched, mask = paste(np.zeros((6, 784)), 1, 12, seed=3)
    images = mask.reshape(6, 28, 28)
    assert (mask.sum(1) == 12).all()
    assert [int(im.any(1).sum()) for im in images] == [1, 12] * 3  # rows the line touches
    assert (patched[mask] == 1.0).all()


def test_per_pixel_ceiling_counts_the_pixels_a_paste_cannot_change() -> None:
    blank = np.zeros((4, 784))
    patched, mask = paste_patches(blank, seed=0)
    assert per_pixel_ceiling(blank, patched, mask) == 1.0  # every pixel of the square changed
    # A digit already white under half of the square: 32 changed pixels come first, then 32
    # places drawn at random from the 752 unchanged, of which the square holds 32.
    half = blank.reshape(4, 28, 28).copy()
    mask_img = mask.reshape(4, 28, 28)
    for im, m in zip(half, mask_img, strict=True):
        rows = np.flatnonzero(m.any(1))
        im[rows[:4]] = np.where(m[rows[:4]], 1.0, 0.0)
    half = half.reshape(4, 784)
    expected = (32 + 32 * 32 / 752) / 64
    assert per_pixel_ceiling(half, np.maximum(half, patched), mask) == pytest.approx(expected)


def test_changed_found_is_the_share_of_changed_pixels_ranked_first() -> None:
    changed = np.zeros((2, 6), dtype=bool)
    changed[0, [1, 4]] = True  # two changed pixels
    changed[1, [0, 2, 5]] = True  # three
    order = np.array(
        [
            [4, 1, 0, 2, 3, 5],  # both first: 1.0
            [0, 1, 3, 2, 4, 5],
        ]
    )  # one of its top three: 1/3
    assert changed_found(order, changed) == pytest.approx((1.0 + 1 / 3) / 2)
    none = np.zeros((1, 6), dtype=bool)
    assert changed_found(np.vstack([order, order[:1]]), np.vstack([changed, none])) == (
        pytest.approx((1.0 + 1 / 3) / 2)
    )  # an image the paste did not change counts for nothing
