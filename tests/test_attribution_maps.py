"""The attribution studies: the spatial filters (bench/attribution_maps.py) and the projection
(bench/attribution_projection.py), their parts, and a small run of each."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from app.model import VAEService
from bench.attribution_maps import SHAPES, SIDE, gaussian, main, opening, window_max_mean
from bench.attribution_projection import SHAPES as PROJECTION_SHAPES
from bench.attribution_projection import dehaene_change, maps
from bench.attribution_projection import main as projection_main
from scoring.artifact import PROJECTION_STEPS, project, redrawn_projection
from tests.conftest import MNIST_DIR
from training.benchmark_anomaly import paste
from training.data import load_data

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


def test_the_projection_study_runs_on_validation_digits_and_finds_the_trims_cost(
    tmp_path: Path,
) -> None:
    out = tmp_path / "projection.json"
    args = ["--artifact", str(SHIPPED), "--data-dir", str(MNIST_DIR), "--images", "10",
            "--reference", "20", "--out", str(out)]  # fmt: skip
    assert projection_main(args) == 0
    result = json.loads(out.read_text())
    assert result["images"] == 10
    assert result["reference"] == 20
    for kind in ("grey", "binarised"):
        r = result["inputs"][kind]
        assert set(r["changed_found"]) == set(maps(None))
        for row in r["changed_found"].values():
            assert set(row) == set(PROJECTION_SHAPES)
            assert all(0.0 <= v <= 1.0 for v in row.values())
        # What the study explains: the trimmed projection redraws a normal digit worse than
        # the posterior mean does.
        misfit = r["misfit_pixels_per_normal_digit"]
        assert misfit["at z* (trim 0.2)"] > misfit["at the posterior mean"]
    # A binarised paste changes whole pixels only: none by less than 0.1.
    assert set(result["inputs"]["binarised"]["changed_by_under_0.1"].values()) == {0.0}


def test_redrawing_starts_from_the_trimmed_projection() -> None:
    vae = VAEService.load(SHIPPED, device="cpu")
    digits = np.asarray(load_data(MNIST_DIR).x_test[:4], np.float32)
    x = torch.from_numpy(paste(digits, 8, 8, 0)[0])
    with torch.no_grad():
        # The same steps (to float rounding: TorchScript optimises a graph after its first calls).
        served = project(vae.module, x)[0]
        torch.testing.assert_close(
            redrawn_projection(vae.module, x, 0, 0.2, PROJECTION_STEPS),
            served,
            rtol=1e-4,
            atol=1e-5,
        )
        redrawn = redrawn_projection(vae.module, x, 3, 0.2)
    assert redrawn.shape == (4, vae.latent_dim)
    assert bool(torch.isfinite(redrawn).all())
    assert not torch.allclose(redrawn, served, rtol=1e-2, atol=1e-3)


def test_dehaenes_projection_moves_a_pasted_patch_more_than_the_digit() -> None:
    vae = VAEService.load(SHIPPED, device="cpu")
    digits = np.asarray(load_data(MNIST_DIR).x_test[:8], np.float32)
    patched, _ = paste(digits, 8, 8, 0)
    with torch.no_grad():
        change = dehaene_change(vae.module, torch.from_numpy(patched)).numpy()
    assert change.shape == patched.shape
    assert ((change >= 0) & (change <= 1)).all()
    inside = patched != digits
    # The map is how far each pixel moved towards what the model explains: the pasted white
    # pixels move, on average, several times as far as the rest of the image.
    assert change[inside].mean() > 3 * change[~inside].mean()
