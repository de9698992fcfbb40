"""Frozen configs for the model and the training run, and the named presets.

Each setting is declared once, here: its field, its default and the default's reason in a
trailing comment, nanoGPT style. A field made with `option(default, help)` is also a flag of
`python -m training` (`--hidden-dims` for `hidden_dims`); the others are set by the CLI from the
data or from its own flags. The defaults are the `full` run, what `python -m training` trains with
no flags. A checkpoint and the artifact's manifest store these dicts, so whoever loads them never
re-declares a shape.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, TypeVar

Likelihood = Literal["bernoulli", "gaussian"]
T = TypeVar("T")


def option(default: T, help: str) -> T:
    """A field that `python -m training` offers as a flag, with this help text."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ModelConfig:
    input_dim: int = 784  # 28 x 28 MNIST, flattened; the CLI takes it from the data
    # Encoder layers; the decoder mirrors them. Measured (docs/results.md): 7 nats better than
    # the IWAE paper's (200, 200) after 10 epochs. (1024, 512) was 3.5 nats better still, but
    # its ~3x cost per epoch and per IWAE sample does not fit the 20-minute budget.
    hidden_dims: tuple[int, ...] = option((512, 256), "encoder hidden sizes; the decoder mirrors")
    # 16, 32 and 64 were within 2 nats after 10 epochs; 32 leaves room to grow (17 units are
    # active after the full 200 epochs, by Burda et al.'s measure).
    latent_dim: int = option(32, "latent size")
    likelihood: Likelihood = "bernoulli"  # binary or [0, 1] data; "gaussian" for real values

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden_dims"] = list(self.hidden_dims)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """The inverse of to_dict: a manifest's `model` back to its config."""
        return cls(**{**d, "hidden_dims": tuple(d["hidden_dims"])})


@dataclass(frozen=True)
class TrainConfig:
    # docs/results.md: 200 epochs gained 1.2 nats over 100 and fit 20 minutes on 2 cores.
    epochs: int = option(200, "training epochs")
    # The IWAE paper's 100-ish; 128 keeps 2 cores busy. Global: torchrun ranks share it.
    batch_size: int = option(128, "images per optimiser step, over all ranks")
    lr: float = option(1e-3, "Adam learning rate")  # Adam's default
    # Cosine decay to lr * this by the last epoch (Loshchilov & Hutter 2017); with the KL
    # warm-up it gained 2.6 nats at 100 epochs over a constant lr (docs/results.md).
    lr_min_factor: float = option(0.1, "cosine-decay the lr to lr * this; 1 keeps it constant")
    # The KL weight ramps 0 -> 1 over these epochs (Sonderby et al. 2016), so the decoder uses
    # more latent units before the prior pulls them shut.
    kl_warmup_epochs: float = option(10.0, "ramp the KL weight 0 -> 1 over these epochs")
    # Off: at 200 epochs the best epoch is 198, so early stopping would stop nothing.
    patience: int | None = option(None, "early-stop after this many epochs without progress")
    seed: int = option(0, "makes a run reproducible: the same seed gives the same model")
    # The validation split: this fraction of the training files, within [val_min, val_max]
    # (training/pipeline.py, validation_size). 2,000 of MNIST's 22,699-image prefix (~9%)
    # gives a stable ELBO and a calibration that resolves 0.05%; at least 100 rows (0.99 of
    # V + 1 rows is a whole row only from V = 99) resolve the 1% tail of the 0.99 threshold.
    val_fraction: float = option(0.1, "validation share of the training files")
    val_min: int = option(
        100, "smallest validation split, where the rows allow it (at most 3 in 10 of them)"
    )
    val_max: int = option(2000, "largest validation split")
    # A fresh Bernoulli draw each time an image is shown (Burda et al. 2015); off, a Bernoulli
    # model trains on the [0, 1] intensities as they are.
    dynamic_binarization: bool = option(True, "binarise each image afresh every time it is shown")
    # The likelihood ratio's background model (Ren et al. 2019): the same net, trained on inputs
    # with this share of features replaced by uniform noise each time they are shown (they use
    # 0.1 to 0.3), with L2 weight decay, so it learns the data's low-level statistics only.
    background_noise: float = option(
        0.2, "background model: share of features replaced by noise; 0 trains none"
    )
    background_weight_decay: float = option(1e-4, "background model: L2 weight decay")
    # A quarter of the default's epochs bounds what the ratio adds to a run; not tuned further.
    background_epochs: int = option(50, "background model: epochs, at most --epochs")
    # latent_distance compares a posterior mean with this many training rows' means: on held-out
    # MNIST digits (10 epochs), a random 2,000 gave a mean AUROC of 0.85, 10,000 0.89 and all
    # ~18,600 0.89; each row costs 128 bytes in the artifact and a dot product per request.
    # A table model (format 7) keeps the same rows, standardised, for the input distance.
    latent_reference: int = option(
        30000, "training rows kept as the latent and input distances' reference"
    )
    # The full evaluation, as papers report it (Burda et al. 2015: K=5000, all test images).
    # Shorter runs get SHORT_RUN_EVALUATION instead unless these are set.
    eval_k: int = option(5000, "importance samples K for the test log-likelihood")
    eval_images: int | None = option(None, "test images to evaluate; unset: all")
    calibration_samples: int = 16  # L for the reconstruction probability: the service default
    calibration_ll_samples: int = 100  # K for the log-likelihood score: the service default
    max_batches: int | None = None  # --dry-run: a single batch per epoch
    stop_after: int | None = option(
        None, "end this invocation after N epochs (time-boxed machines); --resume goes on"
    )
    device: str = "cpu"  # --device, resolved ("auto" -> cuda or cpu)
    preset: str = "custom"  # --preset, recorded in the manifest

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """A manifest's `training` back to its config; settings this trainer no longer has
        (an older artifact's) are left out."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


# A run shorter than the full one, or on other data than MNIST, is evaluated with the
# service's K for the log-likelihood score on at most 1,000 test images: 1/500 of the full
# evaluation's decoder passes, seconds instead of ~8 minutes on 2 cores. The full evaluation
# makes the number compared with papers; a 3-epoch run trained in seconds should not spend
# minutes on it. --eval-k and --eval-images still ask for any size.
SHORT_RUN_EVALUATION: dict[str, Any] = {"eval_k": 100, "eval_images": 1000}


def is_full_run(cfg: TrainConfig, dataset: str) -> bool:
    """A run that earns the full evaluation: MNIST, for at least the default's epochs."""
    return dataset == "mnist" and cfg.epochs >= TrainConfig.epochs


@dataclass(frozen=True)
class Preset:
    """Named starting points over the defaults; explicit CLI flags override them."""

    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    # The defaults themselves: under 20 minutes on 2 cores, evaluation included
    # (docs/results.md has the path here, measured).
    "full": Preset(),
    # A smoke run: about a minute on 2 cores; as a short run it gets SHORT_RUN_EVALUATION.
    "quick": Preset(train={"epochs": 15, "kl_warmup_epochs": 3}),
}


def schedule(preset: str = "full", epochs: int | None = None) -> tuple[int, float]:
    """A preset's epochs and KL warm-up, or its recipe cut to `epochs`: the warm-up then spans
    half the run at most, so that even a short run ends on the whole ELBO."""
    train = PRESETS[preset].train
    warmup: float = train.get("kl_warmup_epochs", TrainConfig.kl_warmup_epochs)
    if epochs is None:
        return int(train.get("epochs", TrainConfig.epochs)), warmup
    return epochs, min(warmup, epochs / 2)
