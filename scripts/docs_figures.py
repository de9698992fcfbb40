"""Write every measured figure in README.md and docs/ from the committed results, plots included.

    .venv/bin/python scripts/docs_figures.py          # rewrite the blocks, redraw stale plots
    .venv/bin/python scripts/docs_figures.py --check  # exit 1, naming each, if any is stale

The figures come from the JSON the benchmarks write (docs/benchmark/*.json) and from the shipped
model's own summary and report (models/default/manifest.json, models/default/report/metrics.json).

- A table (or a sentence) of figures lives in a page between `<!-- generated: NAME -->` and
  `<!-- /generated -->`; BLOCKS renders each NAME. Everything outside the markers is prose.
- A plot is a PNG whose metadata (a tEXt chunk, DIGEST_KEY) holds the sha256 of what it was
  drawn from: its input files' bytes and its drawing function's source. A plot is stale when
  that digest differs from the current inputs', so the check never compares pixels, which
  differ between matplotlib versions.

tests/test_docs_figures.py fails while either is stale. After a benchmark writes new JSON, or
a new shipped model, run this script and commit what it changes.
"""

from __future__ import annotations

import argparse
import collections
import functools
import hashlib
import inspect
import json
import math
import os
import re
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a file, `app` and `scripts` are not on the path otherwise

from app.common import SCORES, listing  # noqa: E402
from scripts.settings_doc import table  # noqa: E402

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

COMMAND = ".venv/bin/python scripts/docs_figures.py"
RESULTS = REPO / "docs" / "benchmark"
SHIPPED = REPO / "models" / "default"
IMG = REPO / "docs" / "benchmarks" / "img"
MNIST_SLICE = REPO / "tests" / "data" / "mnist"
PAGES = (REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")))
MARKER = re.compile(
    r"(?P<open><!-- generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(?P<close><!-- /generated -->)",
    re.S,
)
DIGEST_KEY = "Docs-Digest"
# Part of every plot's digest: bump it when a change outside the drawing functions (the shared
# style, the size) changes what every plot looks like.
DRAWING_VERSION = "1"

# Column titles and legends: each score's short name, in app.common.SCORES' order.
SHORT = dict(
    zip(
        SCORES,
        (
            "KL",
            "recon. prob.",
            "log-lik.",
            "input complexity",
            "likelihood ratio",
            "DoSE",
            "latent distance",
            "polar distance",
            "RaPP",
            "input distance",
            "feature distance",
            "ensemble",
        ),
        strict=True,
    )
)
# Scores that a format adds to the calibration (app/common.py says the same of SCORES' order).
# Format 4 first held the rank calibration alone; an artifact with `rapp` is of the format 4
# whose ensemble combines three scores.
# Format 7 adds a score to table models alone, format 9 to image models alone: an image
# model of format 6 to 8 is told from format 5, and a table model of format 8 from format 7, by
# its manifest, not its scores.
FORMAT_SCORES = (
    (9, ("feature_distance",)),
    (7, ("input_distance",)),
    (5, ("latent_polar_distance",)),
    (4, ("rapp",)),
    (3, ("latent_distance", "ensemble")),
    (2, ("input_complexity", "dose")),
)
# The newest format that changed a table model's scores: format 9's feature distance is an
# image model's alone, so a table run of format 7 or later trained what the trainer trains now.
TABLE_FORMAT = 7
# The shipped MNIST model's earlier artifacts, oldest first, each upgraded to the next with the
# same weights: an upgraded manifest names only the artifact it was made from, and results
# keyed to an older sha256 (the latent probe's) still describe these weights.
SHIPPED_LINEAGE = (
    ("c6ea81f747c890129b3a9d3e0d8ad92255a67d0e1603e40d6ba7387d4e52f99d", 2),
    ("eae3ec8648d7dce5e2a15518dc88e2047fbd232de4c0aaa75800f1081d974f46", 3),
)
# The share of a pasted shape's changed pixels the attribution was asked to find.
ATTRIBUTION_TARGET = 0.80


# -- reading ------------------------------------------------------------------------------------


# Each result is read once per run: several blocks and plots quote the same file.
@functools.cache
def load(path: Path) -> Any:
    return json.loads(path.read_text())


def bench(name: str) -> Any:
    return load(RESULTS / f"{name}.json")


def shipped_manifest() -> dict[str, Any]:
    manifest: dict[str, Any] = load(SHIPPED / "manifest.json")["manifest"]
    return manifest


def shown(path: Path) -> str:
    """A path as the messages and links name it: from the repository's root when inside it."""
    return path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path)


def link(page: Path, target: Path, text: str | None = None) -> str:
    """A Markdown link from `page` to a file of the repository, relative as GitHub reads it;
    its text is the file's path in the repository unless given."""
    rel = Path(os.path.relpath(target, page.parent)).as_posix()
    return f"[{text or shown(target)}]({rel})"


def layers(inputs: int, hidden: Sequence[int], latent: int) -> str:
    """A net's widths as the docs write them, encoder side: 784-512-256-32."""
    return "-".join(str(d) for d in (inputs, *hidden, latent))


def portable(command: str) -> str:
    """A recorded command as anyone can run it: the data directory was the measuring
    machine's own."""
    return re.sub(r"--data-dir \S+", "--data-dir <MNIST dir>", command)


def megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def percent(x: float, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f}%"


def default_threshold() -> float:
    """The service's default VAE_ANOMALY_PERCENTILE, at which the benchmarks count false alarms."""
    from app.settings import Settings

    q: float = Settings.model_fields["anomaly_percentile"].default
    return q


def out_at(command: str, name: str) -> str:
    """A recorded command with its --out where the committed file lies: the run wrote to the
    measuring machine's scratch directory, and the file was copied here."""
    return re.sub(r"--out \S+", f"--out docs/benchmark/{name}.json", command)


def bold_best(cells: list[str], values: Sequence[float | None]) -> list[str]:
    """The cells, with the one of the highest value in bold (all of them, if tied)."""
    known = [v for v in values if v is not None and math.isfinite(v)]
    best = max(known, default=None)
    return [
        f"**{c}**" if v is not None and v == best else c for c, v in zip(cells, values, strict=True)
    ]


def describe_machine(m: dict[str, Any]) -> str:
    """One phrase for a result's `machine` record: what each benchmark writes of it."""
    parts = [
        f"a {m['nproc']}-core {m['cpu_model']}" + (f" ({m['machine']})" if "machine" in m else "")
    ]
    if "mem_total_gib" in m:
        parts.append(f"{m['mem_total_gib']:g} GiB")
    torch = m["torch"] + (" (CPU only)" if m["torch"].endswith("+cpu") else "")
    versions = [f"Python {m['python']}", f"torch {torch}"]
    versions += [f"{lib} {m[lib]}" for lib in ("scikit-learn",) if lib in m]
    versions += [
        f"{k} {v}" for k, v in m.get("packages", {}).items() if k in ("fastapi", "uvicorn")
    ]
    return ", ".join(parts) + "; " + ", ".join(versions)


def artifact_format(calibrated: Iterable[str]) -> int:
    names = set(calibrated)
    return next((fmt for fmt, scores in FORMAT_SCORES if names & set(scores)), 1)


def decision_score(fmt: int, likelihood: str) -> str:
    """The score a trainer of that format recommended: format 1 predates the choice."""
    # Imported here: training pulls in torch, which only the throughput page's note needs.
    from training.evaluate import DECISION_SCORE

    if fmt == 1:
        return "reconstruction_log_prob"
    return "dose" if fmt == 2 or (likelihood == "gaussian" and fmt < 7) else DECISION_SCORE


# -- blocks ---------------------------------------------------------------------------------------

# A block renders for the page that holds it: its links are relative to that page.
Render = Callable[[Path], str]
BLOCKS: dict[str, Render] = {}


def block(name: str) -> Callable[[Render], Render]:
    """Register `render(page)` as the body of every `<!-- generated: name -->` block."""

    def register(render: Render) -> Render:
        BLOCKS[name] = render
        return render

    return register


@block("shipped-model")
def shipped_model(page: Path) -> str:
    summary = load(SHIPPED / "manifest.json")
    m, metrics, data = (
        summary["manifest"],
        summary["manifest"]["metrics"],
        summary["manifest"]["dataset"],
    )
    size = (SHIPPED / "vae.pt").stat().st_size
    rows = [
        ("test ELBO (nats per image)", f"{metrics['test_elbo']:.2f}"),
        (
            f"test log-likelihood (IWAE bound, K={metrics['log_likelihood_k']:,}, "
            f"{metrics['test_images']:,} test images, fixed binarisation)",
            f"{metrics['test_log_likelihood']:.2f}",
        ),
        (
            f"best validation ELBO (epoch {metrics['best_epoch']} of {m['training']['epochs']})",
            f"{metrics['best_val_elbo']:.2f}",
        ),
        (
            "active latent units (of the latent size Z)",
            f"{metrics['active_units']} of {m['latent_dim']}",
        ),
        ("training time, the model alone (seconds)", f"{metrics['train_seconds']:g}"),
        (
            f"images: training / validation / test ({data['name']})",
            f"{data['train_size']:,} / {data['val_size']:,} / {data['test_size']:,}",
        ),
        calibration_row(m["calibration"]),
        (
            "artifact: size, format, decision score",
            f"{megabytes(size)}, {m['format_version']}, `{m['decision_score']}`",
        ),
    ]
    # An upgraded artifact keeps its original's weights: say so, since results keyed to the
    # original's sha256 (the latent probe's) still describe this model.
    origin = m.get("upgraded_from")
    note = ""
    if origin is not None:
        before = [
            f", itself brought from format {fmt}, `{sha[:8]}…`"
            for sha, fmt in reversed(SHIPPED_LINEAGE)
            if fmt < origin["format_version"]
        ][:1]
        note = (
            f"\nBrought to format {m['format_version']} from format {origin['format_version']} "
            f"(sha256 `{origin['sha256'][:8]}…`{''.join(before)}) by "
            "`python -m training.upgrade`: the same weights throughout.\n"
        )
    return (
        f"sha256 `{summary['sha256']}`, from {link(page, SHIPPED / 'manifest.json')}:\n\n"
        + table(("", "value"), rows)
        + note
    )


