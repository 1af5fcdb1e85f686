"""deploy/monitoring/rules.yml with Debian's promtool: the file is valid, its unit tests
(deploy/monitoring/tests/*.yaml) pass, and they really pin every alert: an alert that never fires, or
one that always fires, makes them fail."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
RULES = MONITORING / "rules.yml"
UNIT_TESTS = sorted((MONITORING / "tests").glob("*.yaml"))


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: apt-get install prometheus (scripts/setup.sh does)")
    return path


def alerts() -> list[str]:
    return [r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]


def run_unit_tests(promtool: str, rules_dir: Path) -> subprocess.CompletedProcess:
    """promtool test rules on every unit-test file, the rules read from ``rules_dir``/rules.yml."""
    return subprocess.run([promtool, "test", "rules", *[str(t) for t in sorted((rules_dir / "tests").glob("*.yaml"))]],
                          capture_output=True, text=True, timeout=120)


def test_rules_are_valid(promtool: str) -> None:
    out = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_unit_tests_pass(promtool: str) -> None:
    assert UNIT_TESTS, "no promtool unit tests in deploy/monitoring/tests"
    out = run_unit_tests(promtool, MONITORING)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_has_a_severity_and_a_summary() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    for rule in (r for g in groups for r in g["rules"] if "alert" in r):
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]


@pytest.mark.parametrize("replacement", ["vector(0) > 1", "vector(1)"], ids=["never-fires", "always-fires"])
@pytest.mark.parametrize("alert", alerts())
def test_unit_tests_pin_each_alert(promtool: str, tmp_path: Path, alert: str, replacement: str) -> None:
    """A copy of the rules with one alert's expression replaced: the unit tests must catch it."""
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                rule["expr"] = replacement
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    shutil.copytree(MONITORING / "tests", tmp_path / "tests")
    out = run_unit_tests(promtool, tmp_path)
    assert out.returncode != 0 and f"alertname: {alert}," in out.stdout + out.stderr, (
        f"the unit tests do not notice {alert} replaced by `{replacement}`:\n{out.stdout[-2000:]}")
