"""The README is the front door: small, and it links every page in docs/; no link points nowhere."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_readme_stays_under_12_kb():
    assert README.stat().st_size < 12 * 1024, README.stat().st_size


def test_readme_links_every_docs_page():
    text = README.read_text(encoding="utf-8")
    missing = [p.name for p in PAGES if f"(docs/{p.name})" not in text]
    assert not missing, f"README.md does not link {missing}"


def test_every_relative_link_resolves():
    broken = []
    for page in [README, *PAGES]:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken
