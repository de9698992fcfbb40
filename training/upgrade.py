"""Bring an artifact to the current format without retraining: same weights, new scoring data.

    python -m training.upgrade models/default/vae.pt --data-dir ../shared/datasets/mnist \
        --out models/default/vae.pt

The newer scores need what only the training data gives: the training rows' latent means and
hidden-space gaps (the latent distance's and RaPP's references) and the validation split's
values of every score, as callers send the data (grey digits). The split is rebuilt from the
manifest's own settings (seed, validation share) and checked against the sizes the manifest
recorded, so the calibration is on the same held-out rows as before. The model is scripted
afresh from its weights, so it gains the methods the current format needs (hidden_gap).
The weights, the background model, the training record and the test metrics are kept; the
manifest says what it was upgraded from. Tables are not upgraded here: retrain them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from training.config import ModelConfig, TrainConfig
from training.data import DataError, load_data
from training.export import FORMAT_VERSION, build_manifest, export_artifact, load_weights, sha256_of
from training.model import VAE
from training.pipeline import calibration, split

log = logging.getLogger("training")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.upgrade", description=__doc__)
    p.add_argument("artifact", type=Path, help="the artifact to upgrade")
    p.add_argument("--data-dir", type=Path, required=True, help="the data it was trained on")
    p.add_argument("--out", type=Path, required=True, help="where to write the upgraded one")
    return p.parse_args(argv)


def rebuild(weights: dict[str, Any], model_cfg: ModelConfig) -> VAE:
    model = VAE(model_cfg)
    model.load_state_dict(weights)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    weights, background_weights, old = load_weights(args.artifact)
    if old["format_version"] >= FORMAT_VERSION:
        print(f"{args.artifact}: already format_version {old['format_version']}.")
        return 0
    if "features" in old or old["format_version"] < 2:
        print(f"error: {args.artifact}: only format-2 to format-{FORMAT_VERSION - 1} image and "
              "vector artifacts can be upgraded; retrain this one with `python -m training`.",
              file=sys.stderr)  # fmt: skip
        return 2
    model_cfg = ModelConfig.from_dict(old["model"])
    cfg = TrainConfig.from_dict(old["training"])
    model = rebuild(weights, model_cfg)
    background = None if background_weights is None else rebuild(background_weights, model_cfg)
    try:
        data = load_data(args.data_dir)
        splits = split(data, cfg, old["likelihood"], torch.device("cpu"))
    except DataError as e:
        print(f"error: {args.data_dir}: {e}", file=sys.stderr)
        return 2
    recorded = (old["dataset"]["train_size"], old["dataset"]["val_size"])
    if (len(splits.x_train), len(splits.x_val)) != recorded:
        print(f"error: {args.data_dir}: gives {len(splits.x_train)} training and "
              f"{len(splits.x_val)} validation rows, but the artifact was trained on "
              f"{recorded[0]} and {recorded[1]}: not its data.", file=sys.stderr)  # fmt: skip
        return 2
    calibrated, scoring, refs = calibration(model, splits, cfg, background)
    manifest = build_manifest(
        model, input_shape=tuple(old["input_shape"]), model_config=old["model"],
        train_config=old["training"], dataset=old["dataset"], metrics=old["metrics"],
        calibration=calibrated, scoring=scoring,
    )  # fmt: skip
    manifest["upgraded_from"] = {
        "sha256": sha256_of(args.artifact),
        "format_version": old["format_version"],
        "created_at": old.get("created_at"),
    }
    sha = export_artifact(model, manifest, args.out, background, refs)
    print(f"artifact     {args.out} (format_version {FORMAT_VERSION})\nsha256       {sha}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
