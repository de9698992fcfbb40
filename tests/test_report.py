"""The report CLI: figures and metrics.json for a briefly trained MNIST model and a vector model."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import MNIST_DIR, make_artifact
from training import report
from training.__main__ import main as train
from training.evaluate import auroc
from training.export import load_artifact

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
VECTOR_FIGURES = ["curves.png", "latents.png", "roc.png", "scores.png"]
IMAGE_FIGURES = sorted([*VECTOR_FIGURES, "reconstructions.png", "samples.png"])


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE, path
    assert head[12:16] == b"IHDR", path
    width, height = struct.unpack(">II", head[16:24])
    return width, height


@pytest.fixture(scope="module")
def mnist_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two epochs on the shipped MNIST slice: a small but real artifact."""
    path = tmp_path_factory.mktemp("mnist") / "vae.pt"
    # On a shared 2-core machine two OpenMP threads spin against other processes; one thread
    # trains this epoch about ten times faster there.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # No KL warm-up: in so short a run it would leave the KL term barely trained.
        assert train(["--data-dir", str(MNIST_DIR), "--out", str(path), "--epochs", "2",
                      "--kl-warmup-epochs", "0", "--eval-k", "5", "--eval-images", "200",
                      "--no-progress"]) == 0  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return path


@pytest.fixture(scope="module")
def mnist_report(mnist_model: Path) -> Path:
    out = mnist_model.parent / "report"
    args = ["--artifact", str(mnist_model), "--data-dir", str(MNIST_DIR), "--out", str(out)]
    assert report.main([*args, "--images", "300"]) == 0
    return out


@pytest.fixture
def vectors(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    data = tmp_path / "vectors"
    data.mkdir()
    for name, n in (("train", 100), ("test", 50)):
        np.save(data / f"{name}.npy", rng.normal(size=(n, 3)).astype(np.float32))
    return data


@pytest.mark.slow
def test_report_draws_every_figure_for_an_image_model(mnist_report: Path) -> None:
    written = sorted(p.name for p in mnist_report.iterdir())
    assert written == sorted([*IMAGE_FIGURES, "metrics.json"])
    for name in IMAGE_FIGURES:
        width, height = png_size(mnist_report / name)
        assert min(width, height) >= 200, (name, width, height)
        assert (mnist_report / name).stat().st_size > 10_000, name


@pytest.mark.slow
def test_report_metrics_add_aurocs_that_separate_noise_after_two_epochs(
    mnist_model: Path, mnist_report: Path
) -> None:
    metrics = json.loads((mnist_report / "metrics.json").read_text())
    _, manifest = load_artifact(mnist_model)
    assert {k: metrics[k] for k in manifest["metrics"]} == manifest["metrics"]
    assert metrics["figures"] == IMAGE_FIGURES
    assert metrics["report"]["images"] == 300

    names = set(manifest["calibration"]["scores"])
    assert set(metrics["auroc"]) == names == set(metrics["thresholds"]["scores"])
    for by_kind in metrics["auroc"].values():
        assert set(by_kind) == {"noise", "inverted"}
        assert all(0.0 <= area <= 1.0 for area in by_kind.values())
    # Chance is 0.5; two epochs of the default model on the slice already separate noise.
    assert metrics["auroc"]["kl_divergence"]["noise"] >= 0.99


def test_report_draws_only_non_image_figures_for_a_vector_model(
    tmp_path: Path, vectors: Path
) -> None:
    artifact = make_artifact(tmp_path / "vae.pt", input_shape=(3,), likelihood="gaussian")
    out = tmp_path / "report"
    args = ["--artifact", str(artifact), "--data-dir", str(vectors), "--out", str(out)]
    assert report.main(args) == 0

    assert sorted(p.name for p in out.iterdir()) == sorted([*VECTOR_FIGURES, "metrics.json"])
    for name in VECTOR_FIGURES:
        png_size(out / name)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["figures"] == VECTOR_FIGURES
    assert metrics["report"]["images"] == 50
    # Each score draws as many samples as its calibration did, so the thresholds apply.
    _, manifest = load_artifact(artifact)
    calibrated = {
        name: s.get("samples", 0) for name, s in manifest["calibration"]["scores"].items()
    }
    assert metrics["report"]["samples"] == calibrated | {"kl_divergence": 0}


def test_report_rejects_data_that_does_not_fit_the_model(
    tmp_path: Path, vectors: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    artifact = make_artifact(tmp_path / "vae.pt", input_shape=(4,), likelihood="gaussian")
    out = tmp_path / "report"
    args = ["--artifact", str(artifact), "--data-dir", str(vectors), "--out", str(out)]
    assert report.main(args) == 2
    assert "rows of 3 values do not match the 4 inputs" in capsys.readouterr().err
    assert not out.exists()


def test_roc_curve_area_equals_auroc_with_ties() -> None:
    rng = np.random.default_rng(0)
    normal = rng.integers(0, 5, 200).astype(np.float64)
    anomalous = rng.integers(2, 8, 150).astype(np.float64)
    fpr, tpr, area = report.roc_curve(normal, anomalous)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0)
    assert np.all(np.diff(tpr) >= 0)
    assert area == auroc(normal, anomalous)
    assert np.trapezoid(tpr, fpr) == pytest.approx(area, abs=1e-12)


def test_anomalies_invert_inputs_and_fill_their_range() -> None:
    x = np.random.default_rng(0).random((20, 6))
    images = report.make_anomalies(x, [0.0, 1.0], seed=0)
    np.testing.assert_array_equal(images["inverted"], 1.0 - x)
    assert images["noise"].shape == x.shape
    assert images["noise"].min() >= 0.0
    assert images["noise"].max() <= 1.0

    vectors = report.make_anomalies(x * 10 - 3, [None, None], seed=0)
    assert np.all(vectors["noise"] >= (x * 10 - 3).min(0))
    assert np.all(vectors["noise"] <= (x * 10 - 3).max(0))
