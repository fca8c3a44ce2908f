"""Rollouts: group_size sampled replies per chat prompt, all decoded together by the one engine.

A group's rows share one prompt, so the engine prefills it once and copies its keys/values into the
group's rows (qinglm.infer.engine); every step then decodes all rows of all groups in one forward.

Each row gets its own sampling seed, drawn from a torch generator (torch's global RNG by default), so
the same RNG state gives the same rollouts, whatever the batch holds (the engine's rows are
independent). Prompts are rendered with the chat template (`qinglm.infer.chat.encode_chat`: user text never
becomes a control token) and a reply ends at <|im_end|>, [EOS] or max_new_tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from qinglm.config import SamplingConfig
from qinglm.infer.chat import IM_END, encode_chat
from qinglm.infer.engine import Generation, Request
from qinglm.model.transformer import Transformer

if TYPE_CHECKING:
    from qinglm.tokenizer import Tokenizer

_SEED_BOUND = 2**62


@dataclass
class Rollouts:
    """Sampled replies; rows g*G .. g*G+G-1 answer prompt g (G = group_size)."""

    ids: torch.Tensor  # (N, T) prompt + reply ids, right-padded with the tokenizer's pad id
    completion_mask: torch.Tensor  # (N, T) bool: True on the reply's tokens (its stop token included)
    texts: list[str]  # the replies' text, without the stop string
    lengths: list[int]  # reply tokens per row
    truncated: list[bool]  # the reply hit max_new_tokens (or the context) before stopping
    group_size: int


def row_seeds(n: int, generator: torch.Generator | None = None) -> list[int]:
    """Return n sampling seeds drawn from generator (torch's global RNG by default)."""
    return torch.randint(0, _SEED_BOUND, (n,), generator=generator).tolist()


def decode(
    model: Transformer, tokenizer: Tokenizer, requests: Sequence[Request]
) -> tuple[list[list[int]], list[str], list[str]]:
    """Return (reply ids, reply texts, finish reasons) of requests decoded together by the engine.

    A reply's ids hold its stop token (<|im_end|>, or [EOS], which the engine never emits, appended).
    """
    replies: list[list[int]] = [[] for _ in requests]
    texts = [""] * len(requests)
    finish = [""] * len(requests)
    for events in Generation(model, requests, tokenizer=tokenizer):
        for ev in events:
            replies[ev.row] += ev.ids
            texts[ev.row] += ev.text
            if ev.finish_reason == "stop" and not ev.ids:  # [EOS]: the engine never emits it
                replies[ev.row].append(tokenizer.eos_id)
            if ev.finish_reason:
                finish[ev.row] = ev.finish_reason
    return replies, texts, finish


def rollout(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[Mapping[str, str]]],
    group_size: int,
    sampling: SamplingConfig,
    generator: torch.Generator | None = None,
    thinking: bool | None = None,
) -> Rollouts:
    """Return group_size replies to each chat prompt, sampled with sampling (its seed is ignored).

    thinking: the chat template's thinking switch (None: no thinking markup; False: an empty block).
    """
    seeds = row_seeds(len(prompts) * group_size, generator)
    chats = [encode_chat(tokenizer, m, add_generation_prompt=True, thinking=thinking) for m in prompts]
    requests = [
        Request(chat.ids, dataclasses.replace(sampling, seed=seed), [IM_END], chat.content)
        for chat, seed in zip((c for c in chats for _ in range(group_size)), seeds)
    ]
    replies, texts, finish = decode(model, tokenizer, requests)
    truncated = [f == "length" for f in finish]
    rows = [r.prompt_ids + reply for r, reply in zip(requests, replies)]
    masks = [[False] * len(r.prompt_ids) + [True] * len(reply) for r, reply in zip(requests, replies)]
    ids, mask = padded(rows, masks, tokenizer.pad_id, next(model.parameters()).device)
    return Rollouts(ids, mask, texts, [len(r) for r in replies], truncated, group_size)


def padded(
    rows: Sequence[Sequence[int]], masks: Sequence[Sequence[bool]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (ids, mask) (N, T) on device: the rows right-padded with pad_id, their masks with False."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for k, (row, m) in enumerate(zip(rows, masks)):
        ids[k, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[k, : len(m)] = torch.tensor(m, dtype=torch.bool)
    return ids.to(device), mask.to(device)
