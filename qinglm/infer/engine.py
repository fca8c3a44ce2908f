"""Batched generation: many requests decode together in one KV cache, each with its own settings.

The API (the server, the CLI and ``qinglm.infer.generate`` all use it)::

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
- ``qinglm.infer.generate.complete(model, tokenizer, prompts, sampling, batch_size=8, stop=())``:
  offline batched generation of plain-text prompts, returning the completions in order.
- ``Engine(model, tokenizer=, max_batch_size=32, kv_tokens=None, prefill_chunk=256, compile=False, draft=None)``: the
  engine under Generation, for callers whose requests come and go (the server): ``engine.add(key, req)``
  at any time between steps, ``engine.step()`` returns one step's events (``ev.row`` is the key),
  ``engine.cancel(key)``, ``engine.busy``. One forward per step decodes every row, whatever request it
  belongs to; requests join and leave between steps without touching the other rows.

How it works (qinglm.infer.slots): a static KV cache of rows x positions; row i holds active request
i from position 0, with its own length. A step feeds every row its last token at its own position
(attention masks the rest of the row), samples all rows at once (qinglm.infer.sampling.sample_rows:
each row draws its own uniform number from its own generator, so a seed gives the same tokens alone
or in any batch), and frees the rows that finished by moving the last row into their place. New
requests are admitted while rows and the KV budget allow, and prefilled (identical prompts once) in
chunks while others decode; the step compiles (``compile=True``) to a bounded set of shapes. A row with
``SamplingConfig.speculate`` drafts tokens while it decodes alone (qinglm.infer.speculate); one forward
verifies the draft and the row's event carries every token accepted (the tokens plain decoding gives).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from qinglm.errors import QingLMError
from qinglm.infer.request import Event, Request, Row, check_request, uniform_numbers
from qinglm.infer.sampling import N_CONTROL_IDS, SeenTokens, sample_apart, sample_configs
from qinglm.infer.slots import MIN_BUCKET, Slots, bucket, check_fits
from qinglm.infer.speculate import DraftModel, DraftRow, PromptLookup, SpecStats, draft, verify
from qinglm.model.transformer import Transformer

if TYPE_CHECKING:
    from qinglm.tokenizer import Tokenizer


class _Prefill:
    """Prompts admitted together, prefilled chunk by chunk into a scratch cache of their own."""

    def __init__(self, rows: list[Row]):
        self.rows = rows
        unique: dict[tuple[int, ...], int] = {}  # identical prompts (a GRPO group) are prefilled once
        self.src = [unique.setdefault(tuple(r.req.prompt_ids), len(unique)) for r in rows]
        self.prompts = [list(p) for p in unique]
        self.width, self.done, self.scratch = max(len(p) for p in self.prompts), 0, None


class Engine:
    """The one decode engine: the rows of many requests share one static KV cache and one step."""

    def __init__(
        self,
        model: Transformer,
        *,
        tokenizer: Tokenizer | None = None,
        eos_id: int | None = None,
        device: torch.device | str | None = None,
        max_batch_size: int = 32,
        kv_tokens: int | None = None,
        prefill_chunk: int = 256,
        compile: bool = False,
        isolate_rows: bool = False,
        draft: Transformer | None = None,
        log: Callable[[str], None] = print,
    ):
        if max_batch_size < 1:
            raise QingLMError(f"max batch size must be 1 or more, got {max_batch_size}")
        self.model, self.tokenizer, self.isolate_rows = model, tokenizer, isolate_rows
        self.eos_id = eos_id if eos_id is not None or tokenizer is None else tokenizer.eos_id
        # The ids the repetition penalty never counts: 6, or 12 with the tool and thinking tokens.
        self.n_control = N_CONTROL_IDS if tokenizer is None else tokenizer.n_control_ids
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.max_len, self.prefill_chunk = model.cfg.max_seq_len, max(1, prefill_chunk)
        full = bucket(max_batch_size, max_batch_size) * bucket(self.max_len, self.max_len, MIN_BUCKET)
        self.kv_tokens = full if kv_tokens is None else kv_tokens
        self.slots = Slots(model, max_batch_size, self.kv_tokens, self.device, compile, log)
        self.active: list[Row] = []  # row i of the cache is active[i]
        # A row holds at most its context's tokens and the one sampled last.
        self.seen = SeenTokens(max_batch_size, self.max_len + 1, self.n_control, self.device)
        self.waiting: collections.deque[Row] = collections.deque()
        self.prefilling: _Prefill | None = None
        self._ready: list[Event] = []  # events that need no step (max_new_tokens 0)
        self._cancelled: set[Hashable] = set()
        self._lock = threading.Lock()
        self.spec = SpecStats()  # what the speculating rows drafted and had accepted (qinglm.infer.speculate)
        self.draft = DraftModel(draft, model) if draft is not None else None  # else drafts by prompt lookup

    # -------------------------------------------------------------- callers' side

    def add(self, key: Hashable, req: Request) -> None:
        """Queue req under key (its events carry it); raise QingLMError if it can never run."""
        check_request(req, self.model, self.tokenizer)
        row = Row(key, req, self.tokenizer, self.device)
        if req.sampling.max_new_tokens == 0:
            self._ready.append(Event(key, [], "", "length"))
            return
        check_fits(len(req.prompt_ids), req.sampling.max_new_tokens, self.max_len, self.kv_tokens)
        self.waiting.append(row)

    def cancel(self, key: Hashable) -> None:
        """Stop request key before the next step (thread-safe); its last event has finish_reason "cancelled"."""
        with self._lock:
            self._cancelled.add(key)

    @property
    def busy(self) -> bool:
        """Return True while any request is waiting, prefilling or decoding."""
        return bool(self.active or self.waiting or self.prefilling or self._ready)

    @property
    def rows(self) -> int:
        """Return the number of requests prefilling or decoding."""
        return len(self.active) + (len(self.prefilling.rows) if self.prefilling else 0)

    def warm_up(self) -> int:
        """Compile the decoding step for every shape it can take (compiled engines; a no-op eager), so no
        request waits for a compile; return the number of shapes."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                return self.slots.warm_up()
        finally:
            self.model.train(was_training)

    # -------------------------------------------------------------- one step

    def step(self) -> list[Event]:
        """Return the events of one step: every decoding row gets a token; new requests are admitted,
        prefilled (a chunk of a long prompt per step while others decode) and get their first token."""
        events, self._ready = self._ready, []
        was_training = self.model.training  # eval() walks every module: only when it changes anything
        if was_training:
            self.model.eval()
        try:
            with torch.inference_mode():
                events += self._drop_cancelled()
                logits, later, drafts = [], None, draft(self.active, self.slots.positions)
                if drafts is not None:  # logits (n, 1 + k, vocab): each position's next token
                    verified = verify(self.slots, self.active, drafts, self.spec)
                    logits.append(verified[:, 0])
                    later = verified[:, 1:]
                elif self.active:
                    logits.append(self._decode())
                if self.prefilling is None:
                    self._admit()
                if self.prefilling is not None:
                    new = self._prefill(self.prefilling)
                    if new is not None:
                        logits.append(new)
                if logits:
                    first = logits[0] if len(logits) == 1 else torch.cat(logits)
                    events += self._sample(first, later, drafts)
        finally:
            if was_training:
                self.model.train()
        return events

    def _decode(self) -> torch.Tensor:
        """Return the logits (n, vocab) after feeding each decoding row its last token."""
        positions = [r.length for r in self.active]
        tokens = torch.tensor([r.last for r in self.active], device=self.device)
        longest, aligned = max(positions) + 1, min(positions) == max(positions)
        logits = self.slots.decode(tokens, torch.tensor(positions, device=self.device), longest, aligned)
        for r in self.active:
            r.length += 1
        return logits

    def _admit(self) -> None:
        """Start prefilling the waiting requests that fit beside the decoding rows (rows and KV budget)."""
        taken: list[Row] = []
        longest = max((r.need(self.max_len) for r in self.active), default=1)
        while self.waiting and len(self.active) + len(taken) < self.slots.max_rows:
            nxt = self.waiting[0]
            longest_with = max(longest, nxt.need(self.max_len))
            if not self.slots.fits(len(self.active) + len(taken) + 1, longest_with):
                break
            taken.append(self.waiting.popleft())
            longest = longest_with
        if taken:
            self.prefilling = _Prefill(taken)

    def _prefill(self, job: _Prefill) -> torch.Tensor | None:
        """Run the next chunk of job; return the logits (k, vocab) of the k prompts that ended in it
        (now the last k active rows), or None."""
        start = job.done
        job.done = job.width if not self.active else min(job.width, start + self.prefill_chunk)
        job.scratch, logits = self.slots.prefill(job.prompts, job.scratch, start, job.done)
        ends = [k for k, r in enumerate(job.rows) if start < r.length <= job.done and not r.cancelled]
        if job.done == job.width:
            self.prefilling = None
        if not ends:
            return None
        new, n = [job.rows[k] for k in ends], len(self.active)
        self.slots.reserve(n + len(new), max(r.need(self.max_len) for r in self.active + new))
        src = [job.src[k] for k in ends]
        self.slots.store(list(range(n, n + len(new))), job.scratch, src, [r.length for r in new])
        for i, r in enumerate(new, start=n):
            r.placed = True
            if r.cfg.speculate:
                ids = r.req.prompt_ids
                r.drafter = (
                    DraftRow(self.draft, ids, r.cfg.repetition_penalty) if self.draft else PromptLookup(ids)
                )
            ids = torch.tensor(r.req.prompt_ids, device=self.device)
            if r.req.counted is not None:
                ids = ids[torch.tensor(list(r.req.counted), dtype=torch.bool, device=self.device)]
            self.seen.set(i, ids[ids >= self.n_control])  # the prompt tokens the penalty counts
        self.active += new
        return logits[torch.tensor(src, device=self.device)]

    def _sample(
        self, first: torch.Tensor, later: torch.Tensor | None = None, drafts: list[list[int]] | None = None
    ) -> list[Event]:
        """Return the events of the active rows after sampling a token for each from first (n, vocab); a
        row whose token equals its draft's first goes on with later[:, 0] and the draft's second, and so on
        (speculation: the same tokens, one uniform number each, as one step per token would give)."""
        rows, events, done = self.active, {}, []
        alive, t = list(range(len(rows))), 0
        while alive:
            logits = first if t == 0 else later[torch.tensor(alive, device=later.device), t - 1]
            tokens, failed = self._draw(logits, [rows[k] for k in alive], alive if t else None)
            going = []
            for j, (k, tok) in enumerate(zip(alive, tokens.tolist())):
                row = rows[k]
                ev = self._event(row, tok, failed.get(j))
                row.last = tok
                if row.drafter is not None:
                    row.drafter.extend(ev.ids)
                events[k] = ev if t == 0 else events[k].then(ev)
                if ev.finish_reason:
                    done.append(k)
                elif drafts is not None and k < len(drafts) and t < len(drafts[k]) and tok == drafts[k][t]:
                    going.append(k)  # its key/value at this position are the right ones: keep them
                    row.length += 1
                    self.spec.accepted += 1
            alive, t = going, t + 1
        self._free(done)
        return list(events.values())

    def _draw(
        self, logits: torch.Tensor, rows: list[Row], index: list[int] | None
    ) -> tuple[torch.Tensor, dict[int, Exception]]:
        """Return a token (n,) for each of rows (active rows at index; None: all) from logits (n, vocab) and
        {j: error} of those whose sampling raised (isolate_rows); the penalty's record gets the tokens."""
        uniform = uniform_numbers(rows, self.device)
        logits = logits.float()
        cfgs = [r.cfg for r in rows]
        penalty = [c.repetition_penalty for c in cfgs]
        penalised = any(p != 1.0 for p in penalty)  # only a penalised row ever reads its seen tokens
        if penalised:
            logits = self.seen.penalise(logits, torch.tensor(penalty, device=logits.device), index)
        if self.isolate_rows:
            tokens, failed = sample_apart(logits, cfgs, uniform)
        else:
            tokens, failed = sample_configs(logits, cfgs, uniform), {}
        if penalised:
            self.seen.append(tokens, index)
        return tokens, failed

    def _free(self, done: list[int]) -> None:
        """Remove the active rows at indices done; the last rows move into the holes they leave."""
        for i in sorted(done, reverse=True):
            last = len(self.active) - 1
            if i != last:
                self.slots.move(last, i, self.active[last].length)
                self.seen.move(last, i)
                self.active[i] = self.active[last]
            self.active.pop()

    def _drop_cancelled(self) -> list[Event]:
        """Return the "cancelled" events of the requests cancelled since the last step, now removed."""
        with self._lock:
            keys, self._cancelled = self._cancelled, set()
        if not keys:
            return []
        gone = [r for r in self.waiting if r.key in keys]
        self.waiting = collections.deque(r for r in self.waiting if r.key not in keys)
        if self.prefilling is not None:
            for r in self.prefilling.rows:
                if r.key in keys and not r.placed and not r.cancelled:
                    r.cancelled = True
                    gone.append(r)
        done = [i for i, r in enumerate(self.active) if r.key in keys]
        gone += [self.active[i] for i in done]
        self._free(done)
        return [Event(r.key, [], "", "cancelled") for r in gone]

    def _event(self, row: Row, tok: int, error: Exception | None) -> Event:
        """Return _advance's Event, or with isolate_rows the "error" Event of a row that failed."""
        if error is None:
            try:
                return self._advance(row, tok)
            except Exception as e:
                if not self.isolate_rows:
                    raise
                error = e
        return Event(row.key, [], "", "error", error)

    def _advance(self, row: Row, tok: int) -> Event:
        """Return the Event of row after sampling tok (EOS, max_new_tokens, a full context, stop strings)."""
        cfg = row.cfg
        if cfg.stop_at_eos and self.eos_id is not None and tok == self.eos_id:
            return Event(row.key, [], row.text.finish() if row.text else "", "stop")
        row.generated += 1
        row.n_tokens += 1
        text, stopped = row.text.feed(tok) if row.text else ("", False)
        if stopped:
            return Event(row.key, [tok], text, "stop")
        # The token sampled after a full context is emitted but cannot be fed back.
        if row.generated >= cfg.max_new_tokens or row.n_tokens > self.max_len:
            return Event(row.key, [tok], text + (row.text.finish() if row.text else ""), "length")
        return Event(row.key, [tok], text)


