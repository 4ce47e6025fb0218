"""toolchain.options: the declared rules of option fields (intervals, choices, types) and their messages."""
import dataclasses
import math

import pytest

from toolchain.options import (EXTRA_RULES, Interval, check_table, check_value, declare_rules, describe_rules,
                               field_docs, option, rules, type_name)


@pytest.mark.parametrize("text, lo, hi, lo_open, hi_open", [
    ("[0, 1]", 0, 1, False, False), ("(0, 1]", 0, 1, True, False), ("[0, 2^32)", 0, 2**32, False, True),
    ("[1, 2**31)", 1, 2**31, False, True), ("(-inf, inf)", -math.inf, math.inf, True, True),
    ("[0.5, +inf)", 0.5, math.inf, False, True)])
def test_interval_parse(text, lo, hi, lo_open, hi_open):
    iv = Interval.parse(text)
    assert (iv.lo, iv.hi, iv.lo_open, iv.hi_open, iv.text) == (lo, hi, lo_open, hi_open, text)
    assert (lo in iv) == (not lo_open) and (hi in iv) == (not hi_open)


@pytest.mark.parametrize("text", ["0, 1", "[0; 1]", "[a, 1]", "[0, 1, 2]"])
def test_interval_parse_rejects(text):
    with pytest.raises(ValueError):
        Interval.parse(text)


@pytest.mark.parametrize("iv, inside, outside", [("(0, 1]", [1e-9, 0.5, 1], [0, 1.0000001, -1]),
                                                 ("[1, 3)", [1, 2, 2.999], [0.999, 3, 4])])
def test_interval_membership(iv, inside, outside):
    iv = Interval.parse(iv)
    assert all(v in iv for v in inside) and not any(v in iv for v in outside)


@dataclasses.dataclass
class Opts:
    n: int = option(2, "[1, 10]")  # a count
    x: float | None = option(None, "(0, 1]", doc="a fraction")
    mode: str = option("a", choices=("a", "b"))  # the mode
    flag: bool = True
    items: list = option([1, 2])
    shape: str | list = "auto"
    table: dict = dataclasses.field(default_factory=dict)


def test_option_metadata_and_defaults():
    f = {f.name: f for f in dataclasses.fields(Opts)}
    assert f["n"].metadata["range"] == Interval.parse("[1, 10]") and f["n"].default == 2
    assert f["mode"].metadata["choices"] == ("a", "b") and "range" not in f["mode"].metadata
    assert f["x"].metadata["doc"] == "a fraction" and f["x"].default is None
    a, b = Opts(), Opts()
    assert a.items == [1, 2] and a.items is not b.items  # a fresh copy per instance
    assert rules(Opts, f["flag"]) == {} and describe_rules(Opts, f["flag"]) == ""
    assert describe_rules(Opts, f["n"]) == "[1, 10]" and describe_rules(Opts, f["mode"]) == "`a`, `b`"
    assert field_docs(Opts) == {"n": "a count", "x": "a fraction", "mode": "the mode", "flag": "", "items": "",
                                "shape": "", "table": ""}


def test_type_names():
    hints = {f.name: f.type for f in dataclasses.fields(Opts)}
    import typing

    hints = typing.get_type_hints(Opts)
    assert [type_name(hints[k]) for k in ("n", "x", "mode", "flag", "items", "shape", "table")] == \
        ["integer", "number or none", "string", "true/false", "list", "string or list", "table"]


@pytest.mark.parametrize("key, value, message", [
    ("n", 2.5, "n must be integer in [1, 10], not 2.5"), ("n", True, "n must be integer in [1, 10], not True"),
    ("n", "3", "n must be integer in [1, 10], not '3'"), ("n", 0, "n must be in [1, 10], not 0"),
    ("n", 11, "n must be in [1, 10], not 11"), ("x", float("nan"), "x must be a finite number in (0, 1], not nan"),
    ("x", float("inf"), "x must be a finite number in (0, 1], not inf"), ("x", 0, "x must be in (0, 1], not 0"),
    ("x", [0.5], "x must be number or none in (0, 1], not [0.5]"),
    ("mode", "c", "unknown mode 'c': mode must be one of 'a', 'b'"),
    ("mode", 1, "mode must be string ('a', 'b'), not 1"), ("flag", 1, "flag must be true/false, not 1"),
    ("items", 3, "items must be list, not 3"), ("shape", 3, "shape must be string or list, not 3"),
    ("table", [], "table must be table, not []")])