def calibration_row(cal: dict[str, Any]) -> tuple[str, str]:
    """The calibration's size, the smallest tail it resolves, and the threshold the service
    applies at its default, lowered where the rows cannot resolve it."""
    from scoring.calibration import Calibration

    q = default_threshold()
    applied = Calibration(cal["n"], {}).effective_threshold(q)
    kept = f"keeps {q:g}" if applied == q else f"lowered to {applied:.4f}"
    return (
        f"calibration: validation rows, smallest tail resolved; the threshold at {q:g}",
        f"{cal['n']:,}, {percent(cal['resolvable_tail'], 2)}; {kept}",
    )


TABLE_MODEL = REPO / "models" / "breast-cancer"


@block("table-model")
def table_model(page: Path) -> str:
    summary = load(TABLE_MODEL / "manifest.json")
    m = summary["manifest"]
    data, auroc = m["dataset"], m["metrics"]["test_auroc"]
    size = (TABLE_MODEL / "vae.pt").stat().st_size
    rows = [
        (
            f"rows: training / validation / test ({data['name']}, `{data['label_column']}`)",
            f"{data['train_size']:,} / {data['val_size']:,} / {data['test_size']:,}",
        ),
        calibration_row(m["calibration"]),
        ("features", f"{m['input_dim']}, {m['likelihood']} decoder"),
        (
            "net",
            f"{layers(m['input_dim'], m['model']['hidden_dims'], m['latent_dim'])}, "
            f"{m['training']['epochs']} epochs, batch {m['training']['batch_size']}",
        ),
        (
            "artifact: size, format, decision score",
            f"{megabytes(size)}, {m['format_version']}, `{m['decision_score']}`",
        ),
        *(
            (f"AUROC on the test rows, `{score}`", f"{auroc[score]:.3f}")
            for score in SCORES
            if score in auroc
        ),
    ]
    return (
        f"sha256 `{summary['sha256']}`, from {link(page, TABLE_MODEL / 'manifest.json')}; "
        f"the test rows are the held-out `{data['normal_value']}` rows and every other one:\n\n"
        + table(("", "value"), rows)
    )


@block("shipped-thresholds")
def shipped_thresholds(page: Path) -> str:
    report = load(SHIPPED / "report" / "metrics.json")
    cut = report["thresholds"]
    sets = sorted({s for per_set in report["auroc"].values() for s in per_set})
    rows = [
        (
            f"`{score}`",
            f"{cut['scores'][score]:.4g}",
            *(f"{report['auroc'][score][s]:.3f}" for s in sets),
        )
        for score in SCORES
        if score in cut["scores"]
    ]
    head = (
        "score",
        f"value at the {cut['percentile']:g} percentile",
        *(f"AUROC, {s}" for s in sets),
    )
    return (
        f"{report['report']['images']:,} test images, seed {report['report']['seed']}, from "
        f"{link(page, SHIPPED / 'report' / 'metrics.json')}:\n\n" + table(head, rows)
    )


@block("shipped-scoring")
def shipped_scoring(page: Path) -> str:
    m = shipped_manifest()
    k = m["training"]["calibration_samples"], m["training"]["calibration_ll_samples"]
    reference = m["latent_distance"]
    text = (
        f"The shipped model was calibrated with L={k[0]} and K={k[1]} on "
        f"{m['calibration']['n']:,} validation digits; its latent distance compares with the "
        f"posterior means of {reference['n']:,} training images (k={reference['k']}), and DoSE "
        f"sums over {m['dose']['n']:,} validation points."
    )
    if "rapp" in m:
        text += (
            f" RaPP's projection is fitted on the hidden-space gaps of {m['rapp']['n']:,} "
            "training images"
        )
        ensemble = m.get("ensemble")
        if ensemble is not None and ensemble["combine"] == "fisher":
            names = listing([f"`{n}`" for n in ensemble["scores"]])
            text += f", and the ensemble sums the tails of {names} (Fisher's method)"
        text += "."
    return text + "\n"


# The anomaly benchmark's runs, by the name of their JSON: one class (train on one digit, the
# other nine are anomalies) and leave-one-digit-out, at 20 epochs and with the quick preset.
ONECLASS, LODO, LODO_QUICK = "oneclass", "lodo-scores", "lodo-quick"


def protocol(c: dict[str, Any]) -> str:
    """A run's protocol as the pages name it; runs older than --protocol left one digit out."""
    return "one class" if c.get("protocol") == "oneclass" else "leave one digit out"


def recipe(c: dict[str, Any]) -> str:
    """How a run's models trained: the quick preset, or the default recipe for --epochs."""
    from training.config import schedule

    if c.get("preset") == "quick":
        epochs, warmup = schedule("quick")
        return f"{epochs} epochs, KL warm-up over {warmup:g} (the quick preset)"
    epochs, warmup = schedule(epochs=c["epochs"])
    return f"{epochs} epochs, KL warm-up over {warmup:g}"


def worst_digit(r: dict[str, Any], score: str) -> str:
    return min(r["auroc"], key=lambda d: r["auroc"][d][score])


@block("lodo-headline")
def lodo_headline(page: Path) -> str:
    def figures(r: dict[str, Any]) -> tuple[str, str, str, str]:
        score = r.get("decision_score") or r["best_score"]
        worst = worst_digit(r, score)
        return (score, f"{r['mean_auroc'][score]:.3f}", worst, f"{r['auroc'][worst][score]:.3f}")

    lodo, one = bench(LODO), bench(ONECLASS)
    score, mean, worst, low = figures(lodo)
    text = (
        f"In the leave-one-digit-out benchmark the default decision, `{score}`, reaches a mean "
        f"AUROC of {mean}, its worst held-out digit the {worst} ({low})"
    )
    one_score, mean, worst, low = figures(one)
    named = "it" if one_score == score else f"`{one_score}`"
    text += (
        f"; trained on one digit alone, with the other nine as anomalies, {named} reaches "
        f"{mean}, its worst digit the {worst} ({low})."
    )
    alarms = [r.get("mean_false_alarms", {}).get("grey") for r in (lodo, one)]
    if all(a is not None for a in alarms):
        text += (
            f" At the default {default_threshold():g} threshold it flagged "
            f"{percent(alarms[0], 2)} and {percent(alarms[1], 2)} of the normal test digits "
            "respectively (grey, as callers send them)."
        )
    return text + "\n"


def anomaly_command(name: str) -> str:
    """The benchmark_anomaly command behind a result, from the config it records."""
    # The JSON keeps the options, not the command line; the data directory was the measuring
    # machine's, so the command names a placeholder.
    c = bench(name)["config"]
    flags = ["--data-dir <MNIST dir>"]
    if c.get("artifact"):
        flags += ["--digits", f"--artifact {c['artifact']}", f"--test-images {c['test_images']}"]
    else:
        if c.get("protocol", "lodo") != "lodo":
            flags.append(f"--protocol {c['protocol']}")
        if c.get("preset", "benchmark") != "benchmark":
            flags.append(f"--preset {c['preset']}")  # the preset sets the epochs
        else:
            flags.append(f"--epochs {c['epochs']}")
        flags.append(f"--latent-dim {c['latent_dim']}")
    return (
        f"python -m training.benchmark_anomaly {' '.join(flags)} --out docs/benchmark/{name}.json"
    )


def anomaly_setup(page: Path, name: str) -> str:
    r = bench(name)
    c = r["config"]
    learns = (
        "that digit's training images alone, the other nine digits the anomalies"
        if c.get("protocol") == "oneclass"
        else "the training images of the other nine digits, the held-out digit the anomaly"
    )
    # Runs with a --protocol score the test images grey, as callers send them; older ones
    # scored them binarised.
    served = "grey, as callers send them" if "protocol" in c else "binarised"
    images = "all the" if c["test_images"] is None else f"{c['test_images']:,}"
    return (
        "```bash\n" + anomaly_command(name) + "\n```\n\n"
        f"Per digit, a VAE and its background model trained on {learns}: a "
        f"{'-'.join(map(str, c['hidden_dims']))} net, Z={c['latent_dim']}, {recipe(c)}, seed "
        f"{c['seed']}, background noise {c['background_noise']:g}; scored with L={c['samples']}, "
        f"K={c['ll_samples']} on {images} test images ({served}); "
        f"{r['seconds'] / 60:.0f} minutes in all on the CPU "
        f"(raw: {link(page, RESULTS / f'{name}.json')}).\n"
    )


def anomaly_table(page: Path, name: str) -> str:
    """AUROC per digit and score, the mean and the worst digit below; the best of each row in
    bold, the default decision's column marked."""
    r = bench(name)
    scores = [s for s in SCORES if s in r["mean_auroc"]]
    decision = r.get("decision_score")
    rows = []
    for label, values in [*r["auroc"].items(), ("**mean**", r["mean_auroc"])]:
        cells = bold_best([f"{values[s]:.3f}" for s in scores], [values[s] for s in scores])
        rows.append((label, *cells))
    worst = {s: worst_digit(r, s) for s in scores}
    lows = [r["auroc"][worst[s]][s] for s in scores]
    cells = [f"{v:.3f} ({worst[s]})" for s, v in zip(scores, lows, strict=True)]
    rows.append(("**worst digit**", *bold_best(cells, lows)))
    digit = "normal digit" if r["config"].get("protocol") == "oneclass" else "held-out digit"
    head = (digit, *(SHORT[s] + (" (default)" if s == decision else "") for s in scores))
    return table(head, rows)


