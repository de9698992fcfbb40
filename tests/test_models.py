"""Many models in one server: a repository in Triton's layout, served by name and version over
REST and V2 (tritonclient included), loaded and unloaded with the admin key, against real
servers."""

from __future__ import annotations

import asyncio
import http.client
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from app.repository import ModelRepository, file_sha256
from app.settings import Settings
from tests.conftest import GatedStart, Server, make_artifact

pytestmark = pytest.mark.server

Start = Callable[[dict[str, str]], Server]
ADMIN_KEY, CLIENT_KEY = "admin-key-0123456789", "client-key-0123456789"
AS_ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
IMG = {"instances": [[0.0, 1.0, 1.0, 0.0]]}  # the image model: 2x2 Bernoulli, latent 2
TAB = {"instances": [[0.1, -0.2, 0.3, 1.5, -1.0]]}  # the table model: 5 columns, latent 3
NAME_RULE = "a model name matches [A-Za-z0-9][A-Za-z0-9_.-]{0,63}"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An image model, and a table model of another width and latent size in two versions."""
    folder = tmp_path_factory.mktemp("models")
    table = {"input_shape": (5,), "likelihood": "gaussian", "latent_dim": 3}
    return {
        "img": make_artifact(folder / "img.pt"),
        "tab1": make_artifact(folder / "tab1.pt", seed=1, **table),  # type: ignore[arg-type]
        "tab2": make_artifact(folder / "tab2.pt", seed=2, **table),  # type: ignore[arg-type]
    }


def repository(root: Path, artifacts: dict[str, Path], *, tab_versions: int = 2) -> Path:
    """img/1, tab/1 (and tab/2), in Triton's layout."""
    for name, version, source in [("img", 1, "img"), ("tab", 1, "tab1"), ("tab", 2, "tab2")]:
        if name == "tab" and version > tab_versions:
            continue
        (root / name / str(version)).mkdir(parents=True, exist_ok=True)
        shutil.copy(artifacts[source], root / name / str(version) / "vae.pt")
    return root


def serve(start: Start, root: Path, **env: str) -> Server:
    server = start({"VAE_MODEL_REPOSITORY": str(root), "VAE_ADMIN_KEYS": ADMIN_KEY, **env})
    server.wait_ready()
    return server


def post(
    server: Server, path: str, body: dict[str, Any] | None = None, **kw: Any
) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60, **kw)


def v2_body(x: list[list[float]], name: str = "instances") -> dict[str, Any]:
    return {"inputs": [{"name": name, "shape": [len(x), len(x[0])], "datatype": "FP32",
                        "data": x}]}  # fmt: skip


