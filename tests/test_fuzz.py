"""schemathesis against a live server's /openapi.json: a short pass here, the long one (1,000+
cases) with `python -m bench.fuzz`."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.fuzz import KEY, fuzz
from tests.conftest import Server, make_artifact

pytestmark = [pytest.mark.slow, pytest.mark.server]


def test_generated_requests_get_no_5xx_and_only_documented_answers(
    tmp_path: Path,
) -> None:
    # Image-shaped, so the nested-instance branch of the schema is exercised too.
    artifact = make_artifact(tmp_path / "vae.pt", input_shape=(4, 4), hidden=(8,), latent_dim=2)
    server = Server({"VAE_MODEL_PATH": str(artifact), "VAE_API_KEYS": KEY}, tmp_path / "log")
    try:
        server.wait_ready()
        result = fuzz(server.url, max_examples=10)
    finally:
        server.stop()
    assert result.returncode == 0, result.output[-4000:]
    assert result.cases >= 100
    assert "Traceback" not in server.log.read_text()