# Each anomaly run's two blocks: its command and setup, and its table of AUROCs.
for _prefix, _run in (("oneclass", ONECLASS), ("lodo", LODO), ("lodo-quick", LODO_QUICK)):
    block(f"{_prefix}-setup")(functools.partial(anomaly_setup, name=_run))
    block(f"{_prefix}-table")(functools.partial(anomaly_table, name=_run))


@block("ensemble-parts")
def ensemble_parts(page: Path) -> str:
    """Each run's ensemble beside the scores it combines: the mean AUROC over digits, and the
    worst digit's, the best worst case in bold."""
    # The scores the ensemble combines, as the trainer of these runs' format chose them.
    from training.pipeline import ENSEMBLE

    runs = [bench(name) for name in (ONECLASS, LODO, LODO_QUICK)]
    parts = [s for s in ENSEMBLE if all(s in r["mean_auroc"] for r in runs)] + ["ensemble"]
    rows = []
    for r in runs:
        worst = {s: worst_digit(r, s) for s in parts}
        lows = [r["auroc"][worst[s]][s] for s in parts]
        cells = [
            f"{r['mean_auroc'][s]:.3f} / {low:.3f} ({worst[s]})"
            for s, low in zip(parts, lows, strict=True)
        ]
        beaten = [
            d for d, per in r["auroc"].items() if max(per[s] for s in parts[:-1]) > per["ensemble"]
        ]
        rows.append(
            (
                f"{protocol(r['config'])}, {recipe(r['config'])}",
                *bold_best(cells, lows),
                f"{len(beaten)} of {len(r['auroc'])}"
                + (f" ({', '.join(beaten)})" if beaten else ""),
            )
        )
    head = (
        "run",
        *(f"{SHORT[s]}: mean / worst digit" for s in parts),
        "digits where one of its scores beats it",
    )
    return table(head, rows)


DESIGN = RESULTS / "ensemble-design.json"


@block("ensemble-design")
def ensemble_design(page: Path) -> str:
    """The design split's command, then each score alone and each candidate ensemble: the mean
    AUROC over digits and the worst digit's, per protocol; the default's row marked."""
    r = load(DESIGN)
    protocols = r["protocols"]
    names = list(next(iter(protocols.values()))["mean"])
    columns = []
    for p in protocols.values():
        cells = [f"{p['mean'][n]:.3f} / {p['worst'][n]:.3f}" for n in names]
        columns.append(bold_best(cells, [p["mean"][n] for n in names]))
    rows = []
    for i, n in enumerate(names):
        label = f"{SHORT[n]} alone" if n in SHORT else n
        rows.append((label, *(col[i] for col in columns)))
    titles = {"oneclass": "one class", "lodo": "leave one digit out (quick preset)"}
    head = ("scores", *(f"{titles[p]}: mean / worst digit" for p in protocols))
    command = out_at(r["command"], "ensemble-design")
    return (
        f"```bash\n{portable(command)}\n```\n\n"
        f"On {describe_machine(r['machine'])} (raw: {link(page, DESIGN)}):\n\n" + table(head, rows)
    )


@block("oneclass-seeds")
def oneclass_seeds(page: Path) -> str:
    """The one-class run again with another seed, by the current trainer and by those of
    formats 5 and 4: the ensemble's mean and worst digit, and its false alarms, run by run."""
    rows = []
    for name in (ONECLASS, "oneclass-seed1", "oneclass-seed1-format5", "oneclass-seed1-format4"):
        r = bench(name)
        worst = worst_digit(r, "ensemble")
        alarms = {d: a["grey"] for d, a in r["false_alarms"].items()}
        high = max(alarms, key=lambda d: alarms[d])
        rows.append(
            (
                str(r["config"]["seed"]),
                str(artifact_format(r["mean_auroc"])),
                f"{r['mean_auroc']['ensemble']:.4f}",
                f"{r['auroc'][worst]['ensemble']:.3f} ({worst})",
                f"{percent(r['mean_false_alarms']['grey'], 2)} ({percent(alarms[high], 2)}, "
                f"digit {high})",
                link(page, RESULTS / f"{name}.json", "raw"),
            )
        )
    head = (
        "seed",
        "format",
        "ensemble: mean",
        "worst digit",
        "false alarms, grey: mean (worst)",
        "",
    )
    return table(head, rows)


@block("false-alarms")
def false_alarms(page: Path) -> str:
    """The default decision's false alarms on each run's normal test digits, grey and binarised."""
    rows = []
    for name in (ONECLASS, LODO_QUICK, LODO):
        r = bench(name)
        c, per = r["config"], r["false_alarms"]
        cells = []
        for kind in ("grey", "binarised"):
            worst = max(per, key=lambda d: per[d][kind])
            cells.append(
                f"{percent(r['mean_false_alarms'][kind], 2)} "
                f"({percent(per[worst][kind], 2)}, digit {worst})"
            )
        raw = link(page, RESULTS / f"{name}.json", "raw")
        rows.append((f"{protocol(c)}, {recipe(c)}", f"`{r['decision_score']}`", *cells, raw))
    head = (
        "run",
        "decision",
        "grey, as served: mean (the worst digit's model)",
        "binarised: mean (the worst)",
        "",
    )
    return table(head, rows)


@block("lodo-latent-size")
def lodo_latent_size(page: Path) -> str:
    runs = {name: bench(name) for name in ("lodo-z32", "lodo-z4")}
    scores = [s for s in SCORES if all(s in r["mean_auroc"] for r in runs.values())]
    rows = []
    for name, r in runs.items():
        c = r["config"]
        worst = [min(per[s] for per in r["auroc"].values()) for s in scores]
        raw = link(page, RESULTS / f"{name}.json", "raw")
        cells = [
            f"{r['mean_auroc'][s]:.3f} (worst {w:.3f})" for s, w in zip(scores, worst, strict=True)
        ]
        rows.append((f"Z={c['latent_dim']}, {c['epochs']} epochs ({raw})", *cells))
    return table(("run", *(f"{SHORT[s]}: mean (worst digit)" for s in scores)), rows)


# The sanity sets' names in the JSON are short keys; the table spells out what each set is.
SANITY_SETS = {
    "normal test digits": "normal test digits themselves",
    "normal test digits, binarised": "the same digits, binarised (each pixel drawn 0 or 1)",
    "uniform noise": "uniform noise",
    "all black": "all-black image",
    "all white": "all-white image",
    "inverted": "inverted digits",
    "blurred": "blurred digits (3x3 box, twice)",
    "8x8 patch": "digits with a white 8x8 patch",
}


@block("sanity-setup")
def sanity_setup(page: Path) -> str:
    c = bench("sanity")["config"]
    served = "grey, as callers send them" if "protocol" in c else "binarised"
    return (
        "```bash\n" + anomaly_command("sanity") + "\n```\n\n"
        f"scores `{c['artifact']}` through the service's own code: {c['test_images']:,} normal "
        f"test digits ({served}) against each set, L={c['samples']}, K={c['ll_samples']} "
        f"(raw: {link(page, RESULTS / 'sanity.json')}).\n"
    )


@block("shipped-false-alarms")
def shipped_false_alarms(page: Path) -> str:
    """The shipped model's false alarms on normal test digits, grey (as served) and binarised."""
    r = bench("sanity")
    c, flags = r["config"], r["sanity"]["flagged"]
    return (
        f"At the default {default_threshold():g} threshold the shipped model flags "
        f"{percent(flags['normal test digits'], 2)} of {c['test_images']:,} grey MNIST test "
        f"digits, and {percent(flags['normal test digits, binarised'], 2)} of the same digits "
        f"binarised (each pixel drawn 0 or 1), which it does not calibrate on (scored by the "
        f"service's own code: {link(page, RESULTS / 'sanity.json', 'raw')}).\n"
    )


def flagged_cell(sanity: dict[str, Any], key: str) -> str:
    """The share of a sanity set the default decision flags; the reference set and the single
    images have no AUROC, and a single image is flagged or not."""
    share = sanity["flagged"][key]
    if key not in sanity["auroc"] and not key.startswith("normal test digits"):
        return "yes" if share else "no"
    return percent(share, 2)


@block("sanity-table")
def sanity_table(page: Path) -> str:
    s = bench("sanity")["sanity"]
    scores = [n for n in SCORES if any(n in per for per in s["auroc"].values())]
    rows = []
    for key in s["flagged"]:
        per = s["auroc"].get(key)
        cells = [f"{per[n]:.3f}" if per else "" for n in scores]
        rows.append((SANITY_SETS.get(key, key), *cells, flagged_cell(s, key)))
    head = (
        "set",
        *(SHORT[n] for n in scores),
        f"flagged ({s['decision_score']}, {s['threshold_percentile']:g})",
    )
    return table(head, rows)


# The shipped weights brought to newer formats by training.upgrade, oldest first, and the
# format each is.
UPGRADED = (("sanity-format6", 6), ("sanity-format9", 9))


