"""Binary .npy bodies and answers, content types, and the JSON fast path's precision."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings

X = np.array([[0.0, 1.0, 0.5, 0.25], [1.0, 1.0, 0.0, 0.0]], dtype=np.float32)
NPY = {"content-type": "application/x-npy"}


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


@pytest.fixture
def client(tiny_artifact: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(model_path=tiny_artifact, max_instances=8))) as c:
        yield c


def test_npy_body_gives_the_same_answer_as_json(client: TestClient) -> None:
    as_json = client.post("/encode", json={"instances": X.tolist(), "samples": 2, "seed": 3})
    as_npy = client.post("/encode?samples=2&seed=3", content=npy(X), headers=NPY)
    assert as_npy.status_code == 200
    assert as_npy.json() == as_json.json()


def test_npy_body_may_be_nested_to_the_input_shape(client: TestClient) -> None:
    flat = client.post("/encode", content=npy(X), headers=NPY).json()
    nested = client.post("/encode", content=npy(X.reshape(2, 2, 2)), headers=NPY).json()
    assert nested == flat


def test_npy_answer_is_a_record_per_instance(client: TestClient) -> None:
    r = client.post(
        "/encode?samples=3&seed=0", content=npy(X), headers={**NPY, "accept": "application/x-npy"}
    )
    assert r.headers["content-type"] == "application/x-npy"
    out = np.load(io.BytesIO(r.content), allow_pickle=False)
    assert out["mean"].shape == (2, 2)
    assert out["samples"].shape == (2, 3, 2)
    as_json = client.post("/encode", json={"instances": X.tolist(), "samples": 3, "seed": 0}).json()
    np.testing.assert_array_equal(out["mean"], np.asarray(as_json["mean"], dtype=np.float32))
    np.testing.assert_array_equal(out["samples"], np.asarray(as_json["samples"], dtype=np.float32))


def test_decode_answers_a_plain_npy_array(client: TestClient) -> None:
    z = np.zeros((3, 2), dtype=np.float32)
    r = client.post("/decode", content=npy(z), headers={**NPY, "accept": "application/x-npy"})
    out = np.load(io.BytesIO(r.content), allow_pickle=False)
    assert out.shape == (3, 4)
    assert out.dtype == np.float32


def test_sample_answers_npy_when_asked(client: TestClient) -> None:
    r = client.post("/sample", json={"n": 5, "seed": 1}, headers={"accept": "application/x-npy"})
    out = np.load(io.BytesIO(r.content), allow_pickle=False)
    assert out["latents"].shape == (5, 2)
    assert out["outputs"].shape == (5, 4)


BAD_NPY = [
    (b"\x93NUMPY garbage", "The request body is not a valid .npy array"),
    (npy(X)[:100], "The request body is not a valid .npy array"),
    (b"", "The request body is missing or empty."),
    (npy(np.array([["a", "b"]])), "The .npy array must hold plain numbers (float or integer)."),
    (npy(np.zeros(4, dtype=np.float32)),
     "The .npy array must be N x D or N x H x W with N >= 1; got shape (4,)."),
    (npy(np.array([[0, 0, 0, 0], [0, np.nan, 0, 0]], dtype=np.float32)),
     "instances[1] has a non-finite value."),
    (npy(np.zeros((2, 5), dtype=np.float32)),
     "instances[0] has 5 values; this model takes 4 values or a 2x2 array."),
    (npy(np.full((1, 4), 2.0, dtype=np.float32)),
     "instances[0] has values outside [0, 1], which this Bernoulli model needs."),
    (npy(np.zeros((9, 4), dtype=np.float32)), "9 instances is over the limit of 8 (VAE_MAX_INSTANCES)."),
]  # fmt: skip


@pytest.mark.parametrize(("body", "detail"), BAD_NPY)
def test_malformed_npy_gets_422(client: TestClient, body: bytes, detail: str) -> None:
    r = client.post("/encode", content=body, headers=NPY)
    assert r.status_code == 422
    assert r.json()["detail"].startswith(detail)
    assert client.post("/encode", content=npy(X), headers=NPY).status_code == 200


def test_object_npy_is_refused_without_unpickling(client: TestClient) -> None:
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    r = client.post("/encode", content=buf.getvalue(), headers=NPY)
    assert r.status_code == 422
    assert "allow_pickle=False" in r.json()["detail"]


def test_npy_options_are_checked_as_query_parameters(client: TestClient) -> None:
    r = client.post("/encode?sample=2", content=npy(X), headers=NPY)
    assert r.json() == {"detail": "Unknown query parameter 'sample'."}
    r = client.post("/encode?samples=-1", content=npy(X), headers=NPY)
    assert r.json() == {"detail": "query.samples: Input should be greater than or equal to 0."}


def test_unsupported_content_type_gets_415(client: TestClient) -> None:
    r = client.post("/encode", content=b"0,1,0,1", headers={"content-type": "text/csv"})
    assert r.status_code == 415
    assert r.json() == {
        "detail": "Content-Type 'text/csv' is not supported; send application/json or "
        "application/x-npy."
    }


def test_json_beyond_float32_gets_422(client: TestClient) -> None:
    r = client.post("/decode", json={"latents": [[0.0, 1e39]]})
    assert r.json() == {"detail": "latents[0] has values too large for float32."}


def test_openapi_documents_json_npy_and_image_bodies(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths["/decode"]["post"]["requestBody"]["content"]) == {
        "application/json",
        "application/x-npy",
    }
    for path in ("/encode", "/anomaly-score"):  # image uploads too (tests/test_images.py)
        content = paths[path]["post"]["requestBody"]["content"]
        assert set(content) == {"application/json", "application/x-npy", "multipart/form-data"}
    assert "application/x-npy" in paths["/encode"]["post"]["responses"]["200"]["content"]
