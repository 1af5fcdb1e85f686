"""loadtests/rollout_bench.py, small: the same steps 100/0 -> 90/10 -> 50/50 -> 0/100 -> 100/0 by
rewriting one policy file, 8 closed-loop clients, a thousand requests a step instead of 5000, against
a real `bentoml serve` and then two replicas behind a real HAProxy (plain processes here: the podman
replicas are built and run by tests/deploy/test_replicas.py, and the full-size run in
docs/rollouts.md used them). Two real digits CNNs that disagree on some inputs.

And the checks themselves fail on what they look for: a user switched without a bucket move, a
wrong split, an answer whose label is not the version's, a 503, shadow counts that do not add up.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from loadtests import rollout_bench as rb

REQUESTS = 1000  # per step: the random half's split has sigma ~1.1 pp at 50/50
TOLERANCE_PP = 5.0  # 4.5 sigma at 50/50; a policy ignored is off by 10 to 100 pp


@pytest.fixture(scope="module")
def versions(trained_digits_run, tmp_path_factory) -> dict[str, Path]:
    return rb.make_versions(tmp_path_factory.mktemp("rollout-versions"), trained_digits_run / "best.pt")


@pytest.mark.slow
def test_rollout_under_load_in_one_process_and_two_replicas(versions, tmp_path) -> None:
    args = argparse.Namespace(replicas=2, runner="process", image="", clients=8, requests=REQUESTS,
                              exact_requests=200, tolerance_pp=TOLERANCE_PP, out=tmp_path)
    try:
        results = rb.run(versions, ["process", "replicas"], args)
    except Exception:  # the servers' logs say why (a stalled worker dumps its stacks there: service/stall.py)
        for log in sorted(tmp_path.glob("**/*.log")):
            print(f"== {log}\n{log.read_text(errors='replace')[-8000:]}")
        raise
    print("\n" + rb.table(results))
    saved = json.loads((tmp_path / "rollout.json").read_text())
    assert [r["target"] for r in saved["results"]] == ["1 process", "2 replicas (process) + HAProxy"]
    assert 0 < saved["inputs"]["disagree"] < saved["inputs"]["n"], "the shadow check needs both kinds of input"
    for res in results:
        steps = res["steps"]
        assert [tuple(s["weights"]) for s in steps] == list(rb.STEPS)
        for s in steps:
            assert s["failed"] == [], (res["target"], s["weights"], s["failed"])
            assert s["requests"] >= REQUESTS and s["non2xx"] == s["non2xx_switching"] == 0
            assert s["policy_took_s"] < 2.0, "the file is re-read within 2 s"
        # Sticky users move exactly when their bucket does: 10, 40, 50, then all 100 buckets.
        assert [s["users_moved"] for s in steps] == [0, 10, 40, 50, 100]
        assert [s["users_allowed_to_move"] for s in steps] == [0, 10, 40, 50, 100]
        assert res["non2xx"] == {}
        whole = res["shadow_whole_run"]
        assert whole["ok"] and whole["compared"] + whole["shed"] == whole["v1_answers"] > 0, whole
        assert 0 < whole["offline_agreement"] < 1
        one = res["shadow_one_client"]
        assert one["exact"] and one["compared"] >= 200 and one["agreed"] == one["expected_agreed"], one
        assert res["ok"]


# -- the checks fail on what they look for ---------------------------------------------------------
INPUTS = [rb.Input(b"", {"v1": "1", "v2": "1"}), rb.Input(b"", {"v1": "2", "v2": "7"})]


def answers(weights: tuple[int, int], n: int = 400) -> list[rb.Sent]:
    """What a correct service answers: tracked users by bucket, the others split exactly by the weights."""
    pol, users = rb.parsed(weights), rb.tracked_users()
    out = []
    for i in range(n):
        user = users[(i // 2) % len(users)] if i % 2 == 0 else None
        v = pol.version_for_bucket(rb.bucket(user)) if user else ("v1" if (i // 2) % 100 < weights[0] else "v2")
        out.append(rb.Sent(i, i % 2, user, float(i), 200, v, v, INPUTS[i % 2].labels[v]))
    return out


def report(sent, weights=(90, 10), before=None, before_weights=None, shadow=None):
    w = rb.Window(weights, 0.0, 0.0)
    v1 = sum(s.version == "v1" for s in sent)
    agreed = sum(INPUTS[s.input].agree for s in sent if s.version == "v1")
    w.shadow_before, w.shadow_after = dict.fromkeys(rb.SHADOW_SERIES, 0.0), shadow or \
        {"compared": v1, "agreed": agreed, "shed": 0}
    r = rb.step_report(w, sent, [], INPUTS, 0, before, rb.parsed(before_weights) if before_weights else None)
    r["failed"] = rb.failed_checks(r, 2.0)
    return r


def test_a_correct_step_passes() -> None:
    first = report(answers((100, 0)), (100, 0))
    r = report(answers((90, 10)), before=first["_now"], before_weights=(100, 0))
    assert r["failed"] == [] and r["users_moved"] == r["users_allowed_to_move"] == 10
    assert r["shadow"]["exact"]


def test_a_user_switched_without_a_bucket_move_fails() -> None:
    before = report(answers((90, 10)))["_now"]
    sent = answers((90, 10))
    stay = next(s for s in sent if s.user and s.version == "v1")
    for s in sent:
        if s.user == stay.user:
            s.version = s.body_version = "v2"
            s.label = INPUTS[s.input].labels["v2"]
    r = report(sent, before=before, before_weights=(90, 10))
    assert {"users_off_bucket", "users_moved_unexpectedly"} <= set(r["failed"]), r["failed"]


def test_a_split_off_the_weights_fails() -> None:
    r = report(answers((50, 50)), (90, 10))
    assert "split" in r["failed"] and r["max_off_pp"] == pytest.approx(40.0, abs=1)


def test_a_non_2xx_a_wrong_label_and_a_header_mismatch_fail() -> None:
    sent = answers((90, 10))
    sent[1].status = 503
    sent[3].label = "0"
    sent[5].body_version = "v9"
    assert {"non2xx", "wrong_label", "header_body_mismatch"} <= set(report(sent)["failed"])


def test_shadow_counts_that_do_not_add_up_fail() -> None:
    sent = answers((90, 10))
    v1 = sum(s.version == "v1" for s in sent)
    agreed = sum(INPUTS[s.input].agree for s in sent if s.version == "v1")
    assert "shadow" in report(sent, shadow={"compared": v1, "agreed": agreed - 5, "shed": 0})["failed"]
    assert "shadow" in report(sent, shadow={"compared": v1 - 50, "agreed": agreed, "shed": 0})["failed"]
    ok = report(sent, shadow={"compared": v1 - 50, "agreed": agreed - 25, "shed": 50})
    assert "shadow" not in ok["failed"] and not ok["shadow"]["exact"]