@block("sanity-upgraded")
def sanity_upgraded(page: Path) -> str:
    """The shipped weights' sanity sets as format 4 (shipped) and as each upgrade of them: the
    ensemble's AUROC and the share the default decision flags, set by set."""
    runs = [bench("sanity")["sanity"], *(bench(name)["sanity"] for name, _ in UPGRADED)]
    rows = []
    for key in runs[0]["flagged"]:
        aurocs = [r["auroc"].get(key, {}).get("ensemble") for r in runs]
        cells = ["" if a is None else f"{a:.3f}" for a in aurocs]
        flags = [flagged_cell(r, key) for r in runs]
        rows.append((SANITY_SETS.get(key, key), *cells, *flags))
    formats = [f"format {fmt}" for _, fmt in UPGRADED]
    head = ("set", "ensemble AUROC, format 4", *formats, "flagged, format 4", *formats)
    commands = "\n".join(anomaly_command(name) for name, _ in UPGRADED)
    return f"```bash\n{commands}\n```\n\n" + table(head, rows)


@block("sanity-costs")
def sanity_costs(page: Path) -> str:
    """Microseconds per instance of each artifact at each option, timed in turns in one run,
    with each figure's ratio to the first artifact's."""
    r = bench("score-costs")
    micro, ratio = r["microseconds_per_instance"], r["ratio_to_baseline"]
    formats = list(r["artifacts"])
    rows = [
        (option, *(f"{per[f]:,.0f} (x{ratio[option][f]:.2f})" for f in formats))
        for option, per in micro.items()
    ]
    return (
        f"```bash\n{portable(r['command'])}\n```\n\n"
        f"{r['images']:,} grey test digits a pass, the best of {r['rounds']} rounds, on "
        f"{describe_machine(r['machine'])} (raw: {link(page, RESULTS / 'score-costs.json')}). "
        f"Microseconds per instance, and the ratio to {formats[0]}'s:\n\n"
        + table(("scoring", *formats), rows)
    )


@block("sanity-attribution")
def sanity_attribution(page: Path) -> str:
    """The attribution on the patched test digits: the shipped model's (format 4: standardised
    -log p), and the same weights' as format 6 (the residual from x redrawn)."""
    rows = []
    six = bench("sanity-format6")["sanity"]["attribution"]
    for shape, v in bench("sanity")["sanity"]["attribution"].items():
        found = [v["changed_found"], six[shape]["changed_found"]]
        verdict = "met" if min(found) >= ATTRIBUTION_TARGET else "missed"
        rows.append(
            (
                shape,
                percent(v["in_shape"]),
                percent(six[shape]["in_shape"]),
                *(percent(f) for f in found),
                percent(v["per_pixel_ceiling"]),
                f"{percent(ATTRIBUTION_TARGET, 0)} ({verdict})",
            )
        )
    head = (
        "pasted shape",
        "top pixels inside it, format 4",
        "format 6",
        "changed pixels found, format 4",
        "format 6",
        "per-pixel ceiling",
        "target",
    )
    return table(head, rows)


@block("anomaly-http")
def anomaly_http(page: Path) -> str:
    r = bench("anomaly-http")
    first = r["rows"][0]["rps"]
    rows = [
        (
            row["row"],
            f"{row['rps']:,.0f}",
            f"{row['rps'] / first:.2f}",
            f"{row['p50_ms']:.1f}",
            f"{row['p99_ms']:.1f}",
        )
        for row in r["rows"]
    ]
    return (
        f"On {describe_machine(r['machine'])} "
        f"(raw: {link(page, RESULTS / 'anomaly-http.json')}):\n\n"
        + table(("scoring", "req/s", "ratio to the first row", "p50 ms", "p99 ms"), rows)
    )


def net(train_args: str) -> str:
    """The net a tabular run trained, from its --train-args and the trainer's defaults."""
    from training.config import ModelConfig

    args = train_args.split()

    def flag(name: str, default: list[str]) -> list[str]:
        if name not in args:
            return default
        i = args.index(name) + 1
        values = []
        while i < len(args) and not args[i].startswith("--"):
            values.append(args[i])
            i += 1
        return values

    hidden = flag("--hidden-dims", [str(d) for d in ModelConfig.hidden_dims])
    latent = flag("--latent-dim", [str(ModelConfig.latent_dim)])[0]
    return f"{'-'.join(hidden)}, Z={latent}"


# The default net's run first: PyOD's detectors are listed from it.
TABULAR = ("tabular", "tabular_latent2")


def tabular_format(r: dict[str, Any]) -> int:
    """The artifact format a tabular run trained: as its runs record it, or, for runs from
    before they did, from the scores it reports (the earliest format that serves them all)."""
    recorded = {run.get("format_version") for d in r["datasets"].values() for run in d["runs"]}
    if None not in recorded:
        return max(recorded)
    methods = next(iter(r["datasets"].values()))["summary"]
    return artifact_format(m.partition(": ")[2] for m in methods if not m.startswith("PyOD"))


def tabular_decisions(r: dict[str, Any]) -> set[str]:
    """The decision scores a tabular run's artifacts recommended."""
    return {run["decision_score"] for d in r["datasets"].values() for run in d["runs"]}


def tabular_methods() -> list[tuple[str, dict[str, Any]]]:
    """(label, {dataset: summary}) per method: each net's scores in SCORES' order, the
    artifacts' default decision marked, then PyOD's detectors, once: every run fits them on the
    same splits."""
    ours: list[tuple[int, int, str, dict[str, Any]]] = []
    pyod: list[tuple[str, dict[str, Any]]] = []
    for run, name in enumerate(TABULAR):
        r = bench(name)
        summaries = {d: v["summary"] for d, v in r["datasets"].items()}
        fmt, decisions = tabular_format(r), tabular_decisions(r)
        for method in next(iter(summaries.values())):
            per_dataset = {d: summary[method] for d, summary in summaries.items()}
            kind, _, what = method.partition(": ")
            if kind != "PyOD":
                label = f"vae-service ({net(r['train_args'])}, format {fmt}): `{what}`"
                label += " (default)" if what in decisions else ""
                rank = SCORES.index(what) if what in SCORES else len(SCORES)
                ours.append((run, rank, label, per_dataset))
            elif run == 0:
                pyod.append((f"PyOD {what}", per_dataset))
    return [(label, data) for _, _, label, data in sorted(ours, key=lambda m: m[:2])] + pyod


def tabular_command(r: dict[str, Any], name: str) -> str:
    """The run's command, quoted so it runs: the JSON records its words joined by spaces."""
    command, _, given = str(r["command"]).partition(" --train-args=")
    return out_at(command, name) + (f' "--train-args={r["train_args"]}"' if given else "")


@block("tabular-setup")
def tabular_setup(page: Path) -> str:
    runs = [bench(name) for name in TABULAR]
    lines = []
    for name, r in zip(TABULAR, runs, strict=True):
        seeds = {d: len(v["runs"]) for d, v in r["datasets"].items()}
        flags = f"flags `{r['train_args']}`" if r["train_args"] else "default flags"
        fmt = tabular_format(r)
        older = (
            f" Format-{fmt} artifacts, from an earlier trainer: no RaPP, format {fmt}'s ensemble, "
            "scored with the interpolated percentiles of earlier releases."
            if fmt < TABLE_FORMAT
            else ""
        )
        lines.append(
            f"- {link(page, RESULTS / f'{name}.json')}: the trainer's {flags}, "
            f"{r['test_fraction']:.0%} of the normal rows held out, "
            f"{', '.join(f'{n} seeds of {d}' for d, n in seeds.items())}.{older}"
        )
    commands = "\n".join(tabular_command(r, name) for r, name in zip(runs, TABULAR, strict=True))
    machine = describe_machine(runs[0]["machine"])
    return f"```bash\n{commands}\n```\n\n" + "\n".join(lines) + f"\n\nBoth ran on {machine}.\n"


@block("tabular-table")
def tabular_table(page: Path) -> str:
    methods = tabular_methods()
    datasets = list(methods[0][1])
    columns: list[list[str]] = []
    for d in datasets:
        for metric in ("auroc", "average_precision"):
            cells = [f"{m[d][metric]['mean']:.3f} ± {m[d][metric]['sd']:.3f}" for _, m in methods]
            if metric == "auroc":
                cells = bold_best(cells, [m[d][metric]["mean"] for _, m in methods])
            columns.append(cells)
    rows = [(label, *(col[i] for col in columns)) for i, (label, _) in enumerate(methods)]
    head = ("method", *(f"{d} {h}" for d in datasets for h in ("AUROC", "AP")))
    return table(head, rows)


# The decisions a table model's default was chosen among on the design tables: format 6's,
# the new score alone, and format 7's ensemble of both (training/evaluate.py, DECISION_SCORE).
TABLE_CANDIDATES = (
    ("dose", "`dose` (formats 4 to 6)"),
    ("input_distance", "`input_distance` alone"),
    ("ensemble", "`ensemble` of both (format 7)"),
)


