"""python -m training.upgrade: a format-2 artifact to the current format with the same weights."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from app.model import VAEService
from scoring.scores import References
from tests.conftest import (
    LEGACY_LEVELS,
    drop_format_3,
    drop_format_4,
    drop_format_5,
    drop_format_6,
    drop_format_8,
    drop_format_9,
)
from training.__main__ import main as train
from training.config import ModelConfig
from training.export import FORMAT_VERSION, export_artifact, load_weights, sha256_of
from training.model import VAE
from training.upgrade import main as upgrade


def as_format(artifact: Path, out: Path, version: int) -> Path:
    """The artifact as the trainer of format 2 (no latent reference, DoSE deciding), 4 (no
    polar distance, an ensemble of three) or 5 (the attribution standardised at the trimmed
    projection; no ensemble rows, no feature distance) wrote it."""
    weights, background, manifest = load_weights(artifact)
    cfg = ModelConfig.from_dict(manifest["model"])
    model, bg = VAE(cfg), VAE(cfg)
    model.load_state_dict(weights)
    assert background is not None
    bg.load_state_dict(background)
    rows = torch.bernoulli(
        torch.full((64, cfg.input_dim), 0.3), generator=torch.Generator().manual_seed(0)
    )
    drop_format_9(manifest["calibration"], manifest)
    drop_format_8(manifest["calibration"])
    drop_format_6(model.eval(), rows, manifest)
    # Each older format drops what the next one added, as tests/conftest.py's make_artifact.
    current = VAEService.load(artifact, "cpu")
    assert current.neighbours is not None
    references: References | None = References(current.neighbours, current.gaps)
    if version <= 4:
        drop_format_5(manifest["calibration"], manifest)
        references = References(replace(current.neighbours, log_lengths=None), current.gaps)
    if version <= 3:
        drop_format_4(manifest["calibration"], manifest)
        drop_format_3(manifest["calibration"], manifest)
        references = None
    manifest["format_version"] = version
    export_artifact(model.eval(), manifest, out, bg.eval(), references)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Binary vectors in the .npy layout: a Bernoulli model, as MNIST's."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for name, n in (("train", 600), ("test", 100)):
        np.save(root / f"{name}.npy", (rng.uniform(size=(n, 16)) < 0.3).astype(np.float32))
    return root


@pytest.fixture(scope="module")
def old(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("old")
    args = ["--data-dir", str(data), "--out", str(tmp / "new.pt"), "--epochs", "2",
            "--eval-k", "5", "--batch-size", "64", "--hidden-dims", "16", "--latent-dim", "3",
            "--no-progress"]  # fmt: skip
    assert train(args) == 0
    return as_format(tmp / "new.pt", tmp / "old.pt", 2)


def test_upgrade_keeps_the_weights_and_adds_the_newer_scores(
    old: Path, data: Path, tmp_path: Path
) -> None:
    before = VAEService.load(old, "cpu")
    assert before.format_version == 2
    assert before.neighbours is None
    out = tmp_path / "up.pt"
    assert upgrade([str(old), "--data-dir", str(data), "--out", str(out)]) == 0
    after = VAEService.load(out, "cpu")
    assert after.format_version == FORMAT_VERSION
    assert before.attribution_method == "projection"
    assert after.attribution_method == "redrawn residual"
    assert after.decision_score == "ensemble"
    assert {"latent_distance", "latent_polar_distance", "ensemble"} <= set(after.calibration.scores)
    assert after.neighbours is not None
    assert after.neighbours.reference.shape == (after.manifest["dataset"]["train_size"], 3)
    assert after.neighbours.log_lengths is not None
    assert after.neighbours.log_lengths.shape == (after.manifest["dataset"]["train_size"],)
    old_weights, old_bg, old_manifest = load_weights(old)
    new_weights, new_bg, new_manifest = load_weights(out)
    for name, tensor in old_weights.items():
        assert torch.equal(tensor, new_weights[name]), name
    assert old_bg is not None
    assert new_bg is not None
    assert all(torch.equal(t, new_bg[n]) for n, t in old_bg.items())
    assert new_manifest["metrics"] == old_manifest["metrics"]
    assert new_manifest["upgraded_from"]["sha256"] == sha256_of(old)
    assert new_manifest["upgraded_from"]["format_version"] == 2
    # The same validation rows: the scores format 2 had keep their values (its quantiles).
    for name in ("kl_divergence", "dose"):
        np.testing.assert_allclose(
            np.quantile(new_manifest["calibration"]["scores"][name]["values"], LEGACY_LEVELS),
            old_manifest["calibration"]["scores"][name]["quantiles"],
            rtol=1e-5,
        )
    x = np.random.default_rng(3).uniform(size=(4, 16)).astype(np.float32)
    scores = after.anomaly_scores(x, 4, seed=0)
    assert scores["ensemble"].shape == (4,)


def test_a_format_4_artifact_gains_the_polar_distance_and_keeps_its_other_scores(
    old: Path, data: Path, tmp_path: Path
) -> None:
    """Format 4 to 5: the same weights and validation rows, so every score format 4 had keeps
    its calibration values exactly; the polar distance joins them and the ensemble."""
    current = tmp_path / "current.pt"
    assert upgrade([str(old), "--data-dir", str(data), "--out", str(current)]) == 0
    four = as_format(current, tmp_path / "four.pt", 4)
    before = VAEService.load(four, "cpu")
    assert before.format_version == 4
    assert "latent_polar_distance" not in before.calibration.scores
    assert before.ensemble.scores == ("dose", "latent_distance", "rapp")
    out = tmp_path / "five.pt"
    assert upgrade([str(four), "--data-dir", str(data), "--out", str(out)]) == 0
    after = VAEService.load(out, "cpu")
    assert after.format_version == FORMAT_VERSION
    assert after.ensemble.scores == (
        "dose", "latent_distance", "latent_polar_distance", "rapp", "input_complexity",
        "feature_distance",
    )  # fmt: skip
    assert after.ensemble.weights == (1.0, 1.0, 1.0, 1.0, 1.0, 2.0)
    _, _, four_manifest = load_weights(four)
    _, _, five_manifest = load_weights(out)
    for name in ("kl_divergence", "dose", "latent_distance", "rapp"):
        assert (
            five_manifest["calibration"]["scores"][name]["values"]
            == four_manifest["calibration"]["scores"][name]["values"]
        ), name


def test_a_format_5_artifact_keeps_every_score_and_gains_the_redrawn_residual(
    old: Path, data: Path, tmp_path: Path
) -> None:
    """Format 5 to the current one changes an image model's attribution (6), adds the
    ensemble's validation rows (8), and adds the feature distance to the ensemble (9): every
    other score keeps its calibration values and its seeded answers."""
    current = tmp_path / "current.pt"
    assert upgrade([str(old), "--data-dir", str(data), "--out", str(current)]) == 0
    five = as_format(current, tmp_path / "five.pt", 5)
    before = VAEService.load(five, "cpu")
    assert (before.format_version, before.attribution_method) == (5, "projection")
    out = tmp_path / "six.pt"
    assert upgrade([str(five), "--data-dir", str(data), "--out", str(out)]) == 0
    after = VAEService.load(out, "cpu")
    assert (after.format_version, after.attribution_method) == (FORMAT_VERSION, "redrawn residual")
    calibration = copy.deepcopy(after.manifest["calibration"])
    assert calibration["scores"]["ensemble"]["parts"] == list(after.ensemble.scores)
    assert after.ensemble.scores == (*before.ensemble.scores, "feature_distance")
    scores = calibration["scores"]
    del scores["ensemble"], scores["feature_distance"]
    assert scores == {
        n: v for n, v in before.manifest["calibration"]["scores"].items() if n != "ensemble"
    }
    x = np.random.default_rng(5).uniform(size=(4, 16)).astype(np.float32)
    old_scores = before.anomaly_scores(x, 4, seed=0, attribution=True)
    new_scores = after.anomaly_scores(x, 4, seed=0, attribution=True)
    assert new_scores.keys() - old_scores.keys() == {"feature_distance"}
    for name, values in old_scores.items():
        if name not in ("attribution", "ensemble"):
            np.testing.assert_array_equal(new_scores[name], values, err_msg=name)
    # The residual is in the data's own units, 0 to 1; the standardised map is not.
    assert ((new_scores["attribution"] >= 0) & (new_scores["attribution"] <= 1)).all()
    assert after.attribution_stats is None
    assert before.attribution_stats is not None


def test_upgrade_refuses_data_that_is_not_the_artifacts(
    old: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    for name, n in (("train", 500), ("test", 100)):
        np.save(other / f"{name}.npy", np.zeros((n, 16), np.float32))
    assert upgrade([str(old), "--data-dir", str(other), "--out", str(tmp_path / "x.pt")]) == 2
    assert "not its data" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_a_current_artifact_needs_no_upgrade(old: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "up.pt"
    assert upgrade([str(old), "--data-dir", str(data), "--out", str(out)]) == 0
    assert upgrade([str(out), "--data-dir", str(data), "--out", str(tmp_path / "again.pt")]) == 0
    assert not (tmp_path / "again.pt").exists()
