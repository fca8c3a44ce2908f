"""Corpus files as byte streams: which format a name says (.jsonl, .txt.gz, .jsonl.zst, ...), opened
with streaming decompression, so a compressed file is never held whole in memory."""

from __future__ import annotations

import gzip
import io
import zlib
from pathlib import Path
from typing import BinaryIO

from qinglm.errors import QingLMError

FORMATS = (".txt", ".jsonl", ".json", ".parquet")
COMPRESSIONS = (".gz", ".zst")
_CHUNK = 1 << 16  # compressed bytes fed to the decoder at a time: bounds what one read can expand to


class CorruptInput(Exception):
    """A compressed stream that ends early or holds bad data; raised while it is being read."""


def format_of(path: Path) -> str | None:
    """Return ".txt", ".jsonl", ".json" or ".parquet" for a corpus file (also under .gz / .zst), else None."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        inner = suffixes[0] if len(suffixes) == 2 else ""
        return inner if inner in FORMATS and inner != ".parquet" else None
    return suffixes[-1] if suffixes and suffixes[-1] in FORMATS else None


def open_binary(path: Path) -> BinaryIO:
    """Return `path` opened for reading its (decompressed) bytes; reads raise CorruptInput on bad data."""
    try:
        suffix = path.suffix.lower()
        if suffix == ".gz":
            return io.BufferedReader(_Checked(gzip.open(path, "rb")), _CHUNK)
        if suffix == ".zst":
            return io.BufferedReader(_ZstdReader(path), _CHUNK)
        return open(path, "rb")
    except OSError as e:
        raise QingLMError(
            f"cannot read {path} ({e.strerror or e}); check the path and its permissions"
        ) from None


def stream_size(path: Path) -> int:
    """Return the number of (decompressed) bytes in `path`; reading stops early at corrupt data."""
    if path.suffix.lower() not in COMPRESSIONS:
        return path.stat().st_size
    total = 0
    with open_binary(path) as f:
        try:
            while chunk := f.read(1 << 20):
                total += len(chunk)
        except CorruptInput:
            pass
    return total


class _Checked(io.RawIOBase):
    """A readable stream whose decompression errors become CorruptInput."""

    def __init__(self, inner: BinaryIO):
        self._inner = inner

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            return self._inner.readinto(buffer)
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise CorruptInput(str(e) or type(e).__name__) from None

    def close(self) -> None:
        self._inner.close()
        super().close()


class _ZstdReader(io.RawIOBase):
    """Zstandard frames decompressed as they are read; a stream cut inside a frame is CorruptInput
    (zstandard's own stream reader just stops there, which would hide a truncated download)."""

    def __init__(self, path: Path):
        try:
            import zstandard
        except ImportError:
            raise QingLMError("reading .zst files needs zstandard: pip install zstandard") from None
        self._error = zstandard.ZstdError
        self._file = open(path, "rb")
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = self._dctx.decompressobj()
        self._in_frame = False
        self._pending, self._at = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._at == len(self._pending):
            data = self._file.read(_CHUNK)
            if not data:
                if self._in_frame:
                    raise CorruptInput("the zstd data ends inside a frame (truncated file?)")
                return 0
            self._pending, self._at = self._feed(data), 0
        n = min(len(buffer), len(self._pending) - self._at)
        buffer[:n] = memoryview(self._pending)[self._at : self._at + n]
        self._at += n
        return n

    def _feed(self, data: bytes) -> bytes:
        """Return what `data` decompresses to, starting a new frame wherever one ends."""
        out = []
        try:
            while data:
                out.append(self._obj.decompress(data))
                self._in_frame = not self._obj.eof
                data = self._obj.unused_data if self._obj.eof else b""
                if self._obj.eof:
                    self._obj = self._dctx.decompressobj()
        except self._error as e:
            raise CorruptInput(str(e)) from None
        return b"".join(out)

    def close(self) -> None:
        self._file.close()
        super().close()
