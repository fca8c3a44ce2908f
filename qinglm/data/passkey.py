"""passkey: built-in passkey-retrieval documents, a key hidden in People's Daily text and asked for at the end.

Each document is a stretch of pd1998 text with a needle ("通行密码是12345。记住它，通行密码是12345。") at a
random depth, then the question and its answer ("通行密码是什么？通行密码是12345。"). Keys have KEY_DIGITS
digits; HELD_OUT_PERCENT % of all keys, chosen by a hash of the key itself, are held out: they occur only in
"val" documents, never in "train" ones, so retrieval measured on them is retrieval, not recall. The filler
comes from pd1998's own split (train text around train keys, held-out articles around held-out keys), so the
corpus leaks no held-out news either. Everything is a pure function of the arguments: the same documents on
every machine.
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections.abc import Callable, Iterator

NAME = "passkey"
KEY_DIGITS = 5
HELD_OUT_PERCENT = 10  # of the keys, by a hash of the key
NEEDLE = "通行密码是{key}。记住它，通行密码是{key}。"
QUESTION = "通行密码是什么？通行密码是"
DOCUMENTS = 6000  # documents of the built-in corpus
FILLER_CHARS = (16, 512)  # its filler lengths, in characters, drawn uniformly


def key_split(key: str) -> str:
    """Return "val" when `key` is held out (a hash of the key, so stable), else "train"."""
    h = int(hashlib.sha256(f"passkey:{key}".encode()).hexdigest()[:8], 16)
    return "val" if h % 100 < HELD_OUT_PERCENT else "train"


@functools.cache
def keys(split: str) -> tuple[str, ...]:
    """Return every KEY_DIGITS-digit key (no leading zero) of `split` ("train" or "val"), in order."""
    lo, hi = 10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS
    return tuple(k for k in map(str, range(lo, hi)) if key_split(k) == split)


def passkey_text(filler: str, key: str, depth: float, needle: bool = True) -> str:
    """Return filler with the needle for `key` at `depth` (0..1 of its length), then the question.

    The answer (the key) is what comes next; needle=False gives the same text without the needle,
    where nothing tells the key."""
    cut = int(depth * len(filler))
    middle = NEEDLE.format(key=key) if needle else ""
    return filler[:cut] + middle + filler[cut:] + QUESTION


def passkey_documents(
    split: str,
    n: int,
    filler: str,
    min_chars: int = FILLER_CHARS[0],
    max_chars: int = FILLER_CHARS[1],
    seed: int = 0,
) -> list[str]:
    """Return `n` passkey documents of `split`, each ending with its key and "。": keys of that split, and
    min_chars..max_chars characters of `filler` (the text of that split, qinglm.data.builtin.filler_text)
    around a needle at a uniform random depth."""
    rng = random.Random(f"{NAME}-{split}-{seed}")
    text, pool = filler, keys(split)
    docs = []
    for _ in range(n):
        key, size = rng.choice(pool), rng.randint(min_chars, max_chars)
        start = rng.randrange(max(1, len(text) - size))
        docs.append(passkey_text(text[start : start + size].strip(), key, rng.random()) + key + "。")
    return docs


def passkey_labelled(filler: Callable[[str], str], val_fraction: float = 0.02) -> Iterator[tuple[str, str]]:
    """Yield ("train" | "val", document) for the built-in corpus: DOCUMENTS in all, val_fraction of them
    (at least one) with held-out keys; filler(split) gives the filler text of each split."""
    n_val = max(1, round(DOCUMENTS * val_fraction))
    for split, n in (("train", DOCUMENTS - n_val), ("val", n_val)):
        for doc in passkey_documents(split, n, filler(split)):
            yield split, doc
