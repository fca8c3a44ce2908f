"""Text generation: the one sampling function and the one decoding loop.

Everything that produces text - ``generate``, ``stream``, the Python API, chat and the server -
goes through the batched engine (``qinglm.engine.Generation``: prefill once into a KV cache, then
one token per step; ``generate_ids`` is its single-config front end) and picks tokens with
``sample_next``. ``TextDecoder`` / ``stream_text`` turn the ids into text pieces that never end in
half a character (so a byte-level tokenizer can be streamed safely) nor in part of a stop string.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, overload

import torch

from qinglm.config import SamplingConfig
from qinglm.data.sources import normalize_text
from qinglm.errors import QingLMError
from qinglm.model import Transformer
from qinglm.tokenizer import SPECIAL_TOKENS

if TYPE_CHECKING:
    from qinglm.tokenizer import Tokenizer

N_CONTROL_IDS = len(SPECIAL_TOKENS)  # ids 0..5 in every QingLM tokenizer (qinglm.tokenizer's layout)
REPLACEMENT = "\ufffd"  # what decoding an incomplete UTF-8 sequence gives


# ---------------------------------------------------------------------------- sampling


def apply_repetition_penalty(
    logits: torch.Tensor, prev_ids: torch.Tensor, penalty: float, counted: torch.Tensor | None = None
) -> torch.Tensor:
    """Return logits (B, V) with the tokens in prev_ids (B, L) made less likely (CTRL-style).

    A positive logit is divided by the penalty and a negative one multiplied by it, so the token
    loses probability whatever its sign (dividing a negative logit would raise it). Each token is
    penalised once however often it occurs. Only positions where `counted` (B, L) is True count
    (None: all); callers count the generated text and the prompt's text, not a chat template's
    structure (role names, the newlines around turns). Control tokens (ids below
    len(SPECIAL_TOKENS): [BOS], [EOS], <|im_start|>, <|im_end|> ...) are never penalised, so a
    chat's history never makes the end of a turn less likely.
    """
    if penalty == 1.0 or prev_ids.numel() == 0:
        return logits
    prev_ids = prev_ids.to(logits.device, torch.long)
    weight = (
        torch.ones_like(prev_ids, dtype=torch.float) if counted is None else counted.to(logits.device).float()
    )
    seen = torch.zeros_like(logits).scatter_add_(1, prev_ids, weight) > 0  # (B, V)
    seen[:, :N_CONTROL_IDS] = False
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def check_sampling(cfg: SamplingConfig) -> None:
    """Raise QingLMError for sampling settings that make no sense; return None otherwise."""
    if cfg.max_new_tokens < 0:
        raise QingLMError(f"max_new_tokens must be 0 or more, got {cfg.max_new_tokens}")
    if cfg.temperature < 0:
        raise QingLMError(f"temperature must be 0 (greedy) or positive, got {cfg.temperature}")
    if cfg.top_p is not None and not 0.0 < cfg.top_p <= 1.0:
        raise QingLMError(f"top_p must be in (0, 1], got {cfg.top_p}")
    if cfg.repetition_penalty <= 0:
        raise QingLMError(f"repetition_penalty must be positive (1.0 = off), got {cfg.repetition_penalty}")


def sample_next(
    logits: torch.Tensor,
    cfg: SamplingConfig,
    generator: torch.Generator | None = None,
    prev_ids: torch.Tensor | None = None,
    counted: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return the next token id for each row of logits (B, V) as a (B,) LongTensor.

    Order: repetition penalty over prev_ids where counted (see apply_repetition_penalty), then
    temperature (0 = argmax), top-k, top-p, and a draw from the softmax with the given generator.
    """
    logits = logits.float()  # softmax and the filters below want fp32 even under bf16 autocast
    if prev_ids is not None:
        logits = apply_repetition_penalty(logits, prev_ids, cfg.repetition_penalty, counted)
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / cfg.temperature
    use_top_p = cfg.top_p is not None and cfg.top_p < 1.0
    # Candidates in descending order: the top k only (so top-p sorts k values, not the vocabulary),
    # or all tokens sorted when top-p needs them, or all tokens as they are.
    order = None
    if cfg.top_k is not None and 0 < cfg.top_k < logits.size(-1):
        logits, order = torch.topk(logits, cfg.top_k, dim=-1)
    elif use_top_p:
        logits, order = logits.sort(dim=-1, descending=True)
    if use_top_p:
        probs = logits.softmax(dim=-1)
        # Drop a token when the tokens before it already reach p; the first is always kept.
        drop = probs.cumsum(dim=-1) - probs >= cfg.top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop, float("-inf"))
    choice = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)  # (B, 1)
    return (choice if order is None else order.gather(1, choice)).squeeze(1)


# ---------------------------------------------------------------------------- the decoding loop


@overload
def generate_ids(
    model: Transformer,
    prompt_ids: list[int],
    cfg: SamplingConfig,
    *,
    eos_id: int | None,
    device: torch.device | str | None = None,
) -> Iterator[int]: ...
@overload
def generate_ids(
    model: Transformer,
    prompt_ids: list[list[int]],
    cfg: SamplingConfig,
    *,
    eos_id: int | None,
    device: torch.device | str | None = None,
) -> Iterator[list[int | None]]: ...


