"""deploy/k8s: the kustomizations render with `kubectl kustomize` (the renderer `kubectl apply
-k` uses), every rendered document validates against the Kubernetes schemas offline, and the
manifests agree with the app they deploy. No cluster runs here; kubectl only renders.
"""

from __future__ import annotations

import base64
import math
import re
import secrets
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml
from starlette.routing import Match

from app.main import create_app
from app.settings import Settings
from tests.conftest import REPO, Server, make_artifact, require_tool

K8S = REPO / "deploy" / "k8s"
# The oldest version that runs the manifests (preStop's sleep action is on by default from
# 1.30) and the newest kubernetes-validate bundles at its lower bound in pyproject.toml.
KUBE_VERSIONS = ("1.30", "1.37")
TREES = ("base", "overlays/gpu", "overlays/repository", "model-loader",
         "overlays/repository/loader")  # fmt: skip
SERVING = ("base", "overlays/gpu", "overlays/repository")  # the trees with the server's pods
SETTINGS_ENV = {f"VAE_{name.upper()}" for name in Settings.model_fields}

Doc = dict[str, Any]


class KustomizeError(Exception):
    """`kubectl kustomize` refused a tree; the message is its own."""


def _render(directory: Path) -> list[Doc]:
    """The documents `kubectl apply -k directory` would send, rendered by kubectl itself."""
    kubectl = require_tool("kubectl", "the renderer kubectl apply -k uses")
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True,
                         timeout=120, check=False)  # fmt: skip
    if out.returncode != 0:
        raise KustomizeError(out.stderr.strip())
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc is not None]


# ---------------------------------------------------------------------------------------------
# Fixtures: the trees rendered from a copy of deploy/k8s that holds the api-keys.txt a user
# creates (one fresh key); the copy keeps the real tree free of keys.


@dataclass
class Rendered:
    root: Path  # the copy of deploy/k8s
    key: str  # the API key in its api-keys.txt
    docs: dict[str, list[Doc]]  # by tree: "base", "overlays/gpu", "model-loader", ...

    def one(self, tree: str, kind: str) -> Doc:
        found = [d for d in self.docs[tree] if d["kind"] == kind]
        assert len(found) == 1, f"{tree} renders {len(found)} {kind} documents"
        return found[0]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    root = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, root, ignore=shutil.ignore_patterns("api-keys.txt"))
    key = secrets.token_urlsafe(24)
    (root / "base" / "api-keys.txt").write_text(f"{key}\n")
    return Rendered(root, key, {tree: _render(root / tree) for tree in TREES})


@dataclass
class Pod:
    """The serving pod of one rendered tree, with the look-ups the checks share."""

    docs: list[Doc]
    deployment: Doc
    spec: Doc
    container: Doc
    config: dict[str, str]  # the ConfigMap the container's envFrom names

    def volume_for(self, path: str) -> tuple[Doc, Doc]:
        """The volumeMount holding `path`, and its volume."""
        mounts = [m for m in self.container["volumeMounts"]
                  if Path(path).is_relative_to(m["mountPath"])]  # fmt: skip
        assert len(mounts) == 1, f"{path} is under {len(mounts)} volume mounts"
        (volume,) = [v for v in self.spec["volumes"] if v["name"] == mounts[0]["name"]]
        return mounts[0], volume

    def port(self, port: int | str) -> int:
        """A container port, by number or by name."""
        if isinstance(port, int):
            return port
        (found,) = [p["containerPort"] for p in self.container["ports"] if p["name"] == port]
        return int(found)

    def env(self) -> dict[str, str]:
        """What the kubelet hands the container: envFrom first, then env, which wins."""
        env = dict(self.config)
        for var in self.container.get("env", []):
            if "value" in var:
                env[var["name"]] = var["value"]
            else:
                field = var["valueFrom"]["resourceFieldRef"]
                assert field["containerName"] == self.container["name"]
                limit = self.container["resources"]["limits"][field["resource"].split(".")[1]]
                env[var["name"]] = str(math.ceil(_quantity(limit) / _quantity(field["divisor"])))
        return env

    def settings(self, monkeypatch: pytest.MonkeyPatch) -> Settings:
        """The app's settings from exactly this environment, read the way the app reads them."""
        for name, value in self.env().items():
            monkeypatch.setenv(name, value)
        return Settings()


