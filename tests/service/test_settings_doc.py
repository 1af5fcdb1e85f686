"""docs/serving.md holds the one table of IMGSERVE_* settings: it lists exactly the variables
service/config.py reads, with the defaults load_settings() really applies."""
from __future__ import annotations

import re
from pathlib import Path

from service import config

ROOT = Path(__file__).resolve().parents[2]
ROW = re.compile(r"^\| `(IMGSERVE_[A-Z0-9_]+)` \| `?([^|`]*)`? \| (.+) \|$")


def documented() -> dict[str, str]:
    rows = [ROW.match(line) for line in (ROOT / "docs" / "serving.md").read_text().splitlines()]
    return {m.group(1): m.group(2).strip() for m in rows if m}


def test_the_table_lists_every_setting_once() -> None:
    read = set(re.findall(r'"(IMGSERVE_[A-Z0-9_]+)"', Path(config.__file__).read_text()))
    doc = documented()
    assert set(doc) == read, f"documented only: {sorted(set(doc) - read)}; read but undocumented: {sorted(read - set(doc))}"


def test_documented_defaults_are_the_real_ones() -> None:
    defaults = config.load_settings({})
    checked = 0
    for var, default in documented().items():
        field = var.removeprefix("IMGSERVE_").lower()
        if field == "models":
            assert default == config.DEFAULT_MODELS, default
        elif default == "unset":
            assert getattr(defaults, field, None) is None, (var, getattr(defaults, field))
        elif hasattr(defaults, field) and default.isdigit():
            assert getattr(defaults, field) == int(default), (var, default, getattr(defaults, field))
        elif hasattr(defaults, field) and re.fullmatch(r"[a-z0-9]+", default):
            assert getattr(defaults, field) == default, (var, default, getattr(defaults, field))
        else:
            continue
        checked += 1
    assert checked >= 12, f"only {checked} defaults could be compared: did the table's format change?"
