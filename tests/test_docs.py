"""The README as a newcomer reads it: short, its quick start the two commands and the tests, and
every link into the docs landing on a page and a heading that exist. (The docs pages' own
links are checked by `mkdocs build --strict` in .ci/run.)"""

import re

from .conftest import REPO

README = REPO / "README.md"
#: A markdown link's target: [text](target), skipping images and absolute URLs.
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """A heading's anchor, as GitHub and mkdocs' toc both make it."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: str) -> set[str]:
    headings = re.findall(r"^#{1,6} (.+)$", page, flags=re.MULTILINE)
    return {_slug(h) for h in headings}


def test_the_readme_is_read_in_ten_minutes():
    assert len(README.read_text().splitlines()) <= 250


def test_the_quick_start_is_two_commands_and_the_tests():
    text = README.read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```\n(.*?)```", section, flags=re.DOTALL)
    commands = [line.split("#")[0].strip() for line in block.splitlines()]
    assert commands == ['pip install -e ".[dev]"', "invoke migrate-master", "pytest"]


def test_every_relative_link_in_the_readme_lands_on_a_page_and_a_heading():
    targets = [t for t in LINK.findall(README.read_text()) if "://" not in t]
    assert any(t.startswith("docs/") for t in targets)
    for target in targets:
        path, _, anchor = target.partition("#")
        page = REPO / path
        assert page.is_file(), target
        if anchor:
            assert anchor in _anchors(page.read_text()), target


def test_every_docs_page_is_in_the_site_and_linked_from_the_readme():
    pages = {p.name for p in (REPO / "docs").glob("*.md")}
    nav = set(re.findall(r":\s*(\S+\.md)\s*$", (REPO / "mkdocs.yml").read_text(), re.MULTILINE))
    linked = {t.split("#")[0].removeprefix("docs/") for t in LINK.findall(README.read_text())}
    assert pages == nav
    assert pages <= linked
