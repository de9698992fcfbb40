"""TorchScript against eager PyTorch, per call: `python -m bench.eager`.

The service runs the artifact's TorchScript. The same weights in the trainer's eager module
(training.model.VAE) are timed beside it on the encoder, at the batch sizes the service
forms, with 1 intra-op thread and with torch's default: the medians of many calls, in one
process, interleaved, so both see the same machine.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.artifact import build_artifact, load_module
from training.config import ModelConfig
from training.model import VAE


def median_us(call: Callable[[torch.Tensor], object], x: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.eager", description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=2000)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        scripted, manifest = load_module(build_artifact(Path(tmp) / "vae.pt"))
    model = manifest["model"]
    config = ModelConfig(**{**model, "hidden_dims": tuple(model["hidden_dims"])})
    eager = VAE(config).eval()
    eager.load_state_dict(scripted.state_dict())
    default_threads = torch.get_num_threads()
    print(f"encoder {manifest['input_dim']}-{'-'.join(map(str, config.hidden_dims))}-"
          f"{config.latent_dim}, median of {args.repeats} calls, microseconds")  # fmt: skip
    print("threads  batch  torchscript   eager  eager/script")
    with torch.no_grad():
        for threads in sorted({1, default_threads}):
            torch.set_num_threads(threads)
            for batch in (1, 16, 64):
                x = torch.rand(batch, config.input_dim)
                for model in (scripted, eager):  # warm: the profiling executor specialises
                    for _ in range(50):
                        model.encode(x)
                s = median_us(scripted.encode, x, args.repeats)
                e = median_us(eager.encode, x, args.repeats)
                print(f"{threads:>7}  {batch:>5}  {s:>11.1f}  {e:>6.1f}  {e / s:>12.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