def _quantity(value: str | int) -> float:
    """A CPU quantity: "2", 2 or "500m"."""
    text = str(value)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _pod(docs: list[Doc]) -> Pod:
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    (source,) = container["envFrom"]
    (config,) = [d for d in docs if d["kind"] == "ConfigMap"
                 and d["metadata"]["name"] == source["configMapRef"]["name"]]  # fmt: skip
    return Pod(docs, deployment, spec, container, config["data"])


@pytest.fixture(params=SERVING)
def pod(request: pytest.FixtureRequest, rendered: Rendered) -> Pod:
    return _pod(rendered.docs[request.param])


def _dockerfile_ids() -> tuple[int, int]:
    text = (REPO / "Dockerfile").read_text()
    uid = re.search(r"useradd --uid (\d+)", text)
    gid = re.search(r"groupadd --gid (\d+)", text)
    assert uid, "the Dockerfile no longer creates its user with a fixed uid"
    assert gid, "the Dockerfile no longer creates its group with a fixed gid"
    return int(uid.group(1)), int(gid.group(1))


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and selector.items() <= labels.items()


# ---------------------------------------------------------------------------------------------
# Rendering and schemas


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("tree", TREES)
def test_every_document_validates(rendered: Rendered, tree: str, version: str) -> None:
    for doc in rendered.docs[tree]:
        kubernetes_validate.validate(doc, version, strict=True)  # raises on any error


def test_base_renders_every_kind(rendered: Rendered) -> None:
    kinds = sorted(d["kind"] for d in rendered.docs["base"])
    assert kinds == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler",
                     "PersistentVolumeClaim", "PodDisruptionBudget", "Secret", "Service"]  # fmt: skip
    assert sorted(d["kind"] for d in rendered.docs["overlays/gpu"]) == kinds
    assert sorted(d["kind"] for d in rendered.docs["overlays/repository"]) == kinds


def test_nothing_renders_without_the_keys_file(tmp_path: Path) -> None:
    # A copy, since a checkout that deploys has its own api-keys.txt.
    shutil.copytree(K8S, tmp_path / "k8s", ignore=shutil.ignore_patterns("api-keys.txt"))
    with pytest.raises(KustomizeError, match=r"api-keys\.txt"):
        _render(tmp_path / "k8s" / "base")
    ignored = subprocess.run(["git", "check-ignore", "-q", "deploy/k8s/base/api-keys.txt"],
                             cwd=REPO, check=False)  # fmt: skip
    assert ignored.returncode == 0, "api-keys.txt must stay out of git"


# ---------------------------------------------------------------------------------------------
# The manifests against the app


def test_probes_and_metrics_are_real_routes(pod: Pod) -> None:
    app = create_app(Settings())

    def serves_get(path: str) -> bool:  # asked the way Starlette dispatches a request
        scope = {"type": "http", "method": "GET", "path": path, "root_path": "",
                 "headers": [], "query_string": b""}  # fmt: skip
        return any(route.matches(scope)[0] == Match.FULL for route in app.router.routes)

    probes = {name: pod.container[name]["httpGet"]["path"]
              for name in ("startupProbe", "livenessProbe", "readinessProbe")}  # fmt: skip
    assert probes["livenessProbe"] == "/health"
    assert probes["readinessProbe"] == "/ready"
    annotations = pod.deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    for path in [*probes.values(), annotations["prometheus.io/path"]]:
        assert serves_get(path), path
    assert not serves_get("/no-such-route")


def test_ports_agree_with_vae_port(pod: Pod, monkeypatch: pytest.MonkeyPatch) -> None:
    port = pod.settings(monkeypatch).port
    assert pod.port("http") == port
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert pod.port(pod.container[probe]["httpGet"]["port"]) == port, probe
    annotations = pod.deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == port
    (service,) = [d for d in pod.docs if d["kind"] == "Service"]
    assert [pod.port(p["targetPort"]) for p in service["spec"]["ports"]] == [port]


