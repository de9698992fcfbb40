"""The Open Inference Protocol (V2) on a real server, called by the official tritonclient and by
hand-built requests, and checked against the REST answers for the same work."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as triton
from fastapi.testclient import TestClient
from tritonclient.utils import InferenceServerException

from app import __version__
from app.main import create_app
from app.settings import Settings
from tests.conftest import EVERY_SCORE, Server

pytestmark = pytest.mark.server

HCL = "Inference-Header-Content-Length"
# Three instances of the tiny 2x2 Bernoulli model (D=4, Z=2).
X = np.array([[0.0, 1.0, 0.5, 0.25], [1.0, 1.0, 0.0, 0.0], [0.2, 0.4, 0.6, 0.8]], np.float32)
Z = np.array([[0.0, 0.0], [1.5, -0.5]], np.float32)


@pytest.fixture(scope="module")
def server(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One real server for the module: starting one costs seconds, the tests milliseconds."""
    env = {
        "VAE_MODEL_PATH": str(tiny_artifact),
        "VAE_MAX_INSTANCES": "8",
        "VAE_MAX_SAMPLES": "50",
        "VAE_MAX_BATCH_SIZE": "8",
    }
    srv = Server(env, tmp_path_factory.mktemp("v2") / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10.0) as client:
        yield client


@pytest.fixture
def client(server: Server) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
    yield c
    c.close()


