"""SFT data: reading chat JSONL (counting bad lines), tokenising with assistant-only labels, batching.

Two line formats are read, one object per line:
  minimind:  {"conversations": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
  Alpaca:    {"instruction": "...", "input": "...", "output": "..."}  (optional "system")
A conversation is encoded with qinglm.infer.chat (contents as text, control tokens by id: for contents free of
control-token text, the ids transformers' apply_chat_template gives); labels keep only the tokens of
assistant contents and their closing <|im_end|>, everything else is IGNORE_INDEX. Batches either pack
samples into full rows (a sample attends to the earlier samples of its row; the loss still covers only
its own assistant tokens) or pad samples of similar length to the longest of the batch.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qinglm.errors import QingLMError
from qinglm.infer.chat import ROLES, check_messages, encode_turn
from qinglm.io import not_a_file

if TYPE_CHECKING:
    import torch

    from qinglm.tokenizer import Tokenizer

IGNORE_INDEX = (
    -100
)  # the same value as qinglm.model.transformer.IGNORE_INDEX (not imported: that pulls in torch)
Messages = list[dict[str, str]]


# ---------------------------------------------------------------------------- reading


@dataclass
class ReadReport:
    """What reading a JSONL file found: kept conversations and skipped lines by reason."""

    path: str
    lines: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    first_bad: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason), the first few
    noun: str = "conversations"  # what a kept line is

    def summary(self) -> str:
        """Return one line: how many conversations were read and why lines were skipped."""
        text = f"{self.path}: {self.kept:,} {self.noun} from {self.lines:,} lines"
        if self.skipped:
            reasons = ", ".join(f"{n:,} {why}" for why, n in self.skipped.most_common())
            where = ", ".join(f"line {n}" for n, _ in self.first_bad)
            text += f"; skipped {sum(self.skipped.values()):,} bad lines ({reasons}; first at {where})"
        return text


def to_messages(obj: Any) -> Messages:
    """Return the messages of one parsed JSONL object in either format; raise ValueError(reason) if bad."""
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    if "conversations" in obj:
        conv = obj["conversations"]
        if not isinstance(conv, list) or not conv:
            raise ValueError("empty or non-list conversations")
        msgs = []
        for m in conv:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError("bad message (role must be system/user/assistant, content a string)")
            msgs.append({"role": m["role"], "content": m["content"]})
    elif "instruction" in obj and "output" in obj:
        parts = [obj.get(k, "") for k in ("system", "instruction", "input", "output")]
        if not all(isinstance(p, str) for p in parts):
            raise ValueError("non-string Alpaca field")
        system, instruction, inp, output = parts
        user = f"{instruction}\n{inp}" if inp.strip() else instruction
        msgs = ([{"role": "system", "content": system}] if system.strip() else []) + [
            {"role": "user", "content": user},
            {"role": "assistant", "content": output},
        ]
    else:
        raise ValueError("neither 'conversations' nor 'instruction'/'output'")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
        raise ValueError("no assistant reply")
    return msgs


def read_jsonl(
    path: str | Path,
    parse: Callable[[Any], Any],
    what: str,
    builtin: str,
    noun: str = "conversations",
    max_bad_shown: int = 3,
) -> tuple[list, ReadReport]:
    """Return (parse(obj) of every good line, report) of a JSONL file; bad lines are counted, never kept.

    parse raises ValueError(reason) for a bad object. what ("SFT"), builtin ("idioms-sft") and noun
    ("conversations") name the data in messages. Lines are read as the data tools read them (encoding
    detected; a line longer than MAX_LINE_CHARS is skipped without being held). Raises QingLMError when
    the file is missing, not text, or has no usable line.
    """
    from qinglm.data.files import CorruptInput
    from qinglm.data.sources import json_lines

    p = Path(path).expanduser()
    if problem := not_a_file(p):  # missing, a directory, /dev/zero, ...
        raise QingLMError(f"{what} data file {p}: {problem}; give a JSONL file or {builtin}")
    report, items = ReadReport(str(p), noun=noun), []
    try:
        for n, record, why in json_lines(p, None):
            report.lines += 1
            if not why:
                try:
                    items.append(parse(record))
                    continue
                except ValueError as e:
                    why = str(e)
            report.skipped[why] += 1
            if len(report.first_bad) < max_bad_shown:
                report.first_bad.append((n, why))
    except CorruptInput as e:
        raise QingLMError(f"cannot decompress {p} ({e}); download or compress it again") from None
    report.kept = len(items)
    if not items:
        raise QingLMError(f"no usable {noun} in {p}: {report.summary()}")
    return items, report


def read_sft_jsonl(path: str | Path, max_bad_shown: int = 3) -> tuple[list[Messages], ReadReport]:
    """Return (conversations, report) of an SFT JSONL file (see read_jsonl)."""
    return read_jsonl(path, to_messages, "SFT", "idioms-sft", max_bad_shown=max_bad_shown)


# ---------------------------------------------------------------------------- tokenising


def encode_chat(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], list[int]]:
    """Return (ids, labels) of a whole conversation; labels are IGNORE_INDEX except on assistant tokens.

    The ids are qinglm.infer.chat.encode_chat's (contents encoded as text, control tokens by id). An assistant
    token is one of an assistant content or its closing <|im_end|>; the "\\n" after <|im_end|> and every
    system/user token carry no loss.
    """
    check_messages(messages)
    ids, labels = [tokenizer.bos_id], [IGNORE_INDEX]
    for m in messages:
        turn = encode_turn(tokenizer, m["role"], m["content"])
        ids += turn.ids
        if m["role"] != "assistant":
            labels += [IGNORE_INDEX] * len(turn.ids)
            continue
        end = turn.ids.index(tokenizer.im_end_id)  # the first one: contents never hold a control id
        labels += [
            t if inside or k == end else IGNORE_INDEX
            for k, (t, inside) in enumerate(zip(turn.ids, turn.content))
        ]
    return ids, labels


@dataclass
class Sample:
    """One training example: inputs x and next-token targets y (IGNORE_INDEX where no loss), same length."""

    x: list[int]
    y: list[int]


def make_samples(
    tokenizer: Tokenizer, conversations: Sequence[Messages], seq_len: int
) -> tuple[list[Sample], Counter]:
    """Return (samples, counts): conversations cut to seq_len inputs; counts "truncated" and "no_target"."""
    samples, counts = [], Counter()
    for msgs in conversations:
        ids, labels = encode_chat(tokenizer, msgs)
        if len(ids) - 1 > seq_len:
            ids, labels = ids[: seq_len + 1], labels[: seq_len + 1]
            counts["truncated"] += 1
        y = labels[1:]
        if all(t == IGNORE_INDEX for t in y):  # the reply was cut away entirely
            counts["no_target"] += 1
            continue
        samples.append(Sample(ids[:-1], y))
    return samples, counts


# ---------------------------------------------------------------------------- batching


def pack_rows(samples: Sequence[Sample], seq_len: int) -> list[Sample]:
    """Return rows of at most seq_len tokens, each the concatenation of consecutive samples."""
    rows, cur = [], Sample([], [])
    for s in samples:
        if cur.x and len(cur.x) + len(s.x) > seq_len:
            rows.append(cur)
            cur = Sample([], [])
        cur.x.extend(s.x)
        cur.y.extend(s.y)
    if cur.x:
        rows.append(cur)
    return rows


def collate(rows: Sequence[Sample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (x, y) LongTensors (B, T) padded to the longest row: pad_id in x, IGNORE_INDEX in y."""
    import torch

    T = max(len(r.x) for r in rows)
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, : len(r.x)] = torch.tensor(r.x, dtype=torch.long)
        y[i, : len(r.y)] = torch.tensor(r.y, dtype=torch.long)
    return x, y


