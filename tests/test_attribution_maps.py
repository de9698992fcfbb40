"""The spatial-filter study (bench/attribution_maps.py): its filters, and a small run of it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bench.attribution_maps import SHAPES, SIDE, gaussian, main, opening, window_max_mean
from tests.conftest import MNIST_DIR

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "default" / "vae.pt"


def square(top: int, left: int, side: int) -> np.ndarray:
    im = np.zeros((1, SIDE, SIDE))
    im[0, top : top + side, left : left + side] = 1.0
    return im.reshape(1, -1)


def test_the_window_mean_fills_a_hole_and_keeps_a_square_on_top() -> None:
    m = square(5, 9, 8)
    m.reshape(SIDE, SIDE)[8, 12] = 0.0  # a pixel the paste could not change
    out = window_max_mean(m, 3)
    top = set(np.argsort(-out[0], kind="stable")[:64].tolist())
    assert top == set(np.flatnonzero(square(5, 9, 8)[0]).tolist())


def test_the_opening_keeps_a_square_and_removes_a_thin_line() -> None:
    assert np.array_equal(opening(square(10, 10, 8)), square(10, 10, 8))
    line = np.zeros((1, SIDE, SIDE))
    line[0, 14, 3:15] = 1.0
    assert not opening(line.reshape(1, -1)).any()


def test_the_blur_keeps_the_mass_and_peaks_where_it_was() -> None:
    delta = np.zeros((1, SIDE * SIDE))
    delta[0, 14 * SIDE + 14] = 1.0
    out = gaussian(delta, 2.0)
    assert np.isclose(out.sum(), 1.0)
    assert out.argmax() == 14 * SIDE + 14


def test_a_small_run_writes_every_map_for_every_shape(tmp_path: Path) -> None:
    out = tmp_path / "maps.json"
    args = ["--artifact", str(SHIPPED), "--data-dir", str(MNIST_DIR), "--images", "10",
            "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    rows = json.loads(out.read_text())["in_shape"]
    assert {"served map (per pixel)", "per-pixel ceiling"} <= set(rows)
    for row in rows.values():
        assert set(row) == set(SHAPES)
        assert all(0.0 <= v <= 1.0 for v in row.values())
