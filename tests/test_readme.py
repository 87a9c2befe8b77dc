"""The documents a reader opens: docs/options.md holds the option and preset tables the code generates
(scripts/readme_tables.py), the README stays a guide, and every relative link in README.md, BENCHMARKS.md and
docs/*.md points to a file that exists and, with `#anchor`, to a heading of it (GitHub's slugs)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
README_LINES = 150  # issue 27: a guide, the rest in docs/
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def tables():
    spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "scripts" / "readme_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, markup and punctuation dropped (letters, digits, `_`, `-` and
    spaces kept), each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor, repeats numbered as GitHub numbers them (`name`, `name-1`, ...)."""
    seen: dict[str, int] = {}
    found = set()
    for line in FENCE.sub("", text).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            found.add(f"{base}-{seen[base]}" if base in seen else base)
            seen[base] = seen.get(base, 0) + 1
    return found


def links(text: str) -> list[str]:
    """Relative link targets outside code (code blocks and `inline code` are examples, not links)."""
    prose = INLINE_CODE.sub("", FENCE.sub("", text))
    return [t for t in LINK.findall(prose) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def broken_links(document: Path) -> list[str]:
    broken = []
    for target in links(document.read_text()):
        path, _, anchor = target.partition("#")
        file = (document.parent / path).resolve() if path else document
        if not file.exists():
            broken.append(f"{target}: no file {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
            broken.append(f"{target}: no heading #{anchor} in {file.name}")
    return broken


def test_options_doc_holds_the_generated_option_and_preset_tables():
    options = (ROOT / "docs" / "options.md").read_text()
    module = tables()
    for name, table in (("option", module.option_table()), ("preset", module.preset_table())):
        assert table in options, f"docs/options.md's {name} table is out of date: run python scripts/readme_tables.py"


def test_readme_is_a_guide():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_LINES, f"README.md has {lines} lines: move detail to docs/ (at most {README_LINES})"


def test_readme_links_every_doc():
    readme_targets = {t.partition("#")[0] for t in links((ROOT / "README.md").read_text())}
    assert sorted(p.name for p in (ROOT / "docs").glob("*.md") if f"docs/{p.name}" not in readme_targets) == []


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(document):
    assert broken_links(document) == []


def test_slugs_are_githubs():
    """Anchors as GitHub renders them for headings of this repository (read off the rendered pages)."""
    assert slug("The sketch estimator (`estimator=\"sketch\"`)") == "the-sketch-estimator-estimatorsketch"
    assert slug("1.1 Where the exact init's memory goes, and `init_memory_gb=\"auto\"` (issue 14)") == \
        "11-where-the-exact-inits-memory-goes-and-init_memory_gbauto-issue-14"
    assert slug("The gradient estimator (`--estimator`)") == "the-gradient-estimator---estimator"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n## A\n") == {"a", "a-1", "a-2"}


def test_a_broken_link_is_found(tmp_path):
    (tmp_path / "there.md").write_text("# Here it is\n")
    doc = tmp_path / "doc.md"
    doc.write_text("[ok](there.md#here-it-is) [file](gone.md) [anchor](there.md#elsewhere) `[code](gone.md)`\n"
                   "[web](https://example.com/x.md) [self](#nowhere)\n```\n[example](gone-too.md)\n```\n")
    assert broken_links(doc) == [f"gone.md: no file {tmp_path / 'gone.md'}",
                                 "there.md#elsewhere: no heading #elsewhere in there.md",
                                 "#nowhere: no heading #nowhere in doc.md"]
