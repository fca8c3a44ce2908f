"""Batched generation: many requests decode together in one KV cache, each with its own settings.

The API (the server, the CLI and ``qinglm.infer.generate`` all use it)::

    from qinglm.config import SamplingConfig
    from qinglm.infer.engine import Generation, Request

    requests = [
        Request(prompt_ids=[bos, *tok.encode("今天")], sampling=SamplingConfig(temperature=0.7, seed=1)),
        Request(prompt_ids=chat_ids, sampling=SamplingConfig(max_new_tokens=64), stop=["\\n\\n"]),
    ]
    gen = Generation(model, requests, tokenizer=tok)  # checks everything now: QingLMError on bad input
    for events in gen:          # one list per decoding step (the model runs between two lists)
        for ev in events:       # ev.row indexes requests; ev.ids, ev.text are this step's new part
            send(ev.row, ev.text)
            if ev.finish_reason:  # "stop" (EOS or a stop string), "length", "cancelled"
                close(ev.row)
        if client_gone:
            gen.cancel(row)     # from any thread; the row's last event (finish "cancelled") follows

- ``Request(prompt_ids, sampling=SamplingConfig(), stop=())``: the prompt as token ids (start it with
  [BOS] for plain text: ``qinglm.infer.text.encode_prompt``; chat prompts come from ``qinglm.infer.chat``); its own
  temperature / top-k / top-p / repetition penalty / max_new_tokens / stop_at_eos / seed; stop
  strings; ``counted``, which prompt tokens the repetition penalty counts (``qinglm.infer.chat.ChatIds.content``
  for a chat; None: all; control tokens never count). Prompts may have different lengths.
- ``Event(row, ids, text, finish_reason)``: every unfinished row gets one event per step. ``ids`` are
  the tokens sampled this step (EOS is never included), ``text`` the newly complete text (never half a
  UTF-8 character, never text that might begin a stop string; a stop string and what follows it are
  cut). The last event of a row has ``finish_reason`` set (and may carry the held-back text).
  ``"".join(texts of a row)`` is the row's completion; ``sum(len(ids))`` its completion token count.
- ``Generation(..., isolate_rows=True)`` (the server): a row whose sampling or text decoding raises ends
  alone with finish_reason ``"error"`` (``ev.error`` holds the exception); the other rows go on.
- ``gen.cancel(row)``: stop a row early (thread-safe). ``gen.close()`` (or leaving the for loop and
  dropping ``gen``) ends everything.
- ``complete(model, tokenizer, prompts, sampling, batch_size=8, stop=())``: offline batched
  generation of plain-text prompts, returning the completions in order.

How it works: prompts are left-padded to the longest one and prefilled in one forward; each row's
positions start at 0 after its padding, and pad slots are masked out of attention
(``Transformer.forward(pad=...)``), so every row decodes exactly as it would alone. Then one token per
step for all rows; finished rows are dropped from the batch and the cache. The same seed gives the
same tokens whether a request runs alone or in a batch (each row has its own generator).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from qinglm.config import SamplingConfig
from qinglm.errors import QingLMError
from qinglm.infer.sampling import sample_next
from qinglm.infer.text import TextDecoder, encode_prompt
from qinglm.limits import check_bytes, memory_bytes
from qinglm.memory import kv_cache_bytes
from qinglm.model.transformer import KVCache, Transformer

if TYPE_CHECKING:
    from qinglm.tokenizer import Tokenizer


@dataclass
class Request:
    """One prompt to continue, with its own sampling settings and stop strings."""

    prompt_ids: list[int]
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop: Sequence[str] = ()
    # Which prompt tokens the repetition penalty counts (None: all); a chat counts its contents only.
    counted: Sequence[bool] | None = None


@dataclass
class Event:
    """What one row produced in one step; finish_reason is set on its last event."""

    row: int
    ids: list[int]
    text: str = ""
    finish_reason: str | None = None
    error: Exception | None = None  # with finish_reason "error" (isolate_rows only)


class _Row:
    """The decoding state of one request."""

    def __init__(self, index: int, req: Request, tokenizer: Tokenizer | None, device: torch.device):
        self.index, self.cfg, self.n_tokens = index, req.sampling, len(req.prompt_ids)
        self.generated = 0
        self.generator = None
        if req.sampling.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(req.sampling.seed)
        self.text = TextDecoder(tokenizer, req.stop) if tokenizer is not None else None


class Generation:
    """Decode a batch of requests step by step; iterate it for lists of Events (see the module doc)."""

    def __init__(
        self,
        model: Transformer,
        requests: Sequence[Request],
        *,
        tokenizer: Tokenizer | None = None,
        eos_id: int | None = None,
        device: torch.device | str | None = None,
        isolate_rows: bool = False,
    ):
        self.model, self.requests, self.tokenizer = model, list(requests), tokenizer
        self.isolate_rows = isolate_rows
        self.eos_id = eos_id if eos_id is not None or tokenizer is None else tokenizer.eos_id
        param = next(model.parameters())
        self.device = torch.device(device) if device is not None else param.device
        for req in self.requests:
            _check_request(req, model, tokenizer)
        self._cancelled: set[int] = set()
        self._lock = threading.Lock()
        self._steps = self._run()

    def cancel(self, row: int) -> None:
        """Stop request `row` before the next step; its final event has finish_reason "cancelled"."""
        with self._lock:
            self._cancelled.add(row)

    def close(self) -> None:
        """End generation now (restores the model's training mode); returns None."""
        self._steps.close()

    def __iter__(self) -> Iterator[list[Event]]:
        return self._steps

    def _take_cancelled(self) -> set[int]:
        with self._lock:
            out, self._cancelled = self._cancelled, set()
        return out

    def _run(self) -> Iterator[list[Event]]:
        model, max_len = self.model, self.model.cfg.max_seq_len
        rows = [_Row(i, r, self.tokenizer, self.device) for i, r in enumerate(self.requests)]
        first = [Event(r.index, [], "", "length") for r in rows if r.cfg.max_new_tokens == 0]
        rows = [r for r in rows if r.cfg.max_new_tokens > 0]
        if not rows:
            if first:
                yield first
            return
        prompts = [self.requests[r.index].prompt_ids for r in rows]
        width = max(len(p) for p in prompts)
        pads = [width - len(p) for p in prompts]
        # Slots a row needs: its padding, its prompt and every emitted token but the last (never fed
        # back), and at most max_len positions.
        n_slots = max(
            width,
            *(
                pad + min(len(p) + r.cfg.max_new_tokens - 1, max_len)
                for pad, p, r in zip(pads, prompts, rows)
            ),
        )
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                dtype = next(model.parameters()).dtype
                need = kv_cache_bytes(model.cfg, len(rows), n_slots, dtype.itemsize)
                check_bytes(
                    need, f"decoding {len(rows):,} rows of up to {n_slots:,} tokens at once", memory_bytes()
                )
                cache = KVCache(model.cfg, len(rows), n_slots, self.device, dtype)
                # Pad slots repeat the row's first token; never attended to nor counted by the penalty.
                context = torch.tensor(
                    [[p[0]] * pad + p + [0] * (n_slots + 1 - width) for p, pad in zip(prompts, pads)],
                    dtype=torch.long,
                    device=self.device,
                )
                # The repetition penalty counts generated tokens and the prompt's counted ones, not padding.
                counted = torch.ones_like(context, dtype=torch.bool)
                for k, (r, n_pad) in enumerate(zip(rows, pads)):
                    mask = self.requests[r.index].counted
                    counted[k, :n_pad] = False
                    if mask is not None:
                        counted[k, n_pad:width] = torch.tensor(list(mask), dtype=torch.bool)
                pad = torch.tensor(pads, dtype=torch.long, device=self.device)
                padded = max(pads) > 0  # without padding the model takes its plain causal path
                prefill_pad = pad if padded else None
                logits = model(context[:, :width], cache=cache, last_only=True, pad=prefill_pad)[:, -1]
            slot = width  # slots filled so far; the next token goes into context[:, slot]
            while True:
                with torch.inference_mode():
                    prev, cnt = context[:, :slot], counted[:, :slot]
                    nxt, failed = (
                        _sample_apart(logits, rows, prev, cnt)
                        if self.isolate_rows
                        else (_sample_rows(logits, rows, prev, cnt), {})
                    )
                    context[:, slot] = nxt
                    ids = nxt.tolist()
                events = first + [
                    self._event(row, tok, max_len, failed.get(k))
                    for k, (row, tok) in enumerate(zip(rows, ids))
                ]
                first = []
                yield events
                # Rows cancelled while the caller handled the events (or while the model ran) end here.
                cancelled = self._take_cancelled()
                gone = [ev.row for ev in events if ev.finish_reason is None and ev.row in cancelled]
                if gone:
                    yield [Event(i, [], "", "cancelled") for i in gone]
                keep = [k for k, ev in enumerate(events[-len(rows) :]) if ev.finish_reason is None]
                keep = [k for k in keep if rows[k].index not in gone]
                if not keep:
                    return
                with torch.inference_mode():
                    if len(keep) < len(rows):  # drop finished rows from the batch and the cache
                        index = torch.tensor(keep, device=self.device)
                        cache.keep_rows(index)
                        context, pad, counted = context[index], pad[index], counted[index]
                        rows = [rows[k] for k in keep]
                        padded = bool(pad.any())
                    logits = model(
                        context[:, slot : slot + 1],
                        cache=cache,
                        start=slot,
                        last_only=True,
                        pad=pad if padded else None,
                    )[:, -1]
                slot += 1
        finally:
            model.train(was_training)

    def _event(self, row: _Row, tok: int, max_len: int, error: Exception | None) -> Event:
        """Return _advance's Event, or with isolate_rows the "error" Event of a row that failed."""
        if error is None:
            try:
                return self._advance(row, tok, max_len)
            except Exception as e:
                if not self.isolate_rows:
                    raise
                error = e
        return Event(row.index, [], "", "error", error)

    def _advance(self, row: _Row, tok: int, max_len: int) -> Event:
        """Return the Event of row after sampling tok (EOS, max_new_tokens, a full context, stop strings)."""
        cfg = row.cfg
        if cfg.stop_at_eos and self.eos_id is not None and tok == self.eos_id:
            return Event(row.index, [], row.text.finish() if row.text else "", "stop")
        row.generated += 1
        row.n_tokens += 1
        text, stopped = row.text.feed(tok) if row.text else ("", False)
        if stopped:
            return Event(row.index, [tok], text, "stop")
        # The token sampled after a full context is emitted but cannot be fed back.
        if row.generated >= cfg.max_new_tokens or row.n_tokens > max_len:
            return Event(row.index, [tok], text + (row.text.finish() if row.text else ""), "length")
        return Event(row.index, [tok], text)


def _sample_rows(
    logits: torch.Tensor, rows: list[_Row], prev: torch.Tensor, counted: torch.Tensor
) -> torch.Tensor:
    """Return the next token (K,) of each row, each drawn with its own settings and generator."""
    out = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    greedy: dict[float, list[int]] = {}  # greedy rows sharing a penalty are one batched argmax
    for k, row in enumerate(rows):
        if row.cfg.temperature == 0:
            greedy.setdefault(row.cfg.repetition_penalty, []).append(k)
        else:
            out[k] = sample_next(
                logits[k : k + 1], row.cfg, row.generator, prev[k : k + 1], counted[k : k + 1]
            )[0]
    for ks in greedy.values():
        cfg = rows[ks[0]].cfg
        if len(ks) == len(rows):
            out = sample_next(logits, cfg, None, prev, counted)
        else:
            index = torch.tensor(ks, device=logits.device)
            out[index] = sample_next(logits[index], cfg, None, prev[index], counted[index])
    return out


def _sample_apart(
    logits: torch.Tensor, rows: list[_Row], prev: torch.Tensor, counted: torch.Tensor
) -> tuple[torch.Tensor, dict[int, Exception]]:
    """Return _sample_rows' tokens and {k: error} of the rows whose sampling raised (token 0 for them)."""
    states = [r.generator.get_state() if r.generator is not None else None for r in rows]
    try:
        return _sample_rows(logits, rows, prev, counted), {}
    except Exception:  # find the rows at fault: sample each alone, as if the batched draw never happened
        pass
    out = torch.zeros(len(rows), dtype=torch.long, device=logits.device)
    failed: dict[int, Exception] = {}
    for k, (row, state) in enumerate(zip(rows, states)):
        if state is not None:
            row.generator.set_state(state)
        try:
            out[k] = _sample_rows(logits[k : k + 1], [row], prev[k : k + 1], counted[k : k + 1])[0]
        except Exception as e:
            failed[k] = e
    return out, failed


def _check_request(req: Request, model: Transformer, tokenizer: Tokenizer | None) -> None:
    """Raise QingLMError for a request that cannot run; return None otherwise."""
    req.sampling.validate()  # again: a config may have been changed since it was built
    max_len, vocab = model.cfg.max_seq_len, model.cfg.vocab_size
    n = len(req.prompt_ids)
    if n == 0:
        raise QingLMError("the prompt is empty; encode it as [BOS] + tokens")
    if n > max_len:
        raise QingLMError(f"prompt is {n} tokens but the model's context is {max_len}; shorten it")
    if any(not 0 <= t < vocab for t in req.prompt_ids):
        raise QingLMError(
            f"prompt has token ids outside the model's vocabulary of {vocab}; "
            "use the tokenizer that was trained with this model"
        )
    if req.counted is not None and len(req.counted) != n:
        raise QingLMError(f"counted has {len(req.counted)} flags for a prompt of {n} tokens")
    if isinstance(req.stop, str):
        raise QingLMError("stop must be a list of strings, not one string")
    if any(not isinstance(s, str) or not s for s in req.stop):
        raise QingLMError("stop strings must be non-empty strings")
    if req.stop and tokenizer is None:
        raise QingLMError("stop strings need the tokenizer")


def complete(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    sampling: SamplingConfig | None = None,
    *,
    batch_size: int = 8,
    stop: Sequence[str] = (),
    device: torch.device | str | None = None,
) -> Iterator[str]:
    """Return an iterator over the completions of plain-text prompts, in order, batch_size at a time.

    Prompts are sorted by length so each batch pads little; with a seed every prompt gets the same seed.
    """
    if batch_size < 1:
        raise QingLMError(f"batch size must be 1 or more, got {batch_size}")
    sampling = sampling or SamplingConfig()
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    done: dict[int, str] = {}
    nxt = 0
    for b in range(0, len(order), batch_size):
        chunk = order[b : b + batch_size]
        reqs = [Request(encoded[i], sampling, stop) for i in chunk]
        texts = [""] * len(chunk)
        for events in Generation(model, reqs, tokenizer=tokenizer, device=device):
            for ev in events:
                texts[ev.row] += ev.text
        done.update(zip(chunk, texts))
        while nxt in done:  # yield in the caller's order as soon as possible
            yield done.pop(nxt)
            nxt += 1
