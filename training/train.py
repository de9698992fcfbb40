"""The training loop: Adam on the negative ELBO, per-epoch validation, checkpoints and resume.

Under `torchrun` the same loop runs data-parallel (DistributedDataParallel): every rank takes a
disjoint shard of each epoch's shuffled order, gradients are averaged, and only rank 0 writes.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from training.config import TrainConfig
from training.evaluate import mean_elbo
from training.model import VAE

try:  # the progress bar is in the `train` extra; the lean serving image trains without it
    from tqdm import tqdm
except ImportError:  # pragma: no cover - exercised in the container
    tqdm = None

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and where the last good checkpoint is."""


@dataclass
class TrainResult:
    best_state: dict[str, Tensor]
    best_val_elbo: float
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    stopped_early: bool = False  # --stop-after ended this invocation before the last epoch


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train(
    model: VAE,
    x_train: Tensor,
    x_val: Tensor,
    cfg: TrainConfig,
    *,
    binarize: bool,
    checkpoint_dir: Path,
    meta: dict[str, Any],
    resume: bool = False,
    progress: bool = True,
    noise: float = 0.0,
    weight_decay: float = 0.0,
) -> TrainResult:
    """Maximise the ELBO on `x_train` (N, D); keep the state with the best validation ELBO.

    `x_val` is evaluated as given (already binarised with a fixed seed where that applies).
    After every epoch `last.pt` holds everything needed to resume, so an interrupted run loses
    at most one epoch; `best.pt` holds the best model so far. Both carry `meta` (the configs),
    and a resume refuses a checkpoint whose model config differs.

    `noise` > 0 trains a background model (Ren et al. 2019): in every batch that share of each
    image's features is replaced by uniform noise over the data's range, with L2 weight decay
    `weight_decay`, so the model learns the data's low-level statistics but not its semantics.
    """
    rank, world = rank_and_world()
    device = x_train.device
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=weight_decay)
    # The background model's noise spans the data's range: [0, 1] for a Bernoulli model; each
    # feature's own range for a Gaussian one, whose features may differ in scale by 10^4 (a
    # table's areas and ratios), where one shared range drowns the small ones and overflows.
    if model.bernoulli:
        lo, hi = x_train.min(), x_train.max()
    else:
        lo, hi = x_train.min(0).values, x_train.max(0).values
    # The global batch stays cfg.batch_size whatever the number of ranks, so results compare.
    local_batch = max(1, cfg.batch_size // world)
    usable = x_train.shape[0] - x_train.shape[0] % world  # equal shards: no rank waits alone
    steps_per_epoch = min(-(-usable // world // local_batch), cfg.max_batches or 2**62)
    # Cosine decay over the whole run (Loshchilov & Hutter 2017), stepped per batch.
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=cfg.epochs * steps_per_epoch, eta_min=cfg.lr * cfg.lr_min_factor
    )
    latent_dim = model.latent_dim
    # One shuffle shared by all ranks; the noise (binarisation, eps) differs per rank.
    order_gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed + rank)
    result = TrainResult(best_state=_copy_state(model), best_val_elbo=-math.inf, best_epoch=0)
    start_epoch = 1
    last = checkpoint_dir / "last.pt"
    if resume and last.exists():
        ckpt = torch.load(last, map_location=device, weights_only=False)
        if ckpt["meta"]["model"] != meta["model"]:
            raise TrainingError(
                f"{last}: cannot resume: it was trained with model config {ckpt['meta']['model']}, "
                f"not {meta['model']}."
            )
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt["meta"]["train"]["lr"] != cfg.lr:  # a resumed run may ask for another rate
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr
            scheduler.base_lrs = [cfg.lr for _ in scheduler.base_lrs]
        order_gen.set_state(ckpt["order_rng"])
        rng = ckpt["rng"]
        if isinstance(rng, Tensor):  # a checkpoint of one process, before states per rank
            rng = {"cpu": [rng]}
        elif isinstance(rng, list):  # per rank, before the device's state was kept
            rng = {"cpu": rng}
        torch.set_rng_state(rng["cpu"][rank])
        if device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"][rank], device)
        result = ckpt["result"]
        start_epoch = ckpt["epoch"] + 1
        log.info("resumed from %s after epoch %d", last, ckpt["epoch"])

    t0 = time.perf_counter() - result.seconds
    for epoch in range(start_epoch, cfg.epochs + 1):
        if cfg.patience and epoch - result.best_epoch > cfg.patience:
            log.info("early stop: no better val ELBO in %d epochs", cfg.patience)
            break
        net.train()
        order = torch.randperm(x_train.shape[0], generator=order_gen)[:usable]
        batches = order[rank::world].to(device).split(local_batch)[: cfg.max_batches]
        show = progress and tqdm is not None and rank == 0
        bar = tqdm(batches, desc=f"epoch {epoch}/{cfg.epochs}", leave=False) if show else batches
        total, seen = 0.0, 0
        for i, idx in enumerate(bar):
            xb = x_train[idx]
            if noise > 0.0:
                hit = torch.rand(xb.shape, device=device) < noise
                xb = torch.where(hit, lo + (hi - lo) * torch.rand(xb.shape, device=device), xb)
            if binarize:
                # Dynamic binarisation: a fresh draw every time an image is shown (Burda et al.).
                xb = torch.bernoulli(xb)
            eps = torch.randn(xb.shape[0], latent_dim, device=device)
            log_px, kl = net(xb, eps)
            # KL warm-up (Sonderby et al. 2016): a small KL weight early lets the decoder use
            # more latent units before the prior pulls them shut.
            done = epoch - 1 + i / len(batches)
            beta = min(1.0, done / cfg.kl_warmup_epochs) if cfg.kl_warmup_epochs else 1.0
            loss = -(log_px - beta * kl).mean()
            if not _finite_everywhere(loss, world):
                raise TrainingError(
                    f"the loss became {loss.item()} at epoch {epoch}, batch {i + 1}; stopping. "
                    f"The last good checkpoint stays at {last if last.exists() else 'none yet'}."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            # Report the true ELBO, not the warm-up objective.
            total += (kl - log_px).sum().item()
            seen += xb.shape[0]
            if show:
                bar.set_postfix(loss=f"{total / seen:.2f}")

        model.eval()
        val_elbo = mean_elbo(model, x_val, seed=cfg.seed)  # the same on every rank
        row = {"epoch": epoch, "train_elbo": -total / seen, "val_elbo": val_elbo}
        result.history.append(row)
        if val_elbo > result.best_val_elbo:
            result.best_val_elbo, result.best_epoch = val_elbo, epoch
            result.best_state = _copy_state(model)
            if rank == 0:
                state = {"model": result.best_state, "epoch": epoch, "meta": meta}
                _atomic_save(state, checkpoint_dir / "best.pt")
        result.seconds = time.perf_counter() - t0
        if rank == 0:
            log.info(
                "epoch %d: train ELBO %.2f, val ELBO %.2f%s (%.0fs)",
                epoch, row["train_elbo"], val_elbo,
                " *best*" if result.best_epoch == epoch else "", result.seconds,
            )  # fmt: skip
        rng = _rng_states(world, device)
        if rank == 0:
            _atomic_save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "order_rng": order_gen.get_state(),
                    "rng": rng,
                    "result": result,
                    "epoch": epoch,
                    "meta": meta,
                },
                last,
            )
        if cfg.stop_after and epoch - start_epoch + 1 >= cfg.stop_after and epoch < cfg.epochs:
            result.stopped_early = True
            break
    return result


def _finite_everywhere(loss: Tensor, world: int) -> bool:
    # Every rank must stop together, or the others would wait forever in the next all-reduce.
    # The flag lives where the loss does: NCCL, the GPUs' backend, reduces no CPU tensor.
    flag = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
    if world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _rng_states(world: int, device: torch.device) -> dict[str, list[Tensor]]:
    """Each rank's RNG states, the CPU's and (on a GPU) the device's, so a resumed
    data-parallel run draws the same noise. Gathered through `device`, as NCCL needs; kept on
    the CPU, as a checkpoint and torch.set_rng_state want them."""
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    if world == 1:
        return {kind: [state] for kind, state in states.items()}
    gathered = {}
    for kind, state in states.items():
        mine = state.to(device)
        every = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(every, mine)
        gathered[kind] = [t.cpu() for t in every]
    return gathered


def _copy_state(model: VAE) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
