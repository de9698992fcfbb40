"""The bad-input matrix, against one real server: every case gets a 4xx with one sentence, and
a good request succeeds right after it."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import Server

pytestmark = pytest.mark.server

JSON = "application/json"
GOOD = b'{"instances": [[0.0, 1.0, 1.0, 0.0]]}'


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(
        {"VAE_MODEL_PATH": str(tiny_artifact), "VAE_MAX_SAMPLES": "64"},
        tmp_path_factory.mktemp("matrix") / "server.log",
    )
    s.wait_ready()
    yield s
    s.stop()


# (id, path, content type, body, status, the detail word for word)
CASES: list[tuple[str, str, str, bytes, int, str]] = [
    ("malformed json", "/encode", JSON, b'{"instances": [[0, 1,', 422,
     "The request body is not valid JSON."),
    ("empty body", "/encode", JSON, b"", 422, "The request body is missing or empty."),
    ("text/plain", "/encode", "text/plain", GOOD, 415,
     "Content-Type 'text/plain' is not supported; send application/json or application/x-npy."),
    ("form", "/encode", "application/x-www-form-urlencoded", b"instances=1", 415,
     "Content-Type 'application/x-www-form-urlencoded' is not supported; send application/json or application/x-npy."),
    ("xml", "/decode", "application/xml", b"<z/>", 415,
     "Content-Type 'application/xml' is not supported; send application/json or application/x-npy."),
    ("npy to /sample", "/sample", "application/x-npy", npy(np.zeros((1, 2))), 415,
     "This route takes application/json only."),
    ("body is a string", "/encode", JSON, b'"hello"', 422, "The request body must be a JSON object."),
    ("body is a number", "/encode", JSON, b"42", 422, "The request body must be a JSON object."),
    ("body is null", "/encode", JSON, b"null", 422, "The request body must be a JSON object."),
    ("body is a list", "/anomaly-score", JSON, b"[[0, 1, 1, 0]]", 422,
     "The request body must be a JSON object."),
    ("NaN literal", "/encode", JSON, b'{"instances": [[NaN, 0, 0, 0]]}', 422,
     "instances[0][0]: Input should be a finite number."),
    ("Infinity literal", "/decode", JSON, b'{"latents": [[Infinity, 0]]}', 422,
     "latents[0][0]: Input should be a finite number."),
    ("1e400", "/encode", JSON, b'{"instances": [[1e400, 0, 0, 0]]}', 422,
     "instances[0][0]: Input should be a finite number."),
    ("1e39 beyond float32", "/decode", JSON, b'{"latents": [[1e39, 0]]}', 422,
     "latents[0] has values too large for float32."),
    ("deep nesting", "/encode", JSON, b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
     422, "The request body is not valid JSON."),
    ("deep nesting and escapes", "/encode", JSON,
     b'{"\\u0069nstances": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", 422,
     "The request body is not valid JSON."),
    ("ragged rows", "/encode", JSON, b'{"instances": [[0, 1, 1, 0], [0, 1]]}', 422,
     "instances[1] has 2 values; this model takes 4 values or a 2x2 array."),
    ("wrong width", "/encode", JSON, b'{"instances": [[0, 1, 1]]}', 422,
     "instances[0] has 3 values; this model takes 4 values or a 2x2 array."),
    ("no instances", "/encode", JSON, b'{"instances": []}', 422,
     "instances: List should have at least 1 item after validation, not 0."),
    ("boolean pixel", "/encode", JSON, b'{"instances": [[true, 0, 0, 0]]}', 422,
     "instances[0][0]: Input should be a valid number."),
    ("string pixel", "/anomaly-score", JSON, b'{"instances": [["0", 0, 0, 0]]}', 422,
     "instances[0][0]: Input should be a valid number."),
    ("boolean n", "/sample", JSON, b'{"n": true}', 422, "n: Input should be a valid integer."),
    ("negative n", "/sample", JSON, b'{"n": -1}', 422,
     "n: Input should be greater than or equal to 1."),
    ("huge n", "/sample", JSON, b'{"n": 1000000000000}', 422,
     "n=1000000000000 is over the limit of 64 (VAE_MAX_SAMPLES)."),
    ("fractional n", "/sample", JSON, b'{"n": 2.5}', 422,
     "n: Input should be a valid integer, got a number with a fractional part."),
    ("seed beyond 64 bits", "/sample", JSON, b'{"n": 1, "seed": 18446744073709551616}', 422,
     "seed: Input should be less than or equal to 9223372036854775807."),
    ("negative seed", "/encode", JSON, b'{"instances": [[0, 1, 1, 0]], "seed": -1}', 422,
     "seed: Input should be greater than or equal to 0."),
    ("samples over the limit", "/anomaly-score", JSON,
     b'{"instances": [[0, 1, 1, 0]], "samples": 65}', 422,
     "samples=65 is over the limit of 64 (VAE_MAX_SAMPLES)."),
    ("non-UTF-8", "/encode", JSON, b'{"instances": [[0, 1, 1, 0]], "seed": "\xff\xfe"}', 422,
     "The request body is not valid JSON."),
    ("non-UTF-8 alone", "/sample", JSON, b"\xff\xfe\xfd", 422, "The request body is not valid JSON."),
    ("duplicate key", "/encode", JSON,
     b'{"instances": [[0, 1, 1, 0]], "instances": [[1, 1, 1, 1]]}', 422,
     "The request body gives the key 'instances' more than once."),
    ("duplicate key in /sample", "/sample", JSON, b'{"n": 1, "n": 2}', 422,
     "The request body gives the key 'n' more than once."),
    ("escaped duplicate", "/decode", JSON, b'{"latents": [[0, 0]], "\\u006catents": [[1, 1]]}',
     422, "The request body gives the key 'latents' more than once."),
    ("unknown field", "/encode", JSON, b'{"instances": [[0, 1, 1, 0]], "extra": 1}', 422,
     "Unknown field 'extra' in the request body."),
    ("garbage npy", "/encode", "application/x-npy", b"\x93NUMPY garbage", 422,
     "The request body is not a valid .npy array: we only support format version (1,0), (2,0), and (3,0), not (32, 103)."),
    ("npy of strings", "/encode", "application/x-npy", npy(np.array([["a", "b", "c", "d"]])), 422,
     "The .npy array must hold plain numbers (float or integer)."),
    ("npy bad query", "/encode?samples=-3", "application/x-npy", npy(np.zeros((1, 4))), 422,
     "query.samples: Input should be greater than or equal to 0."),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "content_type", "body", "status", "detail"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_bad_request_gets_one_sentence_and_the_server_keeps_serving(
    server: Server, path: str, content_type: str, body: bytes, status: int, detail: str
) -> None:
    r = httpx.post(server.url + path, content=body, headers={"Content-Type": content_type})
    assert r.status_code == status, r.text
    assert r.json() == {"detail": detail}
    ok = httpx.post(f"{server.url}/encode", content=GOOD, headers={"Content-Type": JSON})
    assert ok.status_code == 200
