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


# (id, path, content type, body, status, detail or None to check only the form)
CASES: list[tuple[str, str, str, bytes, int, str | None]] = [
    ("malformed json", "/encode", JSON, b'{"instances": [[0, 1,', 422,
     "The request body is not valid JSON."),
    ("empty body", "/encode", JSON, b"", 422, None),
    ("text/plain", "/encode", "text/plain", GOOD, 415,
     "Content-Type 'text/plain' is not supported; send application/json or application/x-npy."),
    ("form", "/encode", "application/x-www-form-urlencoded", b"instances=1", 415, None),
    ("xml", "/decode", "application/xml", b"<z/>", 415, None),
    ("npy to /sample", "/sample", "application/x-npy", npy(np.zeros((1, 2))), 415,
     "This route takes application/json only."),
    ("body is a string", "/encode", JSON, b'"hello"', 422, None),
    ("body is a number", "/encode", JSON, b"42", 422, None),
    ("body is null", "/encode", JSON, b"null", 422, None),
    ("body is a list", "/anomaly-score", JSON, b"[[0, 1, 1, 0]]", 422, None),
    ("NaN literal", "/encode", JSON, b'{"instances": [[NaN, 0, 0, 0]]}', 422, None),
    ("Infinity literal", "/decode", JSON, b'{"latents": [[Infinity, 0]]}', 422, None),
    ("1e400", "/encode", JSON, b'{"instances": [[1e400, 0, 0, 0]]}', 422, None),
    ("1e39 beyond float32", "/decode", JSON, b'{"latents": [[1e39, 0]]}', 422, None),
    ("deep nesting", "/encode", JSON, b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
     422, None),
    ("deep nesting and escapes", "/encode", JSON,
     b'{"\\u0069nstances": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", 422, None),
    ("ragged rows", "/encode", JSON, b'{"instances": [[0, 1, 1, 0], [0, 1]]}', 422, None),
    ("wrong width", "/encode", JSON, b'{"instances": [[0, 1, 1]]}', 422,
     "instances[0] has 3 values; this model takes 4 values or a 2x2 array."),
    ("no instances", "/encode", JSON, b'{"instances": []}', 422, None),
    ("boolean pixel", "/encode", JSON, b'{"instances": [[true, 0, 0, 0]]}', 422, None),
    ("string pixel", "/anomaly-score", JSON, b'{"instances": [["0", 0, 0, 0]]}', 422, None),
    ("boolean n", "/sample", JSON, b'{"n": true}', 422, None),
    ("negative n", "/sample", JSON, b'{"n": -1}', 422, None),
    ("huge n", "/sample", JSON, b'{"n": 1000000000000}', 422, None),
    ("fractional n", "/sample", JSON, b'{"n": 2.5}', 422, None),
    ("seed beyond 64 bits", "/sample", JSON, b'{"n": 1, "seed": 18446744073709551616}', 422, None),
    ("negative seed", "/encode", JSON, b'{"instances": [[0, 1, 1, 0]], "seed": -1}', 422, None),
    ("samples over the limit", "/anomaly-score", JSON,
     b'{"instances": [[0, 1, 1, 0]], "samples": 65}', 422, None),
    ("non-UTF-8", "/encode", JSON, b'{"instances": [[0, 1, 1, 0]], "seed": "\xff\xfe"}', 422,
     None),
    ("non-UTF-8 alone", "/sample", JSON, b"\xff\xfe\xfd", 422, None),
    ("duplicate key", "/encode", JSON,
     b'{"instances": [[0, 1, 1, 0]], "instances": [[1, 1, 1, 1]]}', 422,
     "The request body gives the key 'instances' more than once."),
    ("duplicate key in /sample", "/sample", JSON, b'{"n": 1, "n": 2}', 422,
     "The request body gives the key 'n' more than once."),
    ("escaped duplicate", "/decode", JSON, b'{"latents": [[0, 0]], "\\u006catents": [[1, 1]]}',
     422, "The request body gives the key 'latents' more than once."),
    ("unknown field", "/encode", JSON, b'{"instances": [[0, 1, 1, 0]], "extra": 1}', 422,
     "Unknown field 'extra' in the request body."),
    ("garbage npy", "/encode", "application/x-npy", b"\x93NUMPY garbage", 422, None),
    ("npy of strings", "/encode", "application/x-npy", npy(np.array([["a", "b", "c", "d"]])), 422,
     "The .npy array must hold plain numbers (float or integer)."),
    ("npy bad query", "/encode?samples=-3", "application/x-npy", npy(np.zeros((1, 4))), 422, None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "content_type", "body", "status", "detail"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_bad_request_gets_one_sentence_and_the_server_keeps_serving(
    server: Server, path: str, content_type: str, body: bytes, status: int, detail: str | None
) -> None:
    r = httpx.post(server.url + path, content=body, headers={"Content-Type": content_type})
    assert r.status_code == status, r.text
    got = r.json()["detail"]
    assert isinstance(got, str)
    assert got.endswith(".")
    assert "\n" not in got
    assert len(got) < 200
    if detail is not None:
        assert got == detail
    ok = httpx.post(f"{server.url}/encode", content=GOOD, headers={"Content-Type": JSON})
    assert ok.status_code == 200
