"""Text generation: the one sampling function and the one decoding loop.

Everything that produces text - ``generate``, ``stream``, the Python API, and later chat and the
server - goes through ``generate_ids`` (prefill once into a KV cache, then one token per step)
and picks tokens with ``sample_next``. ``stream_text`` turns the ids into text pieces that never
end in half a character, so a byte-level tokenizer can be streamed safely.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, overload

import torch

from qinglm.config import SamplingConfig
from qinglm.errors import QingLMError
from qinglm.model import KVCache, Transformer

if TYPE_CHECKING:
    from qinglm.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"  # what decoding an incomplete UTF-8 sequence gives


# ---------------------------------------------------------------------------- sampling


def apply_repetition_penalty(logits: torch.Tensor, prev_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """Return logits (B, V) with every token in prev_ids (B, L) made less likely (CTRL-style).

    A positive logit is divided by the penalty and a negative one multiplied by it, so the token
    loses probability whatever its sign (dividing a negative logit would raise it). Each token is
    penalised once however often it occurs.
    """
    if penalty == 1.0 or prev_ids.numel() == 0:
        return logits
    prev_ids = prev_ids.to(logits.device, torch.long)
    seen = logits.gather(1, prev_ids)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    # Duplicate ids write the same value, so the scatter is well defined.
    return logits.scatter(1, prev_ids, seen)


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
) -> torch.Tensor:
    """Return the next token id for each row of logits (B, V) as a (B,) LongTensor.

    Order: repetition penalty over prev_ids, then temperature (0 = argmax), top-k, top-p, and a
    draw from the softmax with the given generator.
    """
    logits = logits.float()  # softmax and the filters below want fp32 even under bf16 autocast
    if prev_ids is not None:
        logits = apply_repetition_penalty(logits, prev_ids, cfg.repetition_penalty)
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / cfg.temperature
    if cfg.top_k is not None and 0 < cfg.top_k < logits.size(-1):
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens before it already reach p; the first is always kept.
        drop = probs.cumsum(dim=-1) - probs >= cfg.top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


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

    prompt_ids is one prompt (yields ints) or a batch of equally long prompts (yields one list
    per step with an id per row, None for rows that already stopped). Generation stops at EOS
    (which is not yielded) when cfg.stop_at_eos, after cfg.max_new_tokens tokens, or when the
    model's context is full. The model runs in eval mode and under inference_mode.
    """
    check_sampling(cfg)
    single = len(prompt_ids) > 0 and not isinstance(prompt_ids[0], (list, tuple))
    rows = [list(prompt_ids)] if single else [list(r) for r in prompt_ids]
    max_len, vocab = model.cfg.max_seq_len, model.cfg.vocab_size
    n_prompt = len(rows[0]) if rows else 0
    if n_prompt == 0:
        raise QingLMError("the prompt is empty; encode it as [BOS] + tokens")
    if any(len(r) != n_prompt for r in rows):
        # Per-row prompt lengths need left padding or per-row positions; not supported yet.
        raise QingLMError("all prompts in a batch must have the same number of tokens")
    if n_prompt > max_len:
        raise QingLMError(f"prompt is {n_prompt} tokens but the model's context is {max_len}; shorten it")
    if any(not 0 <= t < vocab for r in rows for t in r):
        raise QingLMError(
            f"prompt has token ids outside the model's vocabulary of {vocab}; "
            "use the tokenizer that was trained with this model"
        )
    return _decode_loop(model, rows, cfg, eos_id, device, single)


def _decode_loop(
    model: Transformer,
    rows: list[list[int]],
    cfg: SamplingConfig,
    eos_id: int | None,
    device: torch.device | str | None,
    single: bool,
) -> Iterator:
    """Return the generator behind generate_ids (arguments already checked)."""
    param = next(model.parameters())
    device = torch.device(device) if device is not None else param.device
    max_len = model.cfg.max_seq_len
    batch, n_prompt = len(rows), len(rows[0])
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    if cfg.max_new_tokens == 0:
        return
    was_training = model.training
    model.eval()
    try:
        # Tensors are created and touched only inside inference_mode blocks, and yields happen
        # outside them, so the caller's code never runs in inference mode.
        with torch.inference_mode():
            # The token sampled after a full context is still emitted but never fed back, so the
            # cache needs at most max_len positions.
            cache = KVCache(
                model.cfg, batch, min(n_prompt + cfg.max_new_tokens, max_len), device, param.dtype
            )
            total = min(n_prompt + cfg.max_new_tokens, max_len + 1)  # prompt + everything emitted
            context = torch.empty(batch, total, dtype=torch.long, device=device)
            context[:, :n_prompt] = torch.tensor(rows, dtype=torch.long, device=device)
            done = torch.zeros(batch, dtype=torch.bool, device=device)
            logits = model(context[:, :n_prompt], cache=cache, start=0, last_only=True)[:, -1]
        length = n_prompt
        for step in range(cfg.max_new_tokens):
            with torch.inference_mode():
                nxt = sample_next(logits, cfg, generator, context[:, :length])
                context[:, length] = nxt
                is_eos = nxt == eos_id if (cfg.stop_at_eos and eos_id is not None) else torch.zeros_like(done)
                newly = ~done & ~is_eos
                done |= is_eos
                ids = nxt.tolist()
                emit = newly.tolist()
                all_done = bool(done.all())
            length += 1
            if all_done:  # every row has hit EOS, so nothing new to emit
                return
            yield ids[0] if single else [t if e else None for t, e in zip(ids, emit)]
            # Feeding the token at position length-1 needs length <= max_len positions.
            if step == cfg.max_new_tokens - 1 or length > max_len:
                return
            with torch.inference_mode():
                logits = model(
                    context[:, length - 1 : length], cache=cache, start=length - 1, last_only=True
                )[:, -1]
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------- text


def stream_text(ids_iter: Iterable[int], tokenizer: Tokenizer) -> Iterator[str]:
    """Return an iterator of text pieces for the ids, none ending in half a character.

    Ids are held back until they decode to text that does not end in U+FFFD (an incomplete
    UTF-8 sequence); whatever is left is flushed at the end. Splitting only after a complete
    character keeps "".join(pieces) equal to tokenizer.decode(all ids).
    """
    pending: list[int] = []
    for tok in ids_iter:
        pending.append(tok)
        text = tokenizer.decode(pending)
        if text and not text.endswith(REPLACEMENT):
            yield text
            pending = []
    if pending:
        text = tokenizer.decode(pending)
        if text:
            yield text


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """Return the ids of prompt as a document start: [BOS] + encode(prompt), as in training data."""
    return [tokenizer.bos_id] + tokenizer.encode(prompt)


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
