"""One training run as plain functions: split, binarise, fit, evaluate, calibrate.

Shared by the CLI (`python -m training`) and the anomaly benchmark, so both train the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from scoring.calibration import Calibration
from scoring.scores import (
    Density,
    Ensemble,
    FeatureNeighbours,
    GapProjection,
    InputNeighbours,
    Neighbours,
    References,
)
from training.config import ModelConfig, TrainConfig
from training.data import DataError, Dataset, binarize_fixed, train_val_split
from training.evaluate import (
    DECISION_SCORE,
    DOSE_FEATURES,
    DOSE_FEATURES_BOUNDED,
    SCORE_DIRECTIONS,
    active_units,
    anomaly_scores,
    auroc,
    calibrate,
    encoder_features,
    feature_stats,
    hidden_gaps,
    iwae_log_likelihood,
    latent_means,
    mean_elbo,
    signed,
)
from training.model import VAE
from training.train import TrainResult, train

log = logging.getLogger("training")

# The test set's binarisation is fixed across runs and configs, so figures compare.
TEST_BINARIZATION_SEED = 1234


@dataclass(frozen=True)
class Splits:
    x_train: Tensor  # (N, D), as read: binarised afresh each time it is shown
    x_val: Tensor  # (V, D), binarised once with a fixed seed where that applies
    x_test: Tensor  # (M, D), likewise
    binarize: bool
    # The validation and test rows as callers send them to the service: grey digits, not
    # binarised ones. The anomaly scores are calibrated and measured on these, so the
    # false-alarm rate holds for the data the service receives (binarised, a grey digit's
    # reconstruction probability runs lower, and 2.6% of normal test digits were flagged).
    x_val_served: Tensor | None = None
    x_test_served: Tensor | None = None

    @property
    def val_served(self) -> Tensor:
        return self.x_val if self.x_val_served is None else self.x_val_served

    @property
    def test_served(self) -> Tensor:
        return self.x_test if self.x_test_served is None else self.x_test_served


# The fewest training rows a model is fitted and calibrated on, and the largest share of a
# small data set held out to calibrate: 250 normal rows (a 70/30 split of breast cancer's 357
# benign ones) keep 75 to calibrate on, which resolve a tail of 1.3%, and 175 to learn from.
MIN_ROWS = 50
SMALL_SHARE = 0.3


def validation_size(n: int, cfg: TrainConfig) -> int:
    """How many of n training rows to hold out: cfg.val_fraction of them, within
    [cfg.val_min, cfg.val_max], except that a small data set gives at most SMALL_SHARE of its
    rows to reach val_min: proportionate, so that 50 rows still train. A DataError below
    MIN_ROWS, where neither the model nor its calibration would mean much."""
    if n < MIN_ROWS:
        raise DataError(
            f"{n} training rows are too few: at least {MIN_ROWS} are needed, to learn from and to "
            "calibrate the anomaly scores on."
        )
    floor = min(cfg.val_min, round(n * SMALL_SHARE))
    return max(1, min(max(round(n * cfg.val_fraction), floor), cfg.val_max))


def split(data: Dataset, cfg: TrainConfig, likelihood: str, device: torch.device) -> Splits:
    val_size = validation_size(len(data.x_train), cfg)
    train_idx, val_idx = train_val_split(len(data.x_train), val_size, cfg.seed)
    binarize = likelihood == "bernoulli" and cfg.dynamic_binarization
    val_served, test_served = data.x_train[val_idx], data.x_test[: cfg.eval_images]
    x_val, x_test = val_served, test_served
    if binarize:
        x_val = binarize_fixed(x_val, TEST_BINARIZATION_SEED)
        x_test = binarize_fixed(x_test, TEST_BINARIZATION_SEED)
    return Splits(
        torch.from_numpy(data.x_train[train_idx]).to(device),
        torch.from_numpy(x_val).to(device),
        torch.from_numpy(x_test).to(device),
        binarize,
        torch.from_numpy(val_served).to(device),
        torch.from_numpy(test_served).to(device),
    )


def fit(
    splits: Splits,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    *,
    checkpoint_dir: Path,
    resume: bool = False,
    progress: bool = True,
    noise: float = 0.0,
    weight_decay: float = 0.0,
) -> tuple[VAE, TrainResult]:
    """Train a fresh VAE and return it holding its best validation state, in eval mode; with
    `noise`, a background model (see train.train)."""
    torch.manual_seed(cfg.seed)  # the initial weights
    model = VAE(model_cfg).to(splits.x_train.device)
    if model_cfg.likelihood == "gaussian":
        model.x_shift.copy_(splits.x_train.mean(0))
        model.x_scale.copy_(splits.x_train.std(0).clamp_min(1e-3))
    meta = {"model": model_cfg.to_dict(), "train": cfg.to_dict()}
    result = train(
        model, splits.x_train, splits.x_val, cfg, binarize=splits.binarize,
        checkpoint_dir=checkpoint_dir, meta=meta, resume=resume, progress=progress,
        noise=noise, weight_decay=weight_decay,
    )  # fmt: skip
    model.load_state_dict(result.best_state)
    return model.eval(), result


def test_metrics(model: VAE, splits: Splits, cfg: TrainConfig) -> dict[str, Any]:
    """Test ELBO and IWAE log-likelihood (nats per image), and the active latent units."""
    log.info("evaluating on %d test images (K=%d)", len(splits.x_test), cfg.eval_k)
    test_ll = iwae_log_likelihood(model, splits.x_test, k=cfg.eval_k, seed=cfg.seed)
    return {
        "test_elbo": mean_elbo(model, splits.x_test, seed=cfg.seed),
        "test_log_likelihood": test_ll.mean().item(),
        "log_likelihood_k": cfg.eval_k,
        "test_images": len(splits.x_test),
        "active_units": active_units(model, splits.x_test),
    }


def fit_background(
    splits: Splits,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    *,
    checkpoint_dir: Path,
    resume: bool = False,
    progress: bool = True,
) -> VAE | None:
    """The likelihood ratio's background model (Ren et al. 2019), or None when
    cfg.background_noise is 0: the same net on noised inputs, for at most background_epochs."""
    if cfg.background_noise <= 0.0:
        return None
    epochs = min(cfg.epochs, cfg.background_epochs)
    bg_cfg = replace(
        cfg, epochs=epochs, kl_warmup_epochs=min(cfg.kl_warmup_epochs, epochs / 2), stop_after=None
    )
    log.info("training the background model: %d epochs, noise %.2f", epochs, cfg.background_noise)
    model, _ = fit(
        splits, model_cfg, bg_cfg, checkpoint_dir=checkpoint_dir / "background", resume=resume,
        progress=progress, noise=cfg.background_noise, weight_decay=cfg.background_weight_decay,
    )  # fmt: skip
    return model


# What an image model's ensemble combines, by Fisher's method (scoring/scores.py), each score's
# tail times its weight: the input complexity where the model has one (data in [0, 1]). On a
# design split of the training images alone (python -m training.benchmark_design), format 4's
# three scores plus the polar distance and the input complexity raised the mean AUROC of both
# protocols, one digit learnt and one left out, where the reweightings of format 4's tried did
# not: format 5's five. Format 9 adds the feature distance, counted twice: of the candidates on
# the same split it raised both protocols' mean and worst digit the most, over format 5's five
# (0.964 to 0.973 with one digit learnt, 0.936 to 0.950 with one left out) and over the feature
# distance counted once (docs/benchmarks/anomaly.md, "How the ensemble was chosen").
ENSEMBLE = {
    "dose": 1.0,
    "latent_distance": 1.0,
    "latent_polar_distance": 1.0,
    "rapp": 1.0,
    "input_complexity": 1.0,
    "feature_distance": 2.0,
}
# A table model's (format 7): DoSE and the input distance, chosen on the design tables, wine and
# iris (training/evaluate.py, DECISION_SCORE). Format 5's four that a table model has (DoSE, the
# two latent distances, RaPP) scored 0.938 on wine in the one-off run the choice was made on,
# below these two's 0.954 on their worse table (docs/benchmarks/tables.md).
TABLE_ENSEMBLE = ("dose", "input_distance")


def ensemble_of(scores: Mapping[str, object]) -> Ensemble:
    """The ensemble a model's scores make: TABLE_ENSEMBLE where the model has the input
    distance (tables), else ENSEMBLE's scores that it has, with their weights."""
    if "input_distance" in scores:
        return Ensemble(tuple(n for n in TABLE_ENSEMBLE if n in scores), "fisher")
    parts = tuple(n for n in ENSEMBLE if n in scores)
    return Ensemble(parts, "fisher", tuple(ENSEMBLE[n] for n in parts))


