"""Text generation's front end: a prompt in, its continuation out, through the batched engine.

Everything that produces text - ``generate``, ``stream``, the Python API, chat and the server - goes
through the engine (``qinglm.infer.engine.Generation``: prefill once into a KV cache, then one token per
step), which picks tokens with ``qinglm.infer.sampling.sample_next`` and turns ids into text with
``qinglm.infer.text``. ``generate_ids`` is the engine with one SamplingConfig for every row.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, overload

import torch

from qinglm.config import SamplingConfig
from qinglm.errors import QingLMError
from qinglm.infer.engine import Generation, Request
from qinglm.infer.speculate import SpecStats
from qinglm.infer.text import encode_prompt, stream_text
from qinglm.model.transformer import Transformer

if TYPE_CHECKING:
    from qinglm.tokenizer import Tokenizer


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
    ``qinglm.infer.engine.Generation`` with one SamplingConfig for every row.
    """
    single = len(prompt_ids) > 0 and not isinstance(prompt_ids[0], (list, tuple))
    rows = [list(prompt_ids)] if single else [list(r) for r in prompt_ids]
    if not rows:
        raise QingLMError("the prompt is empty; encode it as [BOS] + tokens")
    gen = Generation(model, [Request(r, cfg) for r in rows], eos_id=eos_id, device=device)
    return _ids_per_step(gen, len(rows), single)


def _ids_per_step(gen: Iterable, n_rows: int, single: bool) -> Iterator:
    """Return the generator behind generate_ids: the engine's events as one id (or None) per row; a step
    that gave a row several tokens (speculative decoding) is yielded as that many."""
    for events in gen:
        for j in range(max((len(ev.ids) for ev in events), default=0)):
            step: list[int | None] = [None] * n_rows
            for ev in events:
                if j < len(ev.ids):
                    step[ev.row] = ev.ids[j]
            yield step[0] if single else step


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


def complete(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    sampling: SamplingConfig | None = None,
    *,
    batch_size: int = 8,
    stop: Sequence[str] = (),
    device: torch.device | str | None = None,
    speculation: SpecStats | None = None,
    draft: Transformer | None = None,
) -> Iterator[str]:
    """Return an iterator over the completions of plain-text prompts, in order, batch_size at a time.

    Prompts are sorted by length so each batch pads little; with a seed every prompt gets the same seed.
    speculation, when given, adds up what speculative decoding drafted and had accepted; draft is the model
    that drafts (None: prompt lookup).
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
        gen = Generation(model, reqs, tokenizer=tokenizer, device=device, draft=draft)
        for events in gen:
            for ev in events:
                texts[ev.row] += ev.text
        if speculation is not None:
            speculation.add(gen.engine.spec)
        done.update(zip(chunk, texts))
        while nxt in done:  # yield in the caller's order as soon as possible
            yield done.pop(nxt)
            nxt += 1
