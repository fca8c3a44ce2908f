"""Held-out evaluation: loss, perplexity and bits per character, plus the unigram baseline.

Loss and perplexity are per token, so they depend on the tokenizer; bits per character (BPC)
divides the same total negative log-likelihood by the number of characters of the text, so it
compares models with different tokenizers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from qinglm.data.loader import eval_batches
from qinglm.device import autocast, resolve_dtype
from qinglm.errors import QingLMError
from qinglm.model.transformer import IGNORE_INDEX, Transformer

if TYPE_CHECKING:
    from qinglm.tokenizer import Tokenizer


@dataclass
class MemoryShards:
    """An in-memory token stream shaped like TokenShards: what eval_batches and BPC need."""

    shards: list[np.ndarray]
    n_tokens: int
    n_characters: int


def evaluate_shards(
    model: Transformer,
    shards: Any,
    *,
    batch_size: int = 16,
    seq_len: int | None = None,
    device: torch.device | str | None = None,
    dtype: str = "fp32",
    max_tokens: int | None = None,
) -> dict[str, float]:
    """Return {"loss", "ppl", "bpc", "tokens"} of model over shards (TokenShards or MemoryShards).

    loss is the mean negative log-likelihood in nats per predicted token, ppl = exp(loss), and
    bpc = total NLL in bits / characters. seq_len defaults to min(512, the model's context).
    Every token but each shard's first is predicted once. When max_tokens stops the evaluation
    early, the characters covered are estimated as shards.n_characters * (tokens evaluated /
    tokens the whole split would give), assuming characters per token is about constant over a
    split; over the whole split the character count is exact.
    """
    seq_len = seq_len or min(512, model.cfg.max_seq_len)
    if seq_len > model.cfg.max_seq_len:
        raise QingLMError(f"seq_len {seq_len} is longer than the model's context {model.cfg.max_seq_len}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    dtype = resolve_dtype(dtype, device)
    total_nll, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast(device, dtype):
            for x, y in eval_batches(shards, batch_size, seq_len, max_tokens=max_tokens):
                x, y = x.to(device), y.to(device)
                logits = model(x)
                nll = F.cross_entropy(
                    logits.float().view(-1, logits.size(-1)),
                    y.reshape(-1),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
                total_nll += nll.item()
                tokens += int((y != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if tokens == 0:
        raise QingLMError("nothing to evaluate: the text has fewer than 2 tokens; give a longer text")
    characters = float(shards.n_characters)
    targets = sum(max(len(s) - 1, 0) for s in shards.shards)  # what the whole split would give
    if tokens < targets:  # max_tokens stopped early: estimate the characters covered
        characters *= tokens / targets
    loss = total_nll / tokens
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 700.0)),
        "bpc": total_nll / math.log(2) / characters,
        "tokens": tokens,
    }


def documents_to_shards(tokenizer: Tokenizer, docs: Iterable[str]) -> MemoryShards:
    """Return the documents as one in-memory stream of [BOS] + ids + [EOS] per document.

    Characters are counted as len(doc) + 1 per document (the +1 is the document break), the
    same rule as TokenShards.n_characters, so BPC agrees between the two paths.
    """
    docs = list(docs)
    ids: list[int] = []
    n_characters = 0
    for doc, doc_ids in zip(docs, tokenizer.encode_batch(docs) if docs else []):
        ids.append(tokenizer.bos_id)
        ids.extend(doc_ids)
        ids.append(tokenizer.eos_id)
        n_characters += len(doc) + 1
    stream = np.asarray(ids, dtype=np.int64)
    return MemoryShards(
        shards=[stream] if len(stream) else [], n_tokens=len(stream), n_characters=n_characters
    )


def evaluate_documents(
    model: Transformer, tokenizer: Tokenizer, docs: Iterable[str], **kw: Any
) -> dict[str, float]:
    """Return {"loss", "ppl", "bpc", "tokens"} of model over the documents (kw as evaluate_shards)."""
    return evaluate_shards(model, documents_to_shards(tokenizer, docs), **kw)


def _counts(stream: Any, vocab_size: int) -> np.ndarray:
    # A TokenShards-like object is counted shard by shard so memmaps are never concatenated.
    parts = stream.shards if hasattr(stream, "shards") else [stream]
    counts = np.zeros(vocab_size, dtype=np.int64)
    for part in parts:
        arr = np.asarray(part, dtype=np.int64).ravel()
        if len(arr) and (arr.min() < 0 or arr.max() >= vocab_size):
            raise QingLMError(f"token ids outside the vocabulary of {vocab_size}; is vocab_size right?")
        counts += np.bincount(arr, minlength=vocab_size)
    return counts


def unigram_baseline(train_stream: Any, val_stream: Any, vocab_size: int) -> float:
    """Return the loss in nats/token of an add-one smoothed unigram model of train on val.

    Streams are 1-D token arrays (or lists) or objects with a .shards list of them. A trained
    model should beat this number; one that does not has learnt no context at all.
    """
    train = _counts(train_stream, vocab_size) + 1  # add-one: unseen tokens keep some mass
    val = _counts(val_stream, vocab_size)
    if val.sum() == 0:
        raise QingLMError("the validation stream is empty")
    log_p = np.log(train) - np.log(train.sum())
    return float(-(val * log_p).sum() / val.sum())
