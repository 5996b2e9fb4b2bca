"""The README is a front page and the docs pages hang together: short, every relative link leads to a file, and
every page of docs/ is in the book."""
from __future__ import annotations

import re
from pathlib import Path

from segx_helpers.cli.book import PAGES

REPO = Path(__file__).resolve().parents[1]
MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
"""``[text](target)`` and ``![alt](target)``: group 1 is the target."""


def relative_links(text: str) -> list[str]:
    """The targets of the Markdown links and pictures in ``text`` that point into the repository (no scheme, no
    bare anchor), without their ``#anchor``; links inside fenced code blocks are left out."""
    prose = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    targets = [m.group(1) for m in MARKDOWN_LINK.finditer(prose)]
    return [t.split("#")[0] for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def markdown_pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_relative_links_are_found_and_remote_ones_and_code_are_not():
    text = ("See [a](docs/a.md#part), ![b](docs/figures/b.png), [web](https://example.org/x.md), [top](#top),\n"
            "```bash\n[not](a/link.md)\n```\n[c](../README.md)")
    assert relative_links(text) == ["docs/a.md", "docs/figures/b.png", "../README.md"]


def test_the_readme_is_a_front_page_under_200_lines():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) < 200, f"README.md has {len(lines)} lines: move manuals and tables to docs/ (the book shows them)"


def test_every_relative_link_in_the_readme_and_docs_leads_to_a_file():
    broken = [f"{page.relative_to(REPO)}: {target}" for page in markdown_pages()
              for target in relative_links(page.read_text(encoding="utf-8"))
              if not (page.parent / target).exists()]
    assert broken == []


def test_the_book_includes_every_page_of_docs():
    pages = {str(page.relative_to(REPO)) for page in (REPO / "docs").glob("*.md")}
    assert pages == set(PAGES)