def test_check_value_messages(key, value, message):
    with pytest.raises(ValueError) as e:
        check_table(Opts, {key: value}, "")
    assert str(e.value) == message


@pytest.mark.parametrize("key, value", [("n", 1), ("n", 10), ("x", None), ("x", 1), ("x", 0.25), ("mode", "b"),
                                        ("flag", False), ("items", []), ("items", (1,)), ("shape", [2, 3]),
                                        ("table", {"a": 1})])
def test_check_value_accepts(key, value):
    check_table(Opts, {key: value}, "where: ")
    check_value(Opts, next(f for f in dataclasses.fields(Opts) if f.name == key), value, "")


def test_where_prefix_and_unknown_keys_left_alone():
    with pytest.raises(ValueError, match=r"^stage 2: n must be in \[1, 10\], not 0$"):
        check_table(Opts, {"n": 0}, "stage 2: ")
    check_table(Opts, {"not_a_field": object()}, "")


def test_declare_rules_for_a_class_declared_elsewhere():
    @dataclasses.dataclass
    class Plain:
        k: int = 1  # plain field
        s: str = "p"

    declare_rules(Plain, k={"range": "[0, 5]", "doc": "declared elsewhere"}, s={"choices": ("p", "q")})
    try:
        assert isinstance(EXTRA_RULES[Plain]["k"]["range"], Interval)
        assert field_docs(Plain)["k"] == "declared elsewhere" and field_docs(Plain)["s"] == ""
        with pytest.raises(ValueError, match=r"k must be in \[0, 5\], not 6"):
            check_table(Plain, {"k": 6})
        with pytest.raises(ValueError, match="unknown s 'r'"):
            check_table(Plain, {"s": "r"})
        check_table(Plain, {"k": 5, "s": "q"})
    finally:
        del EXTRA_RULES[Plain]


def test_option_builds_fields_at_call_time():
    # (Opts above is built at import; these calls run inside the test)
    ranged = option(3, "[1, 5]")
    assert dict(ranged.metadata) == {"range": Interval.parse("[1, 5]")} and ranged.default == 3
    chosen = option("x", choices=["x", "y"])
    assert dict(chosen.metadata) == {"choices": ("x", "y")}  # a tuple, whatever sequence was given
    plain = option(1)
    assert dict(plain.metadata) == {} and plain.default == 1

    @dataclasses.dataclass
    class Local:
        items: list = option([1, 2])
        table: dict = option({"a": 1})
        pick: str = option("x", choices=("x", "y"))

    a, b = Local(), Local()
    assert a.items == [1, 2] and a.table == {"a": 1} and a.items is not b.items and a.table is not b.table
    check_table(Local, {"pick": "y"})
    with pytest.raises(ValueError, match="^unknown pick 'z': pick must be one of 'x', 'y'$"):
        check_table(Local, {"pick": "z"})


def test_type_names_of_generic_and_other_types():
    assert type_name(dict[str, int]) == "table" and type_name(list[int]) == "list"
    assert type_name(list[int] | None) == "list or none" and type_name(tuple) == "tuple"
    assert type_name(tuple[int, int]) == "tuple" and type_name(Interval) == "Interval"


def test_interval_parse_message_and_minus_infinity():
    with pytest.raises(ValueError, match=r"^bad interval '0, 1'$"):
        Interval.parse("0, 1")
    iv = Interval.parse("[-inf, 0]")
    assert iv.lo == -math.inf and -1e300 in iv and 1 not in iv
