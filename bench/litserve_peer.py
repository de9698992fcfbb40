"""A real peer: LitServe (Lightning AI's serving engine) serving the same artifact's `encode`.

`python -m bench.litserve_peer --artifact A --port P [--max-batch-size N --batch-timeout S]`

Written as LitServe's documentation writes an API: `setup` loads the model, `decode_request`
turns the JSON body into a tensor, `predict` runs it under `torch.no_grad()`, and
`encode_response` returns lists. With `--max-batch-size` above 1, LitServe's dynamic batching
is on: `batch` concatenates the requests' rows and `unbatch` hands each its own back. The rest
is LitServe's defaults (one inference worker on the CPU, one API server process), its
recommended starting point. It answers `POST /predict` with `{"instances": [[...]]}`, the
body the service's `/encode` takes, and `GET /health` once the model is loaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import litserve as ls  # the bench's peer (the dev extra); only this module imports it
import numpy as np
import torch

from bench.artifact import load_module


class EncodeAPI(ls.LitAPI):  # type: ignore[misc]
    """Module-level so LitServe can pickle it into its inference worker process."""

    def __init__(self, artifact: Path, max_batch_size: int, batch_timeout: float) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.artifact = artifact
        self.sizes: list[int] = []

    def setup(self, device: str) -> None:
        self.module, _ = load_module(self.artifact)

    # Unannotated, as LitServe's examples are: it reads the annotations to choose how to parse
    # the body and shape the answer, and none means the request's JSON and a plain response.
    def decode_request(self, request):  # type: ignore[no-untyped-def]
        return torch.from_numpy(np.asarray(request["instances"], dtype=np.float32))

    def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        self.sizes = [len(x) for x in inputs]
        return torch.cat(inputs)

    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            mean, logvar = self.module.encode(x)
        return {"mean": mean, "std": torch.exp(0.5 * logvar)}

    def unbatch(self, output: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        means = output["mean"].split(self.sizes)
        stds = output["std"].split(self.sizes)
        return [{"mean": m, "std": s} for m, s in zip(means, stds, strict=True)]

    def encode_response(self, output):  # type: ignore[no-untyped-def]
        return {"mean": output["mean"].tolist(), "std": output["std"].tolist()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.litserve_peer", description=__doc__)
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--max-batch-size", type=int, default=1, help="1: batching off")
    p.add_argument("--batch-timeout", type=float, default=0.0, help="seconds")
    args = p.parse_args(argv)
    api = EncodeAPI(args.artifact, args.max_batch_size, args.batch_timeout)
    server = ls.LitServer(api, accelerator="cpu")
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
