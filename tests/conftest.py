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


# The tiny model of the tests: options given to tiny_model / tiny_run override these.
TINY = dict(d_model=32, n_layers=2, n_heads=4, max_seq_len=64)


@pytest.fixture(scope="session")
def tiny_model():
    """Return make(vocab_size, **options): a tiny random Transformer (seed 0, eval mode) of TINY + options."""
    import torch

    from qinglm.config import ModelConfig, resolve_model
    from qinglm.model import Transformer

    def make(vocab_size: int, **options):
        torch.manual_seed(0)
        return Transformer(resolve_model(ModelConfig(vocab_size=vocab_size, **{**TINY, **options}))).eval()

    return make


@pytest.fixture(scope="session")
def tiny_run(tiny_model):
    """Return make(path, tokenizer, **options): path, now a run directory of tiny_model(...) and tokenizer."""
    from qinglm.train.checkpoint import save_run

    def make(path: Path, tokenizer, **options) -> Path:
        save_run(path, tiny_model(tokenizer.vocab_size, **options), tokenizer)
        return path

    return make


@pytest.fixture(scope="session")
def perturbed_run(tiny_model):
    """Return make(path, tokenizer, vocab_size=None, **options): tiny_run, with the norm weights and biases
    moved off their init values (ones and zeros would hide a mistake in an exporter's weight layout)."""
    import torch

    from qinglm.train.checkpoint import save_run

    def make(path: Path, tokenizer, vocab_size: int | None = None, **options) -> Path:
        model = tiny_model(vocab_size or tokenizer.vocab_size, **options)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 1:
                    p.add_(torch.randn_like(p) * 0.2)
        save_run(path, model, tokenizer)
        return path

    return make


@pytest.fixture
def faulty_transformer():
    """Return make(factors): a Transformer class whose n-th training forward multiplies the loss by factors[n]."""
    from qinglm.model import Transformer

    def make(factors: dict[int, float]) -> type:
        class Faulty(Transformer):
            calls = 0  # training forwards so far, counted from 1

            def forward(self, idx, targets=None, **kw):
                out = super().forward(idx, targets, **kw)
                if targets is None or not self.training:
                    return out
                Faulty.calls += 1
                return out * factors.get(Faulty.calls, 1.0)

        return Faulty

    return make