def test_each_model_is_served_by_name_and_version(
    start_server: Start, artifacts: dict[str, Path], tmp_path: Path
) -> None:
    root = repository(tmp_path / "repo", artifacts)
    shutil.copy(artifacts["img"], root / "solo.pt")  # DIR/<name>.pt is version 1
    server = serve(start_server, root)
    listing = httpx.get(f"{server.url}/models").json()
    assert listing["default"] is None  # three models, none named the default
    assert [(m["name"], m["state"], [v["version"] for v in m["versions"]])
            for m in listing["models"]] == [("img", "READY", [1]), ("solo", "READY", [1]),
                                            ("tab", "READY", [1, 2])]  # fmt: skip
    shas = {v["version"]: v["sha256"] for v in listing["models"][2]["versions"]}
    assert shas == {1: file_sha256(artifacts["tab1"]), 2: file_sha256(artifacts["tab2"])}

    img = post(server, "/models/img/encode", IMG).json()
    assert np.shape(img["mean"]) == (1, 2)
    tab = post(server, "/models/tab/encode", TAB).json()
    assert np.shape(tab["mean"]) == (1, 3)
    # The highest version serves by default; a version path serves that one.
    assert post(server, "/models/tab/versions/2/encode", TAB).json() == tab
    tab1 = post(server, "/models/tab/versions/1/encode", TAB).json()
    assert tab1["mean"] != tab["mean"]
    assert post(server, "/models/solo/encode", IMG).json() == img  # the same weights as img
    # Each model checks its own shapes.
    r = post(server, "/models/tab/encode", IMG)
    assert r.status_code == 422
    assert "5" in r.json()["detail"]
    for path in ("/models/tab/anomaly-score", "/models/tab/versions/1/anomaly-score"):
        assert post(server, path, TAB).status_code == 200
    assert post(server, "/models/img/decode", {"latents": [[0.0, 0.0]]}).status_code == 200
    assert post(server, "/models/tab/sample", {"n": 2, "seed": 0}).json()["outputs"]
    # Metadata per model and per version.
    meta = httpx.get(f"{server.url}/models/tab").json()
    assert (meta["name"], meta["version"], meta["sha256"]) == ("tab", 2, shas[2])
    assert meta["manifest"]["latent_dim"] == 3
    assert httpx.get(f"{server.url}/models/tab/versions/1").json()["sha256"] == shas[1]
    assert httpx.get(f"{server.url}/models/tab/versions/1/ready").status_code == 200
    # Without a default, the routes without a name say what to do.
    r = post(server, "/encode", IMG)
    assert r.status_code == 404
    assert "no default (VAE_DEFAULT_MODEL)" in r.json()["detail"]
    # Not there: 404 naming what is served; a version that is not loaded: 404 naming those.
    r = post(server, "/models/nope/encode", IMG)
    assert r.status_code == 404
    assert r.json()["detail"] == "No model 'nope' here; the models served are img, solo and tab."
    r = post(server, "/models/tab/versions/3/encode", TAB)
    assert r.status_code == 404
    assert r.json()["detail"] == "Model 'tab' has no version 3 loaded; its versions are 1 and 2."
    assert httpx.get(f"{server.url}/models/tab/versions/3/ready").status_code == 404

    # V2: `m` encodes, `m-decode` decodes, `m-anomaly` scores, each by version too.
    r = post(server, "/v2/models/tab/versions/1/infer", v2_body(TAB["instances"]))
    assert r.status_code == 200, r.text
    assert (r.json()["model_name"], r.json()["model_version"]) == ("tab", "1")
    mean = next(o for o in r.json()["outputs"] if o["name"] == "mean")
    assert np.allclose(mean["data"], np.ravel(tab1["mean"]), atol=1e-6)
    r = post(server, "/v2/models/img-anomaly/infer", v2_body(IMG["instances"]))
    assert r.status_code == 200
    assert r.json()["model_version"] == "1"
    meta = httpx.get(f"{server.url}/v2/models/tab-decode").json()
    assert meta["versions"] == ["1", "2"]
    assert meta["inputs"] == [{"name": "latents", "datatype": "FP32", "shape": [-1, 3]}]
    r = post(server, "/v2/models/nope/infer", v2_body(IMG["instances"]))
    assert r.status_code == 404
    assert "img, img-decode, img-anomaly" in r.json()["error"]

    # Metrics carry the model and version of each request and each forward pass.
    text = httpx.get(f"{server.url}/metrics").text
    assert 'model="tab",op="encode",version="1"' in text.replace(
        'op="encode",model="tab",version="1"', 'model="tab",op="encode",version="1"'
    )
    info = [line for line in text.splitlines() if line.startswith("vae_model_info{")]
    assert len(info) == 4  # img/1, solo/1, tab/1, tab/2
    assert any('model="tab"' in line and 'version="2"' in line and shas[2] in line for line in info)


def test_the_default_model_serves_the_routes_without_a_name(
    start_server: Start, artifacts: dict[str, Path], tmp_path: Path
) -> None:
    root = repository(tmp_path / "repo", artifacts)
    server = serve(start_server, root, VAE_DEFAULT_MODEL="tab")
    assert post(server, "/encode", TAB).json() == post(server, "/models/tab/encode", TAB).json()
    assert httpx.get(f"{server.url}/model").json()["name"] == "tab"
    r = post(server, "/v2/models/vae-decode/infer", v2_body([[0.0, 0.0, 0.0]], "latents"))
    assert r.status_code == 200
    assert r.json()["model_version"] == "2"