@block("tabular-design")
def tabular_design(page: Path) -> str:
    """The design tables' run: its command; each vae-service score and each PyOD detector by
    AUROC on each table, best mean first, the default decision marked; then the candidates
    for the default, with the worse of their two tables, the best worst case in bold."""
    r = bench("tabular-design")
    datasets = r["datasets"]
    decisions = tabular_decisions(r)
    methods = list(next(iter(datasets.values()))["summary"])
    mean_auroc = {
        m: statistics.fmean(d["summary"][m]["auroc"]["mean"] for d in datasets.values())
        for m in methods
    }
    rows = []
    for method in sorted(methods, key=lambda m: -mean_auroc[m]):
        kind, _, what = method.partition(": ")
        label = f"vae-service `{what}`" if kind != "PyOD" else f"PyOD {what}"
        label += " (default)" if kind != "PyOD" and what in decisions else ""
        cells = []
        for d in datasets.values():
            a, ap = d["summary"][method]["auroc"], d["summary"][method]["average_precision"]
            cells += [f"{a['mean']:.3f} ± {a['sd']:.3f}", f"{ap['mean']:.3f} ± {ap['sd']:.3f}"]
        rows.append((label, *cells))
    head = ("method", *(f"{n} {h}" for n in datasets for h in ("AUROC", "AP")))
    candidates = []
    for score, label in TABLE_CANDIDATES:
        per = [d["summary"][f"vae-service: {score}"]["auroc"]["mean"] for d in datasets.values()]
        candidates.append((label, *(f"{a:.3f}" for a in per), min(per)))
    worst = bold_best([f"{c[-1]:.3f}" for c in candidates], [c[-1] for c in candidates])
    choice = [(*c[:-1], w) for c, w in zip(candidates, worst, strict=True)]
    setup = "; ".join(
        f"{name}: {span([run['calibration_rows'] for run in d['runs']])} validation rows, "
        f"{span(held_out_normal(d['runs']))} held-out normal rows a seed, flagged by the "
        f"default decision at 0.99 {percent(mean_alarms(d['runs']), 1)} on average"
        for name, d in datasets.items()
    )
    seeds = " and ".join(f"{len(d['runs'])} seeds of {name}" for name, d in datasets.items())
    return (
        f"```bash\n{tabular_command(r, 'tabular-design')}\n```\n\n"
        f"{seeds} on {describe_machine(r['machine'])} "
        f"(raw: {link(page, RESULTS / 'tabular-design.json')}):\n\n"
        + table(head, rows)
        + "\nThe candidates for the default decision, by mean AUROC on each design table and "
        "the worse of the two (the best worse one in bold):\n\n"
        + table(("candidate", *datasets, "worse of the two"), choice)
        + f"\n{setup}.\n"
    )


@block("tabular-selection")
def tabular_selection(page: Path) -> str:
    """Per-artifact choice on synthetic anomalies: its command; each score's mean AUROC on the
    synthetic anomalies and on the test rows, per table; then the choice beside the default,
    with what was chosen how often."""
    r = bench("tabular-selection")
    datasets = r["datasets"]
    scores = sorted(next(iter(datasets.values()))["summary"]["scores"], key=SCORES.index)
    rows = []
    for s in scores:
        cells = []
        for d in datasets.values():
            m = d["summary"]["scores"][s]
            cells.append(f"{m['synthetic']:.3f} / {m['test']:.3f}")
        rows.append((f"`{s}`", *cells))
    chosen, default = [], []
    for d in datasets.values():
        counts = collections.Counter(run["chosen"] for run in d["runs"])
        picks = ", ".join(f"`{c}` x{n}" for c, n in counts.most_common())
        chosen.append(f"{d['summary']['chosen_test']:.3f} ({picks})")
        defaults = sorted({run["default"] for run in d["runs"]})
        default.append(f"{d['summary']['default_test']:.3f} (`{listing(defaults)}`)")
    rows += [("**chosen per artifact**", *chosen), ("**default decision**", *default)]
    seeds = ", ".join(f"{len(d['runs'])} seeds of {name}" for name, d in datasets.items())
    head = ("score: synthetic / test AUROC", *datasets)
    return (
        f"```bash\n{out_at(r['command'], 'tabular-selection')}\n```\n\n"
        f"{seeds} on {describe_machine(r['machine'])} "
        f"(raw: {link(page, RESULTS / 'tabular-selection.json')}):\n\n" + table(head, rows)
    )


def mean_alarms(runs: list[dict[str, Any]]) -> float:
    """The default decision's false alarms on the held-out normal rows, averaged over runs."""
    return statistics.fmean(run["false_alarms"] for run in runs)


def held_out_normal(runs: list[dict[str, Any]]) -> list[int]:
    """Each tabular run's held-out normal rows, on which its false alarms are counted."""
    return [run["test_rows"] - run["test_anomalies"] for run in runs]


def span(counts: Sequence[int]) -> str:
    """A count over runs: one number where they agree, else the lowest and highest."""
    low, high = min(counts), max(counts)
    return f"{low:,}" if low == high else f"{low:,} to {high:,}"


def beyond_all_range(validation: Sequence[int], held_out: Sequence[int]) -> tuple[float, float]:
    """Where the share of held-out normal rows flagged beyond every validation row, pooled
    over independent splits, lies 95% of the time (a normal approximation). Each split's rate
    r is 1 - F(its validation maximum), a Beta(1, V) draw for exchangeable rows (mean
    1 / (V + 1)), and its n rows' count is Binomial(n, r): variance n E[r(1 - r)] + n^2 Var r."""
    mean = var = 0.0
    for v, n in zip(validation, held_out, strict=True):
        m, m2 = 1 / (v + 1), 2 / ((v + 1) * (v + 2))  # E r, E r^2
        mean += n * m
        var += n * (m - m2) + n * n * (m2 - m * m)
    total = sum(held_out)
    spread = 1.96 * math.sqrt(var)
    return max(0.0, mean - spread) / total, (mean + spread) / total


@block("tabular-false-alarms")
def tabular_false_alarms(page: Path) -> str:
    """The default decision's false alarms on each table's held-out normal rows, per seed."""
    r = bench("tabular")
    rows = []
    for d, v in r["datasets"].items():
        runs = v["runs"]
        normal = held_out_normal(runs)
        rows.append(
            (
                d,
                f"`{listing(sorted(tabular_decisions({'datasets': {d: v}})))}`",
                span([run["calibration_rows"] for run in runs]),
                span(normal),
                percent(mean_alarms(runs), 2),
                ", ".join(percent(run["false_alarms"], 1) for run in runs),
            )
        )
    head = (
        "table",
        "decision",
        "validation rows",
        "held-out normal rows",
        f"flagged at {default_threshold():g}: mean",
        "per seed",
    )
    return table(head, rows)


@block("tabular-false-alarms-seeds")
def tabular_false_alarms_seeds(page: Path) -> str:
    """The same false alarms over more seeds, pooled: the rate against the conformal bound."""
    r = bench("tabular-false-alarms")
    rows = []
    for d, v in r["datasets"].items():
        runs = v["runs"]
        normal = held_out_normal(runs)
        flagged = round(sum(run["false_alarms"] * n for run, n in zip(runs, normal, strict=True)))
        bounds = [1 / (run["calibration_rows"] + 1) for run in runs]
        low, high = beyond_all_range([run["calibration_rows"] for run in runs], normal)
        rows.append(
            (
                d,
                str(len(runs)),
                span([run["calibration_rows"] for run in runs]),
                f"{sum(normal):,}",
                f"{flagged} ({percent(flagged / sum(normal), 2)})",
                " to ".join(dict.fromkeys(percent(b, 2) for b in (min(bounds), max(bounds)))),
                f"{percent(low, 2)} to {percent(high, 2)}",
            )
        )
    head = (
        "table",
        "seeds",
        "validation rows",
        "held-out normal rows, all seeds",
        f"flagged at {default_threshold():g}",
        "bound, 1 / (V + 1)",
        "95% range of the pooled rate",
    )
    return (
        f"```bash\n{tabular_command(r, 'tabular-false-alarms')}\n```\n\n"
        f"On {describe_machine(r['machine'])} (raw: "
        f"{link(page, RESULTS / 'tabular-false-alarms.json')}):\n\n" + table(head, rows)
    )


@block("attribution-setup")
def attribution_setup(page: Path) -> str:
    return study_setup(page, "attribution-maps", "digits")


def study_setup(page: Path, name: str, what: str) -> str:
    """An attribution study's command, its size and machine, and its raw JSON."""
    r = bench(name)
    return (
        f"```bash\n{portable(r['command'])}\n```\n\n"
        f"{r['images']} {what}, on {describe_machine(r['machine'])} "
        f"(raw: {link(page, RESULTS / f'{name}.json')}).\n"
    )


@block("attribution-table")
def attribution_table(page: Path) -> str:
    return map_table(bench("attribution-maps")["in_shape"])


def map_table(maps: dict[str, dict[str, float]]) -> str:
    """A row per map, a column per shape (or input and shape), each column's best in bold."""
    shapes = list(next(iter(maps.values())))
    columns = [
        bold_best([percent(m[s]) for m in maps.values()], [m[s] for m in maps.values()])
        for s in shapes
    ]
    rows = [(name, *(col[i] for col in columns)) for i, name in enumerate(maps)]
    return table(("map", *shapes), rows)


@block("attribution-projection-setup")
def attribution_projection_setup(page: Path) -> str:
    reference = bench("attribution-projection")["reference"]
    what = f"validation digits of the shipped model's split, standardised on {reference:,} others"
    return study_setup(page, "attribution-projection", what)


@block("attribution-projection-table")
def attribution_projection_table(page: Path) -> str:
    inputs = bench("attribution-projection")["inputs"]
    maps: dict[str, dict[str, float]] = {}
    for kind, r in inputs.items():
        for name, row in r["changed_found"].items():
            maps.setdefault(name, {}).update({f"{shape}, {kind}": v for shape, v in row.items()})
    return map_table(maps)


@block("attribution-projection-facts")
def attribution_projection_facts(page: Path) -> str:
    inputs = bench("attribution-projection")["inputs"]
    grey, binary = (inputs[k]["misfit_pixels_per_normal_digit"] for k in ("grey", "binarised"))
    tiny = inputs["grey"]["changed_by_under_0.1"]
    return (
        "On unpatched digits the reconstruction at z* misses "
        f"{grey['at z* (trim 0.2)']:g} pixels per grey digit by more than 0.8 "
        f"({binary['at z* (trim 0.2)']:g} per binarised one), against "
        f"{grey['at the posterior mean']:g} ({binary['at the posterior mean']:g}) at the "
        "posterior mean. Of the pixels a paste changes in a grey digit, "
        + ", ".join(f"{percent(v)} ({shape})" for shape, v in tiny.items())
        + " change by less than 0.1. "
        + format_6_gains(inputs)
    )


