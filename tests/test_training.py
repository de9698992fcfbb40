"""The training CLI end to end: it learns on real MNIST, resumes, and fails clearly."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from app.model import VAEService
from tests.conftest import EVERY_SCORE, MNIST_DIR
from training.__main__ import TEST_BINARIZATION_SEED, main, model_config, parse_args, train_config
from training.config import ModelConfig, TrainConfig, schedule
from training.data import DataError, binarize_fixed, load_data
from training.evaluate import auroc, mean_elbo
from training.export import load_artifact
from training.model import VAE
from training.pipeline import validation_size


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
    untrained = VAE(ModelConfig.from_dict(manifest["model"]))
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
    assert cal["n"] == manifest["dataset"]["val_size"] == 1000  # a tenth of the 10,000
    assert "levels" not in cal  # format 4: ranks among the values, not quantiles
    assert set(cal["scores"]) == set(EVERY_SCORE)  # every score, the format-2 ones too
    for entry in cal["scores"].values():
        values = np.asarray(entry["values"])
        assert values.shape == (1000,)  # every validation row
        assert np.isfinite(values).all()
        assert (np.diff(values) >= 0).all()
        assert values[-1] > values[0]
    assert cal["scores"]["reconstruction_log_prob"]["samples"] == 16
    assert cal["scores"]["log_likelihood"]["samples"] == 100
    for name in ("input_complexity", "likelihood_ratio", "dose", "ensemble"):
        assert cal["scores"][name]["samples"] == 16
    assert cal["scores"]["latent_distance"]["samples"] == 0
    assert 1 <= manifest["metrics"]["active_units"] <= manifest["latent_dim"]


@pytest.mark.slow
def test_manifest_carries_what_the_newer_scores_need(mnist_artifact: Path) -> None:
    _, manifest = load_artifact(mnist_artifact)
    assert manifest["format_version"] == 9
    assert manifest["decision_score"] == "ensemble"
    dose = manifest["dose"]
    assert dose["features"] == ["kl_divergence", "reconstruction_log_prob", "complexity_bits"]
    assert np.asarray(dose["reference"]).shape == (1000, 3)  # every validation row
    # An image model's attribution is the residual from x redrawn: no statistics to carry.
    assert manifest["attribution"] == {
        "method": "redrawn residual", "steps": 25, "rounds": 3, "trim": 0.15,
    }  # fmt: skip
    assert manifest["background"] == {"noise": 0.2, "weight_decay": 1e-4, "epochs": 7}
    vae = VAEService.load(mnist_artifact, "cpu")  # the background model travels inside the artifact
    assert vae.background is not None
    assert set(vae.calibration.scores) == set(EVERY_SCORE)
    # The latent reference: every training row's posterior mean (the slice's 9,000).
    train_size = manifest["dataset"]["train_size"]
    assert manifest["latent_distance"] == {
        "k": 5,
        "n": train_size,
        "source": "posterior means of training rows",
    }
    assert vae.neighbours is not None
    assert vae.neighbours.reference.shape == (train_size, manifest["latent_dim"])
    np.testing.assert_allclose(np.linalg.norm(vae.neighbours.reference, axis=1), 1.0, atol=1e-6)
    # RaPP's projection, fitted on the same training rows' hidden gaps (512 + 256 units).
    assert manifest["rapp"] == {"method": "nap", "n": train_size,
                                "source": "hidden-space reconstruction gaps of training rows"}  # fmt: skip
    assert vae.gaps is not None
    assert vae.gaps.mean.shape == (768,)
    # The polar distance reads the same means' log lengths.
    assert manifest["latent_polar_distance"] == {
        "k": 5,
        "n": train_size,
        "source": "posterior means of training rows: directions and log lengths",
    }
    assert vae.neighbours.log_lengths is not None
    assert vae.neighbours.log_lengths.shape == (train_size,)
    # The feature distance's reference: the same rows' first-layer features (512 units),
    # projected on 128 directions, unit rows.
    assert manifest["feature_distance"] == {
        "k": 5,
        "n": train_size,
        "rank": 128,
        "source": "the encoder's first hidden layer of training rows, projected",
    }
    assert vae.features is not None
    assert vae.features.basis.shape == (512, 128)
    assert vae.features.neighbours.reference.shape == (train_size, 128)
    np.testing.assert_allclose(
        np.linalg.norm(vae.features.neighbours.reference, axis=1), 1.0, atol=1e-6
    )
    assert manifest["ensemble"] == {
        "scores": ["dose", "latent_distance", "latent_polar_distance", "rapp", "input_complexity",
                   "feature_distance"],
        "combine": "fisher",
        "weights": [1.0, 1.0, 1.0, 1.0, 1.0, 2.0],
    }  # fmt: skip
    assert manifest["calibration"]["scores"]["ensemble"]["weights"] == [1, 1, 1, 1, 1, 2]


@pytest.mark.slow
def test_the_calibration_is_on_the_data_as_callers_send_it(mnist_artifact: Path) -> None:
    """Grey validation digits, not binarised ones: held-out grey test digits are flagged at
    about the threshold's 1% (binarised, a digit's reconstruction runs higher, fewer are)."""
    vae = VAEService.load(mnist_artifact, "cpu")
    grey = load_data(MNIST_DIR).x_test
    scores = vae.anomaly_scores(grey, 16, seed=0)
    q = vae.calibration.effective_threshold(0.99)
    flagged = float(np.mean(vae.calibration.percentiles(scores)[vae.decision_score] > q))
    assert 0.002 <= flagged <= 0.03, flagged  # 5,000 digits: 1% is 50 of them


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
    assert load_artifact(tmp_path / "vae.pt")[1]["dataset"]["test_size"] == 5_000


def test_help_prints_each_default_once(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # one line per flag
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  --")]
    assert all(line.count("default:") <= 1 for line in lines), lines
    assert "(default: None)" not in "\n".join(lines)
    epochs = next(line for line in lines if line.startswith("  --epochs"))
    assert epochs.endswith("training epochs (default: 200; quick: 15)")


def test_no_flags_train_the_full_preset_with_the_full_evaluation() -> None:
    cfg = train_config(parse_args([]), "mnist", "cpu")
    assert cfg == TrainConfig(preset="full")
    assert train_config(parse_args(["--preset", "full"]), "mnist", "cpu") == cfg
    assert (cfg.epochs, cfg.lr_min_factor, cfg.kl_warmup_epochs) == (200, 0.1, 10)
    assert (cfg.eval_k, cfg.eval_images) == (5000, None)  # None: every test image


def test_setting_flags_override_the_preset_and_set_their_fields() -> None:
    args = parse_args(["--preset", "quick", "--epochs", "4", "--batch-size", "64", "--lr", "0.01",
                       "--lr-min-factor", "1", "--kl-warmup-epochs", "0.5", "--patience", "2",
                       "--seed", "7", "--val-fraction", "0.2", "--val-min", "50",
                       "--val-max", "500", "--no-dynamic-binarization", "--stop-after", "1",
                       "--hidden-dims", "64", "32", "--latent-dim", "4"])  # fmt: skip
    assert train_config(args, "mnist", "cuda:0") == TrainConfig(
        epochs=4, batch_size=64, lr=0.01, lr_min_factor=1.0, kl_warmup_epochs=0.5, patience=2,
        seed=7, val_fraction=0.2, val_min=50, val_max=500, dynamic_binarization=False,
        stop_after=1, eval_k=100, eval_images=1000, device="cuda:0", preset="quick",
    )  # fmt: skip
    assert model_config(args, 8, "gaussian") == ModelConfig(
        input_dim=8, hidden_dims=(64, 32), latent_dim=4, likelihood="gaussian"
    )
    assert train_config(parse_args(["--preset", "quick"]), "mnist", "cpu").epochs == 15


def test_the_benchmarks_schedule_is_the_presets_or_its_recipe_cut_short() -> None:
    # The benchmarks train as the CLI does: a preset's own epochs and warm-up...
    quick = train_config(parse_args(["--preset", "quick"]), "mnist", "cpu")
    assert schedule("quick") == (quick.epochs, quick.kl_warmup_epochs) == (15, 3)
    assert schedule() == (200, 10)
    # ...or fewer epochs of its recipe, warmed up over half the run at most.
    assert schedule(epochs=40) == (40, 10)
    assert schedule(epochs=12) == (12, 6)
    assert schedule("quick", 4) == (4, 2)


@pytest.mark.parametrize(
    ("flags", "dataset", "expected"),
    [
        ([], "mnist", (5000, None)),  # the full run
        (["--epochs", "300"], "mnist", (5000, None)),
        (["--epochs", "3"], "mnist", (100, 1000)),  # few epochs
        (["--preset", "quick"], "mnist", (100, 1000)),
        ([], "digit3", (100, 1000)),  # other data
        (["--epochs", "3", "--eval-k", "5000"], "mnist", (5000, 1000)),  # flags ask for more
        (["--epochs", "3", "--eval-images", "5000"], "digit3", (100, 5000)),
        (["--eval-k", "20", "--eval-images", "50"], "mnist", (20, 50)),
        (["--dry-run"], "mnist", (10, 100)),
    ],
)
def test_evaluation_is_proportionate_to_the_run(
    flags: list[str], dataset: str, expected: tuple[int, int | None]
) -> None:
    cfg = train_config(parse_args(flags), dataset, "cpu")
    assert (cfg.eval_k, cfg.eval_images) == expected


def test_short_run_reports_the_evaluation_it_did(
    vectors: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "vae.pt"
    assert main(["--data-dir", str(vectors), "--out", str(out), "--epochs", "1",
                 "--no-progress"]) == 0  # fmt: skip
    metrics = load_artifact(out)[1]["metrics"]
    assert (metrics["log_likelihood_k"], metrics["test_images"]) == (100, 100)  # all 100 it has
    stdout = capsys.readouterr().out
    assert "(IWAE bound, K=100, 100 test images)" in stdout
    assert f"data         {vectors.name}: 500 train, 100 validation, 100 test" in stdout


@pytest.mark.parametrize(
    ("n", "val"),
    [(22_699, 2000), (20_000, 2000), (2_369, 237), (1_000, 100), (600, 100), (300, 90),
     (249, 75), (50, 15)],
)  # fmt: skip
def test_validation_split_is_a_tenth_within_floor_and_cap_and_proportionate_when_small(
    n: int, val: int
) -> None:
    assert validation_size(n, TrainConfig()) == val


def test_validation_split_follows_its_flags() -> None:
    cfg = TrainConfig(val_fraction=0.5, val_min=10, val_max=40)
    assert [validation_size(n, cfg) for n in (50, 60, 1000)] == [25, 30, 40]


def test_data_set_too_small_to_train_on_is_refused() -> None:
    with pytest.raises(DataError, match="49 training rows are too few: at least 50 are needed"):
        validation_size(49, TrainConfig())


def test_too_small_data_set_exits_2_naming_the_sizes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(0)
    for name, n in (("train", 40), ("test", 20)):
        np.save(tmp_path / f"{name}.npy", rng.random((n, 4), dtype=np.float32))
    assert run(tmp_path, tmp_path / "vae.pt") == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: {tmp_path}: 40 training rows are too few: at least 50 are needed, to learn "
        "from and to calibrate the anomaly scores on.\n"
    )
    assert not (tmp_path / "vae.pt").exists()
