"""The training CLI end to end: it learns on real MNIST, resumes, and fails clearly."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import MNIST_DIR
from training.__main__ import TEST_BINARIZATION_SEED, main
from training.config import ModelConfig
from training.data import binarize_fixed, load_data
from training.evaluate import auroc, mean_elbo
from training.export import load_artifact
from training.model import VAE


@pytest.fixture
def vectors(tmp_path: Path) -> Path:
    """A small real-valued data set in the .npy layout."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(1, 8)).astype(np.float32) * 5
    for name, n in (("train", 600), ("test", 100)):
        np.save(tmp_path / f"{name}.npy", base + rng.normal(size=(n, 8)).astype(np.float32))
    return tmp_path


def run(data: Path, out: Path, *args: str) -> int:
    return main(["--data-dir", str(data), "--out", str(out), "--no-progress", "--eval-k", "5",
                 "--batch-size", "64", *args])  # fmt: skip


@pytest.mark.slow
def test_training_learns_mnist_and_scores_separate_noise(mnist_artifact: Path) -> None:
    scripted, manifest = load_artifact(mnist_artifact)

    data = load_data(MNIST_DIR)
    x_test = torch.from_numpy(binarize_fixed(data.x_test[:1000], TEST_BINARIZATION_SEED))
    torch.manual_seed(0)
    untrained = VAE(
        ModelConfig(**{**manifest["model"], "hidden_dims": tuple(manifest["model"]["hidden_dims"])})
    )
    untrained_elbo = mean_elbo(untrained.eval(), x_test)
    trained_elbo = manifest["metrics"]["test_elbo"]
    assert trained_elbo > untrained_elbo + 250, (trained_elbo, untrained_elbo)
    assert manifest["metrics"]["test_log_likelihood"] >= trained_elbo

    noise = torch.rand(1000, 784, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(16, 1000, manifest["latent_dim"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        kl = [scripted.kl_divergence(x).numpy() for x in (x_test, noise)]
        rec = [scripted.reconstruction_log_prob(x, eps).numpy() for x in (x_test, noise)]
    assert auroc(kl[0], kl[1]) >= 0.99
    assert auroc(-rec[0], -rec[1]) >= 0.99  # a lower reconstruction probability is anomalous


@pytest.mark.slow
def test_manifest_calibration_is_monotone_and_complete(mnist_artifact: Path) -> None:
    _, manifest = load_artifact(mnist_artifact)
    cal = manifest["calibration"]
    assert cal["n"] == manifest["dataset"]["val_size"] == 2000
    levels = np.asarray(cal["levels"])
    assert len(levels) == 1001  # a percentile to 0.1%
    assert levels[0] == 0.0
    assert levels[-1] == 1.0
    np.testing.assert_allclose(np.diff(levels), 0.001, atol=1e-9)
    assert set(cal["scores"]) == {"kl_divergence", "reconstruction_log_prob", "log_likelihood"}
    for entry in cal["scores"].values():
        q = np.asarray(entry["quantiles"])
        assert q.shape == levels.shape
        assert np.isfinite(q).all()
        assert (np.diff(q) >= 0).all()
        assert q[-1] > q[0]
    assert cal["scores"]["reconstruction_log_prob"]["samples"] == 16
    assert cal["scores"]["log_likelihood"]["samples"] == 100
    assert 1 <= manifest["metrics"]["active_units"] <= manifest["latent_dim"]


def test_dry_run_exports_a_loadable_artifact(vectors: Path, tmp_path: Path) -> None:
    out = tmp_path / "m" / "vae.pt"
    assert run(vectors, out, "--dry-run") == 0
    _, manifest = load_artifact(out)
    assert manifest["likelihood"] == "gaussian"  # the data is not in [0, 1]
    assert manifest["input_shape"] == [8]
    assert manifest["training"]["epochs"] == 1


def test_same_seed_gives_the_same_model(vectors: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a" / "vae.pt", tmp_path / "b" / "vae.pt"
    assert run(vectors, a, "--epochs", "2", "--seed", "7") == 0
    assert run(vectors, b, "--epochs", "2", "--seed", "7") == 0
    history = [load_artifact(p)[1]["metrics"]["history"] for p in (a, b)]
    assert history[0] == history[1]


def test_resume_continues_where_the_run_stopped(vectors: Path, tmp_path: Path) -> None:
    whole, parts = tmp_path / "whole" / "vae.pt", tmp_path / "parts" / "vae.pt"
    assert run(vectors, whole, "--epochs", "3") == 0
    assert run(vectors, parts, "--epochs", "3", "--stop-after", "2") == 0  # "interrupted"
    assert not parts.exists()  # no artifact from an unfinished run
    assert run(vectors, parts, "--epochs", "3", "--resume") == 0
    h_whole = load_artifact(whole)[1]["metrics"]["history"]
    h_parts = load_artifact(parts)[1]["metrics"]["history"]
    assert [row["epoch"] for row in h_parts] == [1, 2, 3]
    assert h_parts == h_whole  # the same model, as if never interrupted


def test_resume_refuses_a_checkpoint_of_another_shape(
    vectors: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "vae.pt"
    assert run(vectors, out, "--epochs", "1") == 0
    assert run(vectors, out, "--epochs", "2", "--resume", "--latent-dim", "3") == 1
    assert "cannot resume" in capsys.readouterr().err


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(
    vectors: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "vae.pt"
    assert run(vectors, out, "--epochs", "1") == 0
    last = tmp_path / "checkpoints" / "last.pt"
    good = last.read_bytes()
    # An absurd learning rate drives the weights to inf within the next epoch.
    assert run(vectors, out, "--epochs", "3", "--resume", "--lr", "1e30") == 1
    err = capsys.readouterr().err
    assert "the loss became nan" in err or "the loss became inf" in err
    assert "The last good checkpoint stays at" in err
    assert "at epoch 2" in err
    assert last.read_bytes() == good  # epoch 1's checkpoint, untouched


def test_corrupt_data_file_is_named_in_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = (MNIST_DIR / "t10k-images-idx3-ubyte.gz").read_bytes()
    for name in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
        (tmp_path / name).write_bytes(images[: len(images) // 3])  # truncated
    assert run(tmp_path, tmp_path / "vae.pt") == 2
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte.gz" in err
    assert "truncated" in err
    assert not (tmp_path / "vae.pt").exists()


def test_bernoulli_refuses_data_outside_unit_range(
    vectors: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(vectors, tmp_path / "vae.pt", "--likelihood", "bernoulli") == 2
    assert "needs data in [0, 1]" in capsys.readouterr().err


def test_raw_idx_files_train_like_gzipped_ones(tmp_path: Path) -> None:
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        raw = gzip.decompress((MNIST_DIR / f"{name}.gz").read_bytes())
        (tmp_path / name).write_bytes(raw)
        (tmp_path / name.replace("t10k", "train")).write_bytes(raw)
    assert run(tmp_path, tmp_path / "vae.pt", "--dry-run") == 0
    assert load_artifact(tmp_path / "vae.pt")[1]["dataset"]["test_size"] == 10_000
