"""Held-out loss / perplexity / bits per character, and the unigram baseline."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from qinglm.config import ModelConfig
from qinglm.evaluate import (
    MemoryShards,
    documents_to_shards,
    evaluate_documents,
    evaluate_shards,
    unigram_baseline,
)
from qinglm.model.transformer import Transformer
from qinglm.tokenizer import train_tokenizer

V = 50


class Uniform(nn.Module):
    """Returns equal logits everywhere, so every token costs exactly ln V nats."""

    def __init__(self):
        super().__init__()
        self.cfg = ModelConfig(vocab_size=V, max_seq_len=64)
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, idx):
        return torch.zeros(*idx.shape, V)


class Bigram(nn.Module):
    """Logits depend only on the current token, so the NLL of each (token, next) pair is known."""

    def __init__(self):
        super().__init__()
        self.cfg = ModelConfig(vocab_size=V, max_seq_len=64)
        self.table = nn.Embedding(V, V)
        nn.init.normal_(self.table.weight, std=2.0, generator=torch.Generator().manual_seed(0))

    def forward(self, idx):
        assert not self.training  # evaluation must switch dropout etc. off
        return self.table(idx)


def stream(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, n).astype(np.uint16)


def test_uniform_logits_give_ln_v_per_token_and_bpc_counts_characters():
    shards = MemoryShards([stream(101, 0)], n_tokens=101, n_characters=70)
    m = evaluate_shards(Uniform(), shards, batch_size=3, seq_len=16)
    assert m["tokens"] == 100  # every token but the first is predicted once
    assert math.isclose(m["loss"], math.log(V), rel_tol=1e-6)
    assert math.isclose(m["ppl"], V, rel_tol=1e-5)
    assert math.isclose(m["bpc"], math.log2(V) * 100 / 70, rel_tol=1e-6)


def test_padded_tails_are_ignored_and_training_mode_is_restored():
    model = Bigram().train()
    parts = [stream(45, 1), stream(20, 2)]  # neither fills whole windows of 16: both tails are padded
    shards = MemoryShards(parts, n_tokens=65, n_characters=100)
    m = evaluate_shards(model, shards, batch_size=2, seq_len=16)
    assert model.training
    with torch.no_grad():
        logp = model.table.weight.log_softmax(-1)
        nll = [-logp[int(a), int(b)] for s in parts for a, b in zip(s[:-1], s[1:])]
    assert m["tokens"] == 63
    assert math.isclose(m["loss"], float(sum(nll)) / 63, rel_tol=1e-5)
    assert math.isclose(m["bpc"], float(sum(nll)) / math.log(2) / 100, rel_tol=1e-5)


def test_max_tokens_scales_the_character_count():
    shards = MemoryShards([stream(1001, 3)], n_tokens=1001, n_characters=2000)
    m = evaluate_shards(Uniform(), shards, batch_size=4, seq_len=10, max_tokens=200)
    assert 200 <= m["tokens"] < 1000
    # the evaluated part is assumed to have the split's characters per token (2 per target)
    assert math.isclose(m["bpc"], math.log2(V) / 2, rel_tol=1e-6)


def test_documents_become_bos_ids_eos_and_evaluate_the_same_way():
    tok = train_tokenizer(["中文文本的测试。", "另一行中文。"] * 20, 300, show_progress=False)
    docs = ["中文文本", "另一行"]
    shards = documents_to_shards(tok, docs)
    want = [tok.bos_id, *tok.encode(docs[0]), tok.eos_id, tok.bos_id, *tok.encode(docs[1]), tok.eos_id]
    assert shards.shards[0].tolist() == want and shards.n_tokens == len(want)
    assert shards.n_characters == 5 + 4
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, max_seq_len=32)
    )
    got = evaluate_documents(model, tok, docs, seq_len=8)
    assert got == evaluate_shards(model, shards, seq_len=8)
    assert got["tokens"] == len(want) - 1


def test_unigram_baseline_is_add_one_smoothed_entropy():
    train, val = np.array([0, 0, 1]), np.array([0, 1])
    assert math.isclose(unigram_baseline(train, val, 3), -(math.log(3 / 6) + math.log(2 / 6)) / 2)
    # shard lists (TokenShards) count the same as one stream
    assert unigram_baseline(MemoryShards([train[:1], train[1:]], 3, 3), val, 3) == unigram_baseline(
        train, val, 3
    )


def test_a_briefly_trained_model_beats_the_unigram_baseline():
    # A repeating 5-token pattern: a unigram model pays ln 5 per token, context makes it nearly free.
    pattern = np.tile(np.array([5, 9, 7, 11, 13]), 80)
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, dropout=0.0)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.from_numpy(pattern[:-1].astype(np.int64))[: 8 * 24].view(8, 24)
    y = torch.from_numpy(pattern[1:].astype(np.int64))[: 8 * 24].view(8, 24)
    for _ in range(30):
        opt.zero_grad()
        model(x, y).backward()
        opt.step()
    val = MemoryShards([pattern[:101]], 101, 101)
    m = evaluate_shards(model, val, seq_len=32)
    assert m["loss"] < 0.5 * unigram_baseline(pattern, val.shards[0], V)


def test_nothing_to_evaluate_is_a_user_error():
    from qinglm.errors import QingLMError

    with pytest.raises(QingLMError, match="nothing to evaluate"):
        evaluate_shards(Uniform(), MemoryShards([stream(1, 0)], 1, 1))
