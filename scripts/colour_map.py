"""Write app/static/inferno.npy: matplotlib's inferno colour map as 256 RGB bytes, the colours
of the attribution heat maps (app/images.py). The service does not depend on matplotlib, so the
table is committed; tests/test_images.py checks it still equals matplotlib's.

    python scripts/colour_map.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps

OUT = Path(__file__).resolve().parents[1] / "app" / "static" / "inferno.npy"


def inferno() -> np.ndarray:
    """(256, 3) uint8: inferno (van der Walt and Smith, matplotlib; CC0) at 256 levels."""
    rgba = colormaps["inferno"](np.linspace(0.0, 1.0, 256))
    return np.rint(rgba[:, :3] * 255).astype(np.uint8)


if __name__ == "__main__":
    np.save(OUT, inferno(), allow_pickle=False)
    print(f"wrote {OUT}")