def generate_ids(model, prompt_ids, cfg, *, eos_id, device=None):
    """Return an iterator over newly generated token ids, yielded as soon as each is sampled.

    prompt_ids is one prompt (yields ints) or a batch of prompts, of any lengths (yields one list
    per step with an id per row, None for rows that already stopped). Generation stops at EOS
    (which is not yielded) when cfg.stop_at_eos, after cfg.max_new_tokens tokens, or when the
    model's context is full. The model runs in eval mode and under inference_mode. This is
    ``qinglm.engine.Generation`` with one SamplingConfig for every row.
    """
    from qinglm.engine import Generation, Request  # the engine builds on this module's sampling

    single = len(prompt_ids) > 0 and not isinstance(prompt_ids[0], (list, tuple))
    rows = [list(prompt_ids)] if single else [list(r) for r in prompt_ids]
    if not rows:
        raise QingLMError("the prompt is empty; encode it as [BOS] + tokens")
    gen = Generation(model, [Request(r, cfg) for r in rows], eos_id=eos_id, device=device)
    return _ids_per_step(gen, len(rows), single)


def _ids_per_step(gen: Iterable, n_rows: int, single: bool) -> Iterator:
    """Return the generator behind generate_ids: the engine's events as one id (or None) per row."""
    for events in gen:
        step: list[int | None] = [None] * n_rows
        for ev in events:
            if ev.ids:
                step[ev.row] = ev.ids[0]
        if any(t is not None for t in step):
            yield step[0] if single else step


# ---------------------------------------------------------------------------- text


class TextDecoder:
    """Turns token ids, one at a time, into text that never ends in half a character or a stop string.

    Ids are held back until they decode to text that does not end in U+FFFD (an incomplete UTF-8
    sequence); splitting only after a complete character keeps the joined pieces equal to
    tokenizer.decode(all ids). Text that might be the start of a stop string is held back too, and
    a stop string ends the text.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Iterable[str] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.pending: list[int] = []  # ids that do not decode to whole characters yet
        self.held = ""  # decoded text that may begin a stop string

    def feed(self, tok: int) -> tuple[str, bool]:
        """Return (text now safe to emit, True when a stop string ended the text) after one more id."""
        self.pending.append(tok)
        text = self.tokenizer.decode(self.pending)
        if not text or text.endswith(REPLACEMENT):
            return "", False
        self.pending = []
        return self._release(self.held + text, final=False)

    def finish(self) -> str:
        """Return everything still held back; an unfinished last character decodes to U+FFFD."""
        text = self.tokenizer.decode(self.pending) if self.pending else ""
        self.pending = []
        return self._release(self.held + text, final=True)[0]

    def _release(self, text: str, final: bool) -> tuple[str, bool]:
        """Return (the part of text to emit, whether a stop string was found); keep the rest held."""
        self.held = ""
        if not self.stop:
            return text, False
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            return text[: min(hits)], True
        if not final:
            keep = max((_prefix_overlap(text, s) for s in self.stop), default=0)
            if keep:
                text, self.held = text[:-keep], text[-keep:]
        return text, False


def _prefix_overlap(text: str, stop: str) -> int:
    """Return the length of the longest end of text that is a proper beginning of stop."""
    for k in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:k]):
            return k
    return 0


def stream_text(ids_iter: Iterable[int], tokenizer: Tokenizer) -> Iterator[str]:
    """Return an iterator of text pieces for the ids, none ending in half a character (see TextDecoder).

    Whatever is left at the end is flushed, so "".join(pieces) == tokenizer.decode(all ids).
    """
    decoder = TextDecoder(tokenizer)
    for tok in ids_iter:
        text, _ = decoder.feed(tok)
        if text:
            yield text
    tail = decoder.finish()
    if tail:
        yield tail


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """Return the ids of prompt as a document start: [BOS] + encode(prompt), as in training data.

    The prompt is normalised as training text is (full-width ASCII made half-width, see
    qinglm.data.sources.normalize_text) and encoded as text: "[EOS]" in it is not the control token.
    """
    return [tokenizer.bos_id] + tokenizer.encode(normalize_text(prompt))


def stream(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt: str,
    cfg: SamplingConfig | None = None,
    *,
    device: torch.device | str | None = None,
) -> Iterator[str]:
    """Return an iterator of text pieces continuing prompt (the prompt itself is not repeated)."""
    ids = generate_ids(
        model,
        encode_prompt(tokenizer, prompt),
        cfg or SamplingConfig(),
        eos_id=tokenizer.eos_id,
        device=device,
    )
    return stream_text(ids, tokenizer)


def generate(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt: str,
    cfg: SamplingConfig | None = None,
    *,
    device: torch.device | str | None = None,
) -> str:
    """Return the generated continuation of prompt (without the prompt)."""
    return "".join(stream(model, tokenizer, prompt, cfg, device=device))
