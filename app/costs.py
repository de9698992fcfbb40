"""The cost model: what a forward pass over so many rows is estimated to take, from timings
taken at warm-up. The batcher reads it to decide which batches run on the event loop
(VAE_INLINE_MAX_MS) and which go to the inference thread (app/batching.py)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from app.model import VAEService


@dataclass(frozen=True)
class Costs:
    """Seconds: a call's fixed part and a row's share, for an encode (decode and sample cost
    about as much) and for the scores, whose rows also pay per posterior sample. Until
    measured, infinite: nothing runs inline."""

    call_s: float = math.inf
    encode_row_s: float = math.inf
    score_call_s: float = math.inf
    score_row_s: float = math.inf
    score_sample_s: float = math.inf

    @classmethod
    def measure(cls, vae: VAEService, repeats: int = 21) -> Costs:
        """Each the median of `repeats` timings: an encode of 1 and of 16 rows; the scores of
        1 row with 1 and 9 samples, and of 16 rows with 1."""
        x = np.full((1, vae.input_dim), 0.5, dtype=np.float32)
        x16 = np.full((16, vae.input_dim), 0.5, dtype=np.float32)

        def median(call: Callable[[], object]) -> float:
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                call()
                times.append(time.perf_counter() - start)
            return float(np.median(times))

        one, sixteen = median(lambda: vae.encode(x)), median(lambda: vae.encode(x16))
        encode_row_s = max((sixteen - one) / 15, 0.0)
        call_s = max(one - encode_row_s, 0.0)
        one = median(lambda: vae.anomaly_scores(x, 1, 0))
        nine = median(lambda: vae.anomaly_scores(x, 9, 0))
        sixteen = median(lambda: vae.anomaly_scores(x16, 1, 0))
        score_sample_s = max((nine - one) / 8, 0.0)
        per_row = max((sixteen - one) / 15, 0.0)  # a row's fixed part and its one sample
        return cls(
            call_s=call_s,
            encode_row_s=encode_row_s,
            score_call_s=max(one - per_row, 0.0),
            score_row_s=max(per_row - score_sample_s, 0.0),
            score_sample_s=score_sample_s,
        )

    def cost_s(
        self, op: str, rows: int, samples: int = 1, ll_samples: int = 0, passes: int = 1
    ) -> float:
        """Estimated model time of a forward pass over `rows`: a call's fixed part plus rows x
        a row's share. For encode, decode and sample those of an encode; for the scores, a
        row's share is its fixed part (the encoder, the compressed length, DoSE's density)
        plus the cost per sample x (samples x `passes` (the background model, the
        attribution) + K). A call's fixed part is most of a one-row pass (dispatch, small
        matrices), so a merged batch costs far less than its jobs apart."""
        if op != "anomaly":
            return self.call_s + rows * self.encode_row_s
        per_sample = self.score_sample_s * (samples * passes + ll_samples)
        return self.score_call_s + rows * (self.score_row_s + per_sample)
