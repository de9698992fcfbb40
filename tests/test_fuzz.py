"""schemathesis against live servers' /openapi.json, and the extreme-value corpus: a short pass
here, the long one (thousands of cases) with `python -m bench.fuzz`."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.fuzz import HOSTILE_NAMES, NAME_ROUTES, TARGETS, extremes, fuzz, hostile_names, serve
from tests.conftest import Server

pytestmark = [pytest.mark.slow, pytest.mark.server]


@pytest.mark.parametrize("target", TARGETS)
def test_generated_requests_get_no_5xx_and_only_documented_answers(
    tmp_path: Path, target: str
) -> None:
    """An image model (uploads, PNG answers), the shipped table model (records, V2 named
    inputs) and the image model behind the root path /vae."""
    server = Server(serve(target, tmp_path), tmp_path / "log")
    try:
        server.wait_ready()
        result = fuzz(server.url, max_examples=5)
    finally:
        server.stop()
    assert result.returncode == 0, result.output[-4000:]
    assert result.cases >= 100
    assert "Traceback" not in server.log.read_text()


def test_extreme_values_are_decided_never_left_null(tmp_path: Path) -> None:
    server = Server(serve("table", tmp_path), tmp_path / "log")
    try:
        server.wait_ready()
        cases, failures = extremes(server.url, features=2)
    finally:
        server.stop()
    assert failures == []
    assert cases == 2 * 72 * 4  # two features, 10^3 to 10^38 both signs, four ways to send
    assert "Traceback" not in server.log.read_text()


def test_hostile_model_names_get_a_4xx_on_every_named_route(tmp_path: Path) -> None:
    server = Server(serve("image", tmp_path), tmp_path / "log")
    try:
        server.wait_ready()
        cases, failures = hostile_names(server.url)
    finally:
        server.stop()
    assert failures == []
    assert cases == len(HOSTILE_NAMES) * len(NAME_ROUTES)
    assert "Traceback" not in server.log.read_text()
