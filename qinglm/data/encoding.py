"""Which codec a text file is in: BOMs, BOM-less UTF-16, strict UTF-8, then GB18030; binary files refused."""

from __future__ import annotations

import codecs
import re
from pathlib import Path
from typing import TextIO

from qinglm.errors import QingLMError

# Encoding detection (and txt mode "auto") look at this much of each file, so huge files stay fast.
SAMPLE_BYTES = 1 << 20
_CONTROL_CHARS = re.compile("[\x00-\x08\x0e-\x1a\x1c-\x1f\x7f]")
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),  # before UTF-16 LE: its BOM starts with FF FE too
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def detect_encoding(raw: bytes, *, truncated: bool = False, name: str = "the input") -> str:
    """Return the codec name that decodes `raw`, the first bytes of a text file.

    Order: BOM (UTF-32, UTF-8, UTF-16); UTF-16 without BOM when NUL bytes sit at one parity;
    strict UTF-8; strict GB18030 (a superset of GBK and GB2312).  `truncated` says `raw` is
    only the start of a file, so a multi-byte character cut at its end is not an error.
    Raises QingLMError when the bytes look binary.
    """
    for bom, codec in _BOMS:
        if raw.startswith(bom):
            return codec
    final = not truncated
    if b"\x00" in raw:
        codec = _utf16_without_bom(raw, final)
        if codec is None:
            raise _binary_error(name, "it contains NUL bytes")
        return codec
    for codec in ("utf-8", "gb18030"):
        text = _try_decode(raw, codec, final)
        if text is not None:
            if _mostly_control(text):
                raise _binary_error(name, "it is full of control characters")
            return codec
    raise _binary_error(name, "it is neither UTF-8, UTF-16 nor GB18030")


def _binary_error(name: str, why: str) -> QingLMError:
    """Return the error for a file that does not look like text."""
    return QingLMError(f"{name} looks like a binary file ({why}); pass --encoding if it is text")


def _try_decode(raw: bytes, codec: str, final: bool) -> str | None:
    """Return `raw` decoded strictly with `codec`, or None when it does not decode."""
    try:
        return codecs.getincrementaldecoder(codec)().decode(raw, final=final)
    except UnicodeDecodeError:
        return None


def _mostly_control(text: str) -> bool:
    """Return True when more than 1% of the start of `text` are control characters."""
    sample = text[:65536]
    return len(_CONTROL_CHARS.findall(sample)) > len(sample) / 100


def _utf16_without_bom(raw: bytes, final: bool) -> str | None:
    """Return "utf-16-le"/"utf-16-be" when `raw` looks like BOM-less UTF-16, else None."""
    # ASCII characters in UTF-16 carry a NUL high byte: at odd offsets in LE, even ones in BE.
    # Binary data has NULs at both parities.
    even, odd = raw[0::2].count(0), raw[1::2].count(0)
    if odd >= 0.95 * (even + odd):
        codec = "utf-16-le"
    elif even >= 0.95 * (even + odd):
        codec = "utf-16-be"
    else:
        return None
    text = _try_decode(raw, codec, final)
    return codec if text is not None and not _mostly_control(text) else None


def open_text(path: Path, encoding: str | None) -> TextIO:
    """Return `path` opened for reading text with the given or detected encoding."""
    try:
        if encoding is not None:
            # The user chose the codec: decode strictly so a wrong choice is reported, not skipped.
            return open(path, encoding=encoding, errors="strict", newline=None)
        with open(path, "rb") as f:
            raw = f.read(SAMPLE_BYTES)
            truncated = bool(f.read(1))
        codec = detect_encoding(raw, truncated=truncated, name=str(path))
        return open(path, encoding=codec, errors="surrogateescape", newline=None)
    except OSError as e:  # unreadable: permissions, a vanished file
        raise QingLMError(
            f"cannot read {path} ({e.strerror or e}); check the path and its permissions"
        ) from None
