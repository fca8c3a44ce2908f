"""Strict types for the fields of config dataclasses: what a config file or a run's config.json may hold.

Python never checks annotations, so d_model "128" from a JSON file would otherwise fail deep inside
the model with a TypeError. int fields refuse bool, text and floats (10000.0 too); float fields take ints.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import reprlib
from typing import Any, get_args, get_origin, get_type_hints

from qinglm.errors import QingLMError


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


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


def check_types(cfg: Any) -> None:
    """Raise QingLMError naming the first field of the config dataclass cfg whose value has the wrong type."""
    hints = _field_types(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        want = _expected(value, hints[f.name])
        if want is None:
            continue
        if isinstance(value, str) and want in ("an integer", "a number"):
            # PyYAML reads 1e-3 (no dot) as text; 1.0e-3 is a number
            yaml = "; in YAML write 1.0e-3, not 1e-3" if want == "a number" else ""
            raise QingLMError(f"{f.name} must be {want}, got the text {value!r:.40} (drop the quotes{yaml})")
        raise QingLMError(f"{f.name} must be {want}, got {reprlib.repr(value)}")
