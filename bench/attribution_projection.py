"""Why does the served attribution miss a third of what a paste changed? A study of the
projection it reads, not a served feature.

    python -m bench.attribution_projection --artifact models/default/vae.pt \\
        --data-dir ../shared/datasets/mnist --out docs/benchmark/attribution-projection.json

It runs on the artifact's own validation digits (training files held out from its fit; the test
set is for the reported figures), grey as callers send them and binarised. White shapes are
pasted as training.benchmark_anomaly pastes them, at two placements each, and each map is
scored by the share of the changed pixels among its most-attributed ones (`changed_found`,
1.0 for a perfect map). The maps:

- formats 3 to 5's: -log p(x_d|z*) at the trimmed projection z* (scoring/artifact.py),
  standardised per pixel on other validation digits; the same at other trims, and at the
  posterior mean;
- the residual |x_d - E[x_d|z*]|, unstandardised;
- that residual after rounds of redrawing: the worst-fitting trim share of x is redrawn from
  the projection, and the redrawn image projected again (a cousin of Dehaene et al.'s
  iterative projection, ICLR 2020), with 25 steps a projection; at trim 0.15, format 6's map;
- Dehaene et al.'s projection itself: gradient steps on the input, each pixel's step weighted
  by its squared residual, and the map how far each pixel moved.

Two facts explain the ranks. `misfit pixels per normal digit`: how many pixels of an unpatched
digit the reconstruction misses by more than 0.8, at z* and at the posterior mean; each is a
pixel that outranks a patch. `changed by under 0.1`: the share of changed pixels the paste
barely changed (a stroke already near white), which a per-pixel map cannot be expected to find.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.model import VAEService
from scoring.artifact import project, redrawn_projection
from training.benchmark_anomaly import changed_found, paste
from training.benchmark_latent import machine, write_result
from training.config import TrainConfig
from training.data import Dataset, binarize_fixed, default_data_dir, load_data
from training.pipeline import TEST_BINARIZATION_SEED, split

SHAPES = {"8x8 patch": (8, 8), "1x12 line": (1, 12), "4x4 patch": (4, 4)}
MISFIT = 0.8  # a reconstruction this far off a pixel ranks it with a pasted one
TINY = 0.1  # a change this small is one no per-pixel map is likely to see
Map = Callable[[torch.Tensor], torch.Tensor]


def nll_at(module: Any, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """-log p(x_d|z) per pixel; x (B, D), z (B, Z) -> (B, D)."""
    nll: torch.Tensor = -module.log_px_given_z_per_feature(x, z.unsqueeze(0))[0]
    return nll


# Dehaene et al. (ICLR 2020) project x itself, not its latent: gradient steps on the input that
# lower the VAE's loss plus an L1 pull back to x, each step weighted per pixel by the squared
# residual, so pixels the model already explains barely move; the map is how far each moved.
# The step, the pull and the count are the best on the 1x12 line of six settings tried in a
# one-off run on the first 100 of these digits (steps 50 to 200, step 0.01 to 2, pull 0.2 to 2),
# with the log-likelihood then written out by hand, its probabilities clamped to [1e-6, 1 - 1e-6].
DEHAENE_STEPS, DEHAENE_STEP, DEHAENE_PULL = 100, 0.5, 0.5


def dehaene_change(module: Any, x0: torch.Tensor) -> torch.Tensor:
    """|x_T - x| after DEHAENE_STEPS masked gradient steps on x; (B, D) -> (B, D)."""
    x = x0.clone()
    for _ in range(DEHAENE_STEPS):
        with torch.enable_grad():
            x.requires_grad_(True)
            mean = module.encode(x)[0]
            vae_loss = nll_at(module, x, mean).sum(1) + module.kl_divergence(x)
            loss = (vae_loss + DEHAENE_PULL * (x - x0).abs().sum(1)).sum()
            (grad,) = torch.autograd.grad(loss, [x])
        with torch.no_grad():
            residual = x - module.decode(mean)
            x = (x.detach() - DEHAENE_STEP * grad * residual.pow(2)).clamp(0, 1)
    return (x - x0).abs()


def maps(module: Any) -> dict[str, tuple[Map, bool]]:
    """Each map by name, and whether it is standardised per pixel on normal digits."""

    def nll(trim: float) -> Map:
        return lambda x: nll_at(module, x, project(module, x, trim)[0])

    def residual(rounds: int, trim: float) -> Map:
        return lambda x: (x - module.decode(redrawn_projection(module, x, rounds, trim))).abs()

    def at_z(x: torch.Tensor) -> torch.Tensor:
        residual: torch.Tensor = (x - module.decode(project(module, x, 0.2)[0])).abs()
        return residual

    return {
        "formats 3 to 5: -log p at z* (trim 0.2), standardised": (nll(0.2), True),
        "-log p at z* (trim 0.1), standardised": (nll(0.1), True),
        "-log p at z* (trim 0.3), standardised": (nll(0.3), True),
        "-log p at the posterior mean, standardised": (
            lambda x: nll_at(module, x, module.encode(x)[0]),
            True,
        ),
        "residual at z* (trim 0.2)": (at_z, False),
        "residual after 3 redrawing rounds (trim 0.2)": (residual(3, 0.2), False),
        "format 6: residual after 3 redrawing rounds (trim 0.15)": (residual(3, 0.15), False),
        "change after Dehaene et al.'s projection of the input": (
            lambda x: dehaene_change(module, x),
            False,
        ),
    }


def validation_digits(vae: VAEService, data: Dataset) -> np.ndarray:
    """The artifact's validation split of the data, as its trainer drew it, grey as served."""
    cfg = TrainConfig.from_dict(vae.manifest.get("training", {}))
    return split(data, cfg, vae.likelihood, torch.device("cpu")).val_served.numpy()


