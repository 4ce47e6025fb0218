"""Typed, range-checked option dataclasses: the rules every recipe table is checked against.

A field's allowed values are declared ONCE, beside the field, as dataclass metadata:

    rounds: int = option(1, "[1, 1000]")                 # an interval; inf allowed as a bound
    schedule: str = option("iterative", choices=("iterative", "gradual"))

and its type comes from the annotation. `check_table(cls, table, where)` then rejects, before any
work starts and naming the key: a wrong type (a string "2" for a number, 2.5 for an integer, a list
for a number, true for a number), NaN or infinite floats, values outside the interval, and unknown
choices. Classes whose fields carry no metadata (e.g. toolchain.train.TrainConfig, owned by the
training loop) get their rules from `EXTRA_RULES` (registered with `declare_rules`).
The reference docs/recipes.md is generated from the same rules (tools/recipe_reference.py).
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import re
import types
import typing
from dataclasses import dataclass

_MISSING = dataclasses.MISSING


@dataclass(frozen=True)
class Interval:
    lo: float
    hi: float
    lo_open: bool
    hi_open: bool
    text: str

    @classmethod
    def parse(cls, text: str) -> "Interval":
        m = re.fullmatch(r"\s*([\[(])\s*([^,]+?)\s*,\s*([^,]+?)\s*([\])])\s*", text)
        if not m:
            raise ValueError(f"bad interval {text!r}")

        def num(s):
            s = s.replace("2**", "2^")
            if s in ("inf", "+inf"):
                return math.inf
            if s == "-inf":
                return -math.inf
            if s.startswith("2^"):
                return 2 ** int(s[2:])
            return float(s)

        return cls(num(m[2]), num(m[3]), m[1] == "(", m[4] == ")", text.strip())

    def describe(self) -> str:
        """'>= 0' / '> 0' for a half-line, else the interval as written ('[1, 1000]', '(0, 1]')."""
        if self.hi == math.inf and self.lo != -math.inf:
            lo = int(self.lo) if float(self.lo).is_integer() else self.lo
            return f"{'>' if self.lo_open else '>='} {lo}"
        return self.text

    def __contains__(self, v) -> bool:
        lo_ok = v > self.lo if self.lo_open else v >= self.lo
        hi_ok = v < self.hi if self.hi_open else v <= self.hi
        return lo_ok and hi_ok


def option(default=_MISSING, range: str | None = None, choices: tuple | None = None, doc: str = ""):
    """A dataclass field with its allowed values (see the module docstring)."""
    meta = {}
    if range is not None:
        meta["range"] = Interval.parse(range)
    if choices is not None:
        meta["choices"] = tuple(choices)
    if doc:
        meta["doc"] = doc
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


EXTRA_RULES: dict[type, dict[str, dict]] = {}


def declare_rules(cls: type, **rules: dict) -> None:
    """Rules for the fields of a dataclass declared elsewhere: name={"range": "[0, inf)"} or {"choices": (...)}."""
    out = {}
    for name, r in rules.items():
        r = dict(r)
        if "range" in r and isinstance(r["range"], str):
            r["range"] = Interval.parse(r["range"])
        out[name] = r
    EXTRA_RULES[cls] = out


def rules(cls: type, f: dataclasses.Field) -> dict:
    return {**EXTRA_RULES.get(cls, {}).get(f.name, {}), **dict(f.metadata)}


def field_types(cls: type) -> dict[str, object]:
    return typing.get_type_hints(cls)


def _alternatives(tp) -> tuple:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return typing.get_args(tp)
    return (tp,)


def type_name(tp) -> str:
    names = []
    for alt in _alternatives(tp):
        if alt is type(None):
            names.append("none")
        else:
            origin = typing.get_origin(alt) or alt
            names.append({int: "integer", float: "number", bool: "true/false", str: "string", list: "list",
                          dict: "table"}.get(origin, getattr(origin, "__name__", str(origin))))
    return " or ".join(names)


def _fits(value, tp) -> bool:
    for alt in _alternatives(tp):
        origin = typing.get_origin(alt) or alt
        if alt is type(None):
            if value is None:
                return True
        elif origin is bool:
            if isinstance(value, bool):
                return True
        elif origin is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return True
        elif origin is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return True
        elif origin in (list, tuple):
            if isinstance(value, (list, tuple)):
                return True
        elif isinstance(origin, type) and isinstance(value, origin):
            return True
    return False


def check_value(cls: type, f: dataclasses.Field, value, where: str, types_=None) -> None:
    """Raise ValueError naming the key unless `value` has the field's type and is in its allowed range."""
    tp = (types_ or field_types(cls))[f.name]
    r = rules(cls, f)
    if not _fits(value, tp):
        raise ValueError(f"{where}{f.name} must be {type_name(tp)}{_allowed(r)}, not {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}{f.name} must be a finite number{_allowed(r)}, not {value!r}")
    if "range" in r and isinstance(value, (int, float)) and not isinstance(value, bool) and value not in r["range"]:
        raise ValueError(f"{where}{f.name} must be {_in(r['range'])}, not {value!r}")
    if "choices" in r and value is not None and value not in r["choices"]:
        raise ValueError(f"{where}unknown {f.name} {value!r}: {f.name} must be one of "
                         f"{', '.join(map(repr, r['choices']))}")


def _in(iv: Interval) -> str:
    d = iv.describe()
    return d if d.startswith(">") else f"in {d}"


def _allowed(r: dict) -> str:
    if "range" in r:
        return f" {_in(r['range'])}"
    if "choices" in r:
        return f" ({', '.join(map(repr, r['choices']))})"
    return ""


def check_table(cls: type, table: dict, where: str = "") -> None:
    """Every key of `table` against the field rules of dataclass `cls` (unknown keys are left to the caller)."""
    hints = field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k, v in table.items():
        if k in fields:
            check_value(cls, fields[k], v, where, hints)


def field_docs(cls: type) -> dict[str, str]:
    """Each field's description: its metadata doc, else the comment after it in the class source."""
    out = {}
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        src = ""
    for f in dataclasses.fields(cls):
        doc = f.metadata.get("doc", "") or EXTRA_RULES.get(cls, {}).get(f.name, {}).get("doc", "")
        if not doc:
            m = re.search(rf"^\s+{re.escape(f.name)}\s*:[^\n#]*#\s*(.+)$", src, re.M)
            doc = m[1].strip() if m else ""
        out[f.name] = doc
    return out


def describe_rules(cls: type, f: dataclasses.Field) -> str:
    r = rules(cls, f)
    if "range" in r:
        return r["range"].describe()
    if "choices" in r:
        return ", ".join(f"`{c}`" if isinstance(c, str) else repr(c) for c in r["choices"])
    return ""
