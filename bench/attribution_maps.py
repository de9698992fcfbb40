"""Does a spatial filter help the attribution find an anomaly? A study, not a served feature.

    python -m bench.attribution_maps --artifact models/default/vae.pt \\
        --data-dir ../shared/datasets/mnist --out docs/benchmark/attribution-maps.json

White rectangles of several shapes are pasted in the first 100 binarised test digits, as
training.benchmark_anomaly pastes its 8x8 patch (the same places for the same shape). For each
shape, the table gives the share of the k = h * w most-attributed pixels that lie in it:

- for the map the service returns (per pixel: -log p(x_d|z*), standardised);
- for a map that ranked exactly the changed pixels first (`per_pixel_ceiling`): where a shape
  lies over a white stroke its pixels do not change, and no per-pixel evidence can find them;
- for spatial filters of the same -log p(x_d|z*): a Gaussian blur of it capped at 2 nats; that
  blur plus half the capped map's 3x3 grey-level opening (which keeps only what is 3 pixels
  wide or more); and each pixel's largest k x k window mean of it capped at 1 nat (ties broken
  by its own value). They fill the unchanged pixels from their neighbours, and blur thin
  anomalies away.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from app.model import VAEService
from training.benchmark_anomaly import paste, per_pixel_ceiling
from training.benchmark_latent import machine, write_result
from training.data import binarize_fixed, default_data_dir, load_data
from training.pipeline import TEST_BINARIZATION_SEED

SIDE = 28
SHAPES = {
    "4x4": (4, 4),
    "8x8": (8, 8),
    "12x12": (12, 12),
    "1x12 line": (1, 12),
    "2x10 bar": (2, 10),
}


def gaussian(a: np.ndarray, sigma: float) -> np.ndarray:
    """Each (SIDE * SIDE,) map blurred with a Gaussian of `sigma` pixels, edges reflected."""
    r = int(np.ceil(3 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    im = a.reshape(-1, SIDE, SIDE)
    for axis in (1, 2):
        pad = [(0, 0), (0, 0), (0, 0)]
        pad[axis] = (r, r)
        p = np.pad(im, pad, mode="reflect")
        im = np.zeros_like(im)
        for i, w in enumerate(kernel):
            im += w * np.take(p, range(i, i + SIDE), axis=axis)
    return im.reshape(len(a), -1)


def window_max_mean(a: np.ndarray, k: int) -> np.ndarray:
    """Each pixel's largest mean over the k x k windows inside the image that contain it."""
    im = a.reshape(-1, SIDE, SIDE)
    n = SIDE - k + 1
    means = np.mean([im[:, i : i + n, j : j + n] for i in range(k) for j in range(k)], axis=0)
    out = np.full(im.shape, -np.inf)
    for i in range(k):
        for j in range(k):
            out[:, i : i + n, j : j + n] = np.maximum(out[:, i : i + n, j : j + n], means)
    return out.reshape(len(a), -1)


def opening(a: np.ndarray) -> np.ndarray:
    """Each map's 3x3 grey-level opening: the 3x3 minimum, then the 3x3 maximum of that."""

    def extreme(im: np.ndarray, pad: str, reduce: Any) -> np.ndarray:
        p = np.pad(im, ((0, 0), (1, 1), (1, 1)), mode=pad)  # type: ignore[call-overload]
        shifted = [p[:, i : i + SIDE, j : j + SIDE] for i in range(3) for j in range(3)]
        out: np.ndarray = reduce(shifted, axis=0)
        return out

    im = a.reshape(-1, SIDE, SIDE)
    return extreme(extreme(im, "edge", np.min), "constant", np.max).reshape(len(a), -1)


def in_shape(att: np.ndarray, mask: np.ndarray) -> float:
    top = np.argsort(-att, axis=1, kind="stable")[:, : int(mask[0].sum())]
    return float(np.take_along_axis(mask, top, axis=1).mean())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m bench.attribution_maps", description=__doc__)
    p.add_argument("--artifact", type=Path, default=Path("models/default/vae.pt"))
    p.add_argument("--data-dir", type=Path, default=default_data_dir())
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("build/attribution-maps.json"))
    args = p.parse_args(argv)
    vae = VAEService.load(args.artifact, device="cpu")
    if vae.attribution_stats is None:  # format 6's image map is a residual, not standardised
        raise SystemExit(f"{args.artifact}: the study filters formats 2 to 5's standardised map")
    mean, scale = vae.attribution_stats
    x = binarize_fixed(load_data(args.data_dir).x_test[: args.images], TEST_BINARIZATION_SEED)
    rows: dict[str, dict[str, float]] = {}
    for shape, (height, width) in SHAPES.items():
        patched, mask = paste(x, height, width, args.seed)
        served = vae.anomaly_scores(patched.astype(np.float32), 16, args.seed, attribution=True)
        z = served["attribution"]
        nll = z * scale + mean  # -log p(x_d|z*), unstandardised
        maps = {
            "served map (per pixel)": z,
            **{f"Gaussian blur, sigma {s} px": gaussian(np.minimum(nll, 2), s) for s in (1, 2, 3)},
            "blur (sigma 3 px) + half the 3x3 opening": gaussian(np.minimum(nll, 2), 3)
            + 0.5 * opening(np.minimum(nll, 2)),
            **{
                f"largest {k}x{k} window mean": window_max_mean(np.minimum(nll, 1), k) + 1e-3 * nll
                for k in (3, 4, 6)
            },
        }
        for name, att in maps.items():
            rows.setdefault(name, {})[shape] = in_shape(att, mask)
        rows.setdefault("per-pixel ceiling", {})[shape] = per_pixel_ceiling(x, patched, mask)
    result = {"command": " ".join(["python -m bench.attribution_maps", *argv]),
              "artifact": str(args.artifact), "images": args.images, "machine": machine(),
              "in_shape": rows}  # fmt: skip
    write_result(args.out, result)
    print("| map | " + " | ".join(SHAPES) + " |\n| --- |" + " --- |" * len(SHAPES))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{100 * row[s]:.1f}%" for s in SHAPES) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
