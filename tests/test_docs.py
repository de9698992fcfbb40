"""The README stays true to the code."""

from __future__ import annotations

from app.settings import Settings
from tests.conftest import REPO


def test_readme_documents_every_setting() -> None:
    readme = (REPO / "README.md").read_text()
    missing = [n for n in Settings.model_fields if f"`VAE_{n.upper()}`" not in readme]
    assert missing == []


def test_readme_opens_with_the_run_and_test_commands() -> None:
    head = (REPO / "README.md").read_text().split("```bash", 1)[1].split("```", 1)[0]
    assert "make run" in head
    assert "make test" in head
