"""The model that ships in models/default: what `make run` and the image serve with no data and
no training. Its bytes, its manifest summary and the figures docs/results.md quotes agree, and
`python -m app` with no settings at all serves it."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import httpx

from app.model import VAEService
from app.settings import Settings
from tests.conftest import REPO, Server

SHIPPED = REPO / "models" / "default"
RESULTS = (REPO / "docs" / "results.md").read_text()


def quoted(label: str) -> str:
    """The figure docs/results.md's shipped-model table gives for this row."""
    found = re.search(rf"^\| {re.escape(label)}[^|]*\| (-?[\d.]+) \|$", RESULTS, flags=re.M)
    assert found, f"docs/results.md quotes no {label!r}"
    return found.group(1)


def test_the_default_setting_is_the_shipped_artifact() -> None:
    assert Settings().model_path == Path("models/default/vae.pt")
    assert (REPO / Settings().model_path).is_file()


def test_docs_quote_the_shipped_artifacts_sha256_and_figures() -> None:
    sha256 = hashlib.sha256((SHIPPED / "vae.pt").read_bytes()).hexdigest()
    assert f"sha256 `{sha256}`" in RESULTS
    metrics = VAEService.load(SHIPPED / "vae.pt").manifest["metrics"]
    assert quoted("test ELBO") == f"{metrics['test_elbo']:.2f}"
    assert quoted("test log-likelihood") == f"{metrics['test_log_likelihood']:.2f}"
    assert (metrics["log_likelihood_k"], metrics["test_images"]) == (5000, 10000)


def test_manifest_json_is_the_artifacts_own_summary() -> None:
    vae = VAEService.load(SHIPPED / "vae.pt")
    summary = json.loads((SHIPPED / "manifest.json").read_text())
    assert summary == {"sha256": vae.sha256, "manifest": vae.public_manifest()}


def test_python_m_app_with_no_settings_serves_it(tmp_path: Path) -> None:
    server = Server({}, tmp_path / "server.log")  # no VAE_* at all: every default
    try:
        server.wait_ready(60)
        model = httpx.get(f"{server.url}/model").json()
        assert model["sha256"] == json.loads((SHIPPED / "manifest.json").read_text())["sha256"]
        body = httpx.post(f"{server.url}/sample", json={"n": 2, "seed": 0}).json()
        assert len(body["outputs"]) == 2
        assert len(body["outputs"][0]) == 784
    finally:
        server.stop()
