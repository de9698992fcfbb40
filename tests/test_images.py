"""Pictures in and out on a real server: PNG grids from /sample and /decode, PNG and JPEG uploads
to /encode and /anomaly-score, checked pixel for pixel against the JSON answers for the same work,
and every refusal a one-sentence 4xx after which the server still serves."""

from __future__ import annotations

import io
import json
import math
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from PIL import Image
from websockets.sync.client import ClientConnection, connect

from app import images
from tests.conftest import MNIST_DIR, Server, make_artifact
from tests.test_docs_browser import BLOCK_NETWORK, CHROMIUM_FLAGS, chromium  # noqa: F401
from tests.test_hardening import raw_post
from training.data import read_idx

pytestmark = pytest.mark.server

H = W = 28
PNG_ACCEPT = {"accept": "image/png"}


def start(env: dict[str, str], log: Path) -> Server:
    server = Server(env, log)  # it passes on no VAE_* of the shell's
    server.wait_ready()
    return server


@pytest.fixture(scope="module")
def image_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One real server for the module, serving a 28x28 Bernoulli model (784-32-4)."""
    tmp = tmp_path_factory.mktemp("images")
    artifact = make_artifact(tmp / "vae.pt", input_shape=(H, W), hidden=(32,), latent_dim=4)
    # A small batch size: start-up warms every size up to it, and these tests send few rows.
    env = {"VAE_MODEL_PATH": str(artifact), "VAE_MAX_INSTANCES": "8", "VAE_MAX_BATCH_SIZE": "8"}
    server = start(env, tmp / "log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def vector_server(
    gaussian_artifact: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """A model whose inputs and outputs are vectors of 3 values, not images."""
    env = {"VAE_MODEL_PATH": str(gaussian_artifact), "VAE_MAX_BATCH_SIZE": "8"}
    server = start(env, tmp_path_factory.mktemp("vector") / "log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def http(image_server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=image_server.url, timeout=30.0) as client:
        yield client


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    """The first real MNIST test images, (N, 28, 28) uint8: white strokes on black."""
    return read_idx(MNIST_DIR / "t10k-images-idx3-ubyte.gz")[:8]


def encoded(pixels: np.ndarray, fmt: str = "PNG", **save: Any) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **save)
    return buf.getvalue()


def as_instances(pixels: np.ndarray) -> list[list[float]]:
    """What the training data reader makes of the same pixels: uint8 / 255 in float32."""
    flat = pixels.reshape(len(pixels), -1).astype(np.float32) / np.float32(255)
    return flat.tolist()


def upload(*files: bytes, name: str = "digit.png") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", (name, data, "image/png")) for data in files]


def ok(r: httpx.Response) -> Any:
    assert r.status_code == 200, r.text
    return r.json()


def grid(r: httpx.Response) -> np.ndarray:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(r.content))
    assert img.format == "PNG"
    assert img.mode == "L"
    return np.asarray(img)


def cell(pixels: np.ndarray, i: int, n: int, scale: int = 1) -> np.ndarray:
    """The i-th cell of a grid of n, by the layout the API documents: row-major, near-square,
    cells 2 px apart."""
    cols = math.ceil(math.sqrt(n))
    r, c = divmod(i, cols)
    h, w = H * scale, W * scale
    return pixels[r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w]


def expected_pixels(outputs: list[list[float]]) -> np.ndarray:
    """A Bernoulli model's probabilities p as grey levels: round(255 p)."""
    return np.rint(np.asarray(outputs, dtype=np.float64) * 255).astype(np.uint8).reshape(-1, H, W)


def refused(server: Server, r: httpx.Response, status: int, detail: str) -> None:
    """A one-sentence refusal, after which the server still answers real work."""
    assert (r.status_code, r.json()) == (status, {"detail": detail})
    assert detail.count(". ") == 0
    assert detail.endswith(".")
    after = httpx.post(f"{server.url}/sample", json={"n": 1, "seed": 0}, timeout=10)
    assert after.status_code == 200, after.text


