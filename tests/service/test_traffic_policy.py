"""service/traffic.py: the policy file is checked whole and names the bad field; sticky users keep
their version unless the weights move their bucket; the random split follows the weights."""
import random

import pytest

from service.traffic import BUCKETS, PolicyError, bucket, choose_version, parse_text

SERVED = {"digits": {"v1", "v2"}, "r18": {"1"}}
GOOD = """
digits:
  weights: {v1: 90, v2: 10}
  shadow: {version: v2, fraction: 1.0}
  sticky: X-User-Id
"""


def test_a_good_policy_parses_yaml_and_json():
    p = parse_text(GOOD, SERVED)["digits"]
    assert p.weights == (("v1", 90), ("v2", 10)) and p.shadow.version == "v2" and p.sticky == "x-user-id"
    j = parse_text('{"digits": {"weights": {"v2": 100, "v1": 0}}}', SERVED)["digits"]
    assert j.weights == (("v1", 0), ("v2", 100)) and j.shadow is None and j.sticky is None


@pytest.mark.parametrize("text, field", [
    ("digits: {weights: {v1: 90, v3: 10}}", "digits.weights.v3"),
    ("digits: {weights: {v1: 90, v2: 20}}", "digits.weights"),
    ("digits: {weights: {v1: 90.5, v2: 9.5}}", "digits.weights.v1"),
    ("digits: {weights: {v1: 100}, shadow: {version: v9}}", "digits.shadow.version"),
    ("digits: {weights: {v1: 100}, shadow: {version: v2, fraction: 2}}", "digits.shadow.fraction"),
    ("digits: {weights: {v1: 100}, sticky: 'a b'}", "digits.sticky"),
    ("digits: {weights: {v1: 100}, wieghts: 1}", "digits.wieghts"),
    ("cats: {weights: {v1: 100}}", "cats"),
    ("r18: {weights: {'1': 100}}\ndigits: {weights: {v1: 50}}", "digits.weights"),  # one bad name refuses all
])
def test_a_bad_policy_is_refused_naming_the_field(text, field):
    with pytest.raises(PolicyError) as e:
        parse_text(text, SERVED)
    assert str(e.value).startswith(field + ":"), str(e.value)


def test_sticky_users_move_only_when_their_bucket_crosses_the_boundary():
    users = [f"user-{i}" for i in range(2000)]
    steps = [{"v1": 100, "v2": 0}, {"v1": 90, "v2": 10}, {"v1": 50, "v2": 50}, {"v1": 0, "v2": 100},
             {"v1": 100, "v2": 0}]
    before = None
    for w in steps:
        p = parse_text(f"digits: {{weights: {w}, sticky: X-User-Id}}", SERVED)["digits"]
        now = {u: choose_version(p, {"x-user-id": u}) for u in users}
        assert now == {u: choose_version(p, {"x-user-id": u}) for u in users}  # the same every time
        if before is not None:
            lo, hi = sorted((before_w["v1"], w["v1"]))  # v1 holds buckets [0, weight of v1)
            for u in users:
                moved = lo <= bucket(u) < hi
                assert (now[u] != before[u]) == moved, (u, bucket(u), before_w, w)
        before, before_w = now, w


def test_without_sticky_the_split_follows_the_weights():
    p = parse_text("digits: {weights: {v1: 90, v2: 10}}", SERVED)["digits"]
    rng = random.Random(7)
    n = 20_000
    share = sum(choose_version(p, {}, rng.random) == "v2" for _ in range(n)) / n
    assert abs(share - 0.10) < 0.01
    # the buckets of distinct users spread evenly too
    counts = [0] * BUCKETS
    for i in range(20_000):
        counts[bucket(f"u{i}")] += 1
    assert min(counts) > 120 and max(counts) < 290


def test_the_policy_file_is_reread_on_change_and_a_bad_one_keeps_the_old(tmp_path):
    import os

    from service.traffic import PolicyFile

    path = tmp_path / "traffic.yaml"
    path.write_text(GOOD)
    pf = PolicyFile(str(path), lambda: SERVED)
    assert pf.check() and pf.policies["digits"].weights == (("v1", 90), ("v2", 10)) and not pf.check()
    path.write_text("digits: {weights: {v1: 50, v2: 40}}")
    os.utime(path, ns=(1, 1))  # a new mtime even within the file system's timestamp resolution
    assert not pf.check() and pf.policies["digits"].weights == (("v1", 90), ("v2", 10))
    assert "digits.weights: the weights sum to 90" in pf.error
    path.write_text("digits: {weights: {v1: 50, v2: 50}}")
    os.utime(path, ns=(2, 2))
    assert pf.check() and pf.policies["digits"].weights == (("v1", 50), ("v2", 50)) and pf.error == ""
    path.unlink()
    assert not pf.check() and pf.policies["digits"].weights == (("v1", 50), ("v2", 50)) and pf.error


def test_the_example_policy_in_deploy_parses():
    from pathlib import Path

    text = (Path(__file__).parents[2] / "deploy" / "traffic.example.yaml").read_text()
    p = parse_text(text, SERVED)["digits"]
    assert p.weights == (("v1", 90), ("v2", 10)) and p.shadow.fraction == 1.0 and p.sticky == "x-user-id"
