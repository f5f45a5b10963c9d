"""README.md and docs/*.md: relative links resolve, anchors match headings, the README stays short and links
every page. Links and headings inside code (fenced blocks, inline spans) are not links or headings."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 300

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+).+?\1")
HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.*?)[ \t#]*$")
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def prose_lines(text: str, inline_code: bool = False) -> list[str]:
    """The page's lines with fenced code blocks emptied and, unless `inline_code`, inline code removed (line
    numbers kept)."""
    lines, fence = [], None
    for line in text.split("\n"):
        opened = FENCE.match(line)
        if fence is None and opened:
            fence = opened.group(1)
            line = ""
        elif fence is not None:
            if line.strip().startswith(fence) and set(line.strip()) == {fence[0]}:
                fence = None
            line = ""
        lines.append(line if inline_code else CODE_SPAN.sub("code", line))
    return lines


def github_slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text lowercased, only letters, digits, spaces, - and _ kept, spaces as -."""
    text = LINK.sub(lambda m: m.group(0)[1 : m.group(0).index("]")], heading).lower()  # a link anchors by its text
    return "".join(ch for ch in text if ch in " -_" or unicodedata.category(ch)[0] in "LN").replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor; a repeated one gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose_lines(text, inline_code=True):  # a heading's inline code is part of its anchor
        match = HEADING.match(line)
        if not match:
            continue
        slug = base = github_slug(match.group(1))
        while slug in seen:
            seen[base] += 1
            slug = f"{base}-{seen[base]}"
        seen[slug] = 0
        found.add(slug)
    return found


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every inline link outside code."""
    return [(n, m.group(1)) for n, line in enumerate(prose_lines(text), 1) for m in LINK.finditer(line)]


def broken_links(page: Path) -> list[str]:
    problems = []
    for line, target in links(page.read_text(encoding="utf-8")):
        if not target or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http(s):, mailto: are not checked
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        where = f"{page.relative_to(ROOT)}:{line} ({target})"
        if not resolved.exists():
            problems.append(f"{where}: no file or directory {resolved}")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved.read_text(encoding="utf-8")):
            problems.append(f"{where}: no heading with the anchor #{anchor} in {resolved.relative_to(ROOT)}")
    return problems


@pytest.mark.parametrize("page", pages(), ids=lambda page: str(page.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(page: Path) -> None:
    problems = broken_links(page)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_readme_is_short_and_links_every_docs_page() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_README_LINES, "move reference material into docs/"
    linked = {(ROOT / target.partition("#")[0]).resolve() for _, target in links(text)}
    docs_pages = sorted(DOCS.glob("*.md"))
    assert docs_pages and [p.name for p in docs_pages if p.resolve() not in linked] == []


def test_slugs_and_code_follow_githubs_rules() -> None:
    assert github_slug("Stable Cascade (Würstchen v3) stage C") == "stable-cascade-würstchen-v3-stage-c"
    assert github_slug("Starting from an existing adapter: `--init_adapter`") == (
        "starting-from-an-existing-adapter---init_adapter"
    )
    assert github_slug("Generating images: `scripts/infer.py`") == "generating-images-scriptsinferpy"
    assert github_slug("See [the docs](docs/x.md)") == "see-the-docs"
    text = "# Notes\n\n## Notes\n\n```bash\n# not a heading\n[a](a.md)\n```\n\n## Notes-1\n`[b](b.md)` [c](c.md)\n"
    assert anchors(text) == {"notes", "notes-1", "notes-1-1"}
    assert links(text) == [(11, "c.md")]


def test_every_kohya_name_has_its_row_in_the_kohya_table() -> None:
    """docs/options.md's "kohya's training flags" names every kohya key that train/kohya_flags/ reads: a key
    added there gets its row (same meaning, converted, no effect or refused)."""
    from difftune.train import kohya_flags

    section = (DOCS / "options.md").read_text().split("\n## kohya's training flags\n", 1)[1].split("\n## ", 1)[0]
    missing = sorted(kohya_flags.KOHYA_ONLY - set(re.findall(r"`(\w+)", section)))
    assert not missing, f"kohya keys without a row in docs/options.md: {', '.join(missing)}"