def format_6_gains(inputs: dict[str, Any]) -> str:
    """In how many of the study's columns format 6's map finds more than formats 3 to 5's."""
    maps = list(inputs["grey"]["changed_found"])
    old = next(n for n in maps if n.startswith("formats 3 to 5"))
    new = next(n for n in maps if n.startswith("format 6"))
    gains = [
        r["changed_found"][new][shape] - r["changed_found"][old][shape]
        for r in inputs.values()
        for shape in r["changed_found"][old]
    ]
    wins = sum(g > 0 for g in gains)
    return (
        f"Format 6's map finds more than formats 3 to 5's in {wins} of the {len(gains)} "
        f"columns, by {100 * min(gains):+.1f} to {100 * max(gains):+.1f} points.\n"
    )


@block("latent-setup")
def latent_setup(page: Path) -> str:
    r = load(RESULTS / "latent_features.json")
    c = r["config"]
    origin = shipped_manifest().get("upgraded_from") or {}
    earlier = dict(SHIPPED_LINEAGE)
    if origin:
        earlier[origin["sha256"]] = origin["format_version"]
    fmt = earlier.get(r["artifact_sha256"])
    same = (
        f" (the shipped model's format-{fmt} original: the same weights, so the same encoder)"
        if fmt is not None
        else ""
    )
    return (
        "```bash\npython -m training.benchmark_latent --data-dir <MNIST dir> "
        f"--artifact {c['artifact']}\n```\n\n"
        f"Artifact sha256 `{r['artifact_sha256'][:8]}…`{same}; Z={r['latent_dim']}; "
        f"{r['test_images']:,} test images; the encoder on {c['device']}; {r['seconds']:g} s, on "
        f"{describe_machine(r['machine'])} (raw: {link(page, RESULTS / 'latent_features.json')}).\n"
    )


@block("latent-table")
def latent_table(page: Path) -> str:
    def accuracy(f: dict[str, Any]) -> str:
        sd = f["accuracy_sd"]
        return f"{f['accuracy_mean']:.3f}" + ("" if sd is None else f" ± {sd:.3f}")

    rows = [
        (
            f"{row['train_images']:,}",
            str(row["latent_mean"]["seeds"]),
            accuracy(row["latent_mean"]),
            accuracy(row["raw_pixels"]),
            f"{row['latent_mean']['fit_seconds_mean']:.2f} / "
            f"{row['raw_pixels']['fit_seconds_mean']:.2f}",
        )
        for row in load(RESULTS / "latent_features.json")["rows"]
    ]
    head = (
        "labelled training images",
        "seeds",
        "latent means",
        "raw pixels",
        "fit seconds, latent / pixels",
    )
    return table(head, rows)


# What the throughput ratios are called, and the target each was measured against: (label,
# target, whether the target is an upper bound).
RATIOS: dict[str, tuple[str, float | None, bool]] = {
    "service_encode_c16_over_ceiling_c16_rps": ("`/encode` x1 @16 vs the FastAPI ceiling", 1.0,
                                                False),
    "service_encode_c16_over_bare_c16_rps": ("`/encode` x1 @16 vs the bare ASGI limit", 0.2, False),
    "ceiling_c16_over_bare_c16_rps": ("the FastAPI ceiling vs the bare ASGI limit", None, False),
    "service_encode_c16_over_naive_c16_rps": ("`/encode` x1 @16 vs naive", 8, False),
    "service_encode_c16_over_litserve_best_c16_rps": ("`/encode` x1 @16 vs LitServe's best", 10,
                                                      False),
    "service_encode_c16_over_baseline_c16_rps": ("`/encode` x1 @16 vs the baseline commit", None,
                                                 False),
    "service_anomaly_c16_over_baseline_c16_rps": ("`/anomaly-score` x1 L=16 @16 vs the baseline "
                                                  "commit", 2, False),
    "service_encode_npy256_over_inprocess256_images": (
        "256-instance .npy `/encode` vs in-process batch 256, images/s", 0.6, False),
    "service_encode_json256_over_inprocess256_images": (
        "256-instance JSON `/encode` vs in-process batch 256, images/s", None, False),
    "service_encode_c64_p99_over_p50": ("p99 / p50 at 64 connections, service", 3, True),
    "ceiling_c64_p99_over_p50": ("p99 / p50 at 64 connections, ceiling", None, True),
    "naive_c64_p99_over_p50": ("p99 / p50 at 64 connections, naive", None, True),
    "rss_after_over_before": ("RSS after the memory run / after warm-up", 1.10, True),
    "service_2w_over_1w_encode_c16_rps": ("2 workers vs 1, `/encode` x1 @16", 1.7, False),
}  # fmt: skip


def bench_artifact() -> str:
    """The artifact a throughput run served, and whether it is the one that ships now."""
    # bench.json records the artifact's size and calibrated scores, not its format or decision
    # score: both follow from the scores unless a later bench writes them.
    a = bench("bench")["artifact"]
    fmt = a.get("format_version") or artifact_format(a["calibration_samples"])
    decides = a.get("decision_score") or decision_score(fmt, a["likelihood"])
    dims = layers(math.prod(a["input_shape"]), a.get("hidden_dims") or [], a["latent_dim"])
    text = (
        f"a {megabytes(a['bytes'])} format-{fmt} artifact ({dims}, {a['likelihood']}, "
        f"deciding with `{decides}`)"
    )
    m, size = shipped_manifest(), (SHIPPED / "vae.pt").stat().st_size
    if a["bytes"] != size or fmt != m["format_version"]:
        text += (
            f". **Not the artifact that ships now** ({megabytes(size)}, "
            f"format {m['format_version']}, "
            f"deciding with `{m['decision_score']}`): the `/anomaly-score` figures are the older "
            f"artifact's until the benchmark runs again"
        )
    return text


def bench_command() -> str:
    r = bench("bench")
    # The first word is the measuring machine's interpreter; name the project's venv instead.
    words = list(r["command"])
    words[0] = ".venv/bin/python" if words[0].endswith("python") else words[0]
    return out_at(" ".join(words), "bench")


@block("throughput-setup")
def throughput_setup(page: Path) -> str:
    r = bench("bench")
    o, s = r["options"], r["stack"]
    return (
        f"```bash\n{bench_command()}\n```\n\n"
        f"Run {r['created_at'][:10]} on {describe_machine(r['machine'])}, load average "
        f"{r['machine']['loadavg_start'][0]:g} at the start; uvicorn with the {s['loop']} loop, "
        f"{s['workers']} worker, `wrk -t{s['wrk_threads']}`, {o['duration']} s per scenario after "
        f"{o['warmup']} s of warm-up. It served {bench_artifact()}. "
        f"Raw: {link(page, RESULTS / 'bench.json')}.\n"
    )


def scenario_rows() -> list[tuple[str, int | None, dict[str, Any], float, float | None]]:
    """(label, connections, latency record, images/s, server cores) per measured line."""
    # The in-process rows are the model alone, no HTTP: the bound every other row sits under.
    r = bench("bench")
    rows: list[tuple[str, int | None, dict[str, Any], float, float | None]] = [
        (f"in-process encode, batch {c['batch']}", None, c, c["images_per_s"], c["own_cores"])
        for c in r["in_process"].values()
    ]
    for s in r["scenarios"]:
        if s.get("wrk") is not None:  # a scenario that could not run has no figures
            rows.append(
                (
                    s["label"],
                    s["concurrency"],
                    s["wrk"],
                    s["images_per_s"],
                    s["cpu"]["server_cores"],
                )
            )
    return rows


@block("throughput-table")
def throughput_table(page: Path) -> str:
    rows = [
        (
            label,
            "-" if conns is None else str(conns),
            f"{w.get('rps', w.get('calls_per_s', 0)):,.0f}",
            f"{images:,.0f}",
            f"{w['p50_ms']:.2f}",
            f"{w['p99_ms']:.2f}",
            "-" if cores is None else f"{cores:.2f}",
        )
        for label, conns, w, images, cores in scenario_rows()
    ]
    head = ("scenario", "connections", "req/s", "images/s", "p50 ms", "p99 ms", "server cores")
    return table(head, rows)


@block("throughput-ratios")
def throughput_ratios(page: Path) -> str:
    rows = []
    for key, value in bench("bench")["ratios"].items():
        label, target, upper = RATIOS.get(key, (key, None, False))
        if value is None:
            continue
        verdict = ""
        if target is not None:
            met = value <= target if upper else value >= target
            verdict = f"{target:g} ({'met' if met else 'missed'})"
        rows.append((label, f"{value:.2f}", verdict))
    m = bench("bench")["memory"]
    return (
        table(("ratio", "measured", "target"), rows)
        + f"\nThe memory run: {m['requests_sent']:,} requests at {m['concurrency']} connections, "
        f"RSS {m['rss_before_bytes'] / 2**20:.1f} MiB after warm-up and "
        f"{m['rss_after_bytes'] / 2**20:.1f} MiB after them.\n"
    )


# The scenarios the user's page quotes, by bench key: (what, the figure that matters).
HEADLINES = (
    ("service.encode.x1@1", "one image per request, one connection", "req/s"),
    ("service.encode.x1@16", "one image per request, 16 connections", "req/s"),
    ("service-2w.encode.x1@16", "the same with `VAE_WORKERS=2`", "req/s"),
    ("service.encode.npy256", "256 images per `.npy` request", "images/s"),
    ("service.encode.json256", "256 images per JSON request", "images/s"),
    ("service.anomaly.x1", "`/anomaly-score`, one image, 16 connections", "req/s"),
)


