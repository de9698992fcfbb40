"""The README and docs/ stay true to the repository: the two commands up front, no link to a file
or heading that is not there, and the promises the pages make of files beside them. (The
generated parts are checked by test_settings_doc.py and test_docs_figures.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from app.settings import Settings
from tests.conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    headings = re.findall(r"^#+\s+(.+?)\s*$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_readme_opens_with_the_run_and_test_commands() -> None:
    head = (REPO / "README.md").read_text().split("```bash", 1)[1].split("```", 1)[0]
    assert "make run" in head
    assert "make test" in head


def test_readme_stays_a_front_door() -> None:
    assert len((REPO / "README.md").read_text().splitlines()) <= 200


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not ours to check offline
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no such heading")
    assert broken == []


def test_compose_passes_every_setting_a_user_sets() -> None:
    """docs/deploy.md: every VAE_* setting set on the host reaches the container, but the two
    the image fixes (where it listens) and the path compose builds from VAE_MODEL_FILE."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    passed = set(compose["services"]["vae"]["environment"])
    wanted = {f"VAE_{name.upper()}" for name in Settings.model_fields} - {"VAE_HOST", "VAE_PORT"}
    assert sorted(wanted - passed) == []
    assert (
        "/srv/models/${VAE_MODEL_FILE"
        in compose["services"]["vae"]["environment"]["VAE_MODEL_PATH"]
    )
