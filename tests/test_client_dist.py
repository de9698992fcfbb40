"""vae-service-client as its own distribution: built into a wheel and installed into a fresh
venv (no system site packages), where it imports with httpx and numpy and nothing of the server.

Nothing is downloaded. The client's wheel is built offline, with the dev venv's setuptools (no
build isolation); its dependencies come as wheels made in the run from the distributions this
venv already has (`wheel_of`), and pip installs from those alone (--no-index).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import REPO

pytestmark = pytest.mark.slow

CLIENT = REPO / "clients" / "python"
# Run in the fresh venv with -I (no cwd, PYTHONPATH or user site on sys.path), from a tmp dir.
PROBE = """
import importlib.metadata, importlib.util, json, re, vae_service_client
print(json.dumps({
    "file": vae_service_client.__file__,
    "package_dir": importlib.util.find_spec("vae_service_client").submodule_search_locations[0],
    "absent": {m: importlib.util.find_spec(m) is None for m in ("torch", "fastapi", "app")},
    "requires": sorted(re.match(r"[A-Za-z0-9._-]+", r).group(0).lower()
                       for r in importlib.metadata.requires("vae-service-client") or []),
}))
"""


def run(args: list[str | Path], cwd: Path) -> str:
    # The dev venv's own variables must not leak into the fresh one.
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
    }
    out = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, f"{args}\n{out.stdout}\n{out.stderr}"
    return out.stdout


def requirement_closure(name: str) -> set[str]:
    """The installed distributions `name` needs, directly or not (extras and markers that do
    not apply here left out), without `name` itself."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        for req in importlib.metadata.requires(todo.pop()) or []:
            parsed = Requirement(req)
            if parsed.marker is not None and not parsed.marker.evaluate({"extra": ""}):
                continue
            key = canonicalize_name(parsed.name)
            if key not in seen:
                seen.add(key)
                todo.append(key)
    return seen


def wheel_of(dist: importlib.metadata.Distribution, folder: Path) -> Path:
    """A wheel of an installed distribution, from its own files: the ones its RECORD lists
    inside site-packages (scripts and caches left out; pip makes its own on install)."""
    info = next(
        f for f in dist.files or [] if f.name == "WHEEL" and f.parent.name.endswith(".dist-info")
    )
    tag = next(
        line.split(": ", 1)[1] for line in info.read_text().splitlines() if line.startswith("Tag: ")
    )
    name = canonicalize_name(dist.metadata["Name"]).replace("-", "_")
    path = folder / f"{name}-{dist.version}-{tag}.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as whl:
        for file in dist.files or []:
            if ".." in file.parts or "__pycache__" in file.parts:
                continue
            whl.write(dist.locate_file(file), str(file))
    return path


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What PROBE sees in a fresh venv holding only the client's wheel and its dependencies."""
    tmp = tmp_path_factory.mktemp("client_dist")
    # A copy, so setuptools' build/ and egg-info land in tmp, not in the working tree.
    source = shutil.copytree(
        CLIENT,
        tmp / "source",
        ignore=shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__"),
    )
    pip = ("-m", "pip", "--disable-pip-version-check", "-q")
    wheels = tmp / "wheels"
    run(
        [sys.executable, *pip, "wheel", "--no-build-isolation", "--no-deps", "-w", wheels, source],
        tmp,
    )
    (wheel,) = wheels.glob("vae_service_client-*.whl")
    for name in requirement_closure("vae-service-client"):
        wheel_of(importlib.metadata.distribution(name), wheels)
    run([sys.executable, "-m", "venv", tmp / "venv"], tmp)
    python = tmp / "venv" / "bin" / "python"
    run([python, *pip, "install", "--no-index", "--find-links", wheels, wheel], tmp)
    probe: dict[str, Any] = json.loads(run([python, "-I", "-c", PROBE], tmp))
    probe["venv"] = str(tmp / "venv")
    return probe


def test_client_imports_from_the_fresh_venv_not_the_working_tree(installed: dict[str, Any]) -> None:
    assert Path(installed["file"]).is_relative_to(installed["venv"])
    assert (Path(installed["package_dir"]) / "py.typed").is_file()


def test_fresh_venv_has_no_torch_fastapi_or_server(installed: dict[str, Any]) -> None:
    assert installed["absent"] == {"torch": True, "fastapi": True, "app": True}


def test_distribution_requires_only_httpx_and_numpy(installed: dict[str, Any]) -> None:
    assert installed["requires"] == ["anyio", "httpx", "numpy"]  # anyio: httpx's own
