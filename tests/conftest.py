"""Fixtures shared by several test modules."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from qinglm.data.shards import prepare_shards
from qinglm.tokenizer import train_tokenizer

PHRASES = [
    "今天天气真不错",
    "我们一起去公园散步",
    "人工智能改变了世界",
    "中国经济持续发展",
    "春天来了花开了",
    "学习使人进步",
]


@pytest.fixture(scope="session")
def phrase_corpus(tmp_path_factory) -> tuple[Path, Path, int]:
    """Return (data_dir, tokenizer_dir, vocab_size) of a small repetitive corpus (read-only for tests)."""
    root = tmp_path_factory.mktemp("phrase-corpus")
    rng = random.Random(0)
    docs = ["，".join(rng.choice(PHRASES) for _ in range(4)) + "。" for _ in range(300)]
    tok = train_tokenizer(docs, 300, show_progress=False)
    tok.save(root / "tokenizer")
    prepare_shards({"train": docs[:270], "val": docs[270:]}, tok, root / "data", show_progress=False)
    return root / "data", root / "tokenizer", tok.vocab_size
