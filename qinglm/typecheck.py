"""Strict types and ranges for the fields of config dataclasses: what a flag, a config file or a run's
config.json may hold.

Python never checks annotations, so d_model "128" from a JSON file would otherwise fail deep inside
the model with a TypeError. int fields refuse bool, text and floats (10000.0 too); float fields take ints.
A number field declares its range once, as an interval in its metadata (``within="(0, 1]"``); NaN and
infinity are refused for every float field, declared or not. The error names the command-line flag.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import re
import reprlib
from typing import Any, get_args, get_origin, get_type_hints

from qinglm.errors import QingLMError


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


@functools.cache
def ranges(cls: type) -> dict[str, str]:
    """Return {field: its interval} of the dataclass cls; a field a subclass redeclares (a new default or
    help) keeps the range a base class gave it."""
    out: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if dataclasses.is_dataclass(base):
            for f in dataclasses.fields(base):
                if "within" in f.metadata:
                    out[f.name] = f.metadata["within"]
    return out


def _expected(value: Any, tp: Any) -> str | None:
    """Return what a field annotated tp must hold when value does not fit it, else None."""
    if value is None and type(None) in get_args(tp):
        return None
    if get_origin(tp) is not None and type(None) in get_args(tp):  # X | None: check X
        tp = next(a for a in get_args(tp) if a is not type(None))
    if tp is bool:
        return None if isinstance(value, bool) else "true or false"
    if tp in (int, float):
        fits = numbers.Integral if tp is int else numbers.Real  # 10000.0 is not an integer
        ok = isinstance(value, fits) and not isinstance(value, bool)  # bool is an int to Python only
        return None if ok else "an integer" if tp is int else "a number"
    if tp is str:
        return None if isinstance(value, str) else "text"
    if get_origin(tp) is list:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        return None if ok else "a list of strings"
    return None


_INTERVAL = re.compile(r"^([\[(])\s*(-?inf|[-+0-9.e]+)\s*,\s*(-?inf|[-+0-9.e]+)\s*([\])])$")


@functools.cache
def interval(spec: str) -> tuple[int | float, int | float, bool, bool]:
    """Return (low, high, low included, high included) of an interval written "[0, 1)", "(0, inf)", ..."""
    m = _INTERVAL.match(spec)
    if not m:
        raise ValueError(f"bad interval {spec!r}")  # a bug in a field's declaration
    low, high = (int(x) if x.lstrip("-").isdigit() else float(x) for x in m.group(2, 3))  # 2**64 - 1 exact
    return low, high, m.group(1) == "[", m.group(4) == "]"


def describe(spec: str) -> str:
    """Return the interval spec in words: "positive", "0 or more", "in [0, 1)"."""
    low, high, with_low, _ = interval(spec)
    if high < math.inf:
        return f"in {spec}"
    if low == -math.inf:
        return "a finite number"
    if low == 0:
        return "0 or more" if with_low else "positive"
    return f"{low:g} or more" if with_low else f"more than {low:g}"


def check_value(flag: str, value: Any, spec: str | None) -> None:
    """Raise QingLMError naming flag when the number value is NaN, infinite or outside the interval spec."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return
    finite = isinstance(value, numbers.Integral) or math.isfinite(value)  # an int past 1e308 is finite
    if spec is None:
        if not finite:
            raise QingLMError(f"{flag} must be a finite number, got {value}")
        return
    low, high, with_low, with_high = interval(spec)
    above = value >= low if with_low else value > low
    below = value <= high if with_high else value < high
    if not (finite and above and below):
        raise QingLMError(f"{flag} must be {describe(spec)}, got {reprlib.repr(value)}")  # 10**400 cut short


def check_types(cfg: Any) -> None:
    """Raise QingLMError naming the first field of the config dataclass cfg whose value has the wrong type
    or lies outside the field's declared range (metadata "within"); NaN and infinity are never allowed."""
    hints, within = _field_types(type(cfg)), ranges(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        want = _expected(value, hints[f.name])
        if want is None:
            check_value(f"--{f.name.replace('_', '-')}", value, within.get(f.name))
            continue
        if isinstance(value, str) and want in ("an integer", "a number"):
            # PyYAML reads 1e-3 (no dot) as text; 1.0e-3 is a number
            yaml = "; in YAML write 1.0e-3, not 1e-3" if want == "a number" else ""
            raise QingLMError(f"{f.name} must be {want}, got the text {value!r:.40} (drop the quotes{yaml})")
        raise QingLMError(f"{f.name} must be {want}, got {reprlib.repr(value)}")
