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


@pytest.mark.parametrize("path", sorted(TRAINING.glob("*.py")), ids=lambda p: p.name)
def test_the_trainer_uses_the_services_scores_and_nothing_of_its_http(path: Path) -> None:
    """Training calibrates with app/scores.py, and the ensemble with app/calibration.py's
    percentiles, so quantiles and live scores cannot drift apart; the attribution's
    projection and the benchmark run through app/model.py as the service does. Nothing HTTP."""
    app_modules = {m for m in imported(path) if belongs(m, {"app"})}
    allowed = {"app.scores", "app.calibration", "app.model"}
    assert {m for m in app_modules if not any(belongs(m, {a}) for a in allowed)} == set()