class Generation:
    """Decode a fixed set of requests step by step on an Engine of their own; iterate it for lists of
    Events (see the module doc)."""

    def __init__(
        self,
        model: Transformer,
        requests: Sequence[Request],
        *,
        tokenizer: Tokenizer | None = None,
        eos_id: int | None = None,
        device: torch.device | str | None = None,
        isolate_rows: bool = False,
        compile: bool = False,
        draft: Transformer | None = None,
    ):
        self.requests = list(requests)
        for req in self.requests:  # every request is checked before any runs
            check_request(req, model, tokenizer)
        self.engine = Engine(
            model,
            tokenizer=tokenizer,
            eos_id=eos_id,
            device=device,
            max_batch_size=max(1, len(self.requests)),
            isolate_rows=isolate_rows,
            compile=compile,
            draft=draft,
        )
        for i, req in enumerate(self.requests):
            self.engine.add(i, req)
        self._steps = self._run()

    def cancel(self, row: int) -> None:
        """Stop request `row` before the next step; its final event has finish_reason "cancelled"."""
        self.engine.cancel(row)

    def close(self) -> None:
        """End generation now; returns None."""
        self._steps.close()

    def __iter__(self) -> Iterator[list[Event]]:
        return self._steps

    def _run(self) -> Iterator[list[Event]]:
        while self.engine.busy:
            events = self.engine.step()
            if events:
                yield events
