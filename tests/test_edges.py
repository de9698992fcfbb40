"""Trust at the edges, against real servers: the most anomalous inputs are flagged, admin is its
own key, paths are matched as routed under a root path, a client that hangs up leaves no work
behind, a failing batch fails only its own request, readiness follows the drain, answers off
their calibration say so, and options follow one rule whatever the body."""

from __future__ import annotations

import concurrent.futures as cf
import io
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from bench.servers import free_port
from tests.conftest import REPO, GatedStart, Server, make_artifact

pytestmark = pytest.mark.server

StartServer = Callable[[dict[str, str]], Server]
TABLE = REPO / "models" / "breast-cancer" / "vae.pt"  # the shipped table model
CLIENT_KEY, ADMIN_KEY = "client-key-0123456789", "admin-key-0123456789"
AS_CLIENT = {"Authorization": f"Bearer {CLIENT_KEY}"}
AS_ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
X = [[0.0, 1.0, 1.0, 0.0]]
# Far beyond anything a breast-cancer table holds, both signs: wrong units, sentinel values.
EXTREMES = [sign * 10.0**e for e in range(3, 39, 5) for sign in (1, -1)] + [3.4e38, -3.4e38]


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def in_flight(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    match = re.search(r"^vae_requests_in_flight (\S+)$", text, re.M)
    assert match
    return float(match.group(1))


# -- the most anomalous inputs are flagged ------------------------------------------------------


@pytest.fixture(scope="module")
def table_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server({"VAE_MODEL_PATH": str(TABLE)}, tmp_path_factory.mktemp("t") / "log")
    server.wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def normal_record(table_server: Server) -> dict[str, float]:
    """A typical row: every feature at its training mean, as /model lists them."""
    features = httpx.get(f"{table_server.url}/model").json()["features"]
    return {f["name"]: f["mean"] for f in features}


def decided(answer: dict[str, Any]) -> tuple[list[bool], list[float | None]]:
    return answer["is_anomaly"], answer["percentiles"][answer["decision_score"]]


@pytest.mark.parametrize("value", EXTREMES, ids=lambda v: f"{v:.0e}")
def test_no_value_of_a_feature_gets_a_null_decision(
    table_server: Server, normal_record: dict[str, float], value: float
) -> None:
    record = {**normal_record, "mean area": value}
    r = httpx.post(f"{table_server.url}/anomaly-score", json={"records": [record], "seed": 0})
    assert r.status_code == 200, r.text
    answer = r.json()
    flagged, percentile = decided(answer)
    assert percentile[0] is not None
    assert 0.0 <= percentile[0] <= 1.0
    assert flagged == [percentile[0] > answer["threshold_percentile"]]
    if abs(value) >= 1e6:  # wrong by three orders of magnitude or more: anomalous
        assert flagged == [True]
    if answer[answer["decision_score"]][0] is None:  # not finite: flagged, and said why
        assert percentile == [1.0]
        assert any(w.startswith("instances[0]: ") and "not finite" in w for w in answer["warnings"])


def test_a_sentinel_value_is_flagged_over_rest_npy_and_v2_alike(
    table_server: Server, normal_record: dict[str, float]
) -> None:
    names = list(normal_record)
    row = np.array([[normal_record[n] for n in names]], dtype=np.float32)
    row[0, names.index("mean area")] = 9e9
    rest = httpx.post(f"{table_server.url}/anomaly-score",
                      json={"instances": row.tolist(), "seed": 0}).json()  # fmt: skip
    assert decided(rest) == ([True], [1.0])
    [why] = [w for w in rest["warnings"] if w.startswith("instances[")]
    not_finite = [n for n, p in rest["percentiles"].items() if p is not None and rest[n] == [None]]
    assert not_finite
    assert all(rest["percentiles"][n] == [1.0] for n in not_finite)
    assert why.startswith(f"instances[0]: {not_finite[0]}")
    assert why.endswith(
        "not finite, the input lying beyond what the model can represent, so each counts as "
        "more anomalous than any normal data (percentile 1.0)."
    )
    r = httpx.post(
        f"{table_server.url}/anomaly-score?seed=0",
        content=npy(row),
        headers={"content-type": "application/x-npy", "accept": "application/x-npy"},
    )
    assert r.status_code == 200, r.text
    record = np.load(io.BytesIO(r.content))
    assert record["is_anomaly"].tolist() == [True]
    assert record[f"{rest['decision_score']}_percentile"].tolist() == [1.0]
    body = {"inputs": [{"name": "instances", "shape": [1, len(names)], "datatype": "FP32",
                        "data": row.ravel().tolist()}], "parameters": {"seed": 0}}  # fmt: skip
    v2 = httpx.post(f"{table_server.url}/v2/models/vae-anomaly/infer", json=body).json()
    outputs = {o["name"]: o["data"] for o in v2["outputs"]}
    assert outputs["is_anomaly"] == [True]
    assert outputs[f"{rest['decision_score']}_percentile"] == [1.0]
    assert "not finite" in v2["parameters"]["warnings"]


def test_values_beyond_float32_are_refused_naming_the_record(
    table_server: Server, normal_record: dict[str, float]
) -> None:
    record = {**normal_record, "mean area": 1e39}
    r = httpx.post(f"{table_server.url}/anomaly-score", json={"records": [record]})
    assert r.status_code == 422
    assert r.json() == {"detail": "records[0] has values too large for float32."}


def test_an_image_model_refuses_values_outside_its_range_and_scores_its_extremes(
    start_server: StartServer, tmp_path: Path
) -> None:
    artifact = make_artifact(tmp_path / "img.pt", input_shape=(4, 4))
    server = start_server({"VAE_MODEL_PATH": str(artifact)})
    server.wait_ready()
    for value in (1e3, -1e3, 1e38):
        r = httpx.post(f"{server.url}/anomaly-score", json={"instances": [[value] * 16]})
        assert r.status_code == 422
        assert r.json()["detail"] == (
            "instances[0] has values outside [0, 1], which this Bernoulli model needs."
        )
    edges = [[0.0] * 16, [1.0] * 16]  # the most extreme inputs it takes: every score finite
    answer = httpx.post(f"{server.url}/anomaly-score", json={"instances": edges, "seed": 0}).json()
    assert all(p is not None for p in answer["percentiles"][answer["decision_score"]])
    assert not [w for w in answer["warnings"] if w.startswith("instances[")]


# -- admin is its own key -------------------------------------------------------------------


def test_a_client_key_gets_403_on_admin_and_an_admin_key_opens_everything(
    start_server: StartServer, tiny_artifact: Path
) -> None:
    server = start_server({"VAE_MODEL_PATH": str(tiny_artifact), "VAE_API_KEYS": CLIENT_KEY,
                           "VAE_ADMIN_KEYS": ADMIN_KEY})  # fmt: skip
    server.wait_ready()
    r = httpx.post(f"{server.url}/admin/reload", headers=AS_CLIENT)
    assert (r.status_code, r.json()) == (
        403,
        {"detail": "This key may not use /admin; send an admin key (VAE_ADMIN_KEYS)."},
    )
    r = httpx.post(f"{server.url}/admin/reload")
    assert (r.status_code, r.json()) == (
        401,
        {"detail": "An admin key is required: send Authorization: Bearer <key> or X-API-Key."},
    )
    r = httpx.post(f"{server.url}/admin/reload", headers=AS_ADMIN, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["changed"] is False
    for headers in (AS_CLIENT, AS_ADMIN):
        assert httpx.post(f"{server.url}/encode", json={"instances": X},
                          headers=headers).status_code == 200  # fmt: skip
    assert httpx.post(f"{server.url}/encode", json={"instances": X}).status_code == 401


def test_reloads_coalesce_and_an_unchanged_file_returns_without_a_load(
    start_gated: GatedStart, tmp_path: Path
) -> None:
    path = tmp_path / "vae.pt"
    make_artifact(path, seed=1)
    server, gate = start_gated({"VAE_MODEL_PATH": str(path), "VAE_ADMIN_KEYS": ADMIN_KEY})
    loads = lambda: server.log.read_text().count('"loaded ')  # noqa: E731
    assert loads() == 1  # at start-up
    unchanged = httpx.post(f"{server.url}/admin/reload", headers=AS_ADMIN, timeout=60).json()
    assert unchanged["changed"] is False
    assert loads() == 1  # no load, no warm-up

    make_artifact(tmp_path / "next.pt", seed=2).replace(path)
    gate.load.touch()  # the first reload stays in its warm-up until the others have arrived
    with cf.ThreadPoolExecutor(4) as pool:
        first = pool.submit(httpx.post, f"{server.url}/admin/reload", headers=AS_ADMIN, timeout=60)
        gate.wait_for_calls(1)  # the first reload is warming the new model up
        later = [pool.submit(httpx.post, f"{server.url}/admin/reload", headers=AS_ADMIN,
                             timeout=60) for _ in range(3)]  # fmt: skip
        time.sleep(0.2)  # they arrive; none can finish before the gate opens
        assert not any(f.done() for f in later)
        gate.load.unlink()
        answers = [f.result() for f in [first, *later]]
    assert [r.status_code for r in answers] == [200] * 4
    assert len({r.content for r in answers}) == 1  # one outcome, shared
    assert answers[0].json()["changed"] is True
    assert loads() == 2  # start-up, and the one reload all four shared
    assert gate.calls() == ["warm_up"]


# -- paths are matched as routed --------------------------------------------------------------


@pytest.fixture(params=["setting", "uvicorn"])
def root_path_server(
    request: pytest.FixtureRequest, tiny_artifact: Path, tmp_path: Path
) -> Iterator[Callable[[dict[str, str]], Server]]:
    """Servers behind a proxy that serves them under /vae and strips it: by VAE_ROOT_PATH, or
    uvicorn's own --root-path. Requests come without the prefix; ASGI's path then carries
    it in front, and the routes match what follows it."""
    servers: list[Server] = []

    def start(env: dict[str, str]) -> Server:
        env = {"VAE_MODEL_PATH": str(tiny_artifact), **env}
        if request.param == "setting":
            server = Server({**env, "VAE_ROOT_PATH": "/vae"}, tmp_path / f"s{len(servers)}")
        else:
            port = free_port()
            args = ("-m", "uvicorn", "app.main:create_app", "--factory", "--root-path", "/vae",
                    "--host", "127.0.0.1", "--port", str(port))  # fmt: skip
            server = Server(env, tmp_path / f"s{len(servers)}", port=port, args=args)
        servers.append(server)
        server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()


def test_a_root_path_cannot_open_admin(
    root_path_server: Callable[[dict[str, str]], Server],
) -> None:
    server = root_path_server({})
    r = httpx.post(f"{server.url}/admin/reload")
    assert (r.status_code, r.json()) == (
        403,
        {"detail": "Admin routes are off: set VAE_ADMIN_KEYS or VAE_ADMIN_KEYS_FILE."},
    )


def test_a_root_path_keeps_the_probes_open_and_the_model_behind_the_key(
    root_path_server: Callable[[dict[str, str]], Server],
) -> None:
    server = root_path_server({"VAE_API_KEYS": CLIENT_KEY})
    for probe in ("/health", "/ready", "/v2/health/ready", "/docs", "/openapi.json"):
        assert httpx.get(server.url + probe).status_code == 200, probe
    assert "'/vae/openapi.json'" in httpx.get(f"{server.url}/docs").text  # as the browser sees it
    url = f"{server.url}/encode"
    assert httpx.post(url, json={"instances": X}).status_code == 401
    assert httpx.post(url, json={"instances": X}, headers=AS_CLIENT).status_code == 200
    v2 = httpx.post(f"{server.url}/v2/models/vae/infer", json={})
    assert v2.json() == {
        "error": "A valid API key is required: send Authorization: Bearer <key> or X-API-Key."
    }


# -- a client that hangs up leaves no work behind -----------------------------------------------


def test_a_client_that_hangs_up_leaves_no_job_running(
    start_gated: GatedStart, tiny_artifact: Path
) -> None:
    server, gate = start_gated({"VAE_MODEL_PATH": str(tiny_artifact)})
    gate.close()
    with cf.ThreadPoolExecutor(1) as pool:
        held = pool.submit(httpx.post, f"{server.url}/encode", json={"instances": X}, timeout=60)
        gate.wait_for_calls(1)  # the first request holds the inference thread
        body = b'{"instances": [[1.0, 0.0, 0.0, 1.0]], "samples": 3}'
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(b"POST /encode HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
            wait_until(lambda: in_flight(server.url) == 2, "the second request to queue")
        # The socket is closed: the server notices and drops the queued job.
        wait_until(lambda: in_flight(server.url) == 1, "the hung-up request to leave")
        gate.open()
        assert held.result().status_code == 200
    wait_until(lambda: in_flight(server.url) == 0, "the first request to finish")
    assert gate.calls() == ["encode 1"]  # the second request's model call never ran
    assert '"POST /encode 499' in server.log.read_text()


def test_a_client_that_hangs_up_mid_body_is_logged_as_gone_not_as_a_failure(
    start_server: StartServer, tiny_artifact: Path
) -> None:
    server = start_server({"VAE_MODEL_PATH": str(tiny_artifact)})
    server.wait_ready()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /encode HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100000\r\n\r\n{\"instances\": [[0.0,")  # fmt: skip
        wait_until(lambda: in_flight(server.url) == 1, "the request to get in")
    wait_until(lambda: in_flight(server.url) == 0, "the server to notice")
    wait_until(lambda: '"POST /encode 499' in server.log.read_text(), "the request's log line")
    assert "unexpected" not in server.log.read_text()
    assert httpx.post(f"{server.url}/encode", json={"instances": X}).status_code == 200


# -- a failing batch fails only its own request -------------------------------------------------


@pytest.fixture
def client(tiny_artifact: Path) -> Iterator[TestClient]:
    settings = Settings(model_path=tiny_artifact, inline_max_ms=0)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


def test_a_failing_batch_fails_only_its_own_request_and_the_thread_goes_on(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    app: Any = client.app
    batcher, vae = app.state.batcher, app.state.models.serving()
    poison = [0.25, 0.25, 0.25, 0.25]
    release, encode = threading.Event(), vae.encode
    merged: list[int] = []

    def fragile(x: np.ndarray, *args: Any, **kwargs: Any) -> Any:
        release.wait(30)
        merged.append(len(x))
        if (x == 0.25).all(axis=1).any():
            raise RuntimeError("a kernel failed on this row")
        return encode(x, *args, **kwargs)

    monkeypatch.setattr(vae, "encode", fragile)
    bodies = [{"instances": [[1.0, 0.0, 0.0, 1.0]]}, {"instances": [poison]},
              {"instances": [[0.0, 1.0, 1.0, 0.0]]}, {"instances": [[1.0, 1.0, 0.0, 0.0]]}]  # fmt: skip
    with cf.ThreadPoolExecutor(5) as pool:
        first = pool.submit(client.post, "/encode", json={"instances": X})
        wait_until(lambda: batcher._busy, "the first request to hold the thread")
        answers = [pool.submit(client.post, "/encode", json=b) for b in bodies]
        wait_until(lambda: batcher._queue.qsize() == 4, "the four requests to queue")
        release.set()
        assert first.result().status_code == 200
        results = [f.result() for f in answers]
    assert merged[:2] == [1, 4]  # the four merged, failed together, then ran alone
    assert [r.status_code for r in results] == [200, 500, 200, 200]
    request_id = results[1].headers["x-request-id"]
    assert results[1].json() == {
        "detail": f"The server failed on this request (request id {request_id}); it keeps serving."
    }
    for body, r in zip(bodies[::2], results[::2], strict=True):
        assert r.json()["mean"] == client.post("/encode", json=body).json()["mean"]
    # The metrics hook failing is logged, never fatal: the thread answers on.
    monkeypatch.setattr(batcher, "on_batch", lambda *a: 1 / 0)
    assert client.post("/encode", json={"instances": X}).status_code == 200
    assert batcher._thread.is_alive()


def test_a_500_on_v2_is_in_v2_shape(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    vae = client.app.state.models.serving()  # type: ignore[attr-defined]
    monkeypatch.setattr(vae, "encode", lambda *a, **k: 1 / 0)
    body = {"inputs": [{"name": "instances", "shape": [1, 4], "datatype": "FP32",
                        "data": [0.0, 1.0, 1.0, 0.0]}]}  # fmt: skip
    r = client.post("/v2/models/vae/infer", json=body)
    assert r.status_code == 500
    assert re.fullmatch(
        r"The server failed on this request \(request id \w+\); it keeps serving\.",
        r.json()["error"],
    )


# -- readiness follows the drain ----------------------------------------------------------------


def test_v2_readiness_follows_the_drain(start_gated: GatedStart, tiny_artifact: Path) -> None:
    server, gate = start_gated({"VAE_MODEL_PATH": str(tiny_artifact),
                                "VAE_SHUTDOWN_TIMEOUT_S": "60"})  # fmt: skip
    probes = ("/ready", "/v2/health/ready", "/v2/models/vae/ready", "/v2/models/vae-anomaly/ready")
    assert [httpx.get(server.url + p).status_code for p in probes] == [200] * 4
    gate.close()
    with cf.ThreadPoolExecutor(1) as pool:
        held = pool.submit(httpx.post, f"{server.url}/encode", json={"instances": X}, timeout=60)
        gate.wait_for_calls(1)
        server.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: httpx.get(f"{server.url}/ready").status_code == 503, "the drain")
        assert [httpx.get(server.url + p).status_code for p in probes] == [503] * 4
        assert httpx.get(f"{server.url}/v2/health/live").status_code == 200  # still alive
        gate.open()
        assert held.result().status_code == 200


# -- answers off their calibration say so; the threshold is honest ------------------------------


def test_an_l_or_k_other_than_the_calibrated_marks_its_percentiles(
    start_server: StartServer, tiny_artifact: Path
) -> None:
    server = start_server({"VAE_MODEL_PATH": str(tiny_artifact)})
    server.wait_ready()
    url = f"{server.url}/anomaly-score"
    # A threshold the tiny calibration's 64 rows resolve, so no other warning joins in.
    plain = {"instances": X, "seed": 0, "threshold_percentile": 0.9}
    calibrated = httpx.post(url, json=plain).json()
    assert (calibrated["uncalibrated"], calibrated["warnings"]) == ([], [])
    off = httpx.post(url, json={**plain, "samples": 2, "log_likelihood_samples": 3}).json()
    assert off["uncalibrated"] == ["reconstruction_log_prob", "log_likelihood", "input_complexity",
                                   "dose", "ensemble"]  # fmt: skip
    assert off["warnings"] == [
        "The percentiles of reconstruction_log_prob, log_likelihood, input_complexity, dose and "
        "ensemble are not calibrated (samples=2, not the calibrated 4; log_likelihood_samples=3, "
        "not the calibrated 8): the false-alarm rate of a decision on them is not the "
        "threshold's."
    ]
    body = {"inputs": [{"name": "instances", "shape": [1, 4], "datatype": "FP32",
                        "data": X[0]}],
            "parameters": {"seed": 0, "samples": 2, "threshold_percentile": 0.9}}  # fmt: skip
    v2 = httpx.post(f"{server.url}/v2/models/vae-anomaly/infer", json=body).json()
    assert (
        v2["parameters"]["uncalibrated"] == "reconstruction_log_prob,input_complexity,dose,ensemble"
    )
    assert v2["parameters"]["warnings"].startswith("The percentiles of reconstruction_log_prob")


def test_a_small_calibration_lowers_the_threshold_and_says_so(
    start_server: StartServer, tiny_artifact: Path
) -> None:
    # The tiny artifact is calibrated on 64 rows: a tail of 1/65, more than 1%.
    server = start_server({"VAE_MODEL_PATH": str(tiny_artifact)})
    server.wait_ready()
    model = httpx.get(f"{server.url}/model").json()
    assert model["manifest"]["calibration"]["n"] == 64
    assert model["manifest"]["calibration"]["resolvable_tail"] == round(1 / 65, 6)
    answer = httpx.post(f"{server.url}/anomaly-score", json={"instances": X, "seed": 0}).json()
    assert answer["threshold_percentile"] == pytest.approx(63.5 / 65)
    assert answer["warnings"] == [
        "The calibration's 64 validation rows resolve a tail of 1.5% at the least, not the 1.0% "
        "the threshold 0.99 asks for: instances beyond every validation row are flagged."
    ]
    loose = {"instances": X, "seed": 0, "threshold_percentile": 0.9}
    assert httpx.post(f"{server.url}/anomaly-score", json=loose).json()["warnings"] == []


# -- /model names the artifact, not where it lies -----------------------------------------------


def test_model_shows_the_artifacts_name_not_its_path(
    start_server: StartServer, tiny_artifact: Path
) -> None:
    server = start_server({"VAE_MODEL_PATH": str(tiny_artifact)})
    server.wait_ready()
    r = httpx.get(f"{server.url}/model")
    assert r.json()["artifact"] == "vae.pt"
    assert str(tiny_artifact.parent) not in r.text


# -- one rule for options -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    artifact = make_artifact(tmp_path_factory.mktemp("img") / "vae.pt", input_shape=(4, 4))
    server = Server({"VAE_MODEL_PATH": str(artifact)}, tmp_path_factory.mktemp("s") / "log")
    server.wait_ready()
    yield server
    server.stop()


IMAGE = [[0.0, 1.0, 1.0, 0.0] * 4]


def test_query_options_apply_to_a_json_body_as_to_the_others(image_server: Server) -> None:
    url = image_server.url
    in_body = httpx.post(f"{url}/encode", json={"instances": IMAGE, "seed": 1, "samples": 2})
    in_query = httpx.post(f"{url}/encode?seed=1&samples=2", json={"instances": IMAGE})
    as_npy = httpx.post(f"{url}/encode?seed=1&samples=2", content=npy(np.asarray(IMAGE, np.float32)),
                        headers={"content-type": "application/x-npy"})  # fmt: skip
    assert in_body.content == in_query.content == as_npy.content
    sample = httpx.post(f"{url}/sample?seed=3", json={"n": 2})
    assert sample.content == httpx.post(f"{url}/sample", json={"n": 2, "seed": 3}).content


@pytest.mark.parametrize(
    ("path", "kwargs", "detail"),
    [
        ("/encode?seed=1", {"json": {"instances": IMAGE, "seed": 2}},
         "The option 'seed' is given both in the query and the body."),
        ("/encode?colour=red", {"json": {"instances": IMAGE}}, "Unknown query parameter 'colour'."),
        ("/encode?seed=1&seed=2", {"json": {"instances": IMAGE}},
         "The query gives the option 'seed' more than once."),
        ("/sample?n=2", {"json": {"n": 3}}, "The option 'n' is given both in the query and the body."),
        ("/anomaly-score?seed=1", {"files": {"file": ("d.png", b"x", "image/png")},
                                   "data": {"seed": "2"}},
         "The option 'seed' is given both in the query and the body."),
    ],
)  # fmt: skip
def test_an_option_given_twice_or_unknown_is_a_422_whatever_the_body(
    image_server: Server, path: str, kwargs: dict[str, Any], detail: str
) -> None:
    r = httpx.post(image_server.url + path, **kwargs)
    assert (r.status_code, r.json()) == (422, {"detail": detail})


def test_a_png_answer_takes_its_scale_from_the_query_with_a_npy_body(image_server: Server) -> None:
    r = httpx.post(
        f"{image_server.url}/anomaly-score?scale=2&seed=0",
        content=npy(np.asarray(IMAGE, np.float32)),
        headers={"content-type": "application/x-npy", "accept": "image/png"},
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"


def test_v2_refuses_top_features_in_one_sentence(image_server: Server) -> None:
    body = {"inputs": [{"name": "instances", "shape": [1, 16], "datatype": "FP32",
                        "data": IMAGE[0]}], "parameters": {"top_features": 3}}  # fmt: skip
    r = httpx.post(f"{image_server.url}/v2/models/vae-anomaly/infer", json=body)
    assert (r.status_code, r.json()) == (
        400,
        {"error": "parameters.top_features is a REST option; over V2 ask for the 'attribution' "
                  "output, one value per feature, and rank it."},
    )  # fmt: skip
