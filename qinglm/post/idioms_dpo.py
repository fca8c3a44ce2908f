"""idioms-dpo: built-in preference pairs from the idiom dictionary, with idioms-sft's held-out idioms.

Each idiom gives up to two pairs, asked with idioms-sft's questions:
  meaning: chosen = its explanation, rejected = another idiom's explanation;
  pinyin:  chosen = its pinyin, rejected = the pinyin with one tone changed or one syllable replaced.
Every choice (which other idiom, which syllable, which tone) comes from a hash of the idiom, so the data
is the same on every machine and no global RNG is touched. The wrong answers of a split come from that
split's idioms only: nothing of a held-out idiom appears in the "train" split.
"""

from __future__ import annotations

from collections.abc import Sequence

from qinglm.data.idioms_sft import SPLITS, Idiom, _hash, idioms, is_held_out, question
from qinglm.errors import QingLMError
from qinglm.post.dpo_data import BUILTIN, Pair

NAME = BUILTIN
# The four tones of each vowel, in tone order.
_TONES = ("āáǎà", "ēéěè", "īíǐì", "ōóǒò", "ūúǔù", "ǖǘǚǜ")
_TONE_OF = {ch: (row, k) for row in _TONES for k, ch in enumerate(row)}


def _pick(options: Sequence[str], key: str, avoid: str) -> str | None:
    """Return an option other than avoid, chosen by a hash of key; None when there is none."""
    start = _hash(key) % len(options) if options else 0
    for k in range(len(options)):
        option = options[(start + k) % len(options)]
        if option != avoid:
            return option
    return None


def wrong_tone(pinyin: str, key: str) -> str | None:
    """Return pinyin with the tone of one syllable changed (chosen by a hash of key); None if toneless."""
    syllables = pinyin.split()
    marked = [i for i, s in enumerate(syllables) if any(ch in _TONE_OF for ch in s)]
    if not marked:
        return None
    h = _hash(key)
    i = marked[h % len(marked)]
    mark = next(ch for ch in syllables[i] if ch in _TONE_OF)
    row, tone = _TONE_OF[mark]
    syllables[i] = syllables[i].replace(mark, row[(tone + 1 + (h >> 8) % 3) % 4], 1)
    return " ".join(syllables)


def wrong_syllable(pinyin: str, key: str, pool: Sequence[str]) -> str | None:
    """Return pinyin with one syllable replaced by another one of pool (both chosen by hashes of key)."""
    syllables = pinyin.split()
    if not syllables:
        return None
    i = _hash(key) % len(syllables)
    other = _pick(pool, key + "/syllable", syllables[i])
    if other is None:
        return None
    syllables[i] = other
    return " ".join(syllables)


def idiom_pairs(idiom: Idiom, meanings: Sequence[str], syllables: Sequence[str]) -> list[Pair]:
    """Return the pairs of one idiom; wrong answers come from meanings and syllables (its split's)."""
    pairs = []
    w = idiom.word
    wrong = _pick(meanings, "dpo-meaning" + w, idiom.explanation) if idiom.explanation else None
    if wrong is not None:
        pairs.append(Pair([{"role": "user", "content": question("meaning", w)}], idiom.explanation, wrong))
    if idiom.pinyin:
        key = "dpo-pinyin" + w
        tone, syllable = wrong_tone(idiom.pinyin, key), wrong_syllable(idiom.pinyin, key, syllables)
        wrong = (tone or syllable) if _hash(key) % 2 == 0 else (syllable or tone)
        if wrong is not None and wrong != idiom.pinyin:
            pairs.append(Pair([{"role": "user", "content": question("pinyin", w)}], idiom.pinyin, wrong))
    return pairs


def idioms_dpo(split: str = "train") -> list[Pair]:
    """Return the preference pairs of the idioms in split ("train" or "heldout"), in dictionary order."""
    if split not in SPLITS:
        raise QingLMError(f"unknown {NAME} split {split!r}; choose train or heldout")
    pool = [i for i in idioms() if is_held_out(i.word) == (split == "heldout")]
    meanings = sorted({i.explanation for i in pool if i.explanation})
    syllables = sorted({s for i in pool for s in i.pinyin.split()})
    return [pair for i in pool for pair in idiom_pairs(i, meanings, syllables)]
