"""docs/quickstart.md runs as written: each section that calls the server is run by bash against a
real `python -m app`, started with the settings the section's own `make run` line gives, and
every answer the page shows after a command is compared with what the command printed.

The page shortens answers with `...`: a list or an object ending in `...` is a prefix (or a
subset) of the real one, a string ending in `...` a prefix. Numbers match to 1e-4 relative,
since oneDNN may round the last digits differently on another CPU. The servers run on the CPU,
as the page's answers were produced."""

from __future__ import annotations

import json
import math
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, Server

pytestmark = pytest.mark.server

PAGE = REPO / "docs" / "quickstart.md"
FENCE = re.compile(r"^```(?P<lang>\w*)\n(?P<body>.*?)^```$", re.S | re.M)
# `make run`, with the settings given before it on the same line: VAR=value ...
SERVE = re.compile(r"^(?P<env>(?:[A-Z][A-Z0-9_]*=\S+ )*)make run$", re.M)
HOST = "localhost:8000"
ELIDED = "\u2026elided"  # what `...` in a shown answer parses to
REL, ABS = 1e-4, 1e-6


@dataclass
class Section:
    title: str
    setup: list[str] = field(default_factory=list)  # bash run before the server starts
    steps: list[tuple[str, tuple[str, str] | None]] = field(default_factory=list)  # (bash, answer)
    env: dict[str, str] = field(default_factory=dict)  # the section's `make run` settings


def read_sections(text: str) -> list[Section]:
    """The page's `## ` sections that call the server, each as bash with its shown answers."""
    sections = []
    for part in re.split(r"^## ", text, flags=re.M)[1:]:
        section = Section(part.splitlines()[0].strip())
        fences = list(FENCE.finditer(part))
        for i, fence in enumerate(fences):
            if fence["lang"] != "bash":
                continue
            body = fence["body"]
            serve = SERVE.search(body)
            if serve is not None:
                section.setup.append(body[: serve.start()])
                section.env = dict(kv.split("=", 1) for kv in serve["env"].split())
                body = body[serve.end() :]
            if not body.strip():
                continue
            answer = None
            following = fences[i + 1] if i + 1 < len(fences) else None
            # An answer is a json or text block right after the command, nothing between.
            if (
                following is not None
                and not part[fence.end() : following.start()].strip()
                and following["lang"] in ("json", "text")
            ):
                answer = (following["lang"], following["body"])
            section.steps.append((body, answer))
        if any(HOST in bash for bash, _ in section.steps):
            sections.append(section)
    return sections


SECTIONS = {s.title: s for s in read_sections(PAGE.read_text())}


def parse_shown(text: str) -> Any:
    """A shown JSON answer, with `...` in a list or object made a marker `matches` reads."""
    text = re.sub(r",\s*\.\.\.\s*\}", f', "{ELIDED}": null}}', text)
    text = re.sub(r",\s*\.\.\.\s*\]", f', "{ELIDED}"]', text)
    return json.loads(text)


def matches(shown: Any, real: Any, where: str = "answer") -> list[str]:
    """Where the real answer differs from the shown one, within its elisions and tolerance."""
    if isinstance(shown, dict):
        if not isinstance(real, dict):
            return [f"{where}: {real!r} is not an object"]
        keys = [k for k in shown if k != ELIDED]
        missing = [k for k in keys if k not in real]
        extra = [] if ELIDED in shown else sorted(set(real) - set(keys))
        problems = (
            [f"{where}: keys {missing} missing, {extra} unexpected"] if missing or extra else []
        )
        return problems + [
            p for k in keys if k in real for p in matches(shown[k], real[k], f"{where}.{k}")
        ]
    if isinstance(shown, list):
        cut = bool(shown) and shown[-1] == ELIDED
        items = shown[:-1] if cut else shown
        if not isinstance(real, list) or (
            len(real) < len(items) if cut else len(real) != len(items)
        ):
            return [f"{where}: {real!r} does not have the {len(items)} items shown"]
        return [p for i, s in enumerate(items) for p in matches(s, real[i], f"{where}[{i}]")]
    if isinstance(shown, str) and shown.endswith("..."):
        ok = isinstance(real, str) and real.startswith(shown[:-3])
    elif isinstance(shown, bool) or shown is None or isinstance(shown, str):
        ok = shown == real
    else:
        ok = isinstance(real, int | float) and math.isclose(shown, real, rel_tol=REL, abs_tol=ABS)
    return [] if ok else [f"{where}: shown {shown!r}, real {real!r}"]


