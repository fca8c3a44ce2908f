"""Speculative decoding: draft a row's next tokens, by prompt lookup or a smaller model, verify them in one forward.

A row with ``SamplingConfig.speculate = k`` looks up the latest earlier occurrence of its last n tokens
(n = NGRAM down to 1) in its prompt and what it has generated, and drafts the k tokens that followed it
(a repeating tail continues its period: PromptLookup); or, when the engine has a draft model (``draft=``,
`--draft RUN`: a smaller model of the same tokenizer), that model's greedy continuation (DraftRow). The engine (qinglm.infer.engine) feeds every row its last token and
its draft in one forward (``Transformer.forward`` with T tokens per row at its own position), then samples
position by position exactly as plain decoding would: position t's token is drawn from the logits after the
row's tokens so far, with the same repetition penalty and the row's next uniform number; while it equals the
draft's token t the row goes on to t + 1. So a greedy row gets the tokens plain decoding gives, and a sampled
row with a seed too (one uniform number per emitted token, as without drafts): "sample, then compare" is
the speculative-sampling rule for a draft that puts all its probability on one token (accepted with
probability p(draft); otherwise a draw from p without it), so the distribution is the model's. Keys and values
of rejected tokens stay in the cache past the row's length, masked, and are overwritten later.

It pays where a forward costs about the same for 1 + k tokens as for 1 (one row, on a CPU or GPU whose step
reads the weights) and where text repeats what came before (quotes, lists, names, a model's own loops); a draft
model pays only where its steps cost little beside the model's and verifying k + 1 tokens costs about one step
(on this CPU it did not: benchmarks/README.md). Drafts are made while one row decodes (MAX_ROWS): a chat, one
prompt. ``SpecStats`` counts what was drafted and accepted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from qinglm.config import SamplingConfig
from qinglm.errors import QingLMError
from qinglm.infer.sampling import apply_repetition_penalty
from qinglm.infer.step import DecodeStep, tokens_logits
from qinglm.model.kv_cache import KVCache
from qinglm.model.transformer import Transformer

if TYPE_CHECKING:
    from qinglm.infer.slots import Slots

NGRAM = 3  # the longest n-gram looked up; shorter ones are tried when it has no earlier occurrence
# Drafts are verified while at most this many rows decode; with more, rows decode plainly. Rows decode in
# lockstep, so a batch waits for its row that speculates worst: on a CPU (benchmarks/speculate.py, the trained
# tiny run, held-out prompts, 128 tokens) 1 row gained 1.6-1.7x, 2 rows 0.92-0.99x, 4 rows 0.82-0.96x, 8 rows
# with 1-token drafts 1.05-1.08x (noise there is +-5%).
MAX_ROWS = 1


class PromptLookup:
    """A row's tokens and where each of its n-grams (n <= NGRAM) last ended before the row's last token."""

    def __init__(self, ids: Iterable[int], ngram: int = NGRAM):
        self.ids: list[int] = []
        self.ngram = ngram
        self.ends: dict[tuple[int, ...], int] = {}  # at most ngram entries a token: bounded by the context
        self.extend(ids)

    def extend(self, ids: Iterable[int]) -> None:
        """Append tokens to the row; the n-grams ending at the previous last token enter the index."""
        for tok in ids:
            j = len(self.ids) - 1
            for n in range(1, min(self.ngram, j + 1) + 1):
                self.ends[tuple(self.ids[j - n + 1 : j + 1])] = j
            self.ids.append(tok)

    def propose(self, k: int) -> list[int]:
        """Return up to k draft tokens: what followed the latest earlier occurrence of the longest tail
        n-gram found ([] when none occurred before, or k < 1)."""
        L = len(self.ids)
        if k < 1:
            return []
        for n in range(min(self.ngram, L - 1), 0, -1):
            end = self.ends.get(tuple(self.ids[L - n :]))
            if end is not None:
                period = L - 1 - end  # past the row's end the draft repeats the span it copied
                return [self.ids[end + 1 + i % period] for i in range(k)]
        return []


class DraftModel:
    """A smaller model that drafts for a larger one (the same tokenizer: a `qinglm distill` student, or a
    smaller run trained on the same tokenizer): greedy, with the row's repetition penalty, on its own KV
    cache, one row of it for each drafting row (DraftRow)."""

    def __init__(self, model: Transformer, target: Transformer):
        if model.cfg.vocab_size != target.cfg.vocab_size:
            raise QingLMError(
                f"the draft model's vocabulary ({model.cfg.vocab_size}) is not the model's "
                f"({target.cfg.vocab_size}); draft with a model trained on the same tokenizer"
            )
        self.model = model.eval()
        self.fast = DecodeStep.of(model)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype

    def logits(self, ids: list[int], cache: KVCache, start: int) -> torch.Tensor:
        """Return the logits (vocab,) after ids fed at positions start.. of cache's row 0 (stored there)."""
        tokens = torch.tensor([ids], device=self.device)
        positions = torch.tensor([start], device=self.device)
        return tokens_logits(self.model, self.fast, tokens, positions, cache, start + len(ids))[0, -1]