def rest(http: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = http.post(path, json=body)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def f32(values: Any) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def triton_input(
    name: str, x: np.ndarray, datatype: str = "FP32", binary: bool = True
) -> triton.InferInput:
    inp = triton.InferInput(name, list(x.shape), datatype)
    inp.set_data_from_numpy(x, binary_data=binary)
    return inp


def outputs(*names: str, binary: bool = True) -> list[triton.InferRequestedOutput]:
    return [triton.InferRequestedOutput(n, binary_data=binary) for n in names]


# --- tritonclient: health and metadata -------------------------------------------------------


def test_tritonclient_sees_the_server_live_and_ready(
    client: triton.InferenceServerClient,
) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    for name in ("vae", "vae-decode", "vae-anomaly"):
        assert client.is_model_ready(name)
    assert not client.is_model_ready("vae-sample")


def test_tritonclient_reads_server_metadata(client: triton.InferenceServerClient) -> None:
    assert client.get_server_metadata() == {
        "name": "vae-service",
        "version": __version__,
        "extensions": ["binary_tensor_data", "model_repository"],
    }


@pytest.mark.parametrize(
    ("model", "inputs", "outs"),
    [
        ("vae", [("instances", "FP32", [-1, 4])],
         [("mean", "FP32", [-1, 2]), ("std", "FP32", [-1, 2]), ("samples", "FP32", [-1, -1, 2])]),
        ("vae-decode", [("latents", "FP32", [-1, 2])], [("outputs", "FP32", [-1, 4])]),
        ("vae-anomaly", [("instances", "FP32", [-1, 4])],
         [(n, "FP32", [-1]) for n in (*EVERY_SCORE, *(f"{s}_percentile" for s in EVERY_SCORE))]
         + [("is_anomaly", "BOOL", [-1]), ("attribution", "FP32", [-1, 4])]),
    ],
)  # fmt: skip
def test_tritonclient_reads_each_models_signature(
    client: triton.InferenceServerClient, model: str, inputs: list[Any], outs: list[Any]
) -> None:
    def tensors(spec: list[Any]) -> list[dict[str, Any]]:
        return [{"name": n, "datatype": d, "shape": s} for n, d, s in spec]

    assert client.get_model_metadata(model) == {
        "name": model,
        "versions": ["1"],
        "platform": "pytorch_torchscript",
        "inputs": tensors(inputs),
        "outputs": tensors(outs),
    }


# --- tritonclient: inference equals REST -----------------------------------------------------
# The encoder's mean is deterministic, but oneDNN may round a row differently when other rows
# share its forward pass. A seed makes a request run alone (app/batching.py), so seeded REST
# and V2 requests for the same rows do exactly the same arithmetic: compare them bit for bit.


def test_tritonclient_binary_encode_equals_rest_encode(
    client: triton.InferenceServerClient, http: httpx.Client
) -> None:
    result = client.infer(
        "vae", [triton_input("instances", X)], outputs=outputs("mean", "std"),
        parameters={"seed": 0},
    )  # fmt: skip
    expected = rest(http, "/encode", {"instances": X.tolist(), "seed": 0})
    np.testing.assert_array_equal(result.as_numpy("mean"), f32(expected["mean"]))
    np.testing.assert_array_equal(result.as_numpy("std"), f32(expected["std"]))
    sizes = [o["parameters"]["binary_data_size"] for o in result.get_response()["outputs"]]
    assert sizes == [3 * 2 * 4, 3 * 2 * 4]  # both came back as raw float32 bytes


def test_tritonclient_json_encode_equals_rest_encode(
    client: triton.InferenceServerClient, http: httpx.Client
) -> None:
    result = client.infer(
        "vae", [triton_input("instances", X, binary=False)],
        outputs=outputs("mean", "std", binary=False), parameters={"seed": 0},
    )  # fmt: skip
    expected = rest(http, "/encode", {"instances": X.tolist(), "seed": 0})
    np.testing.assert_array_equal(result.as_numpy("mean"), f32(expected["mean"]))
    np.testing.assert_array_equal(result.as_numpy("std"), f32(expected["std"]))
    assert all("data" in o for o in result.get_response()["outputs"])


def test_tritonclient_gets_every_output_in_binary_when_it_names_none(
    client: triton.InferenceServerClient, http: httpx.Client
) -> None:
    # tritonclient asks with binary_data_output=true when no outputs are named.
    result = client.infer("vae", [triton_input("instances", X)], parameters={"seed": 0})
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == ["mean", "std"]
    assert all("binary_data_size" in o["parameters"] for o in response["outputs"])
    expected = rest(http, "/encode", {"instances": X.tolist(), "seed": 0})
    np.testing.assert_array_equal(result.as_numpy("mean"), f32(expected["mean"]))


def test_tritonclient_encode_samples_follow_the_seed_as_in_rest(
    client: triton.InferenceServerClient, http: httpx.Client
) -> None:
    result = client.infer(
        "vae", [triton_input("instances", X)], outputs=outputs("samples"),
        parameters={"samples": 3, "seed": 7},
    )  # fmt: skip
    expected = rest(http, "/encode", {"instances": X.tolist(), "samples": 3, "seed": 7})
    assert result.as_numpy("samples").shape == (3, 3, 2)
    np.testing.assert_array_equal(result.as_numpy("samples"), f32(expected["samples"]))


@pytest.mark.parametrize("mode", ["mean", "mode"])
def test_tritonclient_decode_equals_rest_decode(
    client: triton.InferenceServerClient, http: httpx.Client, mode: str
) -> None:
    result = client.infer(
        "vae-decode", [triton_input("latents", Z)], outputs=outputs("outputs"),
        parameters={"output": mode},
    )  # fmt: skip
    expected = rest(http, "/decode", {"latents": Z.tolist(), "output": mode})
    np.testing.assert_array_equal(result.as_numpy("outputs"), f32(expected["outputs"]))


def test_tritonclient_anomaly_equals_rest_anomaly(
    client: triton.InferenceServerClient, http: httpx.Client
) -> None:
    options = {"seed": 3, "samples": 5, "log_likelihood_samples": 6}
    result = client.infer("vae-anomaly", [triton_input("instances", X)], parameters=options)
    expected = rest(http, "/anomaly-score", {"instances": X.tolist(), **options})
    for score in ("kl_divergence", "reconstruction_log_prob", "log_likelihood"):
        np.testing.assert_array_equal(result.as_numpy(score), f32(expected[score]))
        np.testing.assert_array_equal(
            result.as_numpy(f"{score}_percentile"), f32(expected["percentiles"][score])
        )
    assert result.as_numpy("is_anomaly").tolist() == expected["is_anomaly"]
    assert result.get_response()["parameters"] == {
        "decision_score": expected["decision_score"],
        "threshold_percentile": expected["threshold_percentile"],
        "samples": 5,
        "log_likelihood_samples": 6,
        # L and K are not the calibration's: the same marks as REST's, as V2's scalars.
        "uncalibrated": ",".join(expected["uncalibrated"]),
        "warnings": " ".join(expected["warnings"]),
    }
    assert "log_likelihood" in expected["uncalibrated"]


def test_tritonclient_anomaly_leaves_out_the_log_likelihood_it_did_not_compute(
    client: triton.InferenceServerClient,
) -> None:
    result = client.infer("vae-anomaly", [triton_input("instances", X)], parameters={"seed": 3})
    names = [o["name"] for o in result.get_response()["outputs"]]
    cheap = ["kl_divergence", "reconstruction_log_prob", "input_complexity", "dose",
             "latent_distance", "latent_polar_distance", "rapp", "feature_distance",
             "ensemble"]  # fmt: skip
    assert names == [*cheap, *(f"{n}_percentile" for n in cheap), "is_anomaly"]


@pytest.mark.parametrize(("datatype", "dtype"), [("FP64", np.float64), ("UINT8", np.uint8)])
def test_tritonclient_other_datatypes_give_the_fp32_answer(
    client: triton.InferenceServerClient, datatype: str, dtype: type[np.generic]
) -> None:
    x = np.array([[0, 1, 1, 0], [1, 1, 0, 0]], dtype=dtype)
    fp32 = client.infer("vae", [triton_input("instances", x.astype(np.float32))],
                        parameters={"seed": 0})  # fmt: skip
    other = client.infer("vae", [triton_input("instances", x, datatype)], parameters={"seed": 0})
    np.testing.assert_array_equal(other.as_numpy("mean"), fp32.as_numpy("mean"))


def test_tritonclient_raises_the_servers_error_sentence(
    client: triton.InferenceServerClient,
) -> None:
    with pytest.raises(InferenceServerException) as unknown:
        client.infer("vae-sample", [triton_input("instances", X)])
    assert unknown.value.status() == "404"
    assert unknown.value.message() == (
        "Model 'vae-sample' is not served here; the models are vae, vae-decode and vae-anomaly."
    )
    with pytest.raises(InferenceServerException) as bad:
        client.infer("vae", [triton_input("instances", X[:, :3].copy())])
    assert bad.value.status() == "400"
    assert bad.value.message() == (
        "instances[0] has 3 values; this model takes 4 values or a 2x2 array."
    )


# --- the wire format, by hand ----------------------------------------------------------------


def binary_body(header: dict[str, Any], *tensors: bytes) -> tuple[bytes, dict[str, str]]:
    head = orjson.dumps(header)
    return head + b"".join(tensors), {HCL: str(len(head))}


def instances_input(x: np.ndarray, **extra: Any) -> dict[str, Any]:
    return {"name": "instances", "shape": list(x.shape), "datatype": "FP32", **extra}


def test_binary_response_puts_raw_outputs_after_a_json_header_of_the_stated_length(
    http: httpx.Client,
) -> None:
    body, headers = binary_body(
        {"inputs": [instances_input(X, parameters={"binary_data_size": X.nbytes})],
         "outputs": [{"name": "std", "parameters": {"binary_data": True}}, {"name": "mean"}],
         "parameters": {"seed": 0}},
        X.tobytes(),
    )  # fmt: skip
    r = http.post("/v2/models/vae/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    n = int(r.headers[HCL])
    head = orjson.loads(r.content[:n])
    expected = rest(http, "/encode", {"instances": X.tolist(), "seed": 0})
    # std is binary (raw float32, row-major); mean, not asked for as binary, stays JSON.
    assert head["outputs"][0] == {"name": "std", "shape": [3, 2], "datatype": "FP32",
                                  "parameters": {"binary_data_size": 24}}  # fmt: skip
    std = np.frombuffer(r.content[n:], dtype="<f4").reshape(3, 2)
    np.testing.assert_array_equal(std, f32(expected["std"]))
    assert head["outputs"][1]["data"] == np.ravel(expected["mean"]).tolist()


def test_json_request_gets_a_plain_json_answer(http: httpx.Client) -> None:
    body = {"id": "req-7", "inputs": [instances_input(X, data=X.tolist())]}
    r = http.post("/v2/models/vae/infer", json=body)
    assert r.status_code == 200, r.text
    assert HCL.lower() not in r.headers
    assert r.headers["content-type"] == "application/json"
    out = r.json()
    assert (out["model_name"], out["id"]) == ("vae", "req-7")
    assert [(o["name"], o["shape"], o["datatype"]) for o in out["outputs"]] == [
        ("mean", [3, 2], "FP32"), ("std", [3, 2], "FP32")]  # fmt: skip


def test_instances_may_come_nested_to_the_image_shape(http: httpx.Client) -> None:
    def mean(inp: dict[str, Any]) -> Any:
        body = {"inputs": [inp], "outputs": [{"name": "mean"}], "parameters": {"seed": 0}}
        return rest(http, "/v2/models/vae/infer", body)["outputs"]

    images = X.reshape(3, 2, 2)
    flat = mean(instances_input(X, data=X.ravel().tolist()))
    nested = mean({**instances_input(images), "data": images.tolist()})
    assert nested == flat


def test_booleans_outside_the_data_leave_numeric_data_alone(http: httpx.Client) -> None:
    body = {"id": "true", "parameters": {"binary_data_output": True},
            "inputs": [instances_input(X, data=X.tolist())],
            "outputs": [{"name": "mean", "parameters": {"binary_data": False}}]}  # fmt: skip
    r = http.post("/v2/models/vae/infer", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["shape"] == [3, 2]


GOOD_JSON = {"inputs": [instances_input(X[:1], data=X[:1].ravel().tolist())]}
GOOD_BINARY = {"inputs": [instances_input(X[:1], parameters={"binary_data_size": 16})]}
ONE = X[:1].tobytes()  # 16 bytes


def bad(
    header: dict[str, Any] | None = None,
    tensor: bytes | None = None,
    *,
    length: str | None = None,
    raw: bytes | None = None,
    model: str = "vae",
) -> tuple[str, bytes, dict[str, str]]:
    """A request: JSON header (and optionally binary bytes with their header length)."""
    if raw is not None:
        return model, raw, {}
    head = orjson.dumps(header)
    if tensor is None and length is None:
        return model, head, {}
    return model, head + (tensor or b""), {HCL: length or str(len(head))}


def with_input(**changes: Any) -> dict[str, Any]:
    return {"inputs": [{**GOOD_JSON["inputs"][0], **changes}]}


BINARY_LEN = len(orjson.dumps(GOOD_BINARY)) + 16
BAD_REQUESTS = [
    # The binary extension's framing.
    (bad(GOOD_BINARY, ONE, length="abc"),
     f"Inference-Header-Content-Length must be a byte count from 1 to the body's {BINARY_LEN}; got 'abc'."),
    (bad(GOOD_BINARY, ONE, length=str(BINARY_LEN + 1)),
     f"Inference-Header-Content-Length must be a byte count from 1 to the body's {BINARY_LEN}; got '{BINARY_LEN + 1}'."),
    (bad(GOOD_BINARY, ONE, length="20"),
     "The first 20 bytes (Inference-Header-Content-Length) are not a valid JSON inference request."),
    (bad(GOOD_BINARY, ONE + b"\0\0\0\0"),
     "The body has 20 bytes after the JSON part, but binary_data_size says 16."),
    (bad(GOOD_BINARY, X[:1].astype(np.float64).tobytes()),
     "The body has 32 bytes after the JSON part, but binary_data_size says 16."),
    (bad({"inputs": [instances_input(X[:1], parameters={"binary_data_size": 32})]},
         X[:1].astype(np.float64).tobytes()),
     "Input 'instances' is FP32 of shape [1, 4], which is 16 bytes, but its binary_data_size is 32."),
    (bad(GOOD_BINARY),
     "Input 'instances' has binary_data_size, but the request has no Inference-Header-Content-Length header to say where its bytes start."),
    (bad(GOOD_JSON, ONE), "The body has 16 bytes after the JSON part, but no input has binary_data_size."),
    (bad({"inputs": [instances_input(X[:1], parameters={"binary_data_size": 16}, data=[0] * 4)]}, ONE),
     "Input 'instances' has both data and binary_data_size; send one."),
    (bad(GOOD_BINARY, np.array([[0, np.nan, 0, 0]], np.float32).tobytes()),
     "instances[0] has a non-finite value."),
    # The JSON request object.
    (bad(raw=b""), "The request body is empty; send a JSON inference request."),
    (bad(raw=b"{inputs: []"), "The body is not a valid JSON inference request."),
    (bad(raw=b"[1, 2]"), "The inference request must be a JSON object."),
    (bad({**GOOD_JSON, "output": []}), "Unknown field 'output' in the request body."),
    (bad({"input": []}), "inputs: Field required."),
    (bad({"inputs": []}), "inputs: List should have at least 1 item after validation, not 0."),
    (bad(with_input(shape=[1, -4])), "inputs[0].shape[1]: Input should be greater than or equal to 0."),
    (bad(with_input(parameters={"shared_memory_region": "r"})),
     "Unknown field 'shared_memory_region' in the request body."),
    # The input tensor.
    (bad(with_input(datatype="BYTES")),
     "Input 'instances' has datatype 'BYTES'; this server takes FP32, FP16, FP64, INT8, INT16, INT32, INT64, UINT8, UINT16, UINT32 or UINT64."),
    (bad(with_input(name="x")), "Model 'vae' has no input 'x'; its input is 'instances'."),
    (bad({"inputs": GOOD_JSON["inputs"] * 2}), "Model 'vae' takes one input, 'instances'; the request has 2."),
    (bad(GOOD_JSON, model="vae-decode"), "Model 'vae-decode' has no input 'instances'; its input is 'latents'."),
    (bad(with_input(shape=[2, 4])), "Input 'instances' has shape [2, 4], which is 8 values, but its data has 4."),
    (bad(with_input(data=[[0, 1], [0, 1]], shape=[1, 4])),
     "Input 'instances' data is nested as [2, 2], not as its shape [1, 4]."),
    (bad(with_input(data=[[0, 1, 0, 1], [0]], shape=[2, 4])),
     "Input 'instances' has ragged data; send it flat or nested to its shape [2, 4]."),
    (bad(with_input(data=[0, 1, "0.5", 0])), "Input 'instances' data must hold only numbers."),
    (bad(with_input(data=[0, 1, True, 0])), "Input 'instances' data must hold only numbers."),
    (bad({**with_input(data=[0, 1, 0, False]), "id": "true", "parameters": {"binary_data_output": True}}),
     "Input 'instances' data must hold only numbers."),
    (bad(with_input(datatype="FP16", data=[0, 1, 1e5, 0])), "instances[0] has values too large for FP16."),
    (bad(with_input(data=None)), "Input 'instances' has no data; give data or binary_data_size."),
    (bad(with_input(data=1)), "Input 'instances' data must be a JSON array."),
    (bad(with_input(datatype="INT8", data=[0, 1, 0.5, 0])), "Input 'instances' is INT8 but its data has fractions."),
    (bad(with_input(datatype="UINT8", data=[0, 1, -1, 0])), "Input 'instances' has data outside the range of UINT8."),
    (bad(with_input(shape=[4])), "Input 'instances' must have shape [N, D] or [N, *input_shape]; got [4]."),
    (bad(with_input(shape=[0, 4], data=[])), "Input 'instances' has no rows; send at least one."),
    # validation.py's checks and limits, with REST's sentences.
    (bad(with_input(shape=[1, 3], data=[0, 1, 0])),
     "instances[0] has 3 values; this model takes 4 values or a 2x2 array."),
    (bad(with_input(data=[0, 2, 0, 0])),
     "instances[0] has values outside [0, 1], which this Bernoulli model needs."),
    (bad(with_input(shape=[9, 4], data=[0] * 36)), "9 instances is over the limit of 8 (VAE_MAX_INSTANCES)."),
    (bad({**GOOD_JSON, "parameters": {"samples": 51}}), "samples=51 is over the limit of 50 (VAE_MAX_SAMPLES)."),
    (bad({"inputs": [{"name": "latents", "shape": [1, 3], "datatype": "FP32", "data": [0, 0, 0]}]},
         model="vae-decode"),
     "latents[0] has 3 values; this model's latent size is 2."),
    (bad({"inputs": [{"name": "latents", "shape": [1, 1, 2], "datatype": "FP32", "data": [0, 0]}]},
         model="vae-decode"),
     "Input 'latents' must have shape [N, Z]; got [1, 1, 2]."),
    # Parameters and outputs.
    (bad({**GOOD_JSON, "parameters": {"priority": 1}}),
     "Unknown parameter 'priority'; model 'vae' takes samples, seed and binary_data_output."),
    (bad({**GOOD_JSON, "parameters": {"samples": -1}}),
     "parameters.samples: Input should be greater than or equal to 0."),
    (bad({**GOOD_JSON, "parameters": {"binary_data_output": "yes"}}),
     "parameters.binary_data_output must be true or false."),
    (bad({**GOOD_JSON, "parameters": {"decision_score": "mse"}}, model="vae-anomaly"),
     "parameters.decision_score: Input should be 'kl_divergence', 'reconstruction_log_prob', "
     "'log_likelihood', 'input_complexity', 'likelihood_ratio', 'dose', 'latent_distance', "
     "'latent_polar_distance', 'rapp', 'input_distance', 'feature_distance' or 'ensemble'."),
    (bad({**GOOD_JSON, "outputs": [{"name": "z"}]}),
     "Model 'vae' has no output 'z'; its outputs are mean, std and samples."),
    (bad({**GOOD_JSON, "outputs": [{"name": "mean"}, {"name": "mean"}]}), "Output 'mean' is requested twice."),
    (bad({**GOOD_JSON, "outputs": [{"name": "samples"}]}), "Output 'samples' needs parameters.samples > 0."),
    (bad({**GOOD_JSON, "outputs": [{"name": "log_likelihood"}]}, model="vae-anomaly"),
     "Output 'log_likelihood' needs parameters.log_likelihood_samples, or decision_score log_likelihood."),
    (bad({**GOOD_JSON, "outputs": [{"name": "mean", "parameters": {"classification": 2}}]}),
     "Unknown field 'classification' in the request body."),
]  # fmt: skip


@pytest.mark.parametrize(("request_parts", "message"), BAD_REQUESTS)
def test_malformed_infer_gets_a_400_with_one_sentence_and_the_server_goes_on(
    http: httpx.Client, request_parts: tuple[str, bytes, dict[str, str]], message: str
) -> None:
    model, body, headers = request_parts
    r = http.post(f"/v2/models/{model}/infer", content=body, headers=headers)
    assert (r.status_code, r.json()) == (400, {"error": message})
    assert http.post("/v2/models/vae/infer", json=GOOD_JSON).status_code == 200


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v2/models/nope"), ("GET", "/v2/models/nope/ready"),
     ("POST", "/v2/models/nope/infer")],
)  # fmt: skip
def test_unknown_model_is_a_404_in_v2_shape(http: httpx.Client, method: str, path: str) -> None:
    r = http.request(method, path, json=GOOD_JSON if method == "POST" else None)
    assert r.status_code == 404
    assert r.json() == {
        "error": "Model 'nope' is not served here; the models are vae, vae-decode and vae-anomaly."
    }


def test_versions_and_unknown_paths_answer_in_v2_shape(http: httpx.Client) -> None:
    r = http.post("/v2/models/vae/versions/1/infer", json=GOOD_JSON)
    assert (r.status_code, r.json()["model_version"]) == (200, "1")
    r = http.post("/v2/models/vae/versions/2/infer", json=GOOD_JSON)
    assert (r.status_code, r.json()) == (
        404,
        {"error": "Model 'default' has no version 2 loaded; its versions are 1."},
    )
    r = http.get("/v2/models/vae/versions/x/ready")
    assert (r.status_code, r.json()) == (
        400,
        {"error": "Version 'x' is not a version: a positive integer."},
    )
    r = http.get("/v2/repository/index")
    assert (r.status_code, r.json()) == (
        405,
        {"error": "GET is not allowed on /v2/repository/index; use POST."},
    )
    r = http.get("/v2/models/vae/signature")
    assert (r.status_code, r.json()) == (
        404,
        {"error": "No V2 endpoint answers GET /v2/models/vae/signature."},
    )


def test_wrong_method_is_a_405_in_v2_shape(http: httpx.Client) -> None:
    r = http.get("/v2/models/vae/infer")
    assert (r.status_code, r.json()) == (
        405,
        {"error": "GET is not allowed on /v2/models/vae/infer; use POST."},
    )
    assert r.headers["allow"] == "POST"


def test_compressed_body_is_a_415(http: httpx.Client) -> None:
    r = http.post(
        "/v2/models/vae/infer",
        content=orjson.dumps(GOOD_JSON),
        headers={"content-encoding": "gzip"},
    )
    assert (r.status_code, r.json()) == (
        415,
        {"error": "Content-Encoding 'gzip' is not supported; send the body uncompressed."},
    )


def test_health_answers_carry_no_body(http: httpx.Client) -> None:
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/vae/ready"):
        r = http.get(path)
        assert (r.status_code, r.content) == (200, b"")


# --- in-process: readiness, docs, batching ----------------------------------------------------


def test_v2_answers_503_until_the_model_is_ready(tiny_artifact: Path) -> None:
    # Without `with`, the lifespan has not run: exactly the state before the model is warm.
    client = TestClient(create_app(Settings(model_path=tiny_artifact)))
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 503
    assert client.get("/v2/models/vae/ready").status_code == 503
    assert client.get("/v2/models/nope").status_code == 404  # the name is checked first
    for r in (client.get("/v2/models/vae"), client.post("/v2/models/vae/infer", json=GOOD_JSON)):
        assert (r.status_code, r.json()) == (
            503,
            {"error": "The model is not loaded yet; try again shortly."},
        )


def test_openapi_lists_the_v2_routes_under_tag_v2(tiny_artifact: Path) -> None:
    with TestClient(create_app(Settings(model_path=tiny_artifact))) as client:
        paths = client.get("/openapi.json").json()["paths"]
    v2 = {(p, m): op for p, ops in paths.items() if p.startswith("/v2") for m, op in ops.items()}
    assert set(v2) == {
        ("/v2/health/live", "get"), ("/v2/health/ready", "get"), ("/v2", "get"),
        ("/v2/models/{model_name}", "get"), ("/v2/models/{model_name}/ready", "get"),
        ("/v2/models/{model_name}/infer", "post"),
        ("/v2/models/{model_name}/versions/{model_version}", "get"),
        ("/v2/models/{model_name}/versions/{model_version}/ready", "get"),
        ("/v2/models/{model_name}/versions/{model_version}/infer", "post"),
        ("/v2/repository/index", "post"), ("/v2/repository/models/{model_name}/load", "post"),
        ("/v2/repository/models/{model_name}/unload", "post"),
    }  # fmt: skip
    assert all(op["tags"] == ["v2"] for op in v2.values())
    infer = v2[("/v2/models/{model_name}/infer", "post")]
    body = infer["requestBody"]["content"]
    assert set(body) == {"application/json", "application/octet-stream"}
    assert "inputs" in body["application/json"]["schema"]["properties"]
    assert {p["name"] for p in infer["parameters"]} == {"model_name", HCL}
    assert infer["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/V2ErrorResponse"
    )


def test_v2_and_rest_requests_share_a_forward_pass(tiny_artifact: Path) -> None:
    # A long batching window: the first unseeded encode waits for the second, REST or V2.
    settings = Settings(model_path=tiny_artifact, max_batch_size=8, max_batch_delay_ms=1000)
    with TestClient(create_app(settings)) as client:
        batcher = client.app.state.batcher  # type: ignore[attr-defined]
        before = batcher.batch_sizes.copy()
        start = threading.Barrier(2)
        answers: dict[str, int] = {}

        def call(kind: str) -> None:
            start.wait()
            if kind == "rest":
                r = client.post("/encode", json={"instances": X[:1].tolist()})
            else:
                r = client.post("/v2/models/vae/infer", json=GOOD_JSON)
            answers[kind] = r.status_code

        threads = [threading.Thread(target=call, args=(k,)) for k in ("rest", "v2")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert answers == {"rest": 200, "v2": 200}
        assert batcher.batch_sizes - before == {2: 1}  # one forward pass, one row from each
