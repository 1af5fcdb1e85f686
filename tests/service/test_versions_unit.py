"""service/versions.py in-process: which version answers, what may be removed, what the policy keeps.
(The served behaviour is tests/service/test_rollouts.py's, against a real server.)"""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from service.errors import Refused
from service.traffic import parse_text
from service.versions import Versions


@dataclass
class Model:  # what Versions reads of a ServedModel
    name: str
    version: str


def _served(*labels: str) -> tuple[Versions, dict]:
    defaults: dict = {}
    v = Versions(defaults)
    for label in labels:
        v.add(Model("digits", label))
    return v, defaults


def _policy(v: Versions, text: str) -> None:
    v.set_policies(parse_text(text, v.served()), "api")


def test_the_newest_version_is_the_default_and_an_unknown_one_is_a_404_listing_the_served():
    v, defaults = _served("v1", "v2")
    assert defaults["digits"].version == "v2" and v.choose("digits").live.version == "v2"
    with pytest.raises(Refused) as e:
        v.get("digits", "v9")
    assert e.value.status == 404 and "served versions: v1, v2" in str(e.value) and e.value.extra == {"versions": ["v1", "v2"]}
    with pytest.raises(Refused, match="unknown model 'cats'; served models: digits"):
        v.choose("cats")


def test_a_named_version_wins_over_the_weights_and_the_shadow_never_shadows_itself():
    v, _ = _served("v1", "v2")
    _policy(v, "digits: {weights: {v1: 100, v2: 0}, shadow: {version: v2, fraction: 1.0}}")
    c = v.choose("digits", rand=lambda: 0.5)
    assert (c.live.version, c.shadow.version) == ("v1", "v2")
    c = v.choose("digits", "v2")
    assert c.live.version == "v2" and c.shadow is None
    _policy(v, "digits: {weights: {v1: 100, v2: 0}, shadow: {version: v2, fraction: 0.25}}")
    assert v.choose("digits", rand=lambda: 0.3).shadow is None and v.choose("digits", rand=lambda: 0.2).shadow


def test_the_sticky_header_is_read_from_the_request():
    v, _ = _served("v1", "v2")
    _policy(v, "digits: {weights: {v1: 50, v2: 50}, sticky: X-User-Id}")
    from service.traffic import bucket

    for user in ("ann", "bob", "cy", "dee"):
        want = "v1" if bucket(user) < 50 else "v2"
        headers = [(b"x-user-id", user.encode())]
        assert {v.choose("digits", headers=headers).live.version for _ in range(20)} == {want}


def test_a_version_with_traffic_is_not_removed_and_one_with_weight_0_leaves_the_policy():
    v, defaults = _served("v1", "v2", "v3")
    _policy(v, "digits: {weights: {v1: 90, v2: 10, v3: 0}, shadow: {version: v1}}")
    for held in (["v1"], ["v2"], ["v1", "v2", "v3"]):
        with pytest.raises(Refused) as e:
            v.pinned("digits", held)
        assert e.value.status == 409 and e.value.kind == "version_in_use"
    v.pinned("digits", ["v3"])
    v.remove("digits", "v3")
    assert v.policies["digits"].weights == (("v1", 90), ("v2", 10)) and defaults["digits"].version == "v2"
    assert v.served() == {"digits": {"v1", "v2"}}


def test_replacing_a_version_returns_the_old_model_and_removing_the_last_forgets_the_name():
    v, defaults = _served("v1")
    old = v.by_name["digits"]["v1"]
    new = Model("digits", "v1")
    assert v.add(new) is old and v.is_served(new) and not v.is_served(old)
    v.remove("digits", "v1")
    assert v.by_name == {} and defaults == {}
