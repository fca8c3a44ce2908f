"""Remove duplicate documents: exact copies (a hash of the normalised text) and near copies (MinHash over
character n-grams, LSH bands, signatures compared), keeping the first of each group.

Two passes over the input, the way corpus-scale pipelines (datatrove's MinHash stages) do it, so memory
does not hold an index of the corpus. Pass 1 writes each document's exact hash, MinHash signature and
LSH band hashes to spill files (720 bytes per document at 128 permutations, 25 bands). Then, one file
at a time, a stable sort finds the documents that share the exact hash with an earlier document (exact
copies) or a band's hash (candidates); a candidate is a near copy when its signature agrees with an
earlier document of the bucket (its first, or one of the LOOKBACK before it) in at least `threshold`
of the permutations: without that check, a corpus with many loosely similar documents loses some to
chance band collisions. Pass 2 reads the input again and yields the rest. Memory: about 100 bytes per
document while a file is sorted (1.3 GB measured for 13.5 million documents), the signatures read from disk.
MinHash signatures come from `rensa` (Rust), chosen over datasketch (pure Python) for speed and memory:
see README, "Deduplicate".
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qinglm.data.parallel import chunked_map
from qinglm.data.sources import normalize_text
from qinglm.errors import QingLMError
from qinglm.typecheck import check_types

EXAMPLES = 3
BATCH = 1 << 14  # documents hashed per rensa call and per spill write
KEEP, EXACT, NEAR = 0, 1, 2
EXAMPLE_CHARS = 200
_NOT_WORD = re.compile(r"[\W_]+")  # whitespace, punctuation and symbols
_SENTENCE_END = re.compile(r"[。！？!?；;\n]+")


def normalise(text: str) -> str:
    """Return text with full-width letters and digits half-width (normalize_text), lower-cased, without
    whitespace, punctuation or symbols: what duplicates are compared on, never what is written."""
    return _NOT_WORD.sub("", normalize_text(text).lower())


def exact_key(text: str) -> int:
    """Return a 64-bit hash of the normalised text."""
    return int.from_bytes(hashlib.blake2b(normalise(text).encode("utf-8"), digest_size=8).digest(), "little")


def shingles(text: str, n: int) -> list[str]:
    """Return the distinct character n-grams of text's normalised sentences (a shorter sentence whole).

    The n-grams do not cross sentence ends, so the same sentences in another order are the same set.
    """
    grams = set()
    for sentence in _SENTENCE_END.split(text):
        s = normalise(sentence)
        grams.update(s[i : i + n] for i in range(max(1 if s else 0, len(s) - n + 1)))
    return list(grams)


def lsh_bands(threshold: float, num_perm: int) -> int:
    """Return the number of LSH bands (of num_perm // bands rows each) that minimises 0.1 x false positives +
    0.9 x false negatives for the Jaccard threshold, as datasketch chooses them with weights (0.1, 0.9):
    a candidate's signature is checked afterwards, so a false positive costs one comparison, a miss is final
    (with equal weights, copies at Jaccard 0.75 were proposed 4 times in 5: benchmarks/dedup_recall.py)."""
    steps = 200
    low = [(i + 0.5) * threshold / steps for i in range(steps)]
    high = [threshold + (i + 0.5) * (1 - threshold) / steps for i in range(steps)]
    best = None
    for b in range(1, num_perm + 1):
        r = num_perm // b
        fp = sum(1 - (1 - s**r) ** b for s in low) * threshold / steps
        fn = sum((1 - s**r) ** b for s in high) * (1 - threshold) / steps
        if best is None or 0.1 * fp + 0.9 * fn < best[0]:
            best = (0.1 * fp + 0.9 * fn, b)
    return best[1]


@dataclass
class DedupConfig:
    """Which duplicates are removed, and how near copies are found."""

    exact: bool = True
    near: bool = True
    ngram: int = field(default=5, metadata={"within": "[1, 1000]"})  # characters per shingle
    # estimated Jaccard similarity of the shingle sets
    threshold: float = field(default=0.6, metadata={"within": "(0, 1]"})
    # MinHash's error falls as 1/sqrt(num_perm): 3% at 1024, and each document's signature grows with it
    num_perm: int = field(default=128, metadata={"within": "[2, 1024]"})
    # LSH bands of num_perm // bands rows each; 0: lsh_bands(threshold, num_perm)
    bands: int = field(default=0, metadata={"within": "[0, 1024]"})
    seed: int = field(default=1, metadata={"within": "[0, 4294967295]"})

    def __post_init__(self) -> None:
        check_types(self)  # each number's type and range
        if self.bands > self.num_perm:
            raise QingLMError(f"bands must be 0 (chosen for the threshold) to num_perm, got {self.bands}")
        if not (self.exact or self.near):
            raise QingLMError("nothing to do: both exact and near-duplicate removal are off")

    def lsh_bands(self) -> int:
        """Return the number of LSH bands used: `bands`, or the one chosen for the threshold (0 without near)."""
        if not self.near:
            return 0
        return self.bands or lsh_bands(self.threshold, self.num_perm)


@dataclass
class DedupReport:
    """Documents read and kept, duplicates removed by kind, with a few examples each."""

    documents: int = 0
    kept: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[dict]] = field(default_factory=dict)

    def drop(self, kind: str, doc: str, of: int) -> None:
        self.dropped[kind] += 1
        shown = self.examples.setdefault(kind, [])
        if len(shown) < EXAMPLES:
            shown.append({"text": doc[:EXAMPLE_CHARS], "copy_of": of})

    def as_dict(self, config: DedupConfig) -> dict:
        return {
            "documents": self.documents,
            "kept": self.kept,
            "dropped": {k: self.dropped[k] for k in ("exact", "near") if getattr(config, k)},
            "examples": self.examples,
            "config": vars(config) | {"bands": config.lsh_bands()},  # the bands used
        }


def _rensa():
    try:
        import rensa
    except ImportError:
        raise QingLMError(
            "near-duplicate removal needs rensa: pip install 'qinglm[data]' (or pip install rensa), "
            "or pass --no-near for exact duplicates only"
        ) from None
    return rensa


def dedup_documents(
    read: Callable[[], Iterable[str]],
    config: DedupConfig,
    report: DedupReport,
    tmp_dir: str | None = None,
    workers: int = 1,
) -> Iterator[str]:
    """Return an iterator over the documents of read() that are no copy of an earlier one, counting in
    report. read() is called twice and must give the same documents both times; the spill files go to a
    temporary directory in tmp_dir (default: the system's, $TMPDIR) and are removed afterwards; with
    workers > 1 the hashes are computed in that many processes. A dropped document's example names the
    input document (numbered from 0) it copies."""
    if config.near:
        _rensa()  # a missing package is reported before any output
    return _deduped(read, config, report, tmp_dir, workers)


def _deduped(
    read, config: DedupConfig, report: DedupReport, tmp_dir: str | None, workers: int
) -> Iterator[str]:
    try:
        spill_dir = tempfile.TemporaryDirectory(prefix="qinglm-dedup-", dir=tmp_dir)
    except OSError as e:
        raise QingLMError(
            f"cannot make a spill directory in {tmp_dir or tempfile.gettempdir()}: {e}"
        ) from None
    with spill_dir as spill:
        files = _spill(read(), config, Path(spill), workers)
        n = files[0].stat().st_size // 8
        verdict, copy_of = np.zeros(n, dtype=np.uint8), np.zeros(n, dtype=np.int64)
        if config.exact:
            _mark_copies(np.fromfile(files[0], dtype=np.uint64), verdict, copy_of)
        if config.near and n:
            sigs = _Signatures(files[1], config.num_perm)
            for path in files[2:]:
                keys = np.fromfile(path, dtype=np.uint64)
                _mark_near_copies(keys, sigs, config.threshold, verdict, copy_of)
    names = {EXACT: "exact", NEAR: "near"}
    i = -1
    for i, doc in enumerate(read()):
        if i >= n:
            break
        report.documents += 1
        if verdict[i] == KEEP:
            report.kept += 1
            yield doc
        else:
            report.drop(names[int(verdict[i])], doc, int(copy_of[i]))
    if i + 1 != n:
        raise QingLMError(f"the input changed while it was deduplicated: {n:,} documents, then {i + 1:,}")


def _spill(docs: Iterable[str], config: DedupConfig, spill: Path, workers: int) -> list[Path]:
    """Return the spill files written from docs: exact hashes, then one file of hashes per LSH band."""
    bands = config.lsh_bands()
    paths = [spill / "exact.u64"] + [spill / "minhash.u32"] * bool(bands)
    paths += [spill / f"band{j:03d}.u64" for j in range(bands)]
    outs = [open(p, "wb") for p in paths]
    try:
        chunks = chunked_map(
            hash_chunk, docs, workers=workers, chunk=BATCH, init=_init_worker, initargs=(config,)
        )
        for keys, sigs, band_hashes in chunks:
            keys.tofile(outs[0])
            if bands:
                sigs.tofile(outs[1])
            for j in range(bands):
                np.ascontiguousarray(band_hashes[:, j]).tofile(outs[2 + j])
    except OSError as e:  # a full disk
        raise QingLMError(f"cannot write the spill files in {spill}: {e.strerror or e}") from None
    finally:
        for f in outs:
            f.close()
    return paths


_worker: dict[str, Any] = {}  # this process's config, band count and rensa (set by _init_worker)


def _init_worker(config: DedupConfig) -> None:
    _worker["config"] = config
    _worker["bands"] = config.lsh_bands()
    _worker["rensa"] = _rensa() if config.near else None


def hash_chunk(docs: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the exact hashes (n,) uint64, MinHash signatures (n, num_perm) uint32 and LSH band hashes
    (n, bands) uint64 of docs."""
    config, bands, rensa = _worker["config"], _worker["bands"], _worker["rensa"]
    keys = np.array([exact_key(d) for d in docs], dtype=np.uint64)
    if not bands:
        return keys, np.zeros((len(docs), 0), dtype=np.uint32), np.zeros((len(docs), 0), dtype=np.uint64)
    sets = [shingles(d, config.ngram) or [""] for d in docs]
    rows = rensa.RMinHash.digest_matrix_from_token_sets(sets, config.num_perm, config.seed).to_rows()
    sigs = np.array(rows, dtype=np.uint32)
    rows_per_band = config.num_perm // bands  # the first bands * rows_per_band permutations make the bands
    by_band = sigs[:, : bands * rows_per_band].astype(np.uint64).reshape(len(docs), bands, rows_per_band)
    h = np.zeros(by_band.shape[:2], dtype=np.uint64)
    for k in range(by_band.shape[2]):  # a band's hash: its rows' minima mixed in turn
        h = _mix(h ^ by_band[:, :, k])
    return keys, sigs, h


def _mix(x: np.ndarray) -> np.ndarray:
    """Return splitmix64's finaliser of x (uint64, wrapping)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _mark_copies(keys: np.ndarray, verdict: np.ndarray, copy_of: np.ndarray) -> None:
    """Mark as exact copies the documents whose key an earlier document has, with that earlier
    document's number (the first with the key) in copy_of."""
    order = np.argsort(keys, kind="stable")  # equal keys stay in document order
    same = keys[order[1:]] == keys[order[:-1]]
    del keys
    starts = np.flatnonzero(~same) + 1  # sorted positions where a new key begins (besides 0)
    first = order[np.concatenate(([0], starts))][np.cumsum(np.concatenate(([False], ~same)))]
    dup, of = order[1:][same], first[1:][same]
    verdict[dup] = EXACT
    copy_of[dup] = of


LOOKBACK = 4  # a band's candidates are checked against this many earlier documents of the bucket
VERIFY_PAIRS = 1 << 14  # candidate pairs whose signatures are compared at once


class _Signatures:
    """The spilled MinHash signatures, rows read by number with pread: a memory map would fault in
    64 KB around every row it touches (the kernel's fault-around), which took the RSS past 4 GB on the
    5 GB corpus; read this way, memory holds one batch of rows."""

    def __init__(self, path: Path, num_perm: int) -> None:
        self.path, self.num_perm = path, num_perm

    def rows(self, *index: np.ndarray) -> list[np.ndarray]:
        size = self.num_perm * 4
        wanted, where = np.unique(np.concatenate(index), return_inverse=True)
        with open(self.path, "rb") as f:
            fd = f.fileno()
            table = np.frombuffer(b"".join(os.pread(fd, size, int(i) * size) for i in wanted), np.uint32)
        table = table.reshape(len(wanted), self.num_perm)
        bounds = np.cumsum([0] + [len(i) for i in index])
        return [table[where[a:b]] for a, b in zip(bounds, bounds[1:])]


def _mark_near_copies(
    keys: np.ndarray, sigs: _Signatures, threshold: float, verdict: np.ndarray, copy_of: np.ndarray
) -> None:
    """Mark as near copies the documents not yet dropped that share this band's key with an earlier
    document (the bucket's first, or one of the LOOKBACK before it) whose MinHash signature agrees with
    theirs in at least `threshold` of the permutations: the band only proposes, the signatures decide."""
    order = np.argsort(keys, kind="stable")  # a bucket's documents stay in document order
    new = np.concatenate(([True], keys[order[1:]] != keys[order[:-1]]))
    del keys
    bucket = np.cumsum(new) - 1
    first = np.flatnonzero(new)[bucket]  # sorted position of each bucket's first document
    positions = np.arange(len(order))
    for d in range(LOOKBACK + 1):
        earlier = first if d == 0 else positions - d
        p = np.flatnonzero((earlier >= 0) & (earlier < positions))
        p = p[bucket[p] == bucket[earlier[p]]]
        dup, of = order[p], order[earlier[p]]
        fresh = verdict[dup] == KEEP
        dup, of = dup[fresh], of[fresh]
        for i in range(0, len(dup), VERIFY_PAIRS):
            d, o = dup[i : i + VERIFY_PAIRS], of[i : i + VERIFY_PAIRS]
            a, b = sigs.rows(d, o)
            similar = (a == b).mean(axis=1) >= threshold
            verdict[d[similar]] = NEAR
            copy_of[d[similar]] = o[similar]