def study(module: Any, x: np.ndarray, reference: np.ndarray, seed: int) -> dict[str, Any]:
    """Each map's changed_found per shape on the digits x, standardised on `reference`."""
    xt, ref = torch.from_numpy(x), torch.from_numpy(reference)
    found: dict[str, dict[str, float]] = {}
    for name, (attribute, standardised) in maps(module).items():
        mean, scale = torch.zeros(x.shape[1]), torch.ones(x.shape[1])
        if standardised:
            normal = attribute(ref)
            mean, scale = normal.mean(0), normal.std(0).clamp_min(0.05)  # as the service clamps
        for shape, (height, width) in SHAPES.items():
            shares = []
            for placement in (seed, seed + 1):
                patched, _ = paste(x, height, width, placement)
                att = (attribute(torch.from_numpy(patched)) - mean) / scale
                shares.append(changed_found(np.argsort(-att.numpy(), axis=1), patched != x))
            found.setdefault(name, {})[shape] = round(float(np.mean(shares)), 4)
    misfit = {
        "at z* (trim 0.2)": project(module, xt)[0],
        "at the posterior mean": module.encode(xt)[0],
    }
    tiny = {}
    for shape, (height, width) in SHAPES.items():
        patched, _ = paste(x, height, width, seed)
        change = np.abs(patched - x)[patched != x]
        tiny[shape] = round(float((change < TINY).mean()), 4)
    return {
        "changed_found": found,
        "misfit_pixels_per_normal_digit": {
            where: round(float(((xt - module.decode(z)).abs() > MISFIT).sum(1).float().mean()), 2)
            for where, z in misfit.items()
        },
        "changed_by_under_0.1": tiny,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m bench.attribution_projection", description=__doc__)
    p.add_argument("--artifact", type=Path, default=Path("models/default/vae.pt"))
    p.add_argument("--data-dir", type=Path, default=default_data_dir())
    p.add_argument("--images", type=int, default=200, help="validation digits to paste in")
    p.add_argument("--reference", type=int, default=1000, help="other ones to standardise on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("build/attribution-projection.json"))
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    vae = VAEService.load(args.artifact, device="cpu")
    if vae.likelihood != "bernoulli":
        raise SystemExit(f"{args.artifact}: the study pastes white shapes in [0, 1] images")
    val = validation_digits(vae, load_data(args.data_dir))
    x, reference = val[: args.images], val[args.images : args.images + args.reference]
    with torch.no_grad():
        kinds = {
            "grey": study(vae.module, x, reference, args.seed),
            "binarised": study(
                vae.module,
                binarize_fixed(x, TEST_BINARIZATION_SEED),
                binarize_fixed(reference, TEST_BINARIZATION_SEED),
                args.seed,
            ),
        }
    result = {
        "command": " ".join(["python -m bench.attribution_projection", *argv]),
        "artifact": str(args.artifact),
        "images": len(x),
        "reference": len(reference),
        "machine": machine(),
        "inputs": kinds,
    }
    write_result(args.out, result)
    print(json.dumps(kinds, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
