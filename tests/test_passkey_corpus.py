"""Tests for qinglm.data.passkey: the built-in passkey corpus and its split by key."""

import re

from qinglm.data.builtin import BUILTINS, builtin_documents, builtin_labelled, filler_text, is_builtin
from qinglm.data.corpus import describe_split
from qinglm.data.passkey import (
    DOCUMENTS,
    HELD_OUT_PERCENT,
    KEY_DIGITS,
    NEEDLE,
    QUESTION,
    key_split,
    keys,
    passkey_documents,
    passkey_text,
)

DOC = re.compile(r"(.*)通行密码是(\d+)。记住它，通行密码是\2。(.*)" + QUESTION + r"(\d+)。", re.S)


def _key(doc: str) -> str:
    m = DOC.fullmatch(doc)
    assert m, doc
    assert m.group(2) == m.group(4)  # the answer is the key of the needle
    return m.group(2)


def test_registered_as_builtin():
    assert is_builtin("passkey") and "passkey" in BUILTINS
    assert "passkey by key" in describe_split(["pd1998", "passkey"], _Cfg())


class _Cfg:
    val_fraction, split_by, split_block = 0.02, "auto", 1000


def test_key_split_is_disjoint_deterministic_and_proportional():
    train, val = set(keys("train")), set(keys("val"))
    assert not train & val and len(train | val) == 9 * 10 ** (KEY_DIGITS - 1)
    assert all(len(k) == KEY_DIGITS and k[0] != "0" for k in val)
    assert abs(len(val) / len(train | val) - HELD_OUT_PERCENT / 100) < 0.01
    assert all(key_split(k) == "val" for k in list(val)[:50])


def test_documents_are_well_formed_and_split_by_key():
    labelled = list(builtin_labelled("passkey"))
    assert len(labelled) == DOCUMENTS and labelled == list(builtin_labelled("passkey"))  # deterministic
    by_split = {"train": set(), "val": set()}
    for split, doc in labelled:
        by_split[split].add(_key(doc))
        assert "\n" not in doc and doc == doc.strip()
    assert by_split["train"] <= set(keys("train")) and by_split["val"] <= set(keys("val"))
    assert len(by_split["val"]) > 50  # held-out keys are used, and never in training
    assert [d for _, d in labelled] == builtin_documents("passkey")
    assert builtin_documents("passkey", "val") == [d for s, d in labelled if s == "val"]


def test_filler_comes_from_the_same_pd1998_split():
    val_docs = passkey_documents("val", 20, filler_text("val"), 40, 60, seed=3)
    assert val_docs == passkey_documents("val", 20, filler_text("val"), 40, 60, seed=3)
    assert val_docs != passkey_documents("val", 20, filler_text("val"), 40, 60, seed=4)
    val_text = filler_text("val")
    for doc in val_docs:
        m = DOC.fullmatch(doc)
        filler = m.group(1) + m.group(3)
        assert 40 - 2 <= len(filler) <= 60  # the slice may lose surrounding spaces
        assert filler[:20] in val_text or filler[-20:] in val_text


def test_passkey_text_without_needle():
    with_needle = passkey_text("甲乙丙丁", "12345", 0.5)
    assert with_needle == "甲乙" + NEEDLE.format(key="12345") + "丙丁" + QUESTION
    assert passkey_text("甲乙丙丁", "12345", 0.5, needle=False) == "甲乙丙丁" + QUESTION