def test_a_single_artifact_is_a_repository_of_one_model(
    start_server: Start, artifacts: dict[str, Path]
) -> None:
    server = start_server({"VAE_MODEL_PATH": str(artifacts["img"])})
    server.wait_ready()
    models = httpx.get(f"{server.url}/models").json()
    assert models["default"] == "default"
    assert [m["name"] for m in models["models"]] == ["default"]
    plain = post(server, "/encode", IMG).json()
    assert post(server, "/models/default/encode", IMG).json() == plain
    assert post(server, "/models/default/versions/1/encode", IMG).json() == plain
    for name in ("vae", "default"):
        r = post(server, f"/v2/models/{name}/infer", v2_body(IMG["instances"]))
        assert r.status_code == 200
        assert r.json()["model_name"] == name
    # The repository extension is an admin route, and admin routes are off without a key.
    r = post(server, "/v2/repository/index")
    assert r.status_code == 403
    assert "VAE_ADMIN_KEYS" in r.json()["error"]


def test_tritonclient_drives_the_repository(
    start_server: Start, artifacts: dict[str, Path], tmp_path: Path
) -> None:
    root = repository(tmp_path / "repo", artifacts)
    server = serve(start_server, root)
    client = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
    try:
        index = client.get_model_repository_index(headers=AS_ADMIN)
        assert [(m["name"], m["version"], m["state"]) for m in index] == [
            ("img", "1", "READY"), ("tab", "1", "READY"), ("tab", "2", "READY")
        ]  # fmt: skip
        assert client.is_model_ready("tab-anomaly", "1")
        assert not client.is_model_ready("tab-anomaly", "7")
        assert client.get_model_metadata("tab-anomaly")["versions"] == ["1", "2"]
        x = np.asarray(TAB["instances"], np.float32)
        inp = triton.InferInput("instances", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        out = client.infer("tab", [inp], model_version="1")
        assert out.as_numpy("mean").shape == (1, 3)
        assert out.get_response()["model_version"] == "1"

        with pytest.raises(InferenceServerException, match="admin key is required"):
            client.unload_model("img")
        client.unload_model("img", headers=AS_ADMIN)
        assert not client.is_model_ready("img")
        index = client.get_model_repository_index(headers=AS_ADMIN)
        assert ("img", "1", "UNLOADED") in [(m["name"], m["version"], m["state"]) for m in index]
        x = np.asarray(IMG["instances"], np.float32)
        inp = triton.InferInput("instances", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        with pytest.raises(InferenceServerException, match="not loaded; load it"):
            client.infer("img", [inp])
        client.load_model("img", headers=AS_ADMIN)
        assert client.is_model_ready("img")
        assert client.infer("img", [inp]).as_numpy("mean").shape == (1, 2)
        with pytest.raises(InferenceServerException, match="No model 'nope' in the repository"):
            client.load_model("nope", headers=AS_ADMIN)
    finally:
        client.close()


def test_every_repository_call_needs_the_admin_key(
    start_server: Start, artifacts: dict[str, Path], tmp_path: Path
) -> None:
    root = repository(tmp_path / "repo", artifacts, tab_versions=1)
    server = serve(start_server, root, VAE_API_KEYS=CLIENT_KEY)
    calls = ["/v2/repository/index", "/v2/repository/models/img/load",
             "/v2/repository/models/img/unload", "/admin/models/img/load",
             "/admin/models/img/unload"]  # fmt: skip
    for path in calls:
        v2 = path.startswith("/v2")
        key = "error" if v2 else "detail"
        r = post(server, path)
        assert r.status_code == 401, (path, r.text)
        assert "admin key is required" in r.json()[key]
        r = post(server, path, headers={"X-API-Key": CLIENT_KEY})
        assert r.status_code == 403, (path, r.text)
        assert r.json()[key].startswith("This key may not use /")
    for path in calls:  # and with it, each works
        assert post(server, path, headers=AS_ADMIN).status_code == 200, path
    assert post(server, "/models/img/encode", IMG, headers=AS_ADMIN).status_code == 404


def test_hostile_names_get_a_4xx_naming_the_rule(
    start_server: Start, artifacts: dict[str, Path], tmp_path: Path
) -> None:
    root = repository(tmp_path / "repo", artifacts, tab_versions=1)
    outside = tmp_path / "outside"
    (outside / "1").mkdir(parents=True)
    shutil.copy(artifacts["img"], outside / "1" / "vae.pt")
    (root / "escape").symlink_to(outside)  # a folder inside that leads outside
    (root / "link.pt").symlink_to(artifacts["img"])  # a file inside that lies outside
    server = serve(start_server, root)
    names = [m["name"] for m in httpx.get(f"{server.url}/models").json()["models"]]
    assert names == ["img", "tab"]  # nothing reached through a link out of the repository
    for name in ("escape", "link"):
        r = post(server, f"/admin/models/{name}/load", headers=AS_ADMIN)
        assert r.status_code == 404
        assert "No model" in r.json()["detail"]

    host, port = server.url.removeprefix("http://").split(":")

    def raw(method: str, path: str) -> tuple[int, str]:
        """The path exactly as written: httpx would normalise `..` away."""
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            conn.putheader("Authorization", f"Bearer {ADMIN_KEY}")
            conn.putheader("Content-Type", "application/json")
            body = b'{"instances": [[0, 1, 1, 0]]}'
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            response = conn.getresponse()
            return response.status, response.read().decode()
        finally:
            conn.close()

    long = "a" * 65
    for name in ("..", ".", "%2E%2E", "-x", long, "%C3%A9t%C3%A9", "a%20b", "%00"):
        for path in (f"/models/{name}/encode", f"/models/{name}/versions/1/encode",
                     f"/admin/models/{name}/load"):  # fmt: skip
            status, text = raw("POST" if path.endswith(("encode", "load")) else "GET", path)
            assert status == 400, (path, status, text)
            assert NAME_RULE in text, (path, text)
        status, text = raw("POST", f"/v2/repository/models/{name}/load")
        assert status == 400, (name, text)
        assert NAME_RULE in text, (name, text)
        assert '"error"' in text, (name, text)
    for version in ("0", "null%2Cnull", "-1", "1.5", "9" * 12):
        for path in (
            f"/models/img/versions/{version}/encode",
            f"/v2/models/img/versions/{version}/infer",
        ):
            status, text = raw("POST", path)
            assert status in (400, 404), (path, status, text)  # 0 is a number, but no version
            assert "is not a version" in text or "has no version 0" in text, (path, text)
    # A slash in a name is no name: its path matches no route.
    assert raw("POST", "/models/a%2Fb/encode")[0] == 404
    assert raw("POST", "/models/../../etc/encode")[0] == 404
    assert post(server, "/models/img/encode", IMG).status_code == 200  # and it keeps serving


def test_unload_while_requests_are_in_flight_then_load_again(
    start_gated: GatedStart, artifacts: dict[str, Path], tmp_path: Path
) -> None:
    root = repository(tmp_path / "repo", artifacts, tab_versions=1)
    server, gate = start_gated({"VAE_MODEL_REPOSITORY": str(root), "VAE_ADMIN_KEYS": ADMIN_KEY})
    gate.close()
    with ThreadPoolExecutor(2) as pool:
        # Seeded, so each runs alone: two model calls, whichever arrives first.
        rest = pool.submit(post, server, "/models/img/encode", {**IMG, "seed": 0})
        seeded = v2_body(IMG["instances"]) | {"parameters": {"seed": 0}}
        v2 = pool.submit(post, server, "/v2/models/img/infer", seeded)
        # One inference thread: the first waits at the gate, the other in the queue behind
        # it; both took the model at their start.
        gate.wait_for_calls(1)
        wait_in_flight(server, 2)
        r = post(server, "/admin/models/img/unload", headers=AS_ADMIN)
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "UNLOADED"
        # Later requests: 404, in each protocol's shape; the other model serves on.
        r = post(server, "/models/img/encode", IMG)
        assert r.status_code == 404
        assert "is not loaded; load it" in r.json()["detail"]
        r = post(server, "/v2/models/img/infer", v2_body(IMG["instances"]))
        assert r.status_code == 404
        assert "is not loaded; load it" in r.json()["error"]
        gate.open()
        assert rest.result().status_code == 200  # those in flight finish on the unloaded model
        assert v2.result().status_code == 200
    assert post(server, "/models/tab/encode", TAB).status_code == 200
    r = post(server, "/v2/repository/models/img/load", headers=AS_ADMIN)
    assert r.status_code == 200, r.text
    assert post(server, "/models/img/encode", IMG).status_code == 200


def wait_in_flight(server: Server, n: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(f"{server.url}/metrics").text
        line = next(ln for ln in text.splitlines() if ln.startswith("vae_requests_in_flight "))
        if float(line.split()[1]) >= n:
            return
        assert time.monotonic() < deadline, f"{line}, not {n}"
        time.sleep(0.01)


def test_a_version_upgrade_fails_no_request(
    start_server: Start, artifacts: dict[str, Path], tmp_path: Path
) -> None:
    root = repository(tmp_path / "repo", artifacts, tab_versions=1)
    server = serve(start_server, root)
    stop = threading.Event()
    seen: list[tuple[int, int | None]] = []

    def load() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            while not stop.is_set():
                r = c.post("/v2/models/tab-anomaly/infer", json=v2_body(TAB["instances"]))
                seen.append((r.status_code, int(r.json().get("model_version", 0))))

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        (root / "tab" / "2").mkdir()
        shutil.copy(artifacts["tab2"], root / "tab" / "2" / "vae.pt")
        r = post(server, "/v2/repository/models/tab/load", headers=AS_ADMIN)
        assert r.status_code == 200, r.text
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert {status for status, _ in seen} == {200}
    versions = [v for _, v in seen]
    assert versions[0] == 1
    assert versions[-1] == 2
    assert httpx.get(f"{server.url}/models/tab").json()["version"] == 2


def test_explicit_control_loads_on_request_within_the_bound(
    start_server: Start, artifacts: dict[str, Path], tmp_path: Path
) -> None:
    root = repository(tmp_path / "repo", artifacts)
    server = serve(start_server, root, VAE_MODEL_CONTROL="explicit", VAE_MAX_MODELS="2")
    assert httpx.get(f"{server.url}/ready").status_code == 200
    states = {m["name"]: m["state"] for m in httpx.get(f"{server.url}/models").json()["models"]}
    assert states == {"img": "UNLOADED", "tab": "UNLOADED"}
    r = post(server, "/models/img/encode", IMG)
    assert r.status_code == 404
    assert r.json()["detail"] == (
        "Model 'img' is not loaded; load it with POST /v2/repository/models/img/load or "
        "/admin/models/img/load."
    )
    assert post(server, "/admin/models/img/load", headers=AS_ADMIN).json()["state"] == "READY"
    r = post(server, "/admin/models/tab/load", headers=AS_ADMIN)  # two versions: three in all
    assert r.status_code == 409
    assert r.json()["detail"] == (
        "Loading 'tab' (2 version(s)) would hold 3 models, over VAE_MAX_MODELS=2; unload one first."
    )
    assert post(server, "/models/img/encode", IMG).status_code == 200  # nothing changed
    post(server, "/admin/models/img/unload", headers=AS_ADMIN)
    assert post(server, "/admin/models/tab/load", headers=AS_ADMIN).status_code == 200
    assert post(server, "/models/tab/versions/1/encode", TAB).status_code == 200


def test_a_bad_version_is_refused_and_the_old_ones_keep_serving(
    start_server: Start, artifacts: dict[str, Path], tmp_path: Path
) -> None:
    root = repository(tmp_path / "repo", artifacts, tab_versions=1)
    pin = f"tab/1={file_sha256(artifacts['tab1'])}"
    server = serve(start_server, root, VAE_MODEL_PINS=pin)
    (root / "tab" / "2").mkdir()
    (root / "tab" / "2" / "vae.pt").write_bytes(b"not a model")
    r = post(server, "/admin/models/tab/load", headers=AS_ADMIN)
    assert r.status_code == 409
    assert r.json()["detail"].startswith("Model 'tab' was not loaded; what served before keeps")
    assert "tab/2/vae.pt" in r.json()["detail"]
    versions = httpx.get(f"{server.url}/models/tab").json()["versions"]
    assert [(v["version"], v["state"]) for v in versions] == [(1, "READY"), (2, "UNAVAILABLE")]
    assert post(server, "/models/tab/encode", TAB).status_code == 200
    # The pin holds per version: another file at tab/1 is refused too.
    shutil.rmtree(root / "tab" / "2")
    shutil.copy(artifacts["tab2"], root / "tab" / "1" / "vae.pt")
    r = post(server, "/admin/models/tab/load", headers=AS_ADMIN)
    assert r.status_code == 409
    assert "VAE_MODEL_PINS pins" in r.json()["detail"]
    assert "refusing to serve it" in r.json()["detail"]
    assert httpx.get(f"{server.url}/models/tab").json()["sha256"] == file_sha256(artifacts["tab1"])


def test_a_repository_that_cannot_serve_stops_start_up(
    start_server: Start, artifacts: dict[str, Path], tmp_path: Path
) -> None:
    root = repository(tmp_path / "repo", artifacts, tab_versions=1)
    server = start_server({"VAE_MODEL_REPOSITORY": str(root), "VAE_DEFAULT_MODEL": "nope"})
    assert server.proc.wait(timeout=60) != 0
    assert "VAE_DEFAULT_MODEL=nope, but the repository" in server.log.read_text()
    (root / "tab" / "1" / "vae.pt").write_bytes(b"junk")
    server = start_server({"VAE_MODEL_REPOSITORY": str(root)})
    assert server.proc.wait(timeout=60) != 0
    assert "model 'tab': " in server.log.read_text()


def test_the_docs_show_the_namespaced_routes(
    start_server: Start, artifacts: dict[str, Path], tmp_path: Path
) -> None:
    server = serve(start_server, repository(tmp_path / "repo", artifacts))
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    for op in ("encode", "decode", "sample", "anomaly-score"):
        for prefix in ("/models/{model_name}", "/models/{model_name}/versions/{model_version}"):
            spec = paths[f"{prefix}/{op}"]["post"]
            params = {p["name"]: p for p in spec["parameters"] if p["in"] == "path"}
            assert set(params) >= {"model_name"}
            assert params["model_name"]["schema"]["examples"] == ["default"]
            assert spec["requestBody"]["content"]["application/json"]
    for path in ("/models", "/models/{model_name}", "/models/{model_name}/ready",
                 "/v2/repository/index", "/v2/repository/models/{model_name}/load",
                 "/v2/models/{model_name}/versions/{model_version}/infer",
                 "/admin/models/{model_name}/unload"):  # fmt: skip
        assert path in paths, path


def test_two_loads_at_once_cannot_pass_the_bound_between_them(
    start_gated: GatedStart, artifacts: dict[str, Path], tmp_path: Path
) -> None:
    root = repository(tmp_path / "repo", artifacts)
    server, gate = start_gated(
        {
            "VAE_MODEL_REPOSITORY": str(root),
            "VAE_ADMIN_KEYS": ADMIN_KEY,
            "VAE_MODEL_CONTROL": "explicit",
            "VAE_MAX_MODELS": "2",
        }
    )
    gate.load.touch()  # a load's warm-up waits while this exists
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(post, server, "/admin/models/img/load", headers=AS_ADMIN)
        gate.wait_for_calls(1)  # img is being loaded: its one version is spoken for
        r = post(server, "/admin/models/tab/load", headers=AS_ADMIN)  # two versions: three
        assert r.status_code == 409
        assert "would hold 3 models, over VAE_MAX_MODELS=2" in r.json()["detail"]
        gate.load.unlink()
        assert first.result().status_code == 200
    assert post(server, "/models/img/encode", IMG).status_code == 200


def test_a_load_queued_behind_an_unload_serves_what_it_loaded(
    artifacts: dict[str, Path], tmp_path: Path
) -> None:
    """The order that once lost a load: an unload waits for the model's lock, a new load of the
    same model queues behind it, the unload takes the model out; the load that follows must
    put it back, not load into a model the repository no longer holds."""
    root = repository(tmp_path / "repo", artifacts, tab_versions=1)
    models = ModelRepository(Settings(model_repository=root, max_batch_size=2))

    async def scenario() -> int:
        await models.start()
        lock = models._models["img"].lock
        await lock.acquire()  # as a running load of img holds it
        unload = asyncio.ensure_future(models.unload("img"))
        await asyncio.sleep(0)  # the unload now waits for the lock
        load = asyncio.ensure_future(models.load("img"))
        await asyncio.sleep(0)  # and the load behind it
        lock.release()
        assert await unload == [1]
        await load
        return models.serving("img").version

    try:
        assert asyncio.run(scenario()) == 1
    finally:
        models.close()
