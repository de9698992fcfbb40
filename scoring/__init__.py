"""The scoring core: what the trainer and the service both compute, and the artifact's contract.

The trainer calibrates each anomaly score with the very functions the service scores with, so
the percentiles of a validation row and of a live request cannot drift apart. Those functions
live here, below both: `calibration.py` (percentiles by rank, thresholds), `scores.py` (the
scores computed from the model's outputs in numpy) and `artifact.py` (the archive's file names,
the attribution's projection, and the error a bad artifact raises). Nothing here imports
`app` or `training` (tests/test_layout.py checks it).
"""

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float32]
