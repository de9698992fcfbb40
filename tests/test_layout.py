"""The shape of the house: the two protocols are peers over one engine, and the app never
imports the trainer or the client."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parents[1] / "app"
# What belongs to each protocol: its routes and the codec only it uses.
REST = {"app.routes", "app.payloads"}
V2 = {"app.v2"}


def imported(path: Path) -> set[str]:
    """Every module `path` imports, absolute, with `from app import x` read as `app.x`."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def belongs(module: str, owner: set[str]) -> bool:
    return any(module == o or module.startswith(o + ".") for o in owner)


@pytest.mark.parametrize("path", sorted((APP / "v2").glob("*.py")), ids=lambda p: p.name)
def test_v2_imports_nothing_of_rest(path: Path) -> None:
    assert not [m for m in imported(path) if belongs(m, REST)]


@pytest.mark.parametrize("path", [APP / "routes.py", APP / "payloads.py"], ids=lambda p: p.name)
def test_rest_imports_nothing_of_v2(path: Path) -> None:
    assert not [m for m in imported(path) if belongs(m, V2)]


def test_both_protocols_call_the_one_set_of_operations() -> None:
    assert "app.operations" in imported(APP / "routes.py")
    assert "app.operations" in imported(APP / "v2" / "routes.py")


@pytest.mark.parametrize("path", sorted(APP.rglob("*.py")), ids=lambda p: str(p.relative_to(APP)))
def test_the_app_imports_neither_the_trainer_nor_the_client(path: Path) -> None:
    assert not [m for m in imported(path) if belongs(m, {"training", "vae_service_client"})]


TRAINING = APP.parent / "training"
SCORING = APP.parent / "scoring"
# The trainer's tools that score a finished artifact exactly as the service does.
SERVED_BY_THE_SERVICE = {"benchmark_anomaly.py", "benchmark_latent.py", "benchmark_selection.py",
                         "benchmark_tabular.py", "report.py"}  # fmt: skip


@pytest.mark.parametrize("path", sorted(SCORING.glob("*.py")), ids=lambda p: p.name)
def test_the_scoring_core_stands_below_the_app_and_the_trainer(path: Path) -> None:
    """scoring/ is what both compute alike (the scores, the calibration, the artifact's files):
    it imports neither of them, nor anything of HTTP."""
    below = {"app", "training", "vae_service_client", "fastapi", "starlette", "pydantic"}
    assert not [m for m in imported(path) if belongs(m, below)]


@pytest.mark.parametrize("path", sorted(TRAINING.glob("*.py")), ids=lambda p: p.name)
def test_the_trainer_calibrates_through_the_core_and_reaches_into_the_app_nowhere_else(
    path: Path,
) -> None:
    """Training calibrates with scoring/scores.py and scoring/calibration.py, the functions the
    service scores with, so quantiles and live scores cannot drift apart, and without a step
    through app/. Only the benchmarks and the report load an artifact as the service does
    (app/model.py's VAEService), to measure what it serves."""
    app_modules = {m for m in imported(path) if belongs(m, {"app"})}
    allowed = {"app.model"} if path.name in SERVED_BY_THE_SERVICE else set()
    assert {m for m in app_modules if not any(belongs(m, {a}) for a in allowed)} == set()