def epoch_rows(
    samples: Sequence[Sample], batch_size: int, seq_len: int, mode: str, seed: int
) -> list[list[Sample]]:
    """Return one epoch of batches of rows in a seeded random order, packed or padded (mode)."""
    rng = random.Random(seed)
    order = list(samples)
    rng.shuffle(order)
    if mode == "pack":
        rows = pack_rows(order, seq_len)
    elif mode == "pad":
        # Sort within windows of 64 batches so a batch holds similar lengths, then shuffle the batches.
        window = 64 * batch_size
        rows = [
            r
            for i in range(0, len(order), window)
            for r in sorted(order[i : i + window], key=lambda s: len(s.x))
        ]
    else:
        raise QingLMError(f"unknown batching {mode!r}; choose pack or pad")
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    rng.shuffle(batches)
    return batches


def epoch_batches(
    samples: Sequence[Sample], batch_size: int, seq_len: int, mode: str, pad_id: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Return one epoch of (x, y) batches in a seeded random order, packed or padded (mode)."""
    return [collate(b, pad_id) for b in epoch_rows(samples, batch_size, seq_len, mode, seed)]


def steps_per_epoch(samples: Sequence[Sample], batch_size: int, seq_len: int, mode: str, seed: int) -> int:
    """Return the number of batches of the epoch shuffled with seed (greedy packing fills rows unevenly
    and depends on the order, so the rows are counted, not estimated from the tokens)."""
    return max(1, len(epoch_rows(samples, batch_size, seq_len, mode, seed)))


def steps_for_epochs(
    samples: Sequence[Sample], batch_size: int, seq_len: int, mode: str, seed: int, num_epochs: float
) -> int:
    """Return the number of steps of num_epochs epochs of batch_stream(..., seed) (epoch e uses seed + e)."""
    whole = int(num_epochs)
    steps = sum(steps_per_epoch(samples, batch_size, seq_len, mode, seed + e) for e in range(whole))
    if num_epochs > whole:
        part = steps_per_epoch(samples, batch_size, seq_len, mode, seed + whole)
        steps += math.ceil((num_epochs - whole) * part)
    return max(1, steps)


def assistant_tokens(samples: Sequence[Sample]) -> int:
    """Return how many tokens carry loss in samples."""
    return sum(sum(t != IGNORE_INDEX for t in s.y) for s in samples)


def batch_stream(
    samples: Sequence[Sample], batch_size: int, seq_len: int, mode: str, pad_id: int, seed: int
) -> Iterator[tuple[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Return an endless iterator of (epoch, batch), reshuffled each epoch."""
    epoch = 0
    while True:
        for b in epoch_batches(samples, batch_size, seq_len, mode, pad_id, seed + epoch):
            yield epoch, b
        epoch += 1
