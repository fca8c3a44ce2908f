"""Remove duplicate documents from a stream: exact copies (a hash of the normalised text) and near copies
(MinHash over character n-grams, found by LSH), keeping the first of each group.

One pass; memory grows with the number of documents kept (an 8-byte hash each, and the LSH index:
about 2 KB per document with rensa), not with their length. Near copies use `rensa` (MinHash in Rust),
chosen over datasketch (pure Python) for speed and memory: see README, "Deduplicate".
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from qinglm.errors import QingLMError

EXAMPLES = 3
EXAMPLE_CHARS = 200
_NOT_WORD = re.compile(r"[\W_]+")  # whitespace, punctuation and symbols
_SENTENCE_END = re.compile(r"[。！？!?；;\n]+")


def normalise(text: str) -> str:
    """Return text lower-cased without whitespace, punctuation or symbols: what duplicates are compared on."""
    return _NOT_WORD.sub("", text.lower())


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
    """Return the number of LSH bands (dividing num_perm) that minimises false positives + false negatives
    for the Jaccard threshold, as datasketch chooses them."""
    steps = 200
    low = [(i + 0.5) * threshold / steps for i in range(steps)]
    high = [threshold + (i + 0.5) * (1 - threshold) / steps for i in range(steps)]
    best = None
    for b in (b for b in range(1, num_perm + 1) if num_perm % b == 0):
        r = num_perm // b
        fp = sum(1 - (1 - s**r) ** b for s in low) * threshold / steps
        fn = sum((1 - s**r) ** b for s in high) * (1 - threshold) / steps
        if best is None or fp + fn < best[0]:
            best = (fp + fn, b)
    return best[1]


@dataclass
class DedupConfig:
    """Which duplicates are removed, and how near copies are found."""

    exact: bool = True
    near: bool = True
    ngram: int = 5  # characters per shingle
    threshold: float = 0.7  # estimated Jaccard similarity of the shingle sets
    num_perm: int = 128
    seed: int = 1

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise QingLMError(f"the similarity threshold must be in (0, 1], got {self.threshold}")
        if self.ngram < 1 or self.num_perm < 2:
            raise QingLMError(f"need ngram >= 1 and num_perm >= 2, got {self.ngram} and {self.num_perm}")
        if not (self.exact or self.near):
            raise QingLMError("nothing to do: both exact and near-duplicate removal are off")


@dataclass
class DedupReport:
    """Documents read and kept, duplicates removed by kind, with a few examples each."""

    documents: int = 0
    kept: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[dict]] = field(default_factory=dict)

    def drop(self, kind: str, doc: str, of: int | None = None) -> None:
        self.dropped[kind] += 1
        shown = self.examples.setdefault(kind, [])
        if len(shown) < EXAMPLES:
            shown.append({"text": doc[:EXAMPLE_CHARS], **({"similar_to_kept": of} if of is not None else {})})

    def as_dict(self, config: DedupConfig) -> dict:
        return {
            "documents": self.documents,
            "kept": self.kept,
            "dropped": {k: self.dropped[k] for k in ("exact", "near") if getattr(config, k)},
            "examples": self.examples,
            "config": vars(config),
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


def dedup_documents(docs: Iterable[str], config: DedupConfig, report: DedupReport) -> Iterator[str]:
    """Return an iterator over the documents that are no copy of an earlier one, counting in report.
    A kept document's number (from 0, in kept order) is what near-copy examples point to."""
    lsh = minhash = None
    if config.near:
        rensa = _rensa()
        bands = lsh_bands(config.threshold, config.num_perm)
        lsh, minhash = rensa.RMinHashLSH(config.threshold, config.num_perm, bands), rensa.RMinHash
    return _deduped(docs, config, report, lsh, minhash)  # a missing package is reported before any output


def _deduped(docs: Iterable[str], config: DedupConfig, report: DedupReport, lsh, minhash) -> Iterator[str]:
    seen: set[int] = set()
    for doc in docs:
        report.documents += 1
        if config.exact:
            key = exact_key(doc)
            if key in seen:
                report.drop("exact", doc)
                continue
            seen.add(key)
        if lsh is not None:
            m = minhash(config.num_perm, config.seed)
            m.update(shingles(doc, config.ngram) or [""])
            if similar := lsh.query(m):
                report.drop("near", doc, min(similar))
                continue
            lsh.insert(report.kept, m)
        report.kept += 1
        yield doc
