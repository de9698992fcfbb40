"""The artifact's contract, as both sides read it: the formats, the files in the archive beside
the TorchScript module, the attribution's projection (the trainer calibrates it, the service
computes it), and the error a bad artifact raises. training/export.py writes what app/model.py
reads."""

from __future__ import annotations

from typing import Any

import torch


class ModelLoadError(Exception):
    """The artifact cannot be served; the message names the file and the problem."""


# 1: KL, the reconstruction probability and the log-likelihood. 2 adds input complexity, DoSE,
# the likelihood ratio (a background model in BACKGROUND) and the per-feature attribution.
# 3 adds the latent distance (training means in LATENT_REFERENCE) and the ensemble. 4 calibrates
# by rank on the sorted validation values (scoring/calibration.py), on the data as callers send it,
# and adds RaPP (its projection in GAP_PROJECTION) to an ensemble its manifest describes. 5 adds
# the latent polar distance (the training means' log lengths in LATENT_LENGTHS) and takes it and
# the input complexity into the ensemble. 6 draws an image model's attribution as the residual
# from x redrawn (REDRAWN_RESIDUAL, below). 7 gives a table model the input distance (its
# training rows in INPUT_REFERENCE) and decides with the ensemble of it and DoSE. 8 keeps the
# ensemble's validation rows, for its percentile as a full conformal p-value. 9 gives an image
# model the feature distance (the encoder's first-layer features of its training rows, in
# FEATURE_REFERENCE; the module's `features` method) and takes it into the ensemble.
SUPPORTED_FORMAT_VERSIONS = {1, 2, 3, 4, 5, 6, 7, 8, 9}
REQUIRED_METHODS = (
    "encode",
    "decode",
    "kl_divergence",
    "reconstruction_log_prob",
    "log_likelihood",
)
ATTRIBUTION_METHOD = "feature_log_prob"  # format 2
# The archive's files beside the module; training/export.py writes them under these names.
MANIFEST = "manifest.json"
BACKGROUND = "background.pt"
LATENT_REFERENCE = "latent_reference.npy"  # format 3
GAP_PROJECTION = "gap_projection.npz"  # format 4: RaPP's
LATENT_LENGTHS = "latent_lengths.npy"  # format 5: the polar distance's
INPUT_REFERENCE = "input_reference.npz"  # format 7: the input distance's, tables only
FEATURE_REFERENCE = "feature_reference.npz"  # format 9: the feature distance's, images only
REQUIRED_KEYS = ("format_version", "input_shape", "input_dim", "latent_dim", "likelihood")


# The attribution of format 3 reads x against its projection on what the model knows as normal
# (Dehaene et al., ICLR 2020): the latent z* that best explains all but the worst-fitting
# PROJECTION_TRIM share of x's features, with the prior, after PROJECTION_STEPS Adam steps of
# PROJECTION_LR from the posterior mean. Trimmed, the anomalous features cannot pull z* toward
# themselves, as they pull the encoder's mean. On 100 binarised test digits with a white 8x8
# patch (docs/anomaly.md), 0.2 put 65% of the 64 most-attributed pixels in the patch, 0.1 54%;
# the posterior samples' average, format 2's, 46%.
PROJECTION_STEPS = 50
PROJECTION_TRIM = 0.2
PROJECTION_LR = 0.05


def projected_feature_nll(module: Any, x: torch.Tensor) -> torch.Tensor:
    """-log p(x_d|z*) per feature at x's trimmed projection z*; (B, D) -> (B, D).

    `module` is a VAE, scripted or not: its `encode` and `feature_log_prob` are all it needs,
    and gradients flow to z* alone (torch.autograd.grad, so no weight gathers a .grad and
    threads may share the module)."""
    z, mean, std = project(module, x)
    with torch.no_grad():
        nll: torch.Tensor = -module.feature_log_prob(x, ((z - mean) / std).unsqueeze(0))
        return nll


def project(
    module: Any, x: torch.Tensor, trim: float = PROJECTION_TRIM, steps: int = PROJECTION_STEPS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x's projection z* (B, Z), from its posterior's mean and spread, which it also returns:
    the latent that best explains all but the worst-fitting `trim` share of x's features."""
    with torch.no_grad():
        mean, logvar = module.encode(x)
        std = torch.exp(0.5 * logvar)
    keep = max(1, round(x.shape[1] * (1.0 - trim)))
    z = mean.clone()
    m1, m2 = torch.zeros_like(z), torch.zeros_like(z)  # Adam's moments, written out
    for t in range(1, steps + 1):
        with torch.enable_grad():
            z.requires_grad_(True)
            log_p = module.feature_log_prob(x, ((z - mean) / std).unsqueeze(0))
            fit = torch.topk(log_p, keep, dim=1).values.sum(1)
            loss = (0.5 * (z**2).sum(1) - fit).sum()
            (grad,) = torch.autograd.grad(loss, [z])
        with torch.no_grad():
            z = z.detach()
            m1.mul_(0.9).add_(grad, alpha=0.1)
            m2.mul_(0.999).addcmul_(grad, grad, value=0.001)
            step = (m1 / (1 - 0.9**t)) / ((m2 / (1 - 0.999**t)).sqrt() + 1e-8)
            z = z - PROJECTION_LR * step
    return z, mean, std


# Format 6 reads an image model's pixels against x redrawn: REDRAW_ROUNDS times, the worst-fitting
# REDRAW_TRIM share of x's pixels is redrawn from x's projection, and the redrawn image projected
# in turn; the map is |x_d - E[x_d|z*]| at the last projection. The trim that keeps a patch from
# pulling z* toward itself also lets z* drop a normal digit's own strokes, which then outrank the
# patch; redrawn, the image lets z* fall back on the digit. On the shipped model's validation
# digits (bench.attribution_projection, docs/benchmarks/attribution.md) it found 2 to 9 points
# more of what a paste changed than format 3's map, for each of three shapes, grey and binarised.
REDRAWN_RESIDUAL = "redrawn residual"  # the manifest's attribution method
REDRAW_ROUNDS = 3
REDRAW_TRIM = 0.15
# Half format 3's steps a projection: on the same digits 25 found what 50 did, to half a point
# (a one-off run), at half the cost.
REDRAW_STEPS = 25


def redrawn_projection(
    module: Any,
    x: torch.Tensor,
    rounds: int = REDRAW_ROUNDS,
    trim: float = REDRAW_TRIM,
    steps: int = REDRAW_STEPS,
) -> torch.Tensor:
    """z* of x after `rounds` rounds that redraw x's worst-fitting `trim` share of features from
    the last projection and project the redrawn x; (B, D) -> (B, Z)."""
    with torch.no_grad():
        mean, logvar = module.encode(x)
        std = torch.exp(0.5 * logvar)
    redraw = max(1, round(x.shape[1] * trim))  # a feature at least, however few there are
    filled = x
    for _ in range(rounds):
        z = project(module, filled, trim, steps)[0]
        with torch.no_grad():
            nll = -module.feature_log_prob(x, ((z - mean) / std).unsqueeze(0))
            worst = torch.topk(nll, redraw, dim=1).values[:, -1:]
            filled = torch.where(nll >= worst, module.decode(z), x)
    return project(module, filled, trim, steps)[0]


def redrawn_residual(module: Any, x: torch.Tensor) -> torch.Tensor:
    """|x_d - E[x_d|z*]| per feature at x's redrawn projection; (B, D) -> (B, D)."""
    z = redrawn_projection(module, x)
    with torch.no_grad():
        residual: torch.Tensor = (x - module.decode(z)).abs()
        return residual
