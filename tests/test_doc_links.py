"""Every relative link in the project's Markdown (README, docs/, the measurement log) reaches a file
that exists and, where it names an anchor in a Markdown file, a heading that makes that anchor."""
import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "results" / "README.md"]
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} (.*)$", re.M)


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@functools.cache  # the log alone links to README's headings dozens of times
def anchors(path: Path) -> set[str]:
    return {anchor(h) for h in HEADING.findall(path.read_text(encoding="utf-8"))}


def test_anchor_rule():
    assert anchor("`apo-bench`: the micro-benchmarks") == "apo-bench-the-micro-benchmarks"
    assert anchor("AMD EPYC (Zen 4), 2 cores, two speeds (2026-12-07)") == "amd-epyc-zen-4-2-cores-two-speeds-2026-12-07"


def broken_links(doc: Path, text: str) -> list[str]:
    """The relative links of ``text`` (the contents of ``doc``) that reach no file or no heading."""
    broken = []
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, name = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif name and file.suffix == ".md" and name not in anchors(file):
            broken.append(f"{target}: no heading makes #{name}")
    return broken


def test_broken_links_are_found():
    readme = ROOT / "README.md"
    text = "[a](docs/no-such-file.md) [b](#no-such-heading) [c](#install) [d](https://example.org/x)"
    assert broken_links(readme, text) == ["docs/no-such-file.md: no such file",
                                          "#no-such-heading: no heading makes #no-such-heading"]
    assert len(LINK.findall((ROOT / "README.md").read_text(encoding="utf-8"))) > 20


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    broken = broken_links(doc, doc.read_text(encoding="utf-8"))
    assert not broken, f"{doc.relative_to(ROOT)}: broken links:\n" + "\n".join(broken)
