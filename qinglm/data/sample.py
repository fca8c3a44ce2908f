"""An even, reproducible sample of a corpus, bounded in bytes: what the BPE tokenizer is trained on.

The `tokenizers` BPE trainer keeps every distinct pre-token with its pair statistics; on Chinese text
(whole clauses are one pre-token) that costs about 80 bytes of memory per byte of text, measured.
So the trainer sees a sample: each document is kept when a hash of its text falls below
sample_bytes / corpus_bytes, which spreads the sample over the whole corpus (not its first bytes)
and picks the same documents on every run; feeding stops once `sample_bytes` have been fed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from qinglm.data.files import format_of, stream_size
from qinglm.errors import QingLMError
from qinglm.limits import check_bytes, memory_bytes

# The memory the trainer takes per byte it is fed, at least: half the 80 measured on Chinese text, so a
# sample is refused only when it surely cannot fit.
TRAINER_BYTES_PER_BYTE = 40


@dataclass
class SampleStats:
    """What the sample took: documents and UTF-8 bytes kept out of the corpus's (estimated) bytes."""

    corpus_bytes: int = 0
    documents: int = 0
    bytes: int = 0

    def summary(self) -> str:
        """Return one human line, e.g. 'tokenizer sample: 12,345 documents, 33,554,000 bytes of about
        1,073,741,824 bytes of text'."""
        return (
            f"tokenizer sample: {self.documents:,} documents, {self.bytes:,} bytes "
            f"of about {self.corpus_bytes:,} bytes of text"
        )


def corpus_bytes(specs: Iterable[str]) -> int:
    """Return about how many bytes of text `specs` (built-in corpus names or paths) hold: file sizes,
    decompressed sizes for .gz/.zst, the uncompressed size of every column for .parquet (an
    overestimate when it has other columns), UTF-8 bytes for built-in corpora."""
    from qinglm.data.builtin import builtin_documents, is_builtin
    from qinglm.data.sources import expand_paths

    total = 0
    for spec in specs:
        if is_builtin(spec):
            total += sum(len(doc.encode("utf-8")) for doc in builtin_documents(spec))
            continue
        for path in expand_paths(spec):
            total += _parquet_bytes(path) if format_of(path) == ".parquet" else stream_size(path)
    return total


def _parquet_bytes(path: Path) -> int:
    """Return the uncompressed data size recorded in a parquet file's metadata (0 when unreadable)."""
    try:
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(path).metadata
        return sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    except Exception:  # an unreadable file is reported, in one line, when its documents are read
        return 0


def sample_documents(
    docs: Iterable[str], corpus_size: int, sample_bytes: int, stats: SampleStats | None = None
) -> Iterator[str]:
    """Return an iterator over the documents of `docs` whose hash falls below sample_bytes / corpus_size,
    stopping before `sample_bytes` UTF-8 bytes are exceeded; every document when the corpus is small."""
    if sample_bytes < 1:  # checked now, not when the trainer first asks for a document
        raise QingLMError(f"the tokenizer sample must be at least 1 byte, got {sample_bytes}")
    fed = min(sample_bytes, corpus_size) if corpus_size else sample_bytes  # a small corpus is fed whole
    what = f"a tokenizer sample of {fed:,} bytes (--tokenizer-sample-bytes; {TRAINER_BYTES_PER_BYTE} bytes per byte)"
    check_bytes(TRAINER_BYTES_PER_BYTE * fed, what, memory_bytes())  # refused before the trainer starts
    stats = stats if stats is not None else SampleStats()
    stats.corpus_bytes = corpus_size
    return _sample(docs, corpus_size, sample_bytes, stats)


def _sample(docs: Iterable[str], corpus_size: int, sample_bytes: int, stats: SampleStats) -> Iterator[str]:
    """Yield the sample that sample_documents describes, counting it in `stats`."""
    threshold = min(1.0, sample_bytes / max(corpus_size, 1)) * 2**64
    for doc in docs:
        raw = doc.encode("utf-8", errors="surrogatepass")
        if threshold < 2**64 and int.from_bytes(_hash(raw), "little") >= threshold:
            continue
        if stats.bytes + len(raw) > sample_bytes and stats.documents:
            return
        stats.documents += 1
        stats.bytes += len(raw)
        yield doc


def _hash(raw: bytes) -> bytes:
    """Return 8 bytes of a keyed hash, independent of the crc32 that splits train from val."""
    return hashlib.blake2b(raw, digest_size=8, person=b"qinglm-sample").digest()
