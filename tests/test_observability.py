"""/metrics, request ids and structured logs, against real servers."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Server

pytestmark = pytest.mark.server

Start = Callable[[dict[str, str]], Server]
GOOD = {"instances": [[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]]}


def scrape(server: Server, headers: dict[str, str] | None = None) -> dict[str, float]:
    """Every sample of /metrics, keyed `name{label="value",...}`, through prometheus_client's
    own parser (which raises on anything malformed)."""
    r = httpx.get(f"{server.url}/metrics", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}"] = s.value
    return samples


def test_metrics_parse_and_the_histograms_move(start_server: Start, tiny_artifact: Path) -> None:
    server = start_server({"VAE_MODEL_PATH": str(tiny_artifact)})
    server.wait_ready()
    before = scrape(server)
    for _ in range(3):
        assert httpx.post(f"{server.url}/encode", json=GOOD).status_code == 200
    assert httpx.post(f"{server.url}/anomaly-score", json=GOOD).status_code == 200
    assert httpx.post(f"{server.url}/decode", json={"latents": [[0.0, 0.0]]}).status_code == 200
    assert httpx.post(f"{server.url}/sample", json={"n": 2}).status_code == 200
    assert httpx.post(f"{server.url}/encode", json={"instances": [[2.0]]}).status_code == 422
    after = scrape(server)

    def moved(key: str) -> float:
        return after[key] - before.get(key, 0.0)

    # Each request and each forward pass names the model and version it ran on: `default`,
    # version 1, for VAE_MODEL_PATH (a repository of one).
    # (scrape() sorts the labels by name.)
    ok = 'method="POST",model="default",route="/encode",status="200",version="1"'
    assert moved(f"vae_request_duration_seconds_count{{{ok}}}") == 3
    bad = 'method="POST",model="default",route="/encode",status="422",version="1"'
    assert moved(f"vae_request_duration_seconds_count{{{bad}}}") == 1
    assert moved(f'vae_request_duration_seconds_bucket{{le="+Inf",{ok}}}') == 3

    def op(name: str) -> str:
        return f'model="default",op="{name}",version="1"'

    assert moved(f"vae_inference_duration_seconds_count{{{op('encode')}}}") == 3
    assert moved(f"vae_inference_duration_seconds_count{{{op('anomaly')}}}") == 1
    # Every operation carries its own name, none the batcher's placeholder.
    for name in ("decode", "sample"):
        assert moved(f"vae_inference_duration_seconds_count{{{op(name)}}}") == 1
        assert moved(f"vae_queue_duration_seconds_count{{{op(name)}}}") == 1
    assert not [k for k in after if 'op="op"' in k]
    assert moved(f"vae_batch_size_sum{{{op('encode')}}}") == 6  # 2 instances, 3 requests
    assert moved(f"vae_queue_duration_seconds_count{{{op('encode')}}}") == 3
    for score in ("kl_divergence", "reconstruction_log_prob"):
        one_per_instance = f'model="default",score="{score}",version="1"'
        assert moved(f"vae_anomaly_score_count{{{one_per_instance}}}") == 2
    # A route that runs no model has empty model labels.
    probe = 'method="GET",model="",route="/metrics",status="200",version=""'
    assert after[f"vae_request_duration_seconds_count{{{probe}}}"] >= 1
    assert after["vae_requests_in_flight{}"] == 0
    sha = httpx.get(f"{server.url}/model").json()["sha256"]
    info = [k for k in after if k.startswith("vae_model_info{")]
    assert len(info) == 1
    assert f'sha256="{sha}"' in info[0]
    assert 'model="default"' in info[0]
    assert 'version="1"' in info[0]
    assert 'likelihood="bernoulli"' in info[0]
    assert after["process_resident_memory_bytes{}"] > 10e6


def test_metrics_can_be_put_behind_the_keys(start_server: Start, tiny_artifact: Path) -> None:
    env = {"VAE_MODEL_PATH": str(tiny_artifact), "VAE_API_KEYS": "k"}
    public = start_server(env)
    private = start_server({**env, "VAE_METRICS_PUBLIC": "false"})
    public.wait_ready()
    private.wait_ready()
    assert httpx.get(f"{public.url}/metrics").status_code == 200
    assert httpx.get(f"{private.url}/metrics").status_code == 401
    assert scrape(private, {"X-API-Key": "k"})


def log_lines(server: Server) -> list[dict[str, object]]:
    return [json.loads(line) for line in server.log.read_text().splitlines() if line.strip()]


def test_one_json_line_per_request_with_its_id(start_server: Start, tiny_artifact: Path) -> None:
    server = start_server({"VAE_MODEL_PATH": str(tiny_artifact)})
    server.wait_ready()
    given = httpx.post(f"{server.url}/encode", json=GOOD, headers={"X-Request-ID": "abc-123"})
    fresh = httpx.post(f"{server.url}/encode", json=GOOD)
    odd = httpx.post(f"{server.url}/encode", json=GOOD, headers={"X-Request-ID": "x" * 129})
    refused = httpx.post(f"{server.url}/decode", json={"latents": [[0.0]]})
    assert given.headers["x-request-id"] == "abc-123"
    assert re.fullmatch(r"[0-9a-f]{32}", fresh.headers["x-request-id"])
    assert re.fullmatch(r"[0-9a-f]{32}", odd.headers["x-request-id"])  # not echoed as sent
    sha = httpx.get(f"{server.url}/model").json()["sha256"]
    server.stop()

    lines = log_lines(server)  # every line is JSON, start-up included
    requests = [ln for ln in lines if ln["logger"] == "app.access"]
    by_id = {ln["request_id"]: ln for ln in requests}
    line = by_id["abc-123"]
    assert line["route"] == "/encode"
    assert line["method"] == "POST"
    assert line["status"] == 200
    assert line["instances"] == 2
    assert line["level"] == "info"
    assert isinstance(line["duration_ms"], float)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(line["time"]))
    assert by_id[fresh.headers["x-request-id"]]["status"] == 200
    assert by_id[refused.headers["x-request-id"]]["status"] == 422

    ready = next(ln for ln in lines if ln["message"] == "ready")
    assert ready["sha256"] == sha
    assert ready["device"] == "cpu"
    assert ready["input_shape"] == [2, 2]
    assert ready["likelihood"] == "bernoulli"


def test_text_logs_on_request(start_server: Start, tiny_artifact: Path) -> None:
    server = start_server({"VAE_MODEL_PATH": str(tiny_artifact), "VAE_LOG_FORMAT": "text"})
    server.wait_ready()
    httpx.post(f"{server.url}/encode", json=GOOD)
    server.stop()
    text = server.log.read_text()
    assert "INFO app.access POST /encode 200" in text
    assert not text.lstrip().startswith("{")
