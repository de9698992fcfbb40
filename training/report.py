"""Render a trained artifact as figures and a metrics file, for people rather than the service.

`python -m training.report --artifact models/vae.pt --data-dir DIR --out DIR` loads the artifact
as the service does, scores part of the test set against two kinds of anomaly (uniform noise and
inverted inputs) and writes metrics.json, curves.png, latents.png, scores.png and roc.png; image
models also get samples.png and reconstructions.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from app.model import VAEService
from training.__main__ import TEST_BINARIZATION_SEED
from training.data import DataError, binarize_fixed, default_data_dir, load_data
from training.evaluate import auroc

Array = npt.NDArray[np.float64]
Roc = tuple[Array, Array, float]  # false positive rates, true positive rates, AUROC

BATCH = 250  # (K, BATCH, D) decoder outputs at K = 100 stay near 80 MB for MNIST
ANOMALIES = {"noise": "uniform noise", "inverted": "inverted"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m training.report",
        description="Write figures and metrics.json for a trained artifact.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--artifact", type=Path, default=Path("models/vae.pt"), help="artifact path")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=default_data_dir(),
        help="MNIST IDX files, or train.npy + test.npy; $VAE_DATA_DIR sets the default",
    )
    p.add_argument("--out", type=Path, default=Path("runs/report"), help="folder for the report")
    p.add_argument(
        "--threshold", type=float, default=0.99, help="calibration percentile that flags anomalies"
    )
    p.add_argument(
        "--samples", type=int, help="L or K for every sampled score; None: as each was calibrated"
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the noise, eps and prior samples")
    p.add_argument("--images", type=int, default=2000, help="test inputs to score and plot")
    args = p.parse_args(argv)
    if not 0.0 < args.threshold < 1.0:
        p.error("--threshold must lie strictly between 0 and 1")
    if (args.samples is not None and args.samples < 1) or args.images < 2:
        p.error("--samples must be at least 1 and --images at least 2")
    return args


def sample_counts(calibration: dict[str, Any], override: int | None) -> dict[str, int]:
    """The L or K to score with, per score: 0 for the closed-form KL, which draws none."""
    counts: dict[str, int] = {}
    for name, score in calibration["scores"].items():
        if name == "kl_divergence" or score.get("samples") == 0:  # KL, the latent distance
            counts[name] = 0
        elif override is not None:
            counts[name] = override
        else:
            # As many as the calibration drew, so that its thresholds apply; older manifests
            # keep one count for all scores.
            counts[name] = int(score.get("samples") or calibration["samples"])
    return counts


def score_all(vae: VAEService, x: Array, samples: dict[str, int], seed: int) -> dict[str, Array]:
    """Every calibrated score of every row of x, computed by the service's own code, with the
    L of the reconstruction probability (which the format-2 scores share) and the K of the
    log-likelihood from `samples`."""
    n_l = samples.get("reconstruction_log_prob", 16)
    n_k = samples.get("log_likelihood", 0)
    ratio = "likelihood_ratio" in samples
    parts = [
        vae.anomaly_scores(x[i : i + BATCH].astype(np.float32), n_l, seed, n_k, ratio=ratio)
        for i in range(0, len(x), BATCH)
    ]
    return {name: np.concatenate([p[name] for p in parts]).astype(np.float64) for name in samples}


@torch.no_grad()
def encode_means(module: torch.jit.ScriptModule, x: Array) -> Array:
    xs = torch.from_numpy(x).float().split(BATCH)
    return np.concatenate([module.encode(xb)[0].double().numpy() for xb in xs])


def make_anomalies(x: Array, input_range: list[float | None], seed: int) -> dict[str, Array]:
    """Uniform noise over the input range, and x mirrored in it (1 - x for inputs in [0, 1])."""
    lo, hi = input_range
    # Unbounded inputs (null in the manifest): use each feature's observed range instead.
    low = x.min(0) if lo is None else np.full(x.shape[1], lo)
    high = x.max(0) if hi is None else np.full(x.shape[1], hi)
    noise = np.random.default_rng(seed).uniform(low, high, size=x.shape)
    return {"noise": noise, "inverted": low + high - x}


def roc_curve(normal: Array, anomalous: Array) -> Roc:
    """The ROC curve and its area when higher scores flag anomalies."""
    scores = np.concatenate([normal, anomalous])
    is_anomaly = np.r_[np.zeros(len(normal)), np.ones(len(anomalous))]
    order = np.argsort(-scores, kind="mergesort")
    scores, is_anomaly = scores[order], is_anomaly[order]
    # One point per distinct score, so tied scores draw a diagonal (their AUROC counts one half).
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tpr = np.r_[0.0, np.cumsum(is_anomaly)[last] / len(anomalous)]
    fpr = np.r_[0.0, np.cumsum(1 - is_anomaly)[last] / len(normal)]
    return fpr, tpr, auroc(normal, anomalous)


def tile(images: Array, rows: int) -> Array:
    """Images (N, H, W) as one mosaic of `rows` rows, with 1-pixel white gaps between them."""
    n, h, w = images.shape
    cols = -(-n // rows)
    padded = np.ones((rows * cols, h + 1, w + 1))
    padded[:n, :h, :w] = images
    mosaic = padded.reshape(rows, cols, h + 1, w + 1).transpose(0, 2, 1, 3)
    return mosaic.reshape(rows * (h + 1), cols * (w + 1))[:-1, :-1]


def plot_curves(history: list[dict[str, float]]) -> Figure:
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    if history:
        epochs = [row["epoch"] for row in history]
        ax.plot(epochs, [row["train_elbo"] for row in history], "o-", label="train (epoch mean)")
        ax.plot(epochs, [row["val_elbo"] for row in history], "s-", label="validation")
        ax.legend()
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        ax.text(0.5, 0.5, "no per-epoch history in the manifest", ha="center", va="center")
        ax.set(xticks=[], yticks=[])
    ax.set(title="ELBO per epoch", xlabel="epoch", ylabel="ELBO (nats per input, higher is better)")
    ax.grid(alpha=0.3)
    return fig


def plot_images(panels: dict[str, Array], rows: int) -> Figure:
    """Each panel's images (N, H, W) in [0, 1] as a greyscale mosaic under its title."""
    cols = -(-len(next(iter(panels.values()))) // rows)
    fig = Figure(figsize=(6, (6 * rows / cols + 0.35) * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (title, images) in zip(axes, panels.items(), strict=True):
        ax.imshow(tile(images, rows), cmap="gray", vmin=0.0, vmax=1.0)
        ax.set_title(title)
        ax.set_axis_off()
    return fig


def plot_latents(means: Array, labels: npt.NDArray[np.int64] | None) -> Figure:
    z_dim = means.shape[1]
    if z_dim > 2:
        centred = means - means.mean(0)
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        xy = centred @ vt[:2].T
        share = s**2 / (s**2).sum()
        xlabel, ylabel = (f"PC {i + 1} ({share[i]:.0%} of variance)" for i in range(2))
        title = f"Test latent means: PCA of {z_dim} dimensions"
    else:
        xy = np.pad(means, ((0, 0), (0, 2 - z_dim)))  # a 1-D latent goes on the x axis
        xlabel, ylabel = "$z_1$", "$z_2$" if z_dim == 2 else ""
        title = "Test latent means"
    fig = Figure(figsize=(6.5, 5.5), layout="constrained")
    ax = fig.add_subplot()
    if labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=4, alpha=0.6)
    else:
        for label in np.unique(labels):
            at = labels == label
            ax.scatter(xy[at, 0], xy[at, 1], s=4, alpha=0.6, label=str(label))
        ax.legend(title="label", loc="center left", bbox_to_anchor=(1, 0.5), markerscale=3)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    return fig


def panels(n: int, size: tuple[float, float], per_row: int = 3) -> tuple[Figure, list[Any]]:
    """A figure of n panels, at most `per_row` a row; unused ones hidden."""
    rows, cols = -(-n // per_row), min(n, per_row)
    fig = Figure(figsize=(size[0] * cols, size[1] * rows), layout="constrained")
    axes = list(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def plot_scores(
    scores: dict[str, dict[str, Array]],
    thresholds: dict[str, float | None],
    directions: dict[str, str],
    p: float,
) -> Figure:
    fig, axes = panels(len(scores), (5.5, 4.2))
    for ax, (name, by_kind) in zip(axes, scores.items(), strict=True):
        bins = np.histogram_bin_edges(np.concatenate(list(by_kind.values())), bins=60)
        for kind, values in by_kind.items():
            ax.hist(values, bins=bins, alpha=0.5, label=ANOMALIES.get(kind, "test set (normal)"))
        if (at := thresholds[name]) is not None:
            ax.axvline(at, color="black", ls="--", label=f"threshold ({p:.1%} calibration level)")
        ax.set(title=f"{name} ({directions[name]} is anomalous)", xlabel="score", ylabel="inputs")
        ax.legend(fontsize="small")
    return fig


def plot_roc(rocs: dict[str, dict[str, Roc]]) -> Figure:
    fig, axes = panels(len(rocs), (4.6, 4.4))
    for ax, (name, by_kind) in zip(axes, rocs.items(), strict=True):
        for kind, (fpr, tpr, area) in by_kind.items():
            ax.plot(fpr, tpr, label=f"{ANOMALIES[kind]} (AUROC {area:.3f})")
        ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
        ax.set(title=name, xlabel="false positive rate (test set)", ylabel="true positive rate")
        ax.legend(loc="lower right", fontsize="small")
    return fig


@torch.no_grad()
def plot_decoded(
    module: torch.jit.ScriptModule, x: Array, manifest: dict[str, Any], seed: int
) -> dict[str, Figure]:
    """Prior samples and reconstructions, shown as the decoder's pixel probabilities."""
    shape = manifest["input_shape"]
    g = torch.Generator().manual_seed(seed)
    prior = module.decode(torch.randn(64, manifest["latent_dim"], generator=g))
    originals = torch.from_numpy(x[:16]).float()
    recon = module.decode(module.encode(originals)[0])
    binarized = " (binarised)" if manifest["dataset"].get("binarized") else ""
    return {
        "samples.png": plot_images(
            {"decode(z), z ~ N(0, I)": prior.double().numpy().reshape(-1, *shape)}, rows=8
        ),
        "reconstructions.png": plot_images(
            {
                f"test inputs{binarized}": x[:16].reshape(-1, *shape),
                "reconstructions: decode(encoder mean)": recon.double().numpy().reshape(-1, *shape),
            },
            rows=2,
        ),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        data = load_data(args.data_dir)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.artifact.is_file():
        print(f"error: {args.artifact}: no such artifact; train one first.", file=sys.stderr)
        return 2
    vae = VAEService.load(args.artifact, device="cpu")
    module, manifest = vae.module, vae.manifest
    if data.x_test.shape[1] != manifest["input_dim"]:
        print(
            f"error: {args.data_dir}: rows of {data.x_test.shape[1]} values do not match the "
            f"{manifest['input_dim']} inputs of {args.artifact}.",
            file=sys.stderr,
        )
        return 2
    x: Array = data.x_test[: args.images].astype(np.float64)
    labels = None if data.y_test is None else data.y_test[: args.images]
    if manifest["dataset"].get("binarized"):
        x = binarize_fixed(x, TEST_BINARIZATION_SEED).astype(np.float64)

    calibration = manifest["calibration"]
    names = list(calibration["scores"])
    directions = {name: calibration["scores"][name]["anomalous_when"] for name in names}
    inputs = {"normal": x, **make_anomalies(x, manifest["input_range"], args.seed)}
    samples = sample_counts(calibration, args.samples)
    by_input = {kind: score_all(vae, xs, samples, args.seed) for kind, xs in inputs.items()}
    scores = {name: {kind: by_input[kind][name] for kind in inputs} for name in names}
    # Where each score's values start to be flagged at the threshold (None: no finite value).
    q = vae.calibration.effective_threshold(args.threshold)
    thresholds = {name: vae.calibration.scores[name].threshold(q) for name in names}
    rocs: dict[str, dict[str, Roc]] = {}
    for name in names:
        sign = 1.0 if directions[name] == "higher" else -1.0
        normal = sign * scores[name]["normal"]
        rocs[name] = {kind: roc_curve(normal, sign * scores[name][kind]) for kind in ANOMALIES}

    figures = {
        "curves.png": plot_curves(manifest["metrics"].get("history", [])),
        "latents.png": plot_latents(encode_means(module, x), labels),
        "scores.png": plot_scores(scores, thresholds, directions, args.threshold),
        "roc.png": plot_roc(rocs),
    }
    if len(manifest["input_shape"]) == 2:
        figures |= plot_decoded(module, x, manifest, args.seed)

    args.out.mkdir(parents=True, exist_ok=True)
    for file_name, fig in figures.items():
        fig.savefig(args.out / file_name, dpi=110)
    metrics = {
        **manifest["metrics"],
        "auroc": {name: {kind: roc[2] for kind, roc in rocs[name].items()} for name in names},
        "thresholds": {"percentile": args.threshold, "scores": thresholds},
        "report": {"images": len(x), "samples": samples, "seed": args.seed},
        "figures": sorted(figures),
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    print(f"wrote metrics.json and {', '.join(sorted(figures))} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
