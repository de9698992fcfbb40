"""Train a VAE and export one artifact: `python -m training --data-dir DIR --out PATH`."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
import typing
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from training.config import (
    PRESETS,
    SHORT_RUN_EVALUATION,
    Likelihood,
    ModelConfig,
    TrainConfig,
    is_full_run,
)
from training.data import DataError, Dataset, default_data_dir, download_mnist, load_data
from training.export import build_manifest, export_artifact
from training.model import VAE
from training.pipeline import (
    TEST_BINARIZATION_SEED,
    calibration,
    fit,
    fit_background,
    split,
    test_auroc,
    test_metrics,
)
from training.tables import TableOptions, find_table, load_table
from training.train import TrainingError, rank_and_world

log = logging.getLogger("training")

__all__ = ["TEST_BINARIZATION_SEED", "main"]

Config = ModelConfig | TrainConfig


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m training",
        description="Train a VAE on MNIST (IDX), vectors (.npy) or a table (CSV, Parquet) and "
        "export the artifact.",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=default_data_dir(),
        help="MNIST IDX files, train.npy + test.npy, or train.csv|.parquet with an optional "
        "test.csv|.parquet; $VAE_DATA_DIR sets the default (default: %(default)s)",
    )
    p.add_argument("--data", type=Path,
                   help="one CSV or Parquet file instead of --data-dir; the test rows are a "
                   "seeded --test-fraction of it")  # fmt: skip
    tables = p.add_argument_group("tables (CSV, Parquet; the header names the features)")
    tables.add_argument("--label-column", help="a column kept out of the features")
    tables.add_argument("--normal-value",
                        help="train on the rows whose label is this only; the others are "
                        "held out as anomalies for evaluation")  # fmt: skip
    tables.add_argument("--impute", choices=["median"],
                        help="fill missing values with the training rows' median "
                        "(default: refuse them)")  # fmt: skip
    tables.add_argument("--test-fraction", type=float, default=TableOptions.test_fraction,
                        help="share of the (normal) rows held out for testing when there is no "
                        "test file (default: %(default)s)")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("models/vae.pt"),
                   help="artifact path (default: %(default)s)")  # fmt: skip
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="full",
        help="'full' is the settings' defaults, measured; 'quick' serves within minutes "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--likelihood",
        choices=["auto", "bernoulli", "gaussian"],
        default="auto",
        help="decoder p(x|z); auto is bernoulli when all data lies in [0, 1] "
        "(default: %(default)s)",
    )
    # The same variable the service reads, so one setting picks the device for both.
    p.add_argument("--device", default=os.environ.get("VAE_DEVICE", "auto"),
                   help="auto, cpu, cuda or cuda:N (default: $VAE_DEVICE, else auto)")  # fmt: skip
    p.add_argument("--checkpoint-dir", type=Path,
                   help="for last.pt and best.pt (default: OUT's folder/checkpoints)")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
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
    add_config_flags(p.add_argument_group("model settings (ModelConfig)"), ModelConfig)
    add_config_flags(p.add_argument_group("training settings (TrainConfig)"), TrainConfig)
    return p.parse_args(argv)


def add_config_flags(group: argparse._ArgumentGroup, cls: type[Config]) -> None:
    """One flag per field of cls made with config.option: its name, type, help and default
    come from the field. Unset flags stay out of the namespace (SUPPRESS), so that only the
    flags given override the preset."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        kind = hints[f.name]
        if type(None) in typing.get_args(kind):  # X | None takes an X
            kind = next(t for t in typing.get_args(kind) if t is not type(None))
        flag = "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"default": argparse.SUPPRESS}
        kw["help"] = f"{f.metadata['help']} ({_defaults(cls, f.name, f.default)})"
        if kind is bool:  # --dynamic-binarization / --no-dynamic-binarization
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(kind) is tuple:  # --hidden-dims 512 256
            group.add_argument(flag, type=typing.get_args(kind)[0], nargs="+", **kw)
        else:
            group.add_argument(flag, type=kind, **kw)