# -- PNG out -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "size"),
    [(1, (28, 28)), (5, (3 * 28 + 2 * 2, 2 * 28 + 2)), (16, (4 * 28 + 3 * 2, 4 * 28 + 3 * 2))],
)
def test_sample_png_is_a_near_square_grey_grid(
    http: httpx.Client, n: int, size: tuple[int, int]
) -> None:
    pixels = grid(http.post("/sample", json={"n": n, "seed": 0}, headers=PNG_ACCEPT))
    assert (pixels.shape[1], pixels.shape[0]) == size


def test_sample_png_is_byte_identical_for_a_seed(http: httpx.Client) -> None:
    def draw(seed: int) -> bytes:
        r = http.post("/sample", json={"n": 9, "seed": seed}, headers=PNG_ACCEPT)
        assert r.status_code == 200
        return r.content

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_sample_png_cells_are_the_json_outputs(http: httpx.Client) -> None:
    body = {"n": 5, "seed": 3}
    outputs = ok(http.post("/sample", json=body))["outputs"]
    pixels = grid(http.post("/sample", json=body, headers=PNG_ACCEPT))
    want = expected_pixels(outputs)
    for i in range(5):
        np.testing.assert_array_equal(cell(pixels, i, 5), want[i])
    # The separators, and the sixth cell of the 2x3 grid that holds no image, are grey.
    assert (pixels[28:30, :] == 128).all()
    assert (pixels[:, 28:30] == 128).all()
    assert (cell(pixels, 5, 5) == 128).all()


def test_sample_png_mode_output_is_black_and_white(http: httpx.Client) -> None:
    body = {"n": 4, "seed": 1, "output": "mode"}
    pixels = grid(http.post("/sample", json=body, headers=PNG_ACCEPT))
    outputs = ok(http.post("/sample", json=body))["outputs"]
    for i in range(4):
        np.testing.assert_array_equal(cell(pixels, i, 4), expected_pixels(outputs)[i])
        assert set(np.unique(cell(pixels, i, 4))) <= {0, 255}


def test_sample_png_scale_draws_each_pixel_as_a_square(http: httpx.Client) -> None:
    body = {"n": 2, "seed": 5}
    small = grid(http.post("/sample", json=body, headers=PNG_ACCEPT))
    big = grid(http.post("/sample?scale=3", json=body, headers=PNG_ACCEPT))
    assert big.shape == (3 * 28, 2 * 3 * 28 + 2)
    for i in range(2):
        np.testing.assert_array_equal(
            cell(big, i, 2, scale=3), np.kron(cell(small, i, 2), np.ones((3, 3), np.uint8))
        )


def test_decode_png_cells_are_the_json_outputs(http: httpx.Client) -> None:
    latents = np.random.default_rng(0).normal(size=(3, 4)).round(3).tolist()
    outputs = ok(http.post("/decode", json={"latents": latents}))["outputs"]
    pixels = grid(http.post("/decode", json={"latents": latents}, headers=PNG_ACCEPT))
    assert pixels.shape == (2 * 28 + 2, 2 * 28 + 2)
    for i in range(3):
        np.testing.assert_array_equal(cell(pixels, i, 3), expected_pixels(outputs)[i])


def test_decode_png_from_an_npy_body_takes_scale_from_the_query(http: httpx.Client) -> None:
    z = np.zeros((1, 4), dtype=np.float32)
    buf = io.BytesIO()
    np.save(buf, z)
    r = http.post(
        "/decode?scale=2&output=mode",
        content=buf.getvalue(),
        headers={"content-type": "application/x-npy", **PNG_ACCEPT},
    )
    outputs = ok(http.post("/decode", json={"latents": z.tolist(), "output": "mode"}))["outputs"]
    want = np.kron(expected_pixels(outputs)[0], np.ones((2, 2), np.uint8))
    np.testing.assert_array_equal(grid(r), want)