class DraftRow:
    """A row's tokens and its row of the draft model's KV cache: the first `valid` tokens are stored there,
    then the draft tokens fed while proposing (`pending`), which stay valid while the row accepts them."""

    def __init__(self, draft: DraftModel, ids: Iterable[int], penalty: float = 1.0):
        self.draft, self.penalty = draft, penalty
        self.ids: list[int] = list(ids)
        self.valid, self.pending = 0, []
        self.cache: KVCache | None = None  # made at the first draft

    def extend(self, ids: Iterable[int]) -> None:
        """Append tokens to the row; a token equal to the next pending draft token keeps its keys/values."""
        for tok in ids:
            if self.pending and self.pending[0] == tok and self.valid == len(self.ids):
                self.valid += 1
                self.pending.pop(0)
            else:
                self.pending = []
            self.ids.append(tok)

    @torch.inference_mode()
    def propose(self, k: int) -> list[int]:
        """Return up to k draft tokens, the draft model's greedy continuation (fewer near its context's end)."""
        model = self.draft.model
        k = min(k, model.cfg.max_seq_len - len(self.ids))
        if k < 1:
            return []
        if self.cache is None:
            self.cache = KVCache(model.cfg, 1, model.cfg.max_seq_len, self.draft.device, self.draft.dtype)
        out: list[int] = []
        start = min(self.valid, len(self.ids) - 1)  # the last token at least: its logits draft the first
        feed = self.ids[start:]
        for _ in range(k):
            logits = self.draft.logits(feed, self.cache, start)[None].float()
            if self.penalty != 1.0:  # as the row samples: drafts the row would penalise are less likely
                seen = torch.tensor([self.ids + out], device=logits.device)
                logits = apply_repetition_penalty(logits, seen, self.penalty)
            out.append(int(logits.argmax()))
            start += len(feed)
            feed = out[-1:]
        self.valid, self.pending = len(self.ids), out[:-1]  # the last draft token was never fed
        return out


class Row(Protocol):
    """What drafting reads and writes of a decoding row (qinglm.infer.request.Row)."""

    cfg: SamplingConfig
    drafter: PromptLookup | DraftRow | None
    length: int  # cache positions held; the last token goes at this one
    last: int
    generated: int


@dataclass
class SpecStats:
    """What speculative decoding did: forwards that verified drafts, draft tokens, draft tokens accepted."""

    steps: int = 0
    drafted: int = 0
    accepted: int = 0

    def add(self, other: SpecStats) -> None:
        """Add other's counts to these; returns None."""
        self.steps += other.steps
        self.drafted += other.drafted
        self.accepted += other.accepted

    def line(self) -> str:
        """Return one line for the user: the acceptance rate and the tokens a verifying forward produced."""
        if self.drafted == 0:
            return "speculative decoding: no draft found (nothing in the text repeated)"
        rate = self.accepted / self.drafted
        per_step = (self.accepted + self.steps) / max(self.steps, 1)
        return (
            f"speculative decoding: {self.accepted:,} of {self.drafted:,} drafted tokens accepted "
            f"({rate:.1%}), {per_step:.2f} tokens a verifying forward ({self.steps:,} forwards)"
        )


def draft(rows: list[Row], positions: int) -> list[list[int]] | None:
    """Return each decoding row's draft ([] for a row that does not speculate or found none), or None when
    no row has one or more than MAX_ROWS rows decode. A draft never runs past the cache's positions or the
    row's max_new_tokens."""
    if len(rows) > MAX_ROWS or not any(r.drafter is not None for r in rows):
        return None
    room = positions - 1 - max(r.length for r in rows)  # positions after the furthest row's last token
    drafts = [
        r.drafter.propose(min(r.cfg.speculate, room, r.cfg.max_new_tokens - r.generated - 1))
        if r.drafter is not None
        else []
        for r in rows
    ]
    return drafts if any(drafts) else None


def verify(slots: Slots, rows: list[Row], drafts: list[list[int]], stats: SpecStats) -> torch.Tensor:
    """Return the logits (n, 1 + k, vocab) of rows 0..n-1 of the cache fed their last token and their draft
    (padded to the longest, k tokens) in one forward; each row's length then counts its last token (the
    engine adds each accepted draft token)."""
    width = max(len(d) for d in drafts)
    fed = [[r.last, *d] + [d[-1] if d else r.last] * (width - len(d)) for r, d in zip(rows, drafts)]
    device = slots.cache.k.device
    positions = torch.tensor([r.length for r in rows], device=device)
    logits = slots.verify(torch.tensor(fed, device=device), positions)
    for r, d in zip(rows, drafts):
        r.length += 1
        if d:
            stats.steps += 1
            stats.drafted += len(d)
    return logits
