"""Sampling: the one function that picks the next token, used by every way QingLM generates text.

``sample_next`` applies the repetition penalty, temperature, top-k and top-p of a SamplingConfig (whose
checks run when it is built: qinglm.config) and draws from the softmax; the engine (qinglm.infer.engine)
calls it for every row of a batch, and so do generate, stream, chat, the server and their tests.
"""

from __future__ import annotations

import torch

from qinglm.config import SamplingConfig
from qinglm.tokenizer import SPECIAL_TOKENS

N_CONTROL_IDS = len(SPECIAL_TOKENS)  # ids 0..5 in every QingLM tokenizer (qinglm.tokenizer's layout)


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