def bash(script: str, cwd: Path, port: int | None = None) -> str:
    if port is not None:
        script = script.replace(HOST, f"127.0.0.1:{port}")
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=cwd, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"bash exited {done.returncode}:\n{script}\n{done.stderr}"
    return done.stdout


def workdir(tmp: Path) -> Path:
    """A fresh directory that looks like a clone's root to the page's commands: the files they
    read are the repository's, the files they write stay out of it."""
    for name in ("tests", "models"):
        (tmp / name).symlink_to(REPO / name)
    return tmp


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Server, Path]]]:
    """Each section's server, all started at once (each warms up for a while): the setup bash
    runs first, since `make run`'s settings may name a file it writes."""
    started: dict[str, tuple[Server, Path]] = {}
    by_env: dict[tuple[tuple[str, str], ...], Server] = {}  # sections with the same settings share
    try:
        for title, section in SECTIONS.items():
            cwd = workdir(tmp_path_factory.mktemp("quickstart"))
            bash("".join(section.setup), cwd)
            # The server runs in the repository: a file the setup wrote is named absolutely.
            env = {k: str(cwd / v) if (cwd / v).exists() else v for k, v in section.env.items()}
            key = tuple(sorted(env.items()))
            if key not in by_env:
                by_env[key] = Server({"VAE_DEVICE": "cpu", **env}, cwd / "server.log")
            started[title] = (by_env[key], cwd)
        for server in by_env.values():
            server.wait_ready(180)
        yield started
    finally:
        for server in by_env.values():
            server.stop()


def test_the_page_has_the_sections_this_test_runs() -> None:
    assert list(SECTIONS) == [
        "Serve the shipped model",
        "Call it",
        "With an API key",
        "A table model",
    ]
    for section in SECTIONS.values():
        assert any(answer is not None for _, answer in section.steps), section.title


@pytest.mark.parametrize("title", list(SECTIONS))
def test_each_command_answers_what_the_page_shows(
    title: str, servers: dict[str, tuple[Server, Path]]
) -> None:
    server, cwd = servers[title]
    marker = "@@@ next step @@@"
    script = "".join(f"{bash_text}echo '{marker}'\n" for bash_text, _ in SECTIONS[title].steps)
    outputs = bash(script, cwd, server.port).split(marker + "\n")
    problems = []
    for (command, answer), printed in zip(SECTIONS[title].steps, outputs, strict=False):
        if answer is None:
            continue
        lang, shown = answer
        if lang == "json":
            found = matches(parse_shown(shown), json.loads(printed))
        else:
            found = [] if printed.strip() == shown.strip() else [f"printed {printed!r}"]
        problems += [f"{command.strip()[:60]}...: {p}" for p in found]
    assert problems == [], "docs/quickstart.md shows other answers:\n" + "\n".join(problems)


def test_a_shown_answer_may_cut_lists_objects_and_strings_short() -> None:
    shown = parse_shown('{"mean": [[0.5, -1.0, ...]], "sha256": "eae3...", ...}')
    assert matches(shown, {"mean": [[0.50001, -1.0, 2.0]], "sha256": "eae3ec", "std": None}) == []
    assert matches(shown, {"mean": [[0.6, -1.0]], "sha256": "ffff"}) == [
        "answer.mean[0][0]: shown 0.5, real 0.6",
        "answer.sha256: shown 'eae3...', real 'ffff'",
    ]
    assert matches(parse_shown('{"n": [1, 2]}'), {"n": [1, 2, 3], "m": 0}) == [
        "answer: keys [] missing, ['m'] unexpected",
        "answer.n: [1, 2, 3] does not have the 2 items shown",
    ]
