"""The hot path (app/hot_path.py) answers exactly as FastAPI does: one real server with it, one
without, the same requests to both, and the answers compared byte for byte: every operation,
every media type in and out, V2 in JSON and binary, and the error answers."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.conftest import Server

X = [[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.5, 0.25]]
Z = [[0.1, -0.2], [1.5, 0.3]]
FLAT_X, FLAT_Z = [v for row in X for v in row], [v for row in Z for v in row]
JSON = {"content-type": "application/json"}
NPY = "application/x-npy"


def npy(values: Any) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(values, dtype=np.float32))
    return buf.getvalue()


def j(body: Any) -> bytes:
    return json.dumps(body).encode()


def v2_binary(model_input: str, values: Any, **parameters: Any) -> tuple[bytes, dict[str, str]]:
    raw = np.asarray(values, dtype=np.float32).tobytes()
    shape = list(np.asarray(values).shape)
    head = j({
        "inputs": [{"name": model_input, "shape": shape, "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)}}],
        "parameters": parameters,
        "outputs": [{"name": "mean", "parameters": {"binary_data": True}}],
    })  # fmt: skip
    headers = {"content-type": "application/octet-stream",
               "inference-header-content-length": str(len(head))}  # fmt: skip
    return head + raw, headers


BINARY_BODY, BINARY_HEADERS = v2_binary("instances", X, seed=4)

# (name, path, body, headers): the common requests, then options and answers of every kind,
# then the requests that fail, each for its own reason.
CASES: list[tuple[str, str, bytes, dict[str, str]]] = [
    ("encode json", "/encode", j({"instances": X, "seed": 1, "samples": 3}), JSON),
    ("encode json, no content type", "/encode", j({"instances": X, "seed": 1}), {}),
    ("encode json in, npy out", "/encode", j({"instances": X, "seed": 2, "samples": 2}),
     JSON | {"accept": NPY}),
    ("encode npy, options in the query", "/encode?samples=2&seed=3", npy(X),
     {"content-type": NPY, "accept": NPY}),
    ("encode nested to the image shape", "/encode", j({"instances": [[[0, 1], [1, 0]]]}), JSON),
    ("encode +json media type", "/encode", j({"instances": X}),
     {"content-type": "application/vnd.api+json"}),
    ("decode json", "/decode", j({"latents": Z}), JSON),
    ("decode mode, npy", "/decode?output=mode", npy(Z), {"content-type": NPY, "accept": NPY}),
    ("decode png", "/decode", j({"latents": Z}), JSON | {"accept": "image/png"}),
    ("anomaly json", "/anomaly-score", j({"instances": X, "seed": 5}), JSON),
    ("anomaly every option", "/anomaly-score",
     j({"instances": X, "seed": 6, "samples": 4, "log_likelihood_samples": 8, "attribution": True,
        "top_features": 2, "threshold_percentile": 0.9}), JSON),
    ("anomaly npy only", "/anomaly-score?seed=7", npy(X), {"content-type": NPY, "accept": NPY}),
    ("v2 encode json", "/v2/models/vae/infer",
     j({"inputs": [{"name": "instances", "shape": [2, 4], "datatype": "FP32",
                    "data": FLAT_X}], "parameters": {"seed": 3}}), JSON),
    ("v2 decode json", "/v2/models/vae-decode/infer",
     j({"inputs": [{"name": "latents", "shape": [2, 2], "datatype": "FP32",
                    "data": FLAT_Z}]}), JSON),
    ("v2 anomaly json", "/v2/models/vae-anomaly/infer",
     j({"id": "r1", "inputs": [{"name": "instances", "shape": [2, 4], "datatype": "FP32",
                                "data": FLAT_X}], "parameters": {"seed": 8}}), JSON),
    ("v2 binary", "/v2/models/vae/infer", BINARY_BODY, BINARY_HEADERS),
    # Refusals: each must be the same status and sentence on both paths.
    ("wrong width", "/encode", j({"instances": [[1.0, 2.0, 3.0]]}), JSON),
    ("not JSON", "/encode", b'{"instances": [[1, 2', JSON),
    ("a NaN", "/encode", b'{"instances": [[NaN, 0, 0, 0]]}', JSON),
    ("an unknown field", "/anomaly-score", j({"instances": X, "sample": 3}), JSON),
    ("a key twice", "/encode", b'{"instances": [[0,0,0,0]], "instances": [[1,1,1,1]]}', JSON),
    ("an empty body", "/encode", b"", JSON),
    ("samples over the limit", "/encode", j({"instances": X, "samples": 10**6}), JSON),
    ("an option twice", "/encode?seed=1", j({"instances": X, "seed": 2}), JSON),
    ("a bad npy", "/encode", b"\x93NUMPY not really", {"content-type": NPY}),
    ("an unsupported media type", "/encode", b"a,b", {"content-type": "text/csv"}),
    ("png from a vector option", "/decode?scale=0", j({"latents": Z}),
     JSON | {"accept": "image/png"}),
    ("v2 unknown model", "/v2/models/nope/infer", j({"inputs": []}), JSON),
    ("v2 bad tensor", "/v2/models/vae/infer",
     j({"inputs": [{"name": "instances", "shape": [1, 3], "datatype": "FP32",
                    "data": [1, 2, 3]}]}), JSON),
    ("v2 compressed", "/v2/models/vae/infer", b"x",
     JSON | {"content-encoding": "gzip"}),
    ("v2 bad header length", "/v2/models/vae/infer", BINARY_BODY,
     BINARY_HEADERS | {"inference-header-content-length": "99999"}),
]  # fmt: skip


@pytest.fixture(scope="module")
def servers(
    tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Server]]:
    logs = tmp_path_factory.mktemp("hot-path")
    env = {"VAE_MODEL_PATH": str(tiny_artifact), "VAE_MAX_SAMPLES": "64"}
    started = {
        "hot": Server(env | {"VAE_HOT_PATH": "true"}, logs / "hot.log"),
        "fastapi": Server(env | {"VAE_HOT_PATH": "false"}, logs / "fastapi.log"),
    }
    try:
        for server in started.values():
            server.wait_ready()
        yield started
    finally:
        for server in started.values():
            server.stop()


def answer(server: Server, path: str, body: bytes, headers: dict[str, str]) -> tuple[Any, ...]:
    r = httpx.post(server.url + path, content=body, headers=headers, timeout=30)
    # Everything but the request id, which is new on every request by design.
    kept = sorted((k, v) for k, v in r.headers.items() if k not in ("x-request-id", "date"))
    return r.status_code, kept, r.content


@pytest.mark.server
@pytest.mark.parametrize(("name", "path", "body", "headers"), CASES, ids=[c[0] for c in CASES])
def test_both_paths_give_the_same_bytes(
    servers: dict[str, Server], name: str, path: str, body: bytes, headers: dict[str, str]
) -> None:
    hot = answer(servers["hot"], path, body, headers)
    slow = answer(servers["fastapi"], path, body, headers)
    assert hot == slow
    assert hot[0] < 500  # every case is answered, well or with a 4xx


@pytest.mark.server
def test_both_paths_label_metrics_with_the_route_template(servers: dict[str, Server]) -> None:
    for server in servers.values():
        httpx.post(server.url + "/v2/models/vae/infer", content=BINARY_BODY,
                   headers=BINARY_HEADERS).raise_for_status()  # fmt: skip
    for server in servers.values():
        text = httpx.get(server.url + "/metrics").text
        assert 'route="/v2/models/{model_name}/infer",status="200"' in text
        assert 'route="/encode",status="200"' in text  # from the cases above


def test_the_hot_path_serves_its_routes_and_leaves_the_rest_to_fastapi(
    tiny_artifact: Path,
) -> None:
    """FastAPI's router puts the matched endpoint in the scope; the hot path does not, so
    the scope a handler saw says which path served it."""
    seen: dict[str, bool] = {}
    app = create_app(Settings(model_path=tiny_artifact, hot_path=True))

    @app.middleware("http")
    async def record(request: Any, call_next: Any) -> Any:  # outermost: sees the final scope
        response = await call_next(request)
        seen[request.url.path] = "endpoint" in request.scope
        return response

    with TestClient(app) as client:
        client.post("/encode", json={"instances": X})
        client.post("/v2/models/vae/infer", content=BINARY_BODY, headers=BINARY_HEADERS)
        client.post("/sample", json={"n": 1})
        client.post("/anomaly-score", content=b"a,b", headers={"content-type": "text/csv"})
    assert seen == {"/encode": False, "/v2/models/vae/infer": False, "/sample": True,
                    "/anomaly-score": True}  # fmt: skip