def _defaults(cls: type[Config], name: str, default: object) -> str:
    """'default: 200; quick: 15': the field's default and where a preset or rule changes it."""
    parts = [f"default: {_show(default)}"]
    for preset_name, preset in sorted(PRESETS.items()):
        values = preset.model if cls is ModelConfig else preset.train
        if name in values:
            parts.append(f"{preset_name}: {_show(values[name])}")
    if cls is TrainConfig and name in SHORT_RUN_EVALUATION:
        parts.append(
            f"{_show(SHORT_RUN_EVALUATION[name])} for a run under {TrainConfig.epochs} epochs "
            "or not on MNIST"
        )
    return "; ".join(parts)


def _show(value: object) -> str:
    """A value as one would type it on the command line: 512 256 for (512, 256)."""
    if value is None:
        return "unset"
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return str(value)


def given(args: argparse.Namespace, cls: type[Config]) -> dict[str, Any]:
    """The settings of cls that the command line set."""
    names = {f.name for f in dataclasses.fields(cls) if "help" in f.metadata}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if k in names}


def train_config(args: argparse.Namespace, dataset: str, device: str) -> TrainConfig:
    """The defaults, then the preset, then the flags given; a run that is not the full one
    is evaluated by SHORT_RUN_EVALUATION where neither preset nor flags said otherwise."""
    chosen = PRESETS[args.preset].train | given(args, TrainConfig)
    cfg = dataclasses.replace(TrainConfig(), **chosen, device=device, preset=args.preset)
    if not is_full_run(cfg, dataset):
        short = {k: v for k, v in SHORT_RUN_EVALUATION.items() if k not in chosen}
        cfg = dataclasses.replace(cfg, **short)
    if args.dry_run:
        cfg = dataclasses.replace(cfg, epochs=1, max_batches=1, eval_k=10, eval_images=100)
    return cfg


def model_config(args: argparse.Namespace, input_dim: int, likelihood: Likelihood) -> ModelConfig:
    chosen = PRESETS[args.preset].model | given(args, ModelConfig)
    return dataclasses.replace(ModelConfig(), **chosen, input_dim=input_dim, likelihood=likelihood)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name} asked for CUDA, but CUDA is not available here.")
    return torch.device(name)