@block("performance-summary")
def performance_summary(page: Path) -> str:
    by_key = {s["key"]: s for s in bench("bench")["scenarios"] if s.get("wrk") is not None}
    rows = []
    for key, what, unit in HEADLINES:
        s = by_key.get(key)
        if s is None:
            continue
        rate = s["wrk"]["rps"] if unit == "req/s" else s["images_per_s"]
        rows.append(
            (what, f"{rate:,.0f} {unit}", f"{s['wrk']['p50_ms']:.1f}", f"{s['wrk']['p99_ms']:.1f}")
        )
    return (
        table(("`/encode` unless named", "throughput", "p50 ms", "p99 ms"), rows)
        + f"\nMeasured on {describe_machine(bench('bench')['machine'])}, serving "
        f"{bench_artifact()}; `{bench_command()}`. Every scenario: "
        f"{link(page, REPO / 'docs' / 'benchmarks' / 'throughput.md')}.\n"
    )


def models_command() -> str:
    return out_at(".venv/bin/" + bench("models")["command"], "models")


def wrk_errors(w: dict[str, Any]) -> int:
    keys = ("non2xx", "connect_errors", "read_errors", "write_errors", "timeouts")
    return sum(int(w[k]) for k in keys)


@block("models-bench")
def models_bench(page: Path) -> str:
    r = bench("models")
    runs = (
        ("model A alone", r["alone"]),
        ("model A while B loads once", r["while_one_load"]),
        ("model A while B loads back to back", r["while_loading"]),
    )
    rows = [
        (
            what,
            f"{w['rps']:,.0f}",
            f"{w['p50_ms']:.2f}",
            f"{w['p99_ms']:.2f}",
            f"{w['max_ms']:.1f}",
            f"{w['duration_s']:.0f}",
            str(wrk_errors(w)),
        )
        for what, w in runs
    ]
    mem = r["memory"]
    held, rss = mem["models_held"], mem["rss_bytes"]
    verdict = "within" if r["p99_ratio"] <= r["p99_bound"] else "**over**"
    return (
        f"```bash\n{models_command()}\n```\n\n"
        f"Run on {describe_machine(r['machine'])}, load average "
        f"{r['machine']['loadavg_start'][0]:g} at the start. Every model is a copy of "
        f"`{r['artifact']['path']}` ({megabytes(r['artifact']['bytes'])} on disk); wrk at "
        f"{r['connections']} connections on `POST /models/a/encode` (one image, JSON), after "
        f"{r['duration_s']} s of warm-up. Raw: {link(page, RESULTS / 'models.json')}.\n\n"
        + table(("", "req/s", "p50 ms", "p99 ms", "max ms", "s", "errors"), rows)
        + f"\nWhile B loaded once (a window as long as a load takes under this traffic), A's "
        f"p99 was {r['p99_ratio']:.2f}x its p99 alone, {verdict} the bound of "
        f"{r['p99_bound']:g}x. Loaded and unloaded back to back, {r['loads']['count']} times "
        f"(median load {r['loads']['median_s']:.1f} s: read, check, warm-up at every batch "
        f"size), {r['p99_ratio_churn']:.2f}x.\n\n"
        f"Memory: RSS {megabytes(rss[0])} with {held[0]} model held, {megabytes(rss[-1])} with "
        f"{held[-1]}; **{mem['per_model_mb']:.1f} MB per model** (the least-squares slope over "
        f"{len(held)} points).\n"
    )


@block("models-headline")
def models_headline(page: Path) -> str:
    r = bench("models")
    return (
        f"Each model held costs about {r['memory']['per_model_mb']:.0f} MB of resident memory "
        f"(the shipped MNIST model, {megabytes(r['artifact']['bytes'])} on disk). While another "
        f"model loaded, a model's p99 at {r['connections']} connections was "
        f"{r['p99_ratio']:.2f}x its p99 alone ({r['alone']['p99_ms']:.1f} ms to "
        f"{r['while_one_load']['p99_ms']:.1f} ms), and {r['p99_ratio_churn']:.2f}x with loads "
        f"back to back, on {r['machine']['nproc']} cores: "
        f"{link(page, REPO / 'docs' / 'benchmarks' / 'models.md', 'the benchmark')}.\n"
    )


# -- plots ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plot:
    name: str
    path: Path
    inputs: tuple[Path, ...]
    draw: Callable[[], Figure]


PLOTS: dict[str, Plot] = {}


def plot(
    name: str, path: Path, *inputs: Path
) -> Callable[[Callable[[], Figure]], Callable[[], Figure]]:
    def register(draw: Callable[[], Figure]) -> Callable[[], Figure]:
        PLOTS[name] = Plot(name, path, inputs, draw)
        return draw

    return register


def digest(p: Plot) -> str:
    """What a plot is drawn from: its inputs' paths and bytes, and its drawing code."""
    # The function's own source, so editing how one plot looks makes that plot stale; a change
    # to a helper it calls needs DRAWING_VERSION bumped.
    h = hashlib.sha256(f"{DRAWING_VERSION}\0{inspect.getsource(p.draw)}".encode())
    for path in p.inputs:
        h.update(f"\0{shown(path)}\0".encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def embedded_digest(path: Path) -> str | None:
    """The digest a plot was saved with, from its PNG tEXt chunk; None if absent or unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            text = getattr(img, "text", {})  # PNG images have it; others are not ours
            value = text.get(DIGEST_KEY)
    except (OSError, UnidentifiedImageError):
        return None
    return value if isinstance(value, str) else None


def figure(
    width: float, height: float, layout: Literal["constrained"] | None = "constrained"
) -> Figure:
    import matplotlib

    matplotlib.use("Agg")  # files only: never a display
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout=layout)


def save(p: Plot) -> None:
    # The digest goes in as a PNG tEXt chunk, which Pillow reads back without drawing anything.
    fig = p.draw()
    p.path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p.path, metadata={DIGEST_KEY: digest(p)})


def barh(
    ax: Axes,
    labels: Sequence[str],
    values: Sequence[float],
    colors: Sequence[str],
    errors: Sequence[float] | None = None,
    fmt: str = "{:,.0f}",
) -> None:
    """Horizontal bars, top to bottom in the order given, each with its value written beside."""
    y = list(range(len(labels)))[::-1]
    ax.barh(y, values, xerr=errors, color=colors, capsize=2 if errors else 0)
    ax.set_yticks(y, labels, fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    for yi, v, e in zip(y, values, errors or [0.0] * len(values), strict=True):
        ax.text(v + e, yi, " " + fmt.format(v), va="center", fontsize=7)
    ax.set_xlim(0, max(values) * 1.18)  # room for the last value's text
    ax.spines[["top", "right"]].set_visible(False)


# One colour per server, so a peer and the service read apart in the bar chart.
SERVER_COLORS = {
    "bare": "#c7c7c7",
    "ceiling": "#9e9e9e",
    "naive": "#d08c60",
    "litserve": "#b07aa1",
    "litserve-batch": "#b07aa1",
    "service": "#4e79a7",
    "service-2w": "#2d4d7a",
    "baseline": "#a0cbe8",
}


@plot("throughput", IMG / "throughput.png", RESULTS / "bench.json")
def draw_throughput() -> Figure:
    r = bench("bench")
    single = [s for s in r["scenarios"] if s.get("wrk") and s["instances_per_request"] == 1]
    batched = [s for s in r["scenarios"] if s.get("wrk") and s["instances_per_request"] > 1]
    fig = figure(7, 0.24 * (len(single) + len(batched)) + 1.9)
    left, right = fig.subplots(2, 1, height_ratios=(len(single), len(batched) + 1))
    barh(
        left,
        [f"{s['label']} @{s['concurrency']}" for s in single],
        [s["wrk"]["rps"] for s in single],
        [SERVER_COLORS.get(s["server"], "#4e79a7") for s in single],
    )
    left.set_xlabel("requests per second, one image each")
    batch = [
        (f"in-process, batch {c['batch']}", c["images_per_s"], "#9e9e9e")
        for c in r["in_process"].values()
        if c["batch"] > 1
    ]
    batch += [(s["label"], s["images_per_s"], "#4e79a7") for s in batched]
    barh(right, [b[0] for b in batch], [b[1] for b in batch], [b[2] for b in batch])
    right.set_xlabel("images per second, batched")
    fig.suptitle(
        f"Throughput ({r['machine']['nproc']}-core {r['machine']['cpu_model']}, "
        f"{r['created_at'][:10]})",
        fontsize=10,
    )
    return fig


def auroc_grid(fig: Figure, ax: Axes, name: str, title: str) -> None:
    """One run's AUROC per digit and score, the mean below, the default decision boxed."""
    from matplotlib.patches import Rectangle

    r = bench(name)
    scores = [s for s in SCORES if s in r["mean_auroc"]]
    digits = list(r["auroc"])
    grid = [[r["auroc"][d][s] for s in scores] for d in digits] + [
        [r["mean_auroc"][s] for s in scores]
    ]
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    decision = r.get("decision_score")
    labels = [SHORT[s] + (" (default)" if s == decision else "") for s in scores]
    ax.set_xticks(range(len(scores)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(grid)), [*digits, "mean"], fontsize=8)
    ax.axhline(len(digits) - 0.5, color="black", linewidth=1)
    if decision in scores:
        j = scores.index(decision)
        ax.add_patch(Rectangle((j - 0.5, -0.5), 1, len(grid), fill=False, linewidth=1.6))
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
    held = "normal digit" if r["config"].get("protocol") == "oneclass" else "held-out digit"
    ax.set_ylabel(held)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="AUROC (0.5: chance)")