def test_accept_lists_are_read_with_their_q_values(http: httpx.Client) -> None:
    body = {"n": 1, "seed": 0}
    png = http.post("/sample", json=body, headers={"accept": "application/json;q=0.5, image/*"})
    assert png.headers["content-type"] == "image/png"
    declined = http.post("/sample", json=body, headers={"accept": "image/png;q=0, */*"})
    assert declined.headers["content-type"] == "application/json"


# -- uploads in --------------------------------------------------------------------------------


def test_encode_upload_of_an_mnist_png_equals_the_json_instance(
    http: httpx.Client, digits: np.ndarray
) -> None:
    # 28x28 greyscale: no resampling, so the instance is bit for bit what JSON would carry.
    want = ok(
        http.post("/encode", json={"instances": as_instances(digits[:1]), "samples": 2, "seed": 0})
    )
    got = ok(
        http.post("/encode", files=upload(encoded(digits[0])), data={"samples": "2", "seed": "0"})
    )
    assert got == want


def test_encode_upload_takes_options_from_the_query_as_well(
    http: httpx.Client, digits: np.ndarray
) -> None:
    in_form = ok(
        http.post("/encode", files=upload(encoded(digits[0])), data={"samples": "1", "seed": "4"})
    )
    in_query = ok(http.post("/encode?samples=1&seed=4", files=upload(encoded(digits[0]))))
    assert in_query == in_form


def test_several_uploads_are_several_instances_in_order(
    http: httpx.Client, digits: np.ndarray
) -> None:
    files = upload(*(encoded(d) for d in digits[:3]))
    got = ok(http.post("/encode?seed=0", files=files))
    want = ok(http.post("/encode", json={"instances": as_instances(digits[:3]), "seed": 0}))
    assert got == want


def test_encode_upload_of_a_jpeg_is_close(http: httpx.Client, digits: np.ndarray) -> None:
    exact = np.asarray(ok(http.post("/encode?seed=0", files=upload(encoded(digits[0]))))["mean"])
    jpeg = encoded(digits[0], "JPEG", quality=95)
    lossy = np.asarray(ok(http.post("/encode?seed=0", files=upload(jpeg, name="d.jpg")))["mean"])
    other = np.asarray(ok(http.post("/encode?seed=0", files=upload(encoded(digits[1]))))["mean"])
    # JPEG moves the representation a little, and far less than another digit does.
    assert 0 < np.abs(lossy - exact).max() < 0.2 * np.abs(other - exact).max()


def test_encode_upload_of_a_56x56_image_is_resized(http: httpx.Client, digits: np.ndarray) -> None:
    exact = np.asarray(ok(http.post("/encode?seed=0", files=upload(encoded(digits[0]))))["mean"])
    doubled = np.kron(digits[0], np.ones((2, 2), np.uint8))  # 56x56
    resized = np.asarray(ok(http.post("/encode?seed=0", files=upload(encoded(doubled))))["mean"])
    other = np.asarray(ok(http.post("/encode?seed=0", files=upload(encoded(digits[1]))))["mean"])
    assert 0 < np.abs(resized - exact).max() < 0.2 * np.abs(other - exact).max()


def test_invert_makes_dark_ink_on_white_the_same_as_the_original(
    http: httpx.Client, digits: np.ndarray
) -> None:
    original = ok(http.post("/encode?seed=0", files=upload(encoded(digits[0]))))
    scan = encoded(255 - digits[0])  # a black 7 on white paper
    assert ok(http.post("/encode?seed=0", files=upload(scan), data={"invert": "true"})) == original
    assert ok(http.post("/encode?seed=0&invert=true", files=upload(scan))) == original
    assert ok(http.post("/encode?seed=0", files=upload(scan))) != original


def test_colour_upload_is_made_grey(http: httpx.Client, digits: np.ndarray) -> None:
    grey = ok(http.post("/encode?seed=0", files=upload(encoded(digits[0]))))
    rgb = np.repeat(digits[0][:, :, None], 3, axis=2)  # equal channels: luma is the grey level
    assert ok(http.post("/encode?seed=0", files=upload(encoded(rgb)))) == grey


