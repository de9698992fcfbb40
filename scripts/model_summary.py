"""Write manifest.json beside an artifact: its sha256 and the manifest summary GET /model shows.

    python scripts/model_summary.py models/default/vae.pt

For the shipped model, so its shapes, configs and test figures can be read (and diffed in
review) without loading it; tests/test_shipped_model.py checks the two agree.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from app.model import VAEService


def main(path: Path) -> None:
    vae = VAEService.load(path, device="cpu")
    summary = {"sha256": vae.sha256, "manifest": vae.public_manifest()}
    out = path.with_name("manifest.json")
    out.write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    print(f"{out}: sha256 {vae.sha256}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