@plot("lodo", IMG / "lodo.png", RESULTS / f"{LODO}.json", RESULTS / f"{LODO_QUICK}.json")
def draw_lodo() -> Figure:
    fig = figure(13, 4.8)
    left, right = fig.subplots(1, 2)
    auroc_grid(fig, left, LODO, f"{recipe(bench(LODO)['config'])}")
    auroc_grid(fig, right, LODO_QUICK, f"{recipe(bench(LODO_QUICK)['config'])}")
    fig.suptitle("Leave one digit out: AUROC of each score per held-out digit", fontsize=10)
    return fig


@plot("oneclass", IMG / "oneclass.png", RESULTS / f"{ONECLASS}.json")
def draw_oneclass() -> Figure:
    fig = figure(8, 4.8)
    auroc_grid(fig, fig.subplots(), ONECLASS, recipe(bench(ONECLASS)["config"]))
    fig.suptitle(
        "One class: AUROC of each score, trained on one digit, the other nine the anomalies",
        fontsize=10,
    )
    return fig


GROUP_COLORS = ("#4e79a7", "#a0cbe8", "#d08c60")  # default net, small net, PyOD


@plot("tables", IMG / "tables.png", *(RESULTS / f"{n}.json" for n in TABULAR))
def draw_tables() -> Figure:
    methods = tabular_methods()
    datasets = list(methods[0][1])
    fig = figure(9, 0.22 * len(methods) + 1.4)
    axes = fig.subplots(1, len(datasets), sharey=True)
    labels = [label.replace("`", "") for label, _ in methods]
    nets = list(dict.fromkeys(label.split(":")[0] for label in labels if label.startswith("vae")))
    colors = [
        GROUP_COLORS[nets.index(lb.split(":")[0])] if lb.startswith("vae") else GROUP_COLORS[2]
        for lb in labels
    ]
    for ax, d in zip(axes, datasets, strict=True):
        barh(
            ax,
            labels,
            [m[d]["auroc"]["mean"] for _, m in methods],
            colors,
            [m[d]["auroc"]["sd"] for _, m in methods],
            fmt="{:.3f}",
        )
        ax.set_xlim(0, 1.15)
        ax.axvline(0.5, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(d, fontsize=9)
        ax.set_xlabel("AUROC, mean ± sd over seeds")
    fig.suptitle("Tables: vae-service's scores against PyOD's detectors", fontsize=10)
    return fig


@plot("attribution", IMG / "attribution.png", RESULTS / "attribution-maps.json")
def draw_attribution() -> Figure:
    maps = bench("attribution-maps")["in_shape"]
    shapes = list(next(iter(maps.values())))
    fig = figure(8, 3.6)
    ax = fig.subplots()
    import matplotlib

    width = 0.8 / len(maps)
    cmap = matplotlib.colormaps["tab10"]
    for i, (name, values) in enumerate(maps.items()):
        ax.bar(
            [j + i * width for j in range(len(shapes))],
            [100 * values[s] for s in shapes],
            width,
            label=name,
            color=cmap(i),
        )
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes)
    ax.set_ylabel("% of the top pixels inside the shape")
    ax.legend(fontsize=7, ncols=3, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_title("Where the attribution's top pixels fall, per pasted shape and map", fontsize=10)
    return fig


@plot("latent", IMG / "latent.png", RESULTS / "latent_features.json")
def draw_latent() -> Figure:
    rows = load(RESULTS / "latent_features.json")["rows"]
    fig = figure(6, 3.6)
    ax = fig.subplots()
    n = [row["train_images"] for row in rows]
    z = load(RESULTS / "latent_features.json")["latent_dim"]
    for key, label, color in (
        ("latent_mean", f"{z} latent means", "#4e79a7"),
        ("raw_pixels", "raw pixels", "#9e9e9e"),
    ):
        ax.errorbar(
            n,
            [row[key]["accuracy_mean"] for row in rows],
            yerr=[row[key]["accuracy_sd"] or 0 for row in rows],
            marker="o",
            capsize=3,
            label=label,
            color=color,
        )
    ax.set_xscale("log")
    ax.set_xlabel("labelled training images")
    ax.set_ylabel("test accuracy (logistic regression)")
    ax.legend()
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_title("A linear probe on the shipped model's latent means", fontsize=10)
    return fig


@plot(
    "shipped-model",
    REPO / "docs" / "img" / "shipped-model.png",
    SHIPPED / "vae.pt",
    MNIST_SLICE / "t10k-images-idx3-ubyte.gz",
    MNIST_SLICE / "t10k-labels-idx1-ubyte.gz",
)
def draw_shipped_model() -> Figure:
    """The README's picture: the shipped model on one test digit of each class, seeded."""
    import numpy as np

    from app.model import VAEService
    from training.benchmark_anomaly import paste_patches
    from training.data import read_idx

    images = read_idx(MNIST_SLICE / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(MNIST_SLICE / "t10k-labels-idx1-ubyte.gz")
    first = [int(np.argmax(labels == d)) for d in range(10)]  # the first test image of each digit
    x = (images[first].reshape(10, -1) / 255).astype(np.float32)
    vae = VAEService.load(SHIPPED / "vae.pt", device="cpu")
    patched, _ = paste_patches(x, seed=0)
    scored = vae.anomaly_scores(patched, 16, seed=0, attribution=True)
    # log(1 + a), as the service's heat maps (Accept: image/png) draw it, but scaled per image
    # and in colour: one grid-wide scale left most of these maps black at this size.
    heat = np.log1p(np.maximum(scored["attribution"], 0.0))
    heat /= heat.max(axis=1, keepdims=True)
    rows = (
        ("a test digit", x, "gray"),
        ("reconstructed", vae.decode(vae.encode(x).mean), "gray"),
        ("a white patch pasted", patched, "gray"),
        ("which pixels are anomalous", heat, "inferno"),
        ("drawn from the prior", vae.sample(10, seed=0)[1], "gray"),
    )
    fig = figure(7.2, 3.1, layout=None)
    fig.subplots_adjust(left=0.24, right=0.99, top=0.99, bottom=0.01, wspace=0.06, hspace=0.06)
    axes = fig.subplots(len(rows), 10, squeeze=False)
    for r, (title, values, cmap) in enumerate(rows):
        for c in range(10):
            ax = axes[r, c]
            ax.imshow(values[c].reshape(28, 28), cmap=cmap, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(title, rotation=0, ha="right", va="center", fontsize=8)
    return fig


# -- pages and the check --------------------------------------------------------------------------


def render_page(text: str, page: Path) -> tuple[str, list[str]]:
    """The page with every generated block rendered anew, and the names it has no renderer for."""
    # Only the text between the markers is replaced: the prose around it is the author's.
    unknown: list[str] = []

    def fill(match: re.Match[str]) -> str:
        render = BLOCKS.get(match["name"])
        if render is None:
            unknown.append(match["name"])
            return match[0]
        body = render(page)
        return match["open"] + body + ("" if body.endswith("\n") else "\n") + match["close"]

    return MARKER.sub(fill, text), unknown


def stale_pages(pages: Sequence[Path] = PAGES, *, every_block: bool = True) -> list[str]:
    """One line per page whose generated blocks differ from what BLOCKS render now; with
    `every_block`, one more per block that no page holds."""
    problems, used = [], set()
    for page in pages:
        text = page.read_text()
        fresh, unknown = render_page(text, page)
        where = shown(page)
        used |= {m["name"] for m in MARKER.finditer(text)}
        problems += [
            f"{where}: no block is called {name!r} (scripts/docs_figures.py BLOCKS)"
            for name in unknown
        ]
        if fresh != text:
            names = [
                m["name"]
                for m, n in zip(MARKER.finditer(text), MARKER.finditer(fresh), strict=True)
                if m[0] != n[0]
            ]
            problems.append(f"{where}: stale {', '.join(names)}: run {COMMAND}")
    if every_block:  # a renderer no page uses is a table that silently left the docs
        problems += [f"no page holds the block {name!r}" for name in BLOCKS if name not in used]
    return problems


def stale_plots(plots: Iterable[Plot] = PLOTS.values()) -> list[str]:
    """One line per plot that is missing or was drawn from other inputs than today's."""
    problems = []
    for p in plots:
        where = shown(p.path)
        if not p.path.is_file():
            problems.append(f"{where}: missing: run {COMMAND}")
        elif embedded_digest(p.path) != digest(p):
            problems.append(f"{where}: stale, its inputs or drawing changed: run {COMMAND}")
    return problems


def write(force: bool = False) -> list[Path]:
    """Rewrite the pages and redraw the stale plots (all with `force`); what changed."""
    changed = []
    for page in PAGES:
        text = page.read_text()
        fresh, unknown = render_page(text, page)
        if unknown:
            raise SystemExit(f"{shown(page)}: no block is called {unknown[0]!r}")
        if fresh != text:
            page.write_text(fresh)
            changed.append(page)
    for p in PLOTS.values():
        if force or stale_plots([p]):
            save(p)
            changed.append(p.path)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if any block or plot is stale")
    parser.add_argument("--force", action="store_true", help="redraw every plot, stale or not")
    args = parser.parse_args(argv)
    if args.check:
        problems = stale_pages() + stale_plots()
        for line in problems:
            print(line, file=sys.stderr)
        return 1 if problems else 0
    for path in write(args.force):
        print(f"wrote {shown(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