def test_env_names_are_settings_and_values_valid(pod: Pod, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = {var["name"] for var in pod.container.get("env", [])}
    assert set(pod.config) <= SETTINGS_ENV, set(pod.config) - SETTINGS_ENV
    assert explicit <= SETTINGS_ENV, explicit - SETTINGS_ENV
    assert not set(pod.config) & explicit, "a name in both would hide the ConfigMap's value"
    settings = pod.settings(monkeypatch)  # pydantic validates every value
    assert settings.host == "0.0.0.0"
    assert settings.workers == 1, "one worker per pod, so each pod's /metrics is whole"
    assert settings.log_format == "json"


def test_service_links_are_off(pod: Pod) -> None:
    # Kubernetes would inject <SERVICE>_PORT=tcp://... for every Service; VAE_PORT is ours.
    assert pod.spec["enableServiceLinks"] is False


def test_pod_runs_as_the_image_user_read_only(pod: Pod) -> None:
    uid, gid = _dockerfile_ids()
    context = pod.spec["securityContext"]
    assert context["runAsNonRoot"] is True
    assert (context["runAsUser"], context["runAsGroup"]) == (uid, gid)
    container = pod.container["securityContext"]
    assert container["readOnlyRootFilesystem"] is True
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"]["drop"] == ["ALL"]
    assert pod.spec["automountServiceAccountToken"] is False
    mount, volume = pod.volume_for("/tmp")
    assert mount["mountPath"] == "/tmp"
    assert "emptyDir" in volume


def test_command_serves_without_training(pod: Pod) -> None:
    assert pod.container["command"] == ["python", "-m", "app"]
    assert "args" not in pod.container
    assert (REPO / "app" / "__main__.py").is_file()


def test_model_comes_from_a_read_only_volume(pod: Pod, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = pod.settings(monkeypatch)
    model_path = str(settings.model_repository or settings.model_path)  # what the app serves
    assert model_path.startswith("/"), "relative paths resolve against /srv, the image's code"
    mount, volume = pod.volume_for(model_path)
    assert mount["readOnly"] is True
    claim = volume["persistentVolumeClaim"]
    assert claim["readOnly"] is True
    assert claim["claimName"] in [d["metadata"]["name"] for d in pod.docs
                                  if d["kind"] == "PersistentVolumeClaim"]  # fmt: skip


def test_api_keys_come_from_the_secret(
    rendered: Rendered, pod: Pod, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys_file = pod.settings(monkeypatch).api_keys_file
    assert keys_file is not None
    mount, volume = pod.volume_for(str(keys_file))
    assert mount["readOnly"] is True
    (secret,) = [d for d in pod.docs if d["kind"] == "Secret"]
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert "items" not in volume["secret"], "each key of the Secret is then a file of its name"
    key_name = str(keys_file.relative_to(mount["mountPath"]))
    assert base64.b64decode(secret["data"][key_name]).decode() == f"{rendered.key}\n"


def test_grace_period_outlasts_the_drain(pod: Pod, monkeypatch: pytest.MonkeyPatch) -> None:
    pre_stop = pod.container["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = pod.settings(monkeypatch).shutdown_timeout_s
    assert pod.spec["terminationGracePeriodSeconds"] > pre_stop + drain


def test_resources_are_bounded_and_threads_match(pod: Pod, monkeypatch: pytest.MonkeyPatch) -> None:
    resources = pod.container["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[kind]), kind
    # Requests equal to limits: the Guaranteed QoS class.
    assert {k: resources["limits"][k] for k in resources["requests"]} == resources["requests"]
    threads = pod.settings(monkeypatch).torch_threads
    assert (
        threads == _quantity(resources["limits"]["cpu"]) == _quantity(resources["requests"]["cpu"])
    )


def test_hpa_owns_the_deployment_replicas(pod: Pod) -> None:
    (hpa,) = [d for d in pod.docs if d["kind"] == "HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": pod.deployment["metadata"]["name"]}  # fmt: skip
    assert hpa["spec"]["minReplicas"] >= 2, "one pod alone leaves nothing while it drains"
    assert "replicas" not in pod.deployment["spec"], "every apply would reset the HPA's count"


def test_selectors_match_the_pod_labels(pod: Pod, rendered: Rendered) -> None:
    labels = pod.deployment["spec"]["template"]["metadata"]["labels"]
    (service,) = [d for d in pod.docs if d["kind"] == "Service"]
    (pdb,) = [d for d in pod.docs if d["kind"] == "PodDisruptionBudget"]
    assert _selects(pod.deployment["spec"]["selector"]["matchLabels"], labels)
    assert _selects(service["spec"]["selector"], labels)
    assert _selects(pdb["spec"]["selector"]["matchLabels"], labels)
    for spread in pod.spec["topologySpreadConstraints"]:
        assert _selects(spread["labelSelector"]["matchLabels"], labels)
    loader = rendered.one("model-loader", "Pod")
    assert not _selects(service["spec"]["selector"], loader["metadata"]["labels"])


def test_gpu_overlay_asks_for_a_gpu(rendered: Rendered, monkeypatch: pytest.MonkeyPatch) -> None:
    base, gpu = _pod(rendered.docs["base"]), _pod(rendered.docs["overlays/gpu"])
    assert gpu.container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in base.container["resources"]["limits"]
    assert gpu.settings(monkeypatch).device == "cuda"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu.spec[
        "tolerations"
    ]
    assert gpu.container["image"] != base.container["image"], "a CUDA build of the image"
    # The settings change renames the ConfigMap, so applying the overlay rolls the pods.
    assert gpu.container["envFrom"] != base.container["envFrom"]


def _assert_loader_writes_where_served(pod: Pod, loader: dict[str, Any], served_path: str) -> None:
    """The loader pod mounts, writable, the claim the servers read `served_path` from, at the
    same path, with the servers' image."""
    (container,) = loader["spec"]["containers"]
    assert container["image"] == pod.container["image"]
    served_mount, served = pod.volume_for(served_path)
    claim = served["persistentVolumeClaim"]["claimName"]
    (volume,) = [v for v in loader["spec"]["volumes"]
                 if v.get("persistentVolumeClaim", {}).get("claimName") == claim]  # fmt: skip
    assert not volume["persistentVolumeClaim"].get("readOnly")
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert not mount.get("readOnly")
    assert mount["mountPath"] == served_mount["mountPath"], "the same paths on both sides"


def test_model_loader_writes_where_the_servers_read(rendered: Rendered) -> None:
    base = _pod(rendered.docs["base"])
    loader = rendered.one("model-loader", "Pod")
    _assert_loader_writes_where_served(base, loader, base.config["VAE_MODEL_PATH"])
    assert loader["spec"]["securityContext"]["runAsUser"] == _dockerfile_ids()[0]


def test_repository_overlay_serves_a_repository_from_its_own_claim(
    rendered: Rendered, monkeypatch: pytest.MonkeyPatch
) -> None:
    pod = _pod(rendered.docs["overlays/repository"])
    settings = pod.settings(monkeypatch)
    assert settings.model_repository is not None
    assert settings.model_control == "all", "the Service sends any model's request to any pod"
    mount, volume = pod.volume_for(str(settings.model_repository))
    assert mount["readOnly"] is True
    assert volume["persistentVolumeClaim"] == {"claimName": "vae-model-repository",
                                               "readOnly": True}  # fmt: skip
    claims = [d["metadata"]["name"] for d in pod.docs if d["kind"] == "PersistentVolumeClaim"]
    assert claims == ["vae-model-repository"], "the base's one-artifact claim is not created"
    # Only the repository's settings and its claim differ from the base's pod.
    base = _pod(rendered.docs["base"])
    assert {k: v for k, v in pod.config.items() if base.config.get(k) != v} == {
        "VAE_MODEL_REPOSITORY": str(settings.model_repository),
        "VAE_MODEL_CONTROL": "all",
        "VAE_MAX_MODELS": str(settings.max_models),
    }
    assert set(base.config) <= set(pod.config)
    assert pod.container["envFrom"] != base.container["envFrom"], "a new ConfigMap rolls the pods"
    assert pod.container["volumeMounts"] == base.container["volumeMounts"]
    # The overlay's settings file names real settings only, the commented ones included.
    lines = (K8S / "overlays" / "repository" / "repository.env").read_text().splitlines()
    names = {ln.lstrip("# ").split("=", 1)[0] for ln in lines if re.match(r"#? ?VAE_\w+=", ln)}
    assert {"VAE_DEFAULT_MODEL", "VAE_MODEL_PINS"} < names <= SETTINGS_ENV


def test_repository_loader_writes_where_the_servers_read(rendered: Rendered) -> None:
    pod = _pod(rendered.docs["overlays/repository"])
    loader = rendered.one("overlays/repository/loader", "Pod")
    assert loader == {**rendered.one("model-loader", "Pod"), "spec": loader["spec"]}
    _assert_loader_writes_where_served(pod, loader, pod.config["VAE_MODEL_REPOSITORY"])


@pytest.mark.server
@pytest.mark.parametrize("tree", ["base", "overlays/repository"])
def test_pod_environment_serves_the_real_app(
    rendered: Rendered,
    tmp_path: Path,
    start_server: Callable[[dict[str, str]], Server],
    tree: str,
) -> None:
    """A real server with a pod's environment, its volumes stood in for by directories: the
    probes answer, /metrics is open to the scraper, and the Secret's key guards the model (for
    the repository overlay, a repository of one model, which it lists as served)."""
    pod = _pod(rendered.docs[tree])
    (secret,) = [d for d in pod.docs if d["kind"] == "Secret"]
    env = pod.env()
    volumes: dict[str, Path] = {}
    for mount in pod.container["volumeMounts"]:
        volumes[mount["mountPath"]] = tmp_path / mount["name"]
        volumes[mount["mountPath"]].mkdir()
    model = Path(env["VAE_MODEL_PATH"])
    make_artifact(volumes[str(model.parent)] / model.name)
    if "VAE_MODEL_REPOSITORY" in env:  # under the same mount: <repository>/<name>/1/vae.pt
        repository = Path(env["VAE_MODEL_REPOSITORY"])
        (mount_path,) = [m for m in volumes if repository.is_relative_to(m)]
        local = volumes[mount_path] / repository.relative_to(mount_path)
        (local / "mnist" / "1").mkdir(parents=True)
        make_artifact(local / "mnist" / "1" / "vae.pt")
        env["VAE_MODEL_REPOSITORY"] = str(local)
    keys = Path(env["VAE_API_KEYS_FILE"])
    for name, value in secret["data"].items():  # what the kubelet projects into the volume
        (volumes[str(keys.parent)] / name).write_bytes(base64.b64decode(value))
    env["VAE_MODEL_PATH"] = str(volumes[str(model.parent)] / model.name)
    env["VAE_API_KEYS_FILE"] = str(volumes[str(keys.parent)] / keys.name)
    server = start_server(env)  # on a free port of 127.0.0.1 rather than 0.0.0.0:8000
    server.wait_ready()
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert httpx.get(server.url + pod.container[probe]["httpGet"]["path"]).status_code == 200
    annotations = pod.deployment["spec"]["template"]["metadata"]["annotations"]
    assert httpx.get(server.url + annotations["prometheus.io/path"]).status_code == 200
    assert httpx.get(f"{server.url}/model").status_code == 401
    headers = {"Authorization": f"Bearer {rendered.key}"}
    assert httpx.get(f"{server.url}/model", headers=headers).status_code == 200
    if "VAE_MODEL_REPOSITORY" in env:
        listing = httpx.get(f"{server.url}/models", headers=headers).json()
        assert [(m["name"], m["state"]) for m in listing["models"]] == [("mnist", "READY")]
