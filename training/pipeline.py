"""One training run as plain functions: split, binarise, fit, evaluate, calibrate.

Shared by the CLI (`python -m training`) and the anomaly benchmark, so both train the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from app.calibration import Calibration
from app.scores import ENSEMBLE, Density, Neighbours, ensemble
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
    feature_stats,
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


def validation_size(n: int, cfg: TrainConfig) -> int:
    """How many of n training rows to hold out: cfg.val_fraction of them, within
    [cfg.val_min, cfg.val_max]. A DataError when fewer than twice val_min (200 by default)
    would be left to train on: a model fitted on so few rows learns too little for its
    validation ELBO or its calibration to mean much."""
    val = min(max(round(n * cfg.val_fraction), cfg.val_min), cfg.val_max)
    min_train = 2 * cfg.val_min
    if n - val < min_train:
        raise DataError(
            f"{n} training rows are too few: a validation split of {val} would leave {n - val} "
            f"to train on, fewer than the {min_train} needed (twice --val-min)."
        )
    return val


def split(data: Dataset, cfg: TrainConfig, likelihood: str, device: torch.device) -> Splits:
    val_size = validation_size(len(data.x_train), cfg)
    train_idx, val_idx = train_val_split(len(data.x_train), val_size, cfg.seed)
    binarize = likelihood == "bernoulli" and cfg.dynamic_binarization
    x_val, x_test = data.x_train[val_idx], data.x_test[: cfg.eval_images]
    if binarize:
        x_val = binarize_fixed(x_val, TEST_BINARIZATION_SEED)
        x_test = binarize_fixed(x_test, TEST_BINARIZATION_SEED)
    return Splits(
        torch.from_numpy(data.x_train[train_idx]).to(device),
        torch.from_numpy(x_val).to(device),
        torch.from_numpy(x_test).to(device),
        binarize,
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


def latent_reference(model: VAE, splits: Splits, cfg: TrainConfig) -> Neighbours:
    """latent_distance's reference: the posterior means of at most cfg.latent_reference training
    rows (a seeded choice), binarised once as the validation rows are where that applies."""
    x = splits.x_train
    if len(x) > cfg.latent_reference:
        pick = np.random.default_rng(cfg.seed).choice(len(x), cfg.latent_reference, replace=False)
        x = x[torch.from_numpy(np.sort(pick)).to(x.device)]
    if splits.binarize:
        x = torch.from_numpy(binarize_fixed(x.cpu().numpy(), TEST_BINARIZATION_SEED)).to(x.device)
    return Neighbours.fit(latent_means(model, x))


def calibration(
    model: VAE, splits: Splits, cfg: TrainConfig, background: VAE | None = None
) -> tuple[dict[str, Any], dict[str, Any], Neighbours]:
    """The sorted values of each anomaly score on the (normal) validation split, and what the newer
    scores need: the DoSE density fitted there (its own points scored leave-one-out), the
    attribution's per-feature statistics, the decision score (in the manifest), and the
    training rows' latent means (latent_distance's reference, a file of its own). The
    validation rows are not in that reference, so their distances are honest; the ensemble is
    calibrated on percentiles taken from this same calibration, as the service takes them."""
    n_l, n_k = cfg.calibration_samples, cfg.calibration_ll_samples
    x_val = splits.x_val
    neighbours = latent_reference(model, splits, cfg)
    stats = anomaly_scores(
        model, x_val, samples=n_l, ll_samples=n_k, seed=cfg.seed, background=background,
        neighbours=neighbours,
    )  # fmt: skip
    density = Density.fit(stats, DOSE_FEATURES_BOUNDED if model.bernoulli else DOSE_FEATURES)
    stats["dose"] = density.reference_scores()
    scores = {name: v for name, v in stats.items() if name in SCORE_DIRECTIONS}
    # The L or K each score draws; KL and the latent distance draw none.
    samples = {
        name: n_l
        for name in (*scores, "ensemble")
        if name not in ("kl_divergence", "latent_distance")
    }
    samples["log_likelihood"] = n_k
    # The ensemble is of percentiles the service reads off the other scores' calibration, so
    # it is calibrated after them, and its own values join theirs.
    calibrated = calibrate(scores, samples)
    parts = Calibration.from_manifest({"calibration": calibrated}, "calibration")
    scores["ensemble"] = ensemble({n: parts.percentile(n, scores[n]) for n in ENSEMBLE})
    calibrated["scores"] |= calibrate({"ensemble": scores["ensemble"]}, samples)["scores"]
    decision = DECISION_SCORE["bernoulli" if model.bernoulli else "gaussian"]
    scoring: dict[str, Any] = {
        "decision_score": decision if decision in scores else "reconstruction_log_prob",
        "dose": density.to_manifest(),
        "attribution": feature_stats(model, x_val),
        "latent_distance": {
            "k": neighbours.k,
            "n": len(neighbours.reference),
            "source": "posterior means of training rows",
        },
    }
    if background is not None:
        scoring["background"] = {
            "noise": cfg.background_noise,
            "weight_decay": cfg.background_weight_decay,
            "epochs": min(cfg.epochs, cfg.background_epochs),
        }
    return calibrated, scoring, neighbours


def test_auroc(
    model: VAE,
    splits: Splits,
    cfg: TrainConfig,
    background: VAE | None,
    scoring: dict[str, Any],
    neighbours: Neighbours,
    calibrated: dict[str, Any],
    is_anomaly: npt.NDArray[np.bool_],
) -> dict[str, float]:
    """Each score's AUROC on the test split, normal rows against anomalous ones, scored as the
    service scores them (L and K as calibrated, the fitted DoSE density, the latent reference,
    the ensemble's percentiles); empty when the test split lacks either kind."""
    if is_anomaly.all() or not is_anomaly.any():
        return {}
    scores = anomaly_scores(
        model, splits.x_test, samples=cfg.calibration_samples,
        ll_samples=cfg.calibration_ll_samples, seed=cfg.seed, background=background,
        density=Density.from_manifest(scoring["dose"]), neighbours=neighbours,
        calibration=Calibration.from_manifest({"calibration": calibrated}, "calibration"),
    )  # fmt: skip
    return {
        name: round(auroc(signed(name, v)[~is_anomaly], signed(name, v)[is_anomaly]), 4)
        for name, v in scores.items()
        if name in SCORE_DIRECTIONS
    }
