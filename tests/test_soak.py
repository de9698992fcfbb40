"""The soak script's own logic: how answers are judged, and when the verdict fails.

The soak itself runs in CI (`python -m bench.soak --duration 30`); here, its judgement is
checked case by case, and its request catalogue against a real server, so a route or a
message that changes shows up in seconds rather than as a failed 30-second soak.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.soak import API_KEY, Outcome, Tally, build_calls, classify, verdict
from tests.conftest import Server

IN_FLIGHT = (
    "The server already has 8 requests in flight, its limit (VAE_MAX_IN_FLIGHT); retry after 1 s."
)
DRAINING = "The server is shutting down; send the request to another replica."


def test_in_flight_503_is_backpressure_not_error() -> None:
    assert classify(False, 503, IN_FLIGHT) == (Outcome.BACKPRESSURE, "")
    assert classify(True, 503, IN_FLIGHT) == (Outcome.BACKPRESSURE, "")


def test_other_503_is_an_error() -> None:
    assert classify(False, 503, DRAINING) == (Outcome.ERROR, f"503: {DRAINING}")


def test_bad_request_must_get_4xx() -> None:
    assert classify(True, 422, "instances[0] has 3 values.") == (Outcome.OK, "")
    assert classify(True, 200, "") == (Outcome.ERROR, "a bad request got 200, not a 4xx")
    assert classify(True, 500, "boom") == (Outcome.ERROR, "500: boom")


def test_good_request_must_get_2xx_with_a_sound_body() -> None:
    assert classify(False, 200, "") == (Outcome.OK, "")
    assert classify(False, 422, "nope") == (Outcome.ERROR, "a good request got 422: nope")
    assert classify(False, 504, "slow") == (Outcome.ERROR, "504: slow")
    assert classify(False, 200, "", "'mean' is not 1 rows") == (
        Outcome.ERROR,
        "malformed answer: 'mean' is not 1 rows",
    )


def test_totals_keep_backpressure_out_of_the_5xx() -> None:
    tally = Tally()
    stats = tally.stats("encode.json.1")
    stats.requests = 4
    stats.statuses.update({200: 1, 503: 2, 500: 1})
    stats.backpressure = 2
    bad = tally.stats("bad.json.nan")
    bad.requests = 1
    bad.statuses[422] += 1
    totals = tally.totals()
    assert totals["5xx"] == 3
    assert totals["5xx_not_backpressure"] == 1
    assert totals["bad_sent"] == 1
    assert totals["4xx"] == 1


def _phase(**overrides: int) -> dict[str, Any]:
    totals = {"requests": 1000, "5xx_not_backpressure": 0, "dropped": 0, "errors": 0}
    return {"totals": totals | {"bad_sent": 20} | overrides}


CLEAN: dict[str, Any] = {
    "warmup": _phase(),
    "load": _phase(),
    "warmup_reload": {"sha_changed": True, "answers_changed": True},
    "reload": {"sha_changed": True, "answers_changed": True},
    "rss": {"after_warmup": 300 * 2**20, "end": 320 * 2**20, "ratio": 320 / 300},
    "ready_at_end": True,
}


def test_verdict_passes_a_clean_soak() -> None:
    assert verdict(CLEAN) == []


def _with(path: str, value: object) -> dict[str, Any]:
    summary = copy.deepcopy(CLEAN)
    *parents, leaf = path.split(".")
    node = summary
    for key in parents:
        node = node[key]
    node[leaf] = value
    return summary


@pytest.mark.parametrize(
    ("path", "value", "failure"),
    [
        ("warmup.totals.dropped", 1, "warmup: 1 requests were dropped"),
        ("load.totals.dropped", 2, "load: 2 requests were dropped"),
        ("load.totals.errors", 3, "load: 3 other answers broke the contract (see examples)"),
        ("load.totals.requests", 0, "load: no request was answered"),
        ("load.totals.bad_sent", 0, "load: no bad request was sent, so none was checked"),
        ("reload.sha_changed", False, "reload: /model's sha256 did not change"),
        (
            "reload.answers_changed",
            False,
            "reload: the same seeded /encode answered the same after it",
        ),
        (
            "warmup_reload",
            {"sha_changed": False, "answers_changed": True, "problem": "reload answered 500"},
            "warmup reload: /model's sha256 did not change: reload answered 500",
        ),
        ("rss.ratio", 1.11, "RSS grew 1.110x after warm-up (300.0 -> 320.0 MB), over 1.1x"),
        ("ready_at_end", False, "the server was not ready at the end"),
    ],
)
def test_verdict_fails_on(path: str, value: object, failure: str) -> None:
    assert verdict(_with(path, value)) == [failure]


def test_verdict_counts_a_5xx_once() -> None:
    """A 5xx is also an error; the verdict names it as a 5xx, not twice."""
    summary = _with("warmup.totals.errors", 1)
    summary["warmup"]["totals"]["5xx_not_backpressure"] = 1
    assert verdict(summary) == ["warmup: 1 answers were 5xx"]


def test_a_soak_without_warm_up_has_no_warm_up_reload_to_check() -> None:
    summary = copy.deepcopy(CLEAN)
    summary["warmup_reload"] = None
    assert verdict(summary) == []


def test_rss_at_the_limit_passes() -> None:
    assert verdict(_with("rss.ratio", 1.10)) == []


@pytest.mark.server
def test_every_call_is_judged_ok_by_a_real_server(
    tiny_artifact: Path, start_server: Callable[[dict[str, str]], Server]
) -> None:
    """Each good call gets a sound 2xx and each bad one a 4xx, so the catalogue tests what it
    claims: a bad request that passed, or a good one refused, would fail the soak for nothing."""
    server = start_server({"VAE_MODEL_PATH": str(tiny_artifact), "VAE_API_KEYS": API_KEY})
    server.wait_ready()
    good, weights, bad = build_calls(dim=4, latent=2)
    assert len(good) == len(weights)
    assert bad
    assert all(c.bad for c in bad)
    assert not any(c.bad for c in good)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for call in [*good, *bad]:
            method = "POST" if call.body is not None else "GET"
            r = client.request(method, call.path, content=call.body, headers=call.headers())
            assert call.judge(r) == (Outcome.OK, ""), (call.kind, r.status_code, r.text[:300])