def read_data(args: argparse.Namespace) -> Dataset:
    """A table (--data, or train.csv|.parquet in --data-dir), else IDX or .npy files."""
    seed = given(args, TrainConfig).get("seed", TrainConfig.seed)  # the split's, too
    opts = TableOptions(
        label_column=args.label_column, normal_value=args.normal_value, impute=args.impute,
        test_fraction=args.test_fraction, seed=seed,
    )  # fmt: skip
    if args.data is not None:
        return load_table(args.data, None, opts)
    train = find_table(args.data_dir, "train")
    if train is not None:
        return load_table(train, find_table(args.data_dir, "test"), opts)
    if args.label_column or args.normal_value or args.impute:
        raise DataError(
            f"{args.data_dir}: --label-column, --normal-value and --impute apply to tables "
            "(train.csv or train.parquet), and it holds none."
        )
    return load_data(args.data_dir)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    device = resolve_device(args.device)
    # Under torchrun (WORLD_SIZE > 1) train data-parallel: gloo on CPU, NCCL on GPUs.
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":  # one GPU per rank; "cuda" then means this rank's
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        status = main(argv)  # after a failure no teardown: torchrun ends the other ranks
        # The teardown is collective (torch.distributed's docs): every rank waits here until
        # rank 0 has evaluated and exported, then all leave together. A rank that tore down
        # alone while rank 0 still held the group could abort at exit.
        dist.barrier()
        dist.destroy_process_group()
        return status
    rank = rank_and_world()[0]
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
    )
    try:
        if args.download and rank == 0:
            download_mnist(args.data_dir)
        if dist.is_initialized():
            dist.barrier()  # the other ranks read what rank 0 downloaded
        data = read_data(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    likelihood: Likelihood = args.likelihood
    if args.likelihood == "auto":
        in_unit = data.x_train.min() >= 0.0 and data.x_train.max() <= 1.0
        likelihood = "bernoulli" if in_unit else "gaussian"
    if likelihood == "bernoulli" and (data.x_train.min() < 0.0 or data.x_train.max() > 1.0):
        where = args.data or args.data_dir
        print(f"error: {where}: a Bernoulli model needs data in [0, 1].", file=sys.stderr)
        return 2
    model_cfg = model_config(args, data.x_train.shape[1], likelihood)
    cfg = train_config(args, data.name, str(device))
    try:
        splits = split(data, cfg, likelihood, device)
    except DataError as e:
        print(f"error: {args.data or args.data_dir}: {e}", file=sys.stderr)
        return 2
    ckpt_dir = args.checkpoint_dir or args.out.parent / "checkpoints"
    log.info("training %s on %s (%d train, %d val) on %s", model_cfg, data.name,
             len(splits.x_train), len(splits.x_val), device)  # fmt: skip
    log.info("evaluation afterwards: K=%d on %d test images", cfg.eval_k, len(splits.x_test))
    background: VAE | None = None
    try:
        model, result = fit(
            splits, model_cfg, cfg, checkpoint_dir=ckpt_dir, resume=args.resume,
            progress=not args.no_progress,
        )  # fmt: skip
        if not result.stopped_early:
            background = fit_background(
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
    calibrated, scoring, refs = calibration(model, splits, cfg, background)
    if data.test_is_anomaly is not None:
        metrics["test_auroc"] = test_auroc(
            model, splits, cfg, background, scoring, refs, calibrated,
            data.test_is_anomaly[: len(splits.x_test)],
        )  # fmt: skip
    log.info("test metrics: %s", {k: v for k, v in metrics.items() if k != "history"})
    manifest = build_manifest(
        model,
        input_shape=data.input_shape,
        model_config=model_cfg.to_dict(),
        train_config=cfg.to_dict(),
        dataset={"name": data.name, "train_size": len(splits.x_train),
                 "val_size": len(splits.x_val), "test_size": len(data.x_test),
                 "binarized": splits.binarize, **(data.preprocessing or {})},
        metrics=metrics,
        calibration=calibrated,
        scoring=scoring,
        features=data.features,
    )  # fmt: skip
    sha = export_artifact(model, manifest, args.out, background, refs)
    print(
        f"\nartifact     {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)\n"
        f"sha256       {sha}\n"
        f"data         {data.name}: {len(splits.x_train)} train, {len(splits.x_val)} validation, "
        f"{len(data.x_test)} test\n"
        f"test ELBO    {metrics['test_elbo']:.2f} nats/image\n"
        f"test log p(x) {metrics['test_log_likelihood']:.2f} nats/image "
        f"(IWAE bound, K={metrics['log_likelihood_k']}, {metrics['test_images']} test images)\n"
        f"best epoch   {result.best_epoch}/{cfg.epochs} (val ELBO {result.best_val_elbo:.2f})\n"
        + _auroc_line(metrics.get("test_auroc"))
        + _calibration_line(len(splits.x_val))
        + f"train time   {result.seconds:.0f}s; wall time {time.perf_counter() - t_start:.0f}s"
    )
    return 0


def _calibration_line(n: int) -> str:
    """What tail the validation split resolves, and what that does to the 0.99 threshold."""
    tail = 1 / (n + 1)
    line = f"calibration  {n} validation rows: the smallest tail they resolve is {tail:.2%}"
    if n / (n + 1) <= 0.99:  # as scoring/calibration.py's effective_threshold decides
        line += "; at the default 0.99 threshold, only inputs beyond every one of them are flagged"
    return line + "\n"


def _auroc_line(aurocs: dict[str, float] | None) -> str:
    if not aurocs:
        return ""
    best = max(aurocs, key=aurocs.__getitem__)
    return f"test AUROC   {aurocs[best]:.3f} by {best} (every score: metrics.test_auroc)\n"


if __name__ == "__main__":
    sys.exit(main())
