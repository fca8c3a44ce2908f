"""DPO data: preference pairs read from JSONL (bad lines counted by reason), tokenised and batched.

One object per line, in any of these forms:
  plain:          {"prompt": "...", "chosen": "...", "rejected": "..."}  (the prompt is one user turn)
  conversational: {"chosen": [messages], "rejected": [messages]}  (minimind's DPO file, TRL's implicit
                  prompt: every message but the last is the prompt and must be the same in both)
                  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}  (TRL's explicit prompt)
Messages are SFT's {"role", "content"}; each reply is one assistant message. A pair is tokenised as the
prompt's turns (qinglm.infer.chat: message text never becomes control tokens) followed by each reply's
assistant turn; targets are IGNORE_INDEX except on the reply's content and its closing <|im_end|>,
exactly SFT's assistant labels. A batch of B pairs is 2B right-padded rows: B chosen, then B rejected.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qinglm.infer import chat
from qinglm.sft.data import (
    IGNORE_INDEX,
    Messages,
    ReadReport,
    Sample,
    collate,
    encode_chat,
    read_jsonl,
    to_messages,
)

if TYPE_CHECKING:
    import torch

    from qinglm.tokenizer import Tokenizer

BUILTIN = "idioms-dpo"  # the built-in data's name (qinglm.post.idioms_dpo)


@dataclass
class Pair:
    """One preference: the conversation before the reply, the preferred reply and the dispreferred one."""

    prompt: Messages
    chosen: str
    rejected: str


# ---------------------------------------------------------------------------- reading


def _messages(value: Any) -> Messages:
    return to_messages({"conversations": value})  # SFT's checks and reasons


def _checked(prompt: Messages, chosen: str, rejected: str) -> Pair:
    if not prompt:
        raise ValueError("no prompt")
    if not chosen.strip() or not rejected.strip():
        raise ValueError("empty reply")
    if chosen == rejected:
        raise ValueError("chosen equals rejected")
    return Pair(prompt, chosen, rejected)


def to_pair(obj: Any) -> Pair:
    """Return the Pair of one parsed JSONL object in any of the forms; raise ValueError(reason) if bad."""
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    if "chosen" not in obj or "rejected" not in obj:
        raise ValueError("no 'chosen' and 'rejected'")
    prompt, chosen, rejected = obj.get("prompt"), obj["chosen"], obj["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("no prompt")
        return _checked([{"role": "user", "content": prompt}], chosen, rejected)
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise ValueError("'chosen' and 'rejected' must both be strings or both lists of messages")
    if prompt is not None:
        if not isinstance(prompt, list):
            raise ValueError("'prompt' must be a list of messages when the replies are")
        chosen, rejected = prompt + chosen, prompt + rejected
    c, r = _messages(chosen), _messages(rejected)
    if c[:-1] != r[:-1]:
        raise ValueError("chosen and rejected differ before their last message")
    if c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
        raise ValueError("last message is not an assistant reply")
    return _checked(c[:-1], c[-1]["content"], r[-1]["content"])


def read_dpo_jsonl(path: str | Path, max_bad_shown: int = 3) -> tuple[list[Pair], ReadReport]:
    """Return (pairs, report) of a DPO JSONL file; bad lines are counted by reason, never kept."""
    return read_jsonl(path, to_pair, "DPO", BUILTIN, noun="preference pairs", max_bad_shown=max_bad_shown)


# ---------------------------------------------------------------------------- tokenising


@dataclass
class PairIds:
    """One tokenised pair: a chosen and a rejected row (same prompt ids, targets on the reply only)."""

    chosen: Sample
    rejected: Sample


def _reply(tokenizer: Tokenizer, text: str) -> tuple[list[int], list[int]]:
    ids, labels = encode_chat(tokenizer, [{"role": "assistant", "content": text}])
    return ids[1:], labels[1:]  # without the [BOS]


def encode_pair(tokenizer: Tokenizer, pair: Pair, seq_len: int) -> tuple[PairIds | None, bool]:
    """Return (the pair's rows or None when a reply is cut away entirely, whether anything was cut).

    A row holds at most seq_len inputs. When the prompt and the longer reply do not fit, the prompt
    keeps [BOS] and its end (at least half the row when the reply is longer), then replies are cut.
    """
    prompt = chat.encode_chat(tokenizer, pair.prompt).ids
    replies = [_reply(tokenizer, pair.chosen), _reply(tokenizer, pair.rejected)]
    limit = seq_len + 1  # ids per row: inputs are ids[:-1], targets ids[1:]
    longest = max(len(ids) for ids, _ in replies)
    cut = len(prompt) + longest > limit
    if cut:
        keep = min(len(prompt), max(limit - longest, limit // 2, 1))
        prompt = prompt[:1] + prompt[len(prompt) - keep + 1 :]
    rows = []
    for ids, labels in replies:
        ids = (prompt + ids)[:limit]
        y = ([IGNORE_INDEX] * len(prompt) + labels)[1:limit]
        if all(t == IGNORE_INDEX for t in y):
            return None, cut
        rows.append(Sample(ids[:-1], y))
    return PairIds(*rows), cut


def encode_pairs(tokenizer: Tokenizer, pairs: Sequence[Pair], seq_len: int) -> tuple[list[PairIds], Counter]:
    """Return (tokenised pairs, counts): counts "truncated" and "no_target" (dropped: a reply cut away)."""
    out, counts = [], Counter()
    for pair in pairs:
        ids, cut = encode_pair(tokenizer, pair, seq_len)
        counts["truncated"] += cut
        if ids is None:
            counts["no_target"] += 1
        else:
            out.append(ids)
    return out, +counts


def collate_pairs(pairs: Sequence[PairIds], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (x, y) of shape (2B, T): rows 0..B-1 chosen, B..2B-1 rejected, padded (targets IGNORE_INDEX)."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
