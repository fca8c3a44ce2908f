"""Which documents are held out for validation: by document, by block of consecutive documents, by file.

A split by single documents flatters a model when neighbouring documents belong together (the
paragraphs of one news article, the lines of one book): most held-out text then has its context in
training. Blocks keep consecutive documents together; files keep whole files together.

Block i is held out when ⌊i·f + ½⌋ steps up at i+1 (f = val_fraction): the held-out blocks are
spread evenly, one in every 1/f (the first is block ⌊1/(2f)⌋), so the fraction is exact, the
answer is the same on every run, and one streaming pass with a counter decides it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from qinglm.data.files import format_of
from qinglm.data.sources import split_of
from qinglm.errors import QingLMError

SPLIT_BY = ("auto", "document", "block", "file")
VAL_FRACTION = 0.02  # the default share of the data held out for validation
IDIOM_HELD_OUT_PERCENT = 3  # idioms held out of every training split (SFT's held-out evaluation uses them)
# pd1998 blocks: at least this many paragraphs, each starting at a headline (see pd1998_blocks).
PD1998_BLOCK = 50
# "auto" on .txt files smaller than this counts their documents first: too few for one held-out
# block and it holds out single documents instead.
SMALL_CORPUS_BYTES = 16 << 20
# A paragraph that ends like this closes a sentence; a headline ends otherwise.
_SENTENCE_CLOSE = "。！？”…）"


def is_val_block(index: int, val_fraction: float) -> bool:
    """Return True when block `index` (0, 1, 2, ...) is held out at `val_fraction` (evenly spread)."""
    per_10k = round(val_fraction * 10_000)
    return ((index + 1) * per_10k + 5_000) // 10_000 > (index * per_10k + 5_000) // 10_000


def first_val_block(val_fraction: float) -> int:
    """Return the index of the first held-out block (a corpus with fewer blocks holds none out)."""
    return next(i for i in range(10_001) if is_val_block(i, val_fraction))


def idiom_held_out(word: str) -> bool:
    """Return True when the idiom is in SFT's held-out set (a hash of the idiom, so stable)."""
    import hashlib

    return int(hashlib.sha256(word.encode("utf-8")).hexdigest()[:8], 16) % 100 < IDIOM_HELD_OUT_PERCENT


def names_held_out_idiom(texts: Sequence[str], words: Sequence[str]) -> list[bool]:
    """Return, for each text, whether it contains a held-out idiom among words (idiom_held_out).

    An idiom's entry that names a held-out idiom (a longer idiom containing it, a variant spelling
    "同X", an example quoting it) shows the held-out idiom next to its pinyin, so it is held out too.
    """
    held = sorted({w for w in words if w and idiom_held_out(w)}, key=len, reverse=True)
    if not held:
        return [False] * len(texts)
    pattern = re.compile("|".join(map(re.escape, held)))
    return [pattern.search(t) is not None for t in texts]


def pd1998_blocks(paragraphs: tuple[str, ...], size: int = PD1998_BLOCK) -> list[int]:
    """Return the block index of each paragraph: blocks of at least `size` consecutive paragraphs.

    The file has no article marks, but an article starts with a headline: a paragraph that does not
    end a sentence, after one that does. A block ends only right before such a headline, so an
    article never straddles two blocks.
    """
    out, block, start = [], 0, 0
    for i, p in enumerate(paragraphs):
        headline = i > 0 and p[-1] not in _SENTENCE_CLOSE and paragraphs[i - 1][-1] in _SENTENCE_CLOSE
        if headline and i - start >= size:
            block, start = block + 1, i
        out.append(block)
    return out


class Splitter:
    """Labels a stream of documents "train" or "val" in one pass, with O(1) memory.

    by: "document" (a hash of its text), "block" (`block` consecutive documents of the stream, see
    is_val_block), "file" (a hash of its file's name), "auto" (block for .txt files, whose documents
    are consecutive lines or paragraphs; document for JSONL/JSON/Parquet records; see also
    qinglm.pipeline.labelled_documents for small corpora).
    """

    def __init__(self, by: str, val_fraction: float, block: int) -> None:
        if by not in SPLIT_BY:
            raise QingLMError(f"unknown split_by {by!r}; choose one of {', '.join(SPLIT_BY)}")
        if block < 1:
            raise QingLMError(f"split_block must be positive, got {block}")
        self.by, self.val_fraction, self.block = by, val_fraction, block
        self._seen = 0  # documents labelled so far: the block counter
        self._path: Path | None = None  # the file last seen, and whether it holds records
        self._records = False

    def __call__(self, doc: str, path: Path | None) -> str:
        by = self.by
        if by == "auto":
            if path is not self._path:  # once per file, not per document
                self._path = path
                self._records = path is not None and format_of(path) in (".jsonl", ".json", ".parquet")
            by = "document" if self._records else "block"
        if by == "file" and path is not None:
            label = split_of(path.name, self.val_fraction)
        elif by == "block":
            label = "val" if is_val_block(self._seen // self.block, self.val_fraction) else "train"
        else:
            label = split_of(doc, self.val_fraction)
        self._seen += 1
        return label
