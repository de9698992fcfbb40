"""Data-parallel training under torchrun: 2 CPU processes on gloo match a single process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.servers import free_port
from tests.conftest import MNIST_DIR, REPO
from training.export import load_artifact

ARGS = ["--data-dir", str(MNIST_DIR), "--epochs", "2", "--eval-k", "20", "--eval-images", "500",
        "--no-progress", "--seed", "3"]  # fmt: skip


def train(out: Path, nproc: int) -> subprocess.CompletedProcess[str]:
    # One thread per rank: two ranks on two cores, no oversubscription.
    env = {**os.environ, "OMP_NUM_THREADS": "1" if nproc > 1 else "2"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_addr", "127.0.0.1", "--master_port", str(free_port())]  # fmt: skip
    cmd = [*launcher, "-m", "training"] if nproc > 1 else [sys.executable, "-m", "training"]
    return subprocess.run(
        [*cmd, *ARGS, "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


@pytest.mark.slow
def test_torchrun_two_ranks_matches_a_single_process(tmp_path: Path) -> None:
    single = train(tmp_path / "one" / "vae.pt", 1)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = train(tmp_path / "two" / "vae.pt", 2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    m1 = load_artifact(tmp_path / "one" / "vae.pt")[1]["metrics"]
    m2 = load_artifact(tmp_path / "two" / "vae.pt")[1]["metrics"]
    # Same global batch and epochs: the same quality, within the noise of different draws.
    assert abs(m1["test_elbo"] - m2["test_elbo"]) < 3.0, (m1["test_elbo"], m2["test_elbo"])
    assert m2["test_elbo"] > -250  # it learned (an untrained model is near -540)
    assert [row["epoch"] for row in m2["history"]] == [1, 2]
    # Only rank 0 wrote: one artifact, one set of checkpoints, one summary.
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["checkpoints", "vae.pt"]
    assert ddp.stdout.count("sha256") == 1


class CollectiveSeenError(Exception):
    """Raised by the stand-in collectives below, once they have seen their tensors."""


def test_collectives_take_tensors_on_the_ranks_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """NCCL, the GPUs' backend, takes device tensors only: the loss check and the RNG gather
    must hand over tensors on the training device, not the CPU. No GPU or NCCL runs here, so a
    device without storage (meta) stands in for the GPU, and the collectives record what they
    are given (the torchrun test above runs the real ones on gloo)."""
    import torch.distributed as dist

    from training import train

    seen: list[torch.device] = []

    def record(tensors: object, *args: object, **kwargs: object) -> None:
        flat = tensors if isinstance(tensors, list) else [tensors]
        seen.extend(t.device for t in flat)
        raise CollectiveSeenError

    monkeypatch.setattr(dist, "all_reduce", record)
    monkeypatch.setattr(dist, "all_gather", lambda out, mine: record([*out, mine]))
    meta = torch.device("meta")
    with pytest.raises(CollectiveSeenError):
        train._finite_everywhere(torch.ones((), device=meta), world=2)
    with pytest.raises(CollectiveSeenError):
        train._rng_states(2, meta)
    assert len(seen) == 4  # the flag; then the two tensors gathered into, and this rank's own
    assert set(seen) == {meta}
    # One process: nothing is gathered, and the states stay where set_rng_state wants them.
    assert {k: [t.device.type for t in v] for k, v in train._rng_states(1, meta).items()} == {
        "cpu": ["cpu"]
    }
