"""This machine's memory, and the one check of a size against it (torch-free, so data tools use it too)."""

from __future__ import annotations

import os

from qinglm.errors import QingLMError


def memory_bytes() -> int | None:
    """Return this machine's physical memory in bytes, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_bytes(need: int, what: str, ram: int | None) -> None:
    """Return None; raise QingLMError naming what when need bytes are more than ram (memory_bytes(); None,
    where the OS does not say, checks nothing)."""
    if ram is not None and need > ram:
        raise QingLMError(
            f"{what} needs at least {need / 2**30:,.1f} GiB, more than this machine's {ram / 2**30:.1f} GiB; "
            "make it smaller"
        )
