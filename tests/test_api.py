"""The HTTP API in-process (TestClient runs the lifespan) against tiny real artifacts."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from scoring.artifact import ModelLoadError
from tests.conftest import EVERY_SCORE, make_artifact
from training.config import ModelConfig
from training.export import FORMAT_VERSION, export_artifact, sha256_of
from training.model import VAE

GOOD = [[0.0, 1.0, 0.5, 0.25]]


@pytest.fixture
def client(tiny_artifact: Path) -> Iterator[TestClient]:
    settings = Settings(model_path=tiny_artifact, max_instances=8, max_samples=50)
    with TestClient(create_app(settings)) as c:
        yield c


def post(client: TestClient, path: str, body: Any) -> Any:
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


# --- the endpoints ---------------------------------------------------------------------------


def test_encode_returns_mean_and_std_per_instance(client: TestClient) -> None:
    out = post(client, "/encode", {"instances": GOOD * 3})
    assert len(out["mean"]) == 3
    assert len(out["mean"][0]) == 2
    assert all(s > 0 for row in out["std"] for s in row)
    assert out["samples"] is None


def test_encode_accepts_instances_nested_to_the_input_shape(client: TestClient) -> None:
    flat = post(client, "/encode", {"instances": GOOD})
    nested = post(client, "/encode", {"instances": [[[0.0, 1.0], [0.5, 0.25]]]})
    assert flat == nested


def test_encode_accepts_flat_and_nested_instances_mixed(client: TestClient) -> None:
    flat = post(client, "/encode", {"instances": GOOD * 2})
    mixed = post(client, "/encode", {"instances": [GOOD[0], [[0.0, 1.0], [0.5, 0.25]]]})
    assert mixed == flat


def test_encode_draws_samples_from_the_posterior(client: TestClient) -> None:
    out = post(client, "/encode", {"instances": GOOD * 2, "samples": 5, "seed": 1})
    assert [len(out["samples"]), len(out["samples"][0]), len(out["samples"][0][0])] == [2, 5, 2]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/encode", {"instances": GOOD, "samples": 3}),
        ("/sample", {"n": 3}),
        ("/anomaly-score", {"instances": GOOD}),
    ],
)
def test_seeded_requests_are_byte_identical(client: TestClient, path: str, body: Any) -> None:
    first = client.post(path, json={**body, "seed": 42}).content
    assert client.post(path, json={**body, "seed": 42}).content == first
    assert client.post(path, json={**body, "seed": 43}).content != first


def test_decode_returns_probabilities_and_mode_rounds_them(client: TestClient) -> None:
    z = [[0.0, 0.0], [1.0, -1.0]]
    mean = post(client, "/decode", {"latents": z})["outputs"]
    mode = post(client, "/decode", {"latents": z, "output": "mode"})["outputs"]
    assert all(0.0 < p < 1.0 for row in mean for p in row)
    assert mode == [[float(round(p)) for p in row] for row in mean]


def test_sample_decodes_prior_draws(client: TestClient) -> None:
    out = post(client, "/sample", {"n": 4, "seed": 0})
    assert len(out["latents"]) == 4
    assert len(out["outputs"][0]) == 4
    again = post(client, "/decode", {"latents": out["latents"]})
    np.testing.assert_allclose(again["outputs"], out["outputs"], atol=1e-6)


def test_anomaly_score_returns_both_scores_per_instance(client: TestClient) -> None:
    out = post(client, "/anomaly-score", {"instances": GOOD * 2, "samples": 8, "seed": 0})
    assert len(out["kl_divergence"]) == 2
    assert len(out["reconstruction_log_prob"]) == 2
    assert all(k >= 0 for k in out["kl_divergence"])
    assert all(r < 0 for r in out["reconstruction_log_prob"])
    assert out["samples"] == 8


def test_anomaly_score_defaults_to_the_calibrated_samples(client: TestClient) -> None:
    # The tiny artifact was calibrated with L=4 and K=8 (tests/conftest.py).
    out = post(client, "/anomaly-score", {"instances": GOOD, "decision_score": "log_likelihood"})
    assert out["samples"] == 4
    assert out["log_likelihood_samples"] == 8


def test_model_reports_the_artifact_sha256(client: TestClient, tiny_artifact: Path) -> None:
    out = client.get("/model").json()
    assert out["sha256"] == sha256_of(tiny_artifact)
    assert out["manifest"]["input_shape"] == [2, 2]
    assert out["manifest"]["calibration"]["scores"] == sorted(EVERY_SCORE)


def test_health_and_ready_answer_200(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").status_code == 200


def test_docs_examples_fit_the_loaded_model(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    for path, ref in [("/encode", "EncodeRequest"), ("/decode", "DecodeRequest"),
                      ("/sample", "SampleRequest"), ("/anomaly-score", "AnomalyScoreRequest")]:  # fmt: skip
        props = schema["components"]["schemas"][ref]["properties"]
        example = {k: v["examples"][0] for k, v in props.items() if "examples" in v}
        assert client.post(path, json=example).status_code == 200, (path, example)
    assert client.get("/docs").status_code == 200


def test_openapi_documents_the_one_sentence_422(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    ref = schema["paths"]["/encode"]["post"]["responses"]["422"]["content"]["application/json"]
    assert ref["schema"]["$ref"].endswith("/ErrorResponse")


def test_gaussian_model_accepts_values_outside_unit_range(gaussian_artifact: Path) -> None:
    with TestClient(create_app(Settings(model_path=gaussian_artifact))) as c:
        out = post(c, "/anomaly-score", {"instances": [[-3.0, 7.5, 100.0]]})
        assert len(out["kl_divergence"]) == 1
        mode = post(c, "/decode", {"latents": [[0.1, 0.2]], "output": "mode"})
        mean = post(c, "/decode", {"latents": [[0.1, 0.2]]})
        assert mode == mean  # the most probable x of a Gaussian is its mean


# --- bad input: a 422 with one sentence, naming the index ----------------------------------

BAD_REQUESTS = [
    ("/encode", {"instances": [[0.0, 0.0, 0.0]]},
     "instances[0] has 3 values; this model takes 4 values or a 2x2 array."),
    ("/encode", {"instances": [[0, 0, 0, 0], [[0, 0, 0], [0, 0, 0]]]},
     "instances[1] has shape 2x3; this model takes 4 values or a 2x2 array."),
    ("/encode", {"instances": [[0, 0, 0, 0], [[0, 0], [0]]]},
     "instances[1] has ragged rows; this model takes 4 values or a 2x2 array."),
    ("/anomaly-score", {"instances": [[0, 0, 0, 0], [0, 1.5, 0, 0]]},
     "instances[1] has values outside [0, 1], which this Bernoulli model needs."),
    ("/encode", {"instances": []},
     "instances: List should have at least 1 item after validation, not 0."),
    ("/encode", {"instances": GOOD * 9}, "9 instances is over the limit of 8 (VAE_MAX_INSTANCES)."),
    ("/decode", {"latents": [[0.0, 0.0], [0.0, 0.0, 0.0]]},
     "latents[1] has 3 values; this model's latent size is 2."),
    ("/encode", {"instances": GOOD, "foo": 1}, "Unknown field 'foo' in the request body."),
    ("/sample", {"n": 51}, "n=51 is over the limit of 50 (VAE_MAX_SAMPLES)."),
    ("/anomaly-score", {"instances": GOOD, "samples": 51},
     "samples=51 is over the limit of 50 (VAE_MAX_SAMPLES)."),
    ("/encode", {"instances": [[0, True, 0, 0]]}, "instances[0][1]: Input should be a valid number."),
    ("/sample", {"n": 0}, "n: Input should be greater than or equal to 1."),
    ("/sample", {"n": 1, "seed": 2**64}, "seed: Input should be less than or equal to 9223372036854775807."),
    ("/decode", {"latents": [[0.0, 0.0]], "output": "median"}, "output: Input should be 'mean' or 'mode'."),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "detail"), BAD_REQUESTS)
def test_bad_request_gets_422_with_one_sentence(
    client: TestClient, path: str, body: Any, detail: str
) -> None:
    r = client.post(path, json=body)
    assert r.status_code == 422
    assert r.json() == {"detail": detail}


@pytest.mark.parametrize(
    ("raw", "detail"),
    [
        ('{"instances": [[0, NaN, 0, 0]]}', "instances[0][1]: Input should be a finite number."),
        ('{"instances": [[0, 0, 0, 1e400]]}', "instances[0][3]: Input should be a finite number."),
        ('{"instances": [[[0, 0], [Infinity, 0]]]}',
         "instances[0][1][0]: Input should be a finite number."),
        ('{"instances": [[0, 0', "The request body is not valid JSON."),
    ],
)  # fmt: skip
def test_non_finite_and_malformed_json_get_422(client: TestClient, raw: str, detail: str) -> None:
    r = client.post("/encode", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert r.json() == {"detail": detail}


# --- concurrency -----------------------------------------------------------------------------


def test_seeded_answers_hold_under_concurrency(client: TestClient) -> None:
    bodies = [{"instances": GOOD * 4, "samples": 20, "seed": s} for s in range(12)]
    alone = [client.post("/anomaly-score", json=b).content for b in bodies]
    together: list[bytes] = [b""] * len(bodies)

    def call(i: int) -> None:
        for _ in range(5):
            together[i] = client.post("/anomaly-score", json=bodies[i]).content
            assert together[i] == alone[i]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone


# --- start-up fails fast with a clear reason ------------------------------------------------


def start(settings: Settings) -> None:
    with TestClient(create_app(settings)):
        pass


def test_startup_refuses_a_missing_artifact(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no artifact there; train one"):
        start(Settings(model_path=tmp_path / "nope.pt"))


def test_startup_refuses_a_corrupt_artifact(tmp_path: Path, tiny_artifact: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(tiny_artifact.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match=r"not a readable TorchScript artifact"):
        start(Settings(model_path=bad))


def test_startup_refuses_an_unknown_format_version(tmp_path: Path) -> None:
    model = VAE(ModelConfig(input_dim=4, hidden_dims=(8,), latent_dim=2))
    manifest = {"format_version": FORMAT_VERSION + 1, "input_shape": [4], "input_dim": 4,
                "latent_dim": 2, "likelihood": "bernoulli"}  # fmt: skip
    export_artifact(model, manifest, tmp_path / "future.pt")
    match = rf"unknown format_version {FORMAT_VERSION + 1}; this service reads \[1, 2, 3, 4, 5, 6, 7, 8, 9\]"
    with pytest.raises(ModelLoadError, match=match):
        start(Settings(model_path=tmp_path / "future.pt"))


def test_startup_refuses_an_artifact_without_manifest(tmp_path: Path) -> None:
    model = VAE(ModelConfig(input_dim=4, hidden_dims=(8,), latent_dim=2))
    export_artifact(model, {}, tmp_path / "bare.pt")
    with pytest.raises(ModelLoadError, match=r"manifest.json lacks format_version"):
        start(Settings(model_path=tmp_path / "bare.pt"))


def test_startup_refuses_cuda_when_there_is_none(
    tiny_artifact: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    # Whether or not this machine has a GPU: the refusal is what a machine without one says
    # (tests/test_cuda.py runs the real CUDA path where there is one).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelLoadError) as e:
        start(Settings(model_path=tiny_artifact, device="cuda"))
    assert str(e.value) == "VAE_DEVICE=cuda asks for CUDA, but CUDA is not available here."


def test_settings_come_from_vae_environment(
    tiny_artifact: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VAE_MODEL_PATH", str(tiny_artifact))
    monkeypatch.setenv("VAE_MAX_INSTANCES", "2")
    with TestClient(create_app()) as c:
        r = c.post("/encode", json={"instances": GOOD * 3})
        assert r.json() == {"detail": "3 instances is over the limit of 2 (VAE_MAX_INSTANCES)."}


def test_unknown_fields_in_the_manifest_do_not_break_loading(tmp_path: Path) -> None:
    path = make_artifact(tmp_path / "vae.pt")
    with TestClient(create_app(Settings(model_path=path))) as c:
        assert json.loads(c.get("/model").text)["manifest"]["format_version"] == FORMAT_VERSION
