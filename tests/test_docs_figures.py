"""Every measured figure in README.md and docs/ is what scripts/docs_figures.py writes from the
committed results: each generated block as it renders now, each plot drawn from today's inputs.
No torch, no training, no server: the blocks render from JSON, and a plot's freshness is the
digest in its PNG metadata, never its pixels."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from scripts import docs_figures
from tests.conftest import REPO

FIX = f"run {docs_figures.COMMAND}"


def test_every_generated_block_is_current() -> None:
    problems = docs_figures.stale_pages()
    assert problems == [], "\n".join(problems)


def test_every_plot_is_drawn_from_the_current_inputs() -> None:
    problems = docs_figures.stale_plots()
    assert problems == [], "\n".join(problems)


def test_every_plot_is_shown_on_a_page() -> None:
    targets = set()
    for page in docs_figures.PAGES:
        for target in re.findall(r"!\[[^]]*\]\(([^)\s]+)\)", page.read_text()):
            targets.add((page.parent / target).resolve())
    unshown = [p.name for p in docs_figures.PLOTS.values() if p.path.resolve() not in targets]
    assert unshown == []


@pytest.mark.parametrize(
    "page", sorted((REPO / "docs" / "benchmarks").glob("[!R]*.md")), ids=lambda p: p.name
)
def test_each_benchmark_page_names_its_machine_and_command(page: Path) -> None:
    text = page.read_text()
    assert "-core" in text, "no machine"
    assert re.search(r"```bash\n(\.venv/bin/)?python -m ", text), "no command"


def test_a_changed_block_is_named_with_the_command_that_fixes_it(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("Prose.\n<!-- generated: lodo-headline -->\nold figures\n<!-- /generated -->\n")
    assert docs_figures.stale_pages([page], every_block=False) == [
        f"{page}: stale lodo-headline: {FIX}"
    ]
    fresh, unknown = docs_figures.render_page(page.read_text(), page)
    assert unknown == []
    assert fresh.startswith("Prose.\n<!-- generated: lodo-headline -->\nIn the leave-one-digit")
    page.write_text(fresh)
    assert docs_figures.stale_pages([page], every_block=False) == []


def test_an_unknown_block_is_named(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("<!-- generated: no-such-table -->\n<!-- /generated -->\n")
    assert docs_figures.stale_pages([page], every_block=False) == [
        f"{page}: no block is called 'no-such-table' (scripts/docs_figures.py BLOCKS)"
    ]


def test_a_plot_is_stale_once_its_input_changes_and_missing_once_gone(tmp_path: Path) -> None:
    source = tmp_path / "result.json"
    source.write_text(json.dumps({"x": [1, 2, 3]}))

    def draw() -> Figure:
        fig = docs_figures.figure(2, 2)
        fig.subplots().plot(json.loads(source.read_text())["x"])
        return fig

    plot = docs_figures.Plot("tiny", tmp_path / "tiny.png", (source,), draw)
    docs_figures.save(plot)
    assert docs_figures.embedded_digest(plot.path) == docs_figures.digest(plot)
    assert docs_figures.stale_plots([plot]) == []
    source.write_text(json.dumps({"x": [1, 2, 4]}))
    assert docs_figures.stale_plots([plot]) == [
        f"{plot.path}: stale, its inputs or drawing changed: {FIX}"
    ]
    plot.path.unlink()
    assert docs_figures.stale_plots([plot]) == [f"{plot.path}: missing: {FIX}"]


def test_the_check_passes_on_the_committed_pages() -> None:
    assert docs_figures.main(["--check"]) == 0


def test_a_table_runs_format_is_what_its_runs_recorded_or_else_told_by_its_scores() -> None:
    summary = {"vae-service: dose": {}, "vae-service: input_distance": {}, "PyOD: KNN": {}}

    def run(*recorded: int) -> dict[str, object]:
        runs = [{"format_version": v} for v in recorded] or [{}]
        return {"datasets": {"wine": {"runs": runs, "summary": summary}}}

    assert docs_figures.tabular_format(run(9, 9)) == 9
    # A run from before the benchmark recorded it: the earliest format serving its scores.
    assert docs_figures.tabular_format(run()) == 7