def test_anomaly_score_upload_equals_the_json_instances(
    http: httpx.Client, digits: np.ndarray
) -> None:
    want = ok(
        http.post(
            "/anomaly-score", json={"instances": as_instances(digits[:2]), "samples": 4, "seed": 1}
        )
    )
    files = upload(encoded(digits[0]), encoded(digits[1]))
    got = ok(http.post("/anomaly-score", files=files, data={"samples": "4", "seed": "1"}))
    assert got == want


def test_upload_answers_npy_when_asked(http: httpx.Client, digits: np.ndarray) -> None:
    r = http.post(
        "/encode?seed=0", files=upload(encoded(digits[0])), headers={"accept": "application/x-npy"}
    )
    assert r.headers["content-type"] == "application/x-npy"
    mean = np.load(io.BytesIO(r.content))["mean"]
    want = ok(http.post("/encode?seed=0", files=upload(encoded(digits[0]))))["mean"]
    np.testing.assert_array_equal(mean, np.asarray(want, dtype=np.float32))


# -- refusals ----------------------------------------------------------------------------------


def png_declaring(width: int, height: int) -> bytes:
    """A PNG of a few dozen bytes whose header declares width x height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def animated_png() -> bytes:
    frames = [Image.new("L", (28, 28), v) for v in (0, 128, 255)]
    buf = io.BytesIO()
    frames[0].save(buf, format="PNG", save_all=True, append_images=frames[1:])
    return buf.getvalue()


@pytest.mark.parametrize(
    ("name", "data", "status", "detail"),
    [
        ("notes.txt", b"not a picture\n", 415, "file[0] (notes.txt) is not a PNG or JPEG image."),
        (
            "d.gif",
            encoded(np.zeros((28, 28), np.uint8), "GIF"),
            415,
            "file[0] (d.gif) is not a PNG or JPEG image.",
        ),
        (
            "d.tif",
            encoded(np.zeros((28, 28), np.uint8), "TIFF"),
            415,
            "file[0] (d.tif) is not a PNG or JPEG image.",
        ),
        (
            "d.png",
            encoded(np.zeros((28, 28), np.uint8))[:30],
            422,
            "file[0] (d.png) is a damaged or truncated image.",
        ),
        (
            "d.jpg",
            encoded(np.zeros((28, 28), np.uint8), "JPEG")[:200],
            422,
            "file[0] (d.jpg) is a damaged or truncated image.",
        ),
        ("d.png", b"", 422, "file[0] (d.png) is empty."),
        (
            "big.png",
            png_declaring(5000, 20),
            422,
            "file[0] (big.png) is 5000 x 20 pixels; the most this service reads is 4096 x 4096.",
        ),
        (
            "bomb.png",
            png_declaring(100_000, 100_000),
            422,
            "file[0] (bomb.png) declares more pixels than the 4096 x 4096 this service reads.",
        ),
        (
            "anim.png",
            animated_png(),
            422,
            "file[0] (anim.png) has 3 frames; send one still image, not an animation.",
        ),
    ],
)
def test_bad_uploads_are_refused_in_one_sentence(
    image_server: Server, http: httpx.Client, name: str, data: bytes, status: int, detail: str
) -> None:
    r = http.post("/encode", files=[("file", (name, data, "application/octet-stream"))])
    refused(image_server, r, status, detail)


def test_the_refusal_names_which_upload_is_bad(
    image_server: Server, http: httpx.Client, digits: np.ndarray
) -> None:
    files = [*upload(encoded(digits[0])), ("file", ("b.txt", b"text", "text/plain"))]
    r = http.post("/anomaly-score", files=files)
    refused(image_server, r, 415, "file[1] (b.txt) is not a PNG or JPEG image.")


@pytest.mark.parametrize(
    ("files", "data", "query", "detail"),
    [
        (
            [("file", (None, b"digit.png"))],
            {},
            "",
            "The form field 'file' holds text, not a file; upload the image itself (curl -F file=@digit.png).",
        ),
        (
            [("image", ("d.png", b"x", "image/png"))],
            {},
            "",
            "The form has a file in the field 'image'; send images in 'file'.",
        ),
        (None, {"bogus": "1"}, "", "Unknown field 'bogus' in the request body."),
        (None, {}, "?bogus=1", "Unknown query parameter 'bogus'."),
        (
            None,
            {"invert": "perhaps"},
            "",
            "invert: Input should be true or false.",
        ),
        (None, {"invert": "1"}, "", "invert: Input should be true or false."),
        (None, {"seed": "-1"}, "", "seed: Input should be greater than or equal to 0."),
        (
            None,
            {"seed": "1"},
            "?seed=2",
            "The option 'seed' is given both in the query and the body.",
        ),
    ],
)
def test_bad_forms_are_refused_in_one_sentence(
    image_server: Server,
    http: httpx.Client,
    digits: np.ndarray,
    files: list[Any] | None,
    data: dict[str, str],
    query: str,
    detail: str,
) -> None:
    r = http.post(f"/encode{query}", files=files or upload(encoded(digits[0])), data=data)
    refused(image_server, r, 422, detail)


def test_a_form_without_a_file_is_refused(image_server: Server, http: httpx.Client) -> None:
    body = b'--b\r\nContent-Disposition: form-data; name="invert"\r\n\r\ntrue\r\n--b--\r\n'
    r = http.post(
        "/encode", content=body, headers={"content-type": "multipart/form-data; boundary=b"}
    )
    detail = (
        "The form has no 'file' field; upload one or more images in it (curl -F file=@digit.png)."
    )
    refused(image_server, r, 422, detail)


def test_a_form_without_a_boundary_is_refused(image_server: Server, http: httpx.Client) -> None:
    r = http.post("/encode", content=b"--x--", headers={"content-type": "multipart/form-data"})
    detail = "The multipart/form-data body cannot be read: missing boundary in multipart."
    refused(image_server, r, 422, detail)


def test_more_uploads_than_the_instance_limit_are_refused(
    image_server: Server, http: httpx.Client, digits: np.ndarray
) -> None:
    one = encoded(digits[0])
    r = http.post("/encode", files=upload(*[one] * 9))
    refused(image_server, r, 422, "9 images is over the limit of 8 (VAE_MAX_INSTANCES).")
    r = http.post("/encode", files=upload(*[one] * 12))
    detail = "The multipart/form-data body cannot be read: it holds more than 8 files (VAE_MAX_INSTANCES)."
    refused(image_server, r, 422, detail)


def test_uploads_are_bounded_in_total_pixels(image_server: Server, http: httpx.Client) -> None:
    # Each may be read alone, five are 84 megapixels of decoding: refused before any of it.
    r = http.post("/encode", files=upload(*[png_declaring(4096, 4096)] * 5))
    detail = "The uploads declare 83.9 megapixels together; one request may hold 67.1 at most, so send fewer or smaller images."
    refused(image_server, r, 422, detail)


def test_an_upload_over_the_body_limit_is_a_413_even_unannounced(image_server: Server) -> None:
    """Chunked, so no Content-Length warns the server: the form parser meets the limit midway
    and must let the 413 through rather than call it a bad form."""
    head = (
        b"POST /encode HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\n\r\n"
    )
    part = b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n\r\n'

    def chunks() -> Iterator[bytes]:
        yield b"%x\r\n%s\r\n" % (len(part), part)
        for _ in range(40):  # 40 MiB if all sent, over the default 32 MiB VAE_MAX_BODY_BYTES
            yield b"%x\r\n%s\r\n" % (2**20, b"\0" * 2**20)

    answer = raw_post(image_server.port, head, chunks())
    assert answer.startswith(b"HTTP/1.1 413"), answer
    # The guard's own refusal (the body may come in a later segment than the head; its length
    # names it): {"detail": "The request body is larger than 33554432 bytes, the limit ..."}
    detail = "The request body is larger than 33554432 bytes, the limit (VAE_MAX_BODY_BYTES)."
    assert b"content-length: %d\r\n" % len(orjson.dumps({"detail": detail})) in answer
    assert httpx.post(f"{image_server.url}/sample", json={"n": 1}).status_code == 200


@pytest.mark.parametrize(
    ("path", "detail"),
    [
        (
            "/decode",
            "Content-Type 'multipart/form-data' is not supported; send application/json or application/x-npy.",
        ),
        # (read_json_request's own 415 for a type it does not know at all)
        (
            "/sample",
            "Content-Type 'multipart/form-data' is not supported; send application/json or application/x-npy.",
        ),
    ],
)
def test_uploads_go_only_to_encode_and_anomaly_score(
    image_server: Server, http: httpx.Client, digits: np.ndarray, path: str, detail: str
) -> None:
    refused(image_server, http.post(path, files=upload(encoded(digits[0]))), 415, detail)


@pytest.mark.parametrize(
    ("query", "n", "detail"),
    [
        ("?scale=0", 1, "query.scale: Input should be greater than or equal to 1."),
        ("?scale=65", 1, "query.scale: Input should be less than or equal to 64."),
        (
            "?scale=big",
            1,
            "query.scale: Input should be a valid integer, unable to parse string as an integer.",
        ),
        (
            "?scale=50",
            9,
            "9 images at scale=50 make a 4204 x 4204 PNG, over the 4096 x 4096 limit; ask for fewer images or a smaller scale.",
        ),
    ],
)
def test_png_scale_is_bounded(
    image_server: Server, http: httpx.Client, query: str, n: int, detail: str
) -> None:
    r = http.post(f"/sample{query}", json={"n": n}, headers=PNG_ACCEPT)
    refused(image_server, r, 422, detail)


def test_vector_model_refuses_uploads(vector_server: Server, digits: np.ndarray) -> None:
    r = httpx.post(f"{vector_server.url}/encode", files=upload(encoded(digits[0])))
    detail = "This model takes vectors of 3 values, not images; send application/json or application/x-npy."
    refused(vector_server, r, 415, detail)


@pytest.mark.parametrize(
    ("path", "body"), [("/sample", {"n": 2}), ("/decode", {"latents": [[0.0, 0.0]]})]
)
def test_vector_model_answers_406_to_png_only(
    vector_server: Server, path: str, body: dict[str, Any]
) -> None:
    r = httpx.post(f"{vector_server.url}{path}", json=body, headers=PNG_ACCEPT)
    detail = "This model's outputs are vectors of 3 values, not images; accept application/json or application/x-npy."
    refused(vector_server, r, 406, detail)
    # A client that takes JSON as well gets JSON.
    r = httpx.post(
        f"{vector_server.url}{path}",
        json=body,
        headers={"accept": "image/png, application/json;q=0.5"},
    )
    assert r.status_code == 200
    assert len(r.json()["outputs"][0]) == 3


# -- the docs ----------------------------------------------------------------------------------


def test_openapi_offers_a_file_picker_and_png_answers(http: httpx.Client) -> None:
    paths = http.get("/openapi.json").json()["paths"]
    for path in ("/encode", "/anomaly-score"):
        content = paths[path]["post"]["requestBody"]["content"]
        assert set(content) == {"application/json", "application/x-npy", "multipart/form-data"}
        form = content["multipart/form-data"]["schema"]
        assert form["required"] == ["file"]
        assert form["properties"]["file"] == {
            **form["properties"]["file"],
            "type": "string",
            "format": "binary",
        }
        assert form["properties"]["invert"]["type"] == "boolean"
        assert "seed" in form["properties"]
        assert "415" in paths[path]["post"]["responses"]
    for path in ("/sample", "/decode"):
        op = paths[path]["post"]
        assert set(op["responses"]["200"]["content"]) == {
            "application/json",
            "application/x-npy",
            "image/png",
        }
        assert "406" in op["responses"]
        [scale] = [p for p in op["parameters"] if p["name"] == "scale"]
        assert (scale["in"], scale["schema"]["minimum"], scale["schema"]["maximum"]) == (
            "query",
            1,
            64,
        )


# -- the pictures themselves, in-process -------------------------------------------------------


def test_grid_shape_is_near_square() -> None:
    assert [images.grid_shape(n) for n in (1, 2, 3, 4, 5, 10, 16, 17)] == [
        (1, 1), (1, 2), (2, 2), (2, 2), (2, 3), (3, 4), (4, 4), (4, 5)
    ]  # fmt: skip


def test_unbounded_outputs_are_min_max_scaled_over_the_whole_grid() -> None:
    outputs = np.array([[-2.0, 0.0], [1.0, 2.0]], dtype=np.float32)
    got = images.to_pixels(outputs, (1, 2), (None, None))
    np.testing.assert_array_equal(got.reshape(2, 2), [[0, 128], [191, 255]])
    assert (images.to_pixels(np.ones((2, 2), np.float32), (1, 2), (None, None)) == 0).all()


def test_bounded_outputs_are_clipped_to_the_range() -> None:
    outputs = np.array([[-0.5, 0.5, 1.5]], dtype=np.float32)
    np.testing.assert_array_equal(images.to_pixels(outputs, (1, 3), (0.0, 1.0)), [[[0, 128, 255]]])


def test_bounded_input_range_maps_grey_levels_onto_it() -> None:
    x = images.to_instances(np.array([[[0, 255]]], np.uint8), (-1.0, 1.0))
    np.testing.assert_array_equal(x, [[-1.0, 1.0]])


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    wide = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    got = images.read_image(encoded(wide), "x", (1, 3))
    np.testing.assert_array_equal(got, [[0, 100, 255]])


def test_transparent_pixels_are_white_like_on_a_page() -> None:
    ink = np.zeros((2, 2, 4), np.uint8)  # black everywhere, opaque only at the top left
    ink[0, 0, 3] = 255
    got = images.read_image(encoded(ink), "x", (2, 2))
    np.testing.assert_array_equal(got, [[0, 255], [255, 255]])
    np.testing.assert_array_equal(
        images.read_image(encoded(ink), "x", (2, 2), invert=True), 255 - got
    )


def test_downscaling_keeps_the_picture(digits: np.ndarray) -> None:
    doubled = np.kron(digits[0], np.ones((2, 2), np.uint8))
    got = images.read_image(encoded(doubled), "x", (28, 28)).astype(int)
    assert np.abs(got - digits[0]).mean() < 3  # grey levels out of 255


# -- the docs page, in a real browser ----------------------------------------------------------


class Page:
    """One Chromium tab driven over the DevTools protocol, as a person would use /docs."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.calls = 0

    def cdp(self, method: str, **params: Any) -> Any:
        self.calls += 1
        self.ws.send(json.dumps({"id": self.calls, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=30))
            if message.get("id") == self.calls:
                assert "error" not in message, message
                return message["result"]

    def js(self, expression: str) -> Any:
        result = self.cdp("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if value := self.js(expression):
                return value
            time.sleep(0.1)
        raise AssertionError(f"never true in the page: {expression}")

    def open_operation(self, op: str) -> None:
        """Expand an operation and press "Try it out"."""
        self.wait_for(f"!!document.querySelector('{op} .opblock-summary-control')")
        self.js(f"document.querySelector('{op} .opblock-summary-control').click()")
        self.wait_for(f"!!document.querySelector('{op} .try-out__btn')")
        self.js(f"document.querySelector('{op} .try-out__btn').click()")

    def choose(self, op: str, value: str) -> None:
        """Pick `value` in the operation's drop-down that offers it (a content type or media
        type), the way React hears a person do it."""
        self.wait_for(
            f"[...document.querySelectorAll('{op} select')].some(s => [...s.options].some(o => o.value === '{value}'))"
        )
        self.js(
            f"""(() => {{
            const s = [...document.querySelectorAll('{op} select')].find(s => [...s.options].some(o => o.value === '{value}'));
            Object.getOwnPropertyDescriptor(HTMLSelectElement.prototype, 'value').set.call(s, '{value}');
            s.dispatchEvent(new Event('change', {{bubbles: true}}));
        }})()"""
        )

    def execute(self, op: str) -> None:
        self.js(f"document.querySelector('{op} .execute').click()")


@pytest.fixture
def docs_page(image_server: Server, chromium: str, tmp_path: Path) -> Iterator[Page]:  # noqa: F811
    profile = tmp_path / "profile"
    cmd = [chromium, *CHROMIUM_FLAGS, *BLOCK_NETWORK, "--remote-debugging-port=0",
           f"--user-data-dir={profile}", "--window-size=1280,2000", "about:blank"]  # fmt: skip
    browser = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Chromium writes the port it chose, then the browser's path, into its profile.
        active = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while len(active.read_text().splitlines() if active.exists() else []) < 2:
            assert browser.poll() is None, "Chromium exited at start"
            assert time.monotonic() < deadline, "Chromium did not start its DevTools server"
            time.sleep(0.1)
        port = active.read_text().splitlines()[0]
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        [tab] = [t for t in targets if t["type"] == "page"]
        with connect(tab["webSocketDebuggerUrl"], max_size=None) as ws:
            page = Page(ws)
            page.cdp("Page.navigate", url=f"{image_server.url}/docs")
            yield page
    finally:
        browser.terminate()
        browser.wait(timeout=15)


@pytest.mark.browser
def test_docs_page_uploads_a_picture_to_encode(
    docs_page: Page, http: httpx.Client, digits: np.ndarray, tmp_path: Path
) -> None:
    op = "#operations-model-encode_instances_encode_post"
    docs_page.open_operation(op)
    docs_page.choose(op, "multipart/form-data")
    picker = f"{op} input[type=file]"
    docs_page.wait_for(f"!!document.querySelector('{picker}')")
    path = tmp_path / "digit.png"
    path.write_bytes(encoded(digits[0]))
    root = docs_page.cdp("DOM.getDocument")["root"]["nodeId"]
    node = docs_page.cdp("DOM.querySelector", nodeId=root, selector=picker)["nodeId"]
    docs_page.cdp("DOM.setFileInputFiles", files=[str(path)], nodeId=node)
    docs_page.execute(op)
    status, body = docs_page.wait_for(
        f"""(() => {{
        const status = document.querySelector('{op} .live-responses-table .response .response-col_status');
        const body = document.querySelector('{op} .live-responses-table .response .microlight');
        return status && body && [status.textContent, body.textContent];
    }})()"""
    )
    assert status == "200"
    # The form as Swagger UI sent it: the schema's defaults and examples (seed 0), no invert.
    want = ok(http.post("/encode", files=upload(encoded(digits[0])), data={"seed": "0"}))
    assert json.loads(body) == want


@pytest.mark.browser
def test_docs_page_shows_a_png_grid_from_sample(docs_page: Page) -> None:
    op = "#operations-model-sample_prior_sample_post"
    docs_page.open_operation(op)
    docs_page.choose(op, "image/png")  # the response media type: Swagger UI sends it as Accept
    docs_page.js(
        f"""(() => {{
        const t = document.querySelector('{op} textarea.body-param__text');
        Object.getOwnPropertyDescriptor(HTMLTextAreaElement.prototype, 'value').set.call(t, '{{"n": 16, "seed": 0}}');
        t.dispatchEvent(new Event('input', {{bubbles: true}}));
    }})()"""
    )
    docs_page.execute(op)
    # The page's policy lets the image through (img-src blob:), so it decodes at its real size.
    size = docs_page.wait_for(
        f"""(() => {{
        const img = document.querySelector('{op} .live-responses-table img');
        return img && img.complete && img.naturalWidth && [img.naturalWidth, img.naturalHeight];
    }})()"""
    )
    assert size == [4 * 28 + 3 * 2, 4 * 28 + 3 * 2]
