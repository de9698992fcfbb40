"""Train a VAE and export one artifact: `python -m training --data-dir DIR --out PATH`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from training.config import PRESETS, ModelConfig, TrainConfig, apply
from training.data import DataError, default_data_dir, download_mnist, load_data
from training.export import build_manifest, export_artifact
from training.pipeline import TEST_BINARIZATION_SEED, calibration, fit, split, test_metrics
from training.train import TrainingError, rank_and_world

log = logging.getLogger("training")

__all__ = ["TEST_BINARIZATION_SEED", "main"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m training",
        description="Train a VAE on MNIST (IDX) or vector (.npy) data and export the artifact.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=default_data_dir(),
        help="MNIST IDX files, or train.npy + test.npy ($VAE_DATA_DIR, else data/mnist)",
    )
    p.add_argument("--out", type=Path, default=Path("models/vae.pt"), help="artifact path")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="full",
        help="'quick' serves within minutes; 'full' is the measured default",
    )
    p.add_argument("--epochs", type=int, help="training epochs (default: from the preset)")
    p.add_argument(
        "--latent-dim", type=int, help=f"latent size (default: {ModelConfig.latent_dim})"
    )
    p.add_argument(
        "--hidden-dims",
        type=int,
        nargs="+",
        help=f"encoder hidden sizes (default: {' '.join(map(str, ModelConfig.hidden_dims))})",
    )
    p.add_argument(
        "--likelihood",
        choices=["auto", "bernoulli", "gaussian"],
        default="auto",
        help="decoder p(x|z); auto is bernoulli when all data lies in [0, 1]",
    )
    p.add_argument("--batch-size", type=int, help=f"(default: {TrainConfig.batch_size})")
    p.add_argument(
        "--val-size", type=int, help=f"validation images (default: {TrainConfig.val_size})"
    )
    p.add_argument("--lr", type=float, help=f"Adam learning rate (default: {TrainConfig.lr})")
    p.add_argument("--lr-min-factor", type=float, help="cosine-decay the lr to lr * this")
    p.add_argument("--kl-warmup-epochs", type=float, help="ramp the KL weight 0 -> 1 over these")
    p.add_argument("--patience", type=int, help="early-stop after this many epochs w/o progress")
    p.add_argument("--seed", type=int, default=0, help="makes a run reproducible")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--no-dynamic-binarization",
        action="store_true",
        help="train a Bernoulli model on the [0, 1] intensities as they are",
    )
    p.add_argument("--eval-k", type=int, help="importance samples K for the test log-likelihood")
    p.add_argument("--eval-images", type=int, help="test images to evaluate (default: all)")
    p.add_argument("--checkpoint-dir", type=Path, help="(default: OUT's folder/checkpoints)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument(
        "--stop-after",
        type=int,
        help="end this invocation after N epochs (time-boxed or preemptible machines); "
        "--resume goes on from there",
    )
    p.add_argument(
        "--download",
        action="store_true",
        help="fetch the official MNIST files into --data-dir first (md5-checked)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="one batch, one epoch, a tiny evaluation: check the whole path quickly",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name} asked for CUDA, but CUDA is not available here.")
    return torch.device(name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    device = resolve_device(args.device)
    # Under torchrun (WORLD_SIZE > 1) train data-parallel: gloo on CPU, NCCL on GPUs.
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":  # one GPU per rank; "cuda" then means this rank's
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        try:
            return main(argv)
        finally:
            dist.destroy_process_group()
    rank = rank_and_world()[0]
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
    )
    preset = PRESETS[args.preset]
    overrides = {
        "epochs": args.epochs, "val_size": args.val_size, "batch_size": args.batch_size,
        "lr": args.lr, "seed": args.seed, "lr_min_factor": args.lr_min_factor,
        "kl_warmup_epochs": args.kl_warmup_epochs, "patience": args.patience,
        "stop_after": args.stop_after,
        "eval_k": args.eval_k, "eval_images": args.eval_images, "device": str(device),
        "dynamic_binarization": False if args.no_dynamic_binarization else None,
        "preset": args.preset,
    }  # fmt: skip
    if args.dry_run:
        overrides |= {"epochs": 1, "max_batches": 1, "eval_k": 10, "eval_images": 100}
    cfg: TrainConfig = apply(apply(TrainConfig(), preset.train), overrides)

    try:
        if args.download and rank == 0:
            download_mnist(args.data_dir)
        if dist.is_initialized():
            dist.barrier()  # the other ranks read what rank 0 downloaded
        data = load_data(args.data_dir)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    likelihood = args.likelihood
    if likelihood == "auto":
        in_unit = data.x_train.min() >= 0.0 and data.x_train.max() <= 1.0
        likelihood = "bernoulli" if in_unit else "gaussian"
    model_cfg: ModelConfig = apply(
        apply(ModelConfig(), preset.model),
        {
            "input_dim": data.x_train.shape[1],
            "latent_dim": args.latent_dim,
            "hidden_dims": tuple(args.hidden_dims) if args.hidden_dims else None,
            "likelihood": likelihood,
        },
    )
    if likelihood == "bernoulli" and (data.x_train.min() < 0.0 or data.x_train.max() > 1.0):
        print(f"error: {args.data_dir}: a Bernoulli model needs data in [0, 1].", file=sys.stderr)
        return 2
    splits = split(data, cfg, likelihood, device)
    ckpt_dir = args.checkpoint_dir or args.out.parent / "checkpoints"
    log.info("training %s on %s (%d train, %d val) on %s", model_cfg, data.name,
             len(splits.x_train), len(splits.x_val), device)  # fmt: skip
    try:
        model, result = fit(
            splits, model_cfg, cfg, checkpoint_dir=ckpt_dir, resume=args.resume,
            progress=not args.no_progress,
        )  # fmt: skip
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if result.stopped_early:
        log.info("stopped after epoch %d as asked; --resume goes on", result.history[-1]["epoch"])
        return 0
    if rank != 0:
        return 0  # only rank 0 evaluates and writes the artifact

    metrics = test_metrics(model, splits, cfg) | {
        "best_val_elbo": result.best_val_elbo,
        "best_epoch": result.best_epoch,
        "train_seconds": round(result.seconds, 1),
        "history": result.history,
    }
    log.info("test metrics: %s", {k: v for k, v in metrics.items() if k != "history"})
    manifest = build_manifest(
        model,
        input_shape=data.input_shape,
        model_config=model_cfg.to_dict(),
        train_config=cfg.to_dict(),
        dataset={"name": data.name, "train_size": len(splits.x_train),
                 "val_size": len(splits.x_val), "test_size": len(data.x_test),
                 "binarized": splits.binarize},
        metrics=metrics,
        calibration=calibration(model, splits, cfg),
    )  # fmt: skip
    sha = export_artifact(model, manifest, args.out)
    print(
        f"\nartifact     {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)\n"
        f"sha256       {sha}\n"
        f"test ELBO    {metrics['test_elbo']:.2f} nats/image\n"
        f"test log p(x) {metrics['test_log_likelihood']:.2f} nats/image "
        f"(IWAE bound, K={cfg.eval_k}, {metrics['test_images']} test images)\n"
        f"best epoch   {result.best_epoch}/{cfg.epochs} (val ELBO {result.best_val_elbo:.2f})\n"
        f"train time   {result.seconds:.0f}s; wall time {time.perf_counter() - t_start:.0f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
