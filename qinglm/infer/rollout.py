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
    seeds = torch.randint(0, _SEED_BOUND, (len(prompts) * group_size,), generator=generator).tolist()
    chats = [encode_chat(tokenizer, m, add_generation_prompt=True, thinking=thinking) for m in prompts]
    requests = [
        Request(chat.ids, dataclasses.replace(sampling, seed=seed), [IM_END], chat.content)
        for chat, seed in zip((c for c in chats for _ in range(group_size)), seeds)
    ]
    replies: list[list[int]] = [[] for _ in requests]
    texts = [""] * len(requests)
    truncated = [False] * len(requests)
    for events in Generation(model, requests, tokenizer=tokenizer):
        for ev in events:
            replies[ev.row] += ev.ids
            texts[ev.row] += ev.text
            if ev.finish_reason == "stop" and not ev.ids:  # [EOS]: the engine never emits it
                replies[ev.row].append(tokenizer.eos_id)
            truncated[ev.row] = ev.finish_reason == "length"
    rows = [r.prompt_ids + reply for r, reply in zip(requests, replies)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for k, (req, row) in enumerate(zip(requests, rows)):
        ids[k, : len(row)] = torch.tensor(row)
        mask[k, len(req.prompt_ids) : len(row)] = True
    device = next(model.parameters()).device
    return Rollouts(ids.to(device), mask.to(device), texts, [len(r) for r in replies], truncated, group_size)
