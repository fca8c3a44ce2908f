"""Which codec a text file is in (BOMs, BOM-less UTF-16, UTF-8 or GB18030; binary files refused), and
its lines read with bounded memory and right line numbers."""

from __future__ import annotations

import codecs
import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, TextIO

from qinglm.data.files import CorruptInput, open_binary
from qinglm.errors import QingLMError

# Encoding detection (and txt mode "auto") look at this much of each file, so huge files stay fast.
SAMPLE_BYTES = 1 << 20
UNDECODABLE = "qinglm-undecodable"  # the decoding error handler below: bad bytes become lone surrogates
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
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
    else UTF-8 or GB18030 (a superset of GBK and GB2312), whichever leaves fewer lines with
    undecodable bytes (UTF-8 on a tie).  `truncated` says `raw` is only the start of a file, so
    a multi-byte character cut at its end is not an error.  Raises QingLMError when the bytes look
    binary: NUL bytes, control characters, or most lines undecodable in every codec.  A few bad
    lines do not make a file binary: they are skipped and counted wherever they are (one rule).
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
    shares = {codec: _bad_line_share(raw, codec, final) for codec in ("utf-8", "gb18030")}
    codec = min(shares, key=shares.__getitem__)  # the first, UTF-8, on a tie
    bad = shares[codec]
    if bad > 0.5:
        raise _binary_error(name, "most of its lines are neither UTF-8, UTF-16 nor GB18030")
    if _mostly_control(_decode(raw, codec, final)):
        raise _binary_error(name, "it is full of control characters")
    return codec


def check_codec(raw: bytes, codec: str, *, truncated: bool, name: str) -> None:
    """Return nothing; raise QingLMError when most lines of `raw` do not decode with `codec`."""
    bad = _bad_line_share(raw, codec, not truncated)
    if bad > 0.5:
        lines = _decode(raw, codec, not truncated).splitlines()
        first = next(i for i, line in enumerate(lines, 1) if LONE_SURROGATE.search(line))
        raise QingLMError(
            f"cannot decode {name} as {codec}: line {first} and {bad:.0%} of the lines in its first MB "
            f"hold bytes that are not {codec}; pass the right --encoding, or leave it out to detect it"
        )


def _bad_line_share(raw: bytes, codec: str, final: bool) -> float:
    """Return the share of non-blank lines of `raw` that hold bytes `codec` cannot decode."""
    lines = [line for line in _decode(raw, codec, final).splitlines() if line.strip()]
    if not lines:
        return 0.0
    return sum(1 for line in lines if LONE_SURROGATE.search(line)) / len(lines)


def _binary_error(name: str, why: str) -> QingLMError:
    """Return the error for a file that does not look like text."""
    return QingLMError(f"{name} looks like a binary file ({why}); pass --encoding if it is text")


def _decode(raw: bytes, codec: str, final: bool) -> str:
    """Return `raw` decoded with `codec`, each undecodable byte as a lone surrogate."""
    return codecs.getincrementaldecoder(codec)(errors=UNDECODABLE).decode(raw, final=final)


def _escape_undecodable(e: UnicodeError) -> tuple[str, int]:
    """Return each undecodable byte as a lone surrogate: surrogateescape, also for bytes below 0x80
    (a broken UTF-16 pair has one), which surrogateescape itself refuses by raising."""
    if not isinstance(e, UnicodeDecodeError):
        raise e
    return "".join(chr(0xDC00 + b) for b in e.object[e.start : e.end]), e.end


codecs.register_error(UNDECODABLE, _escape_undecodable)


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
    bad = _bad_line_share(raw, codec, final)
    return codec if bad <= 0.5 and not _mostly_control(_decode(raw, codec, final)) else None


def open_text(path: Path, encoding: str | None) -> TextIO:
    """Return `path` (decompressed) opened as text with the given or detected encoding.

    Undecodable bytes come back as lone surrogates (U+DC00 + byte), whichever way the
    codec was chosen, so the reader can skip and count the lines that hold them.
    """
    with open_binary(path) as f:
        raw, truncated = _read_sample(f, path)
    name = str(path)
    if encoding is None:
        encoding = detect_encoding(raw, truncated=truncated, name=name)
    else:
        check_codec(raw, encoding, truncated=truncated, name=name)
    return io.TextIOWrapper(open_binary(path), encoding=encoding, errors=UNDECODABLE, newline=None)


def _read_sample(f: BinaryIO, path: Path) -> tuple[bytes, bool]:
    """Return (up to SAMPLE_BYTES from f, whether f holds more or breaks off); raise if nothing is
    readable."""
    parts, size = [], 0
    try:  # read1: one raw read each, so what came before a break is not dropped with the error
        while size <= SAMPLE_BYTES and (chunk := f.read1(min(1 << 16, SAMPLE_BYTES + 1 - size))):
            parts.append(chunk)
            size += len(chunk)
    except CorruptInput as e:
        if not parts:
            raise QingLMError(f"cannot decompress {path} ({e}); download or compress it again") from None
        return b"".join(parts)[:SAMPLE_BYTES], True
    return b"".join(parts)[:SAMPLE_BYTES], size > SAMPLE_BYTES


def read_lines(path: Path, encoding: str | None, limit: int) -> Iterator[tuple[int, str, bool]]:
    """Yield (line number, text, more) for each line of `path`, newlines made "\\n", a leading BOM
    dropped; a line longer than `limit` characters comes in pieces, `more` True on all but the last.

    Memory stays bounded by `limit` whatever the line lengths.  Raises CorruptInput where a
    compressed file breaks off.
    """
    number, more = 0, False
    with open_text(path, encoding) as f:
        while piece := f.readline(limit):
            if not more:
                number += 1
                if number == 1:
                    piece = piece.lstrip("\ufeff")
            more = len(piece) >= limit and not piece.endswith("\n")
            yield number, piece, more


def whole_lines(path: Path, encoding: str | None, limit: int) -> Iterator[tuple[int, str | None]]:
    """Yield (line number, text) for each line of `path` as read_lines does; text is None, once, for a
    line longer than `limit` characters, which is read past in pieces and never held whole."""
    skipping = False
    for number, piece, more in read_lines(path, encoding, limit):
        if skipping or more:
            if not skipping:
                yield number, None
            skipping = more
            continue
        yield number, piece