def calibrate_with_ensemble(
    scores: dict[str, np.ndarray], samples: dict[str, int], ensemble: Ensemble
) -> dict[str, Any]:
    """The manifest's calibration of the validation `scores` and of the `ensemble` of them
    (added to `scores`). The ensemble is of tails the service reads off the other scores'
    calibration, so it is calibrated after them. Its values are each validation row's tails
    taken against the other rows (what formats 4 to 7 decided by), and beside them are the
    rows' values of its parts, from which the service takes its percentile as a conformal
    p-value (scoring/calibration.py, ConformalEnsemble): float32, as calibrate() stores them."""
    calibrated = calibrate(scores, samples)
    parts = Calibration.from_manifest({"calibration": calibrated}, "calibration")
    scores["ensemble"] = ensemble.score(scores, parts.scores, held_out=True)
    calibrated["scores"] |= calibrate({"ensemble": scores["ensemble"]}, samples)["scores"]
    rows = np.stack([scores[n].astype(np.float32) for n in ensemble.scores], axis=1)
    calibrated["scores"]["ensemble"] |= {
        "parts": list(ensemble.scores),
        **({"weights": list(ensemble.weights)} if ensemble.weights is not None else {}),
        "rows": rows.astype(np.float64).tolist(),
    }
    return calibrated


