"""docs/settings.md is what scripts/settings_doc.py writes from app.settings, field for field."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
from pydantic import Field

from app.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def _load_script() -> ModuleType:
    # scripts/ is not a package: load the file the way `python scripts/settings_doc.py` runs it.
    spec = importlib.util.spec_from_file_location("settings_doc", REPO / "scripts/settings_doc.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


settings_doc = _load_script()


class _WithNewField(Settings):
    new_knob: int = Field(3, ge=2, le=9, description="A knob added after the page was written.")
    new_dirs: list[str] = Field(["a", "b"], description="Two directories.")
    new_file: Path | None = Field(Path("x/y.txt"), description="A file.")


def test_committed_settings_page_is_current() -> None:
    committed = (REPO / "docs/settings.md").read_text()
    assert committed == settings_doc.render(), (
        "docs/settings.md is stale: run .venv/bin/python scripts/settings_doc.py"
    )


def test_settings_page_has_a_row_for_every_field() -> None:
    page = settings_doc.render()
    missing = [n for n in Settings.model_fields if f"\n| `VAE_{n.upper()}` | " not in page]
    assert missing == []


def test_settings_page_changes_when_a_field_is_added() -> None:
    page = settings_doc.render(_WithNewField)
    assert page != settings_doc.render()
    assert (
        "| `VAE_NEW_KNOB` | `3` | integer, >= 2, <= 9 | A knob added after the page was written. |"
        in page
    )


def test_settings_page_renders_defaults_as_they_are_written() -> None:
    page = settings_doc.render(_WithNewField)
    assert "| `VAE_NEW_DIRS` | `a,b` | comma-separated list | Two directories. |" in page
    assert "| `VAE_NEW_FILE` | `x/y.txt` | path | A file. |" in page
    assert "| `VAE_API_KEYS` | none | comma-separated list |" in page
    assert "| `VAE_METRICS_PUBLIC` | `true` | `true` or `false` |" in page


def test_settings_page_escapes_pipes_in_patterns() -> None:
    assert "`^(auto\\|cpu\\|cuda(:\\d+)?)$`" in settings_doc.render()


def test_check_fails_with_one_line_on_a_stale_page(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    page = tmp_path / "settings.md"
    page.write_text("# Settings\n")
    assert settings_doc.main(["--check", "--out", str(page)]) == 1
    assert capsys.readouterr().err == (
        f"{page} is stale: run .venv/bin/python scripts/settings_doc.py\n"
    )
    assert settings_doc.main(["--out", str(page)]) == 0
    assert settings_doc.main(["--check", "--out", str(page)]) == 0
