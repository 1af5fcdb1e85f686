"""The one registry idiom (imgformat/registry.py) every stage extends by."""
import pytest

from imgformat.registry import Registry


class Unknown(ValueError):
    pass


def test_register_get_and_names():
    r: Registry = Registry("widget")
    assert r.register("b")(int) is int  # the decorator hands back what it decorates
    r.add("a", str)
    assert r.get("a") is str and r.names() == ["a", "b"]
    assert Registry("w", keep_order=True).names() == []
    ordered = Registry("w", keep_order=True)
    ordered.add("z", 1), ordered.add("a", 2)
    assert ordered.names() == ["z", "a"]


def test_a_name_twice_is_refused_and_the_first_stays():
    r = Registry("widget")
    r.add("a", 1)
    with pytest.raises(KeyError, match="widget 'a' is already registered"):
        r.add("a", 2)
    assert r.get("a") == 1


def test_unknown_names_raise_the_stage_error_listing_the_valid_ones():
    r = Registry("widget")
    r.add("b", 1), r.add("a", 2)
    with pytest.raises(Unknown, match=r"^unknown widget 'c'; valid widgets: auto, a, b$"):
        r.get("c", Unknown, also=("auto",))
    with pytest.raises(KeyError):
        r.get("c")