def references(model: VAE, splits: Splits, cfg: TrainConfig) -> References:
    """The latent distance's and RaPP's references, from at most cfg.latent_reference training
    rows (a seeded choice) as callers send them: their posterior means, and the projection of
    their hidden-space gaps. The validation rows are not among them, so their scores, and so
    the calibration, are honest."""
    x = splits.x_train
    if len(x) > cfg.latent_reference:
        pick = np.random.default_rng(cfg.seed).choice(len(x), cfg.latent_reference, replace=False)
        x = x[torch.from_numpy(np.sort(pick)).to(x.device)]
    # A table model's rows themselves, for the input distance; an image model's are too many
    # (N x 784 floats) and its ensemble was chosen without them.
    inputs = None if model.bernoulli else InputNeighbours.fit(x.cpu().numpy())
    # An image model's first-layer features instead (format 9): a table's rows have their own
    # distance, and its ensemble was chosen without these.
    features = FeatureNeighbours.fit(encoder_features(model, x)) if model.bernoulli else None
    return References(
        Neighbours.fit(latent_means(model, x)),
        GapProjection.fit(hidden_gaps(model, x)),
        inputs,
        features,
    )


def calibration(
    model: VAE, splits: Splits, cfg: TrainConfig, background: VAE | None = None
) -> tuple[dict[str, Any], dict[str, Any], References]:
    """The sorted values of each anomaly score on the (normal) validation split as callers
    send it, and what the newer scores need: the DoSE density fitted there (its own points
    scored leave-one-out), the attribution's per-feature statistics, the decision score and
    the ensemble's recipe (in the manifest), and the training rows' references (files of their
    own). The ensemble is calibrated on tails taken from this same calibration, as the
    service takes them, each validation row's against the other rows."""
    n_l, n_k = cfg.calibration_samples, cfg.calibration_ll_samples
    x_val = splits.val_served
    refs = references(model, splits, cfg)
    stats = anomaly_scores(
        model, x_val, samples=n_l, ll_samples=n_k, seed=cfg.seed, background=background,
        references=refs,
    )  # fmt: skip
    density = Density.fit(stats, DOSE_FEATURES_BOUNDED if model.bernoulli else DOSE_FEATURES)
    stats["dose"] = density.reference_scores()
    scores = {name: v for name, v in stats.items() if name in SCORE_DIRECTIONS}
    # The L or K each score draws; KL, the latent distances and RaPP draw none.
    samples = {
        name: n_l
        for name in (*scores, "ensemble")
        if name
        not in (
            "kl_divergence",
            "latent_distance",
            "latent_polar_distance",
            "rapp",
            "input_distance",
            "feature_distance",
        )
    }
    samples["log_likelihood"] = n_k
    ensemble = ensemble_of(scores)
    calibrated = calibrate_with_ensemble(scores, samples, ensemble)
    assert refs.neighbours is not None
    scoring: dict[str, Any] = {
        "decision_score": DECISION_SCORE,
        "dose": density.to_manifest(),
        "attribution": feature_stats(model, x_val),
        "latent_distance": {
            "k": refs.neighbours.k,
            "n": len(refs.neighbours.reference),
            "source": "posterior means of training rows",
        },
        "latent_polar_distance": {
            "k": refs.neighbours.k,
            "n": len(refs.neighbours.reference),
            "source": "posterior means of training rows: directions and log lengths",
        },
        "rapp": {
            "method": "nap",
            "n": len(refs.neighbours.reference),
            "source": "hidden-space reconstruction gaps of training rows",
        },
        "ensemble": ensemble.to_manifest(),
    }
    if refs.features is not None:
        scoring["feature_distance"] = {
            "k": refs.features.neighbours.k,
            "n": len(refs.features.neighbours.reference),
            "rank": refs.features.basis.shape[1],
            "source": "the encoder's first hidden layer of training rows, projected",
        }
    if refs.inputs is not None:
        scoring["input_distance"] = {
            "k": refs.inputs.k,
            "n": len(refs.inputs.reference),
            "source": "training rows, each feature standardised over them",
        }
    if background is not None:
        scoring["background"] = {
            "noise": cfg.background_noise,
            "weight_decay": cfg.background_weight_decay,
            "epochs": min(cfg.epochs, cfg.background_epochs),
        }
    return calibrated, scoring, refs


