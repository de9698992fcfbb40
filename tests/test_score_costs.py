"""The cost bench, run small: artifacts timed in turns, each against the first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.score_costs import main, options
from tests.conftest import MNIST_DIR, REPO

SHIPPED = REPO / "models" / "default" / "vae.pt"


def test_artifacts_are_timed_at_every_option_against_the_first(
    mnist_artifact: Path, tmp_path: Path
) -> None:
    out = tmp_path / "costs.json"
    args = [str(SHIPPED), str(mnist_artifact), "--data-dir", str(MNIST_DIR), "--images", "70",
            "--rounds", "2", "--samples", "4", "--ll-samples", "8", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    r = json.loads(out.read_text())
    # Named by format: the shipped model's (4) first, the trainer's current one beside it.
    assert list(r["artifacts"]) == ["format 4", "format 9"]
    assert (r["images"], r["rounds"]) == (70, 2)
    assert list(r["microseconds_per_instance"]) == list(options(8))
    for option, per in r["microseconds_per_instance"].items():
        assert all(v > 0 for v in per.values())
        ratio = r["ratio_to_baseline"][option]
        assert ratio["format 4"] == 1.0
        assert ratio["format 9"] == pytest.approx(per["format 9"] / per["format 4"], abs=1e-3)


def test_two_artifacts_of_one_format_are_refused(tmp_path: Path) -> None:
    args = [str(SHIPPED), str(SHIPPED), "--data-dir", str(MNIST_DIR), "--images", "8",
            "--rounds", "1", "--out", str(tmp_path / "costs.json")]  # fmt: skip
    with pytest.raises(SystemExit, match="one artifact of each format"):
        main(args)
