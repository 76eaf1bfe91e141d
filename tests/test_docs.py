"""The docs stay true: README is a front page, relative links land, the CLI page is current."""

from __future__ import annotations

import enum
import re
from pathlib import Path

import pytest

from fedmodel import errors
from fedmodel.cli import reference

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)
_SOURCE_PATH = re.compile(
    r"(?<![\w/.~-])(?:fedmodel|server|client|simulations|tests|benchmarks)/[\w/]+\.py\b"
)


def _prose(page: Path) -> str:
    """The page without code: links and headings inside code blocks are not real."""
    return _FENCE.sub("", page.read_text(encoding="utf-8"))


def _anchors(page: Path) -> set[str]:
    """Anchors a code forge makes from the page's headings (GitHub's rule, duplicates -1, -2)."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in _HEADING.findall(_prose(page)):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _relative_links(page: Path) -> list[str]:
    links = _LINK.findall(_INLINE_CODE.sub("", _prose(page)))
    return [link for link in links if not re.match(r"^[a-z][a-z0-9+.-]*:", link)]


def test_readme_is_a_front_page_of_at_most_300_lines() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 300, f"README.md has {lines} lines; move detail into docs/"


def test_docs_index_lists_every_page() -> None:
    index = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    for page in PAGES[1:]:
        if page.name != "README.md":
            assert f"]({page.name}" in index, f"docs/README.md does not link {page.name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_points_at_an_existing_file_and_heading(page: Path) -> None:
    broken = []
    for link in _relative_links(page):
        path_part, _, anchor = link.partition("#")
        target = (page.parent / path_part).resolve() if path_part else page
        if not target.exists():
            broken.append(f"{link} (no file {target.relative_to(ROOT)})")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(f"{link} (no heading #{anchor} in {target.name})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: " + ", ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_source_file_the_docs_name_exists(page: Path) -> None:
    """Modules move; a page that names one (`server/app.py`) must follow it."""
    text = page.read_text(encoding="utf-8")
    missing = sorted({path for path in _SOURCE_PATH.findall(text) if not (ROOT / path).exists()})
    assert not missing, f"{page.relative_to(ROOT)} names files that do not exist: {missing}"


def test_cli_reference_matches_the_typer_app() -> None:
    written = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert written == reference.render_reference(), (
        f"docs/cli.md is out of date with the CLI; regenerate it: {reference.REGENERATE}"
    )


def test_cli_reference_is_one_line_per_option_whatever_the_terminal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    wide = reference.render_reference()
    monkeypatch.setenv("COLUMNS", "40")
    monkeypatch.setenv("FORCE_COLOR", "1")
    assert reference.render_reference() == wide
    assert "\x1b[" not in wide


def test_cli_reference_renders_the_exit_code_table_from_the_enum(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class ExitCode(enum.IntEnum):
        OK = 0
        USAGE = 2

        @property
        def description(self) -> str:
            return {0: "success", 2: "a user mistake | caught before anything starts"}[self]

    monkeypatch.setattr(errors, "ExitCode", ExitCode, raising=False)
    page = reference.render_reference()
    assert "## Exit codes" in page
    assert "| 0 | `OK` | success |" in page
    assert "| 2 | `USAGE` | a user mistake \\| caught before anything starts |" in page