def served_scores(
    model: VAE,
    x: Tensor,
    cfg: TrainConfig,
    background: VAE | None,
    scoring: dict[str, Any],
    refs: References,
    calibrated: dict[str, Any],
) -> dict[str, np.ndarray]:
    """Every score of x as the service computes it: L and K as calibrated, the fitted DoSE
    density, the references, the ensemble's percentiles."""
    return anomaly_scores(
        model, x, samples=cfg.calibration_samples, ll_samples=cfg.calibration_ll_samples,
        seed=cfg.seed, background=background, density=Density.from_manifest(scoring["dose"]),
        references=refs,
        calibration=Calibration.from_manifest({"calibration": calibrated}, "calibration"),
        ensemble=Ensemble.from_manifest(scoring),
    )  # fmt: skip


def test_auroc(
    model: VAE,
    splits: Splits,
    cfg: TrainConfig,
    background: VAE | None,
    scoring: dict[str, Any],
    refs: References,
    calibrated: dict[str, Any],
    is_anomaly: npt.NDArray[np.bool_],
) -> dict[str, float]:
    """Each score's AUROC on the test split as callers send it, normal rows against anomalous
    ones, scored as the service scores them (L and K as calibrated, the fitted DoSE density,
    the references, the ensemble's percentiles); empty when the test split lacks either kind."""
    if is_anomaly.all() or not is_anomaly.any():
        return {}
    scores = served_scores(model, splits.test_served, cfg, background, scoring, refs, calibrated)
    return {
        name: round(auroc(signed(name, v)[~is_anomaly], signed(name, v)[is_anomaly]), 4)
        for name, v in scores.items()
        if name in SCORE_DIRECTIONS
    }
