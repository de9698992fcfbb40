"""Names that several modules share, each defined once: array types, score names, media types."""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float32]
Arrays = dict[str, Array]  # an operation's outputs, by name

# The anomaly scores an artifact can be asked for; its calibration states each one's direction.
# Format-1 artifacts offer the first three; format 2 adds the next three, and format 3 the
# latent distance and the ensemble (app/scores.py).
ScoreName = Literal[
    "kl_divergence",
    "reconstruction_log_prob",
    "log_likelihood",
    "input_complexity",
    "likelihood_ratio",
    "dose",
    "latent_distance",
    "ensemble",
]
SCORES: tuple[ScoreName, ...] = get_args(ScoreName)

JSON = "application/json"
NPY = "application/x-npy"
OCTET = "application/octet-stream"
PNG = "image/png"
MULTIPART = "multipart/form-data"
