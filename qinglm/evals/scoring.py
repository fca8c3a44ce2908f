"""Log-likelihood scoring of (context, continuation) pairs, batched, as lm-evaluation-harness does it.

A pair is tokenized like lm-eval's causal models: whole = encode(context + continuation), the
context's tokens are encode(context), and the continuation's are whole[len(context tokens):]; the
sequence starts with BOS (QingLM trains every document after a BOS). A context too long for the
model loses tokens from its left. Multiple choice: acc takes the choice with the highest summed
log-likelihood, acc_norm the highest log-likelihood per character of the choice (lm-eval's
`lls / len(choice)`); acc_calibrated is acc after batch calibration (calibrated_picks).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qinglm.model.transformer import Transformer
from qinglm.tokenizer import Tokenizer

TOKENS_PER_BATCH = 4096  # padded tokens per forward: bounds the (B, T, vocab) logits' memory


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Return (context ids with BOS first, continuation ids), split the way lm-eval splits them."""
    ctx = tokenizer.encode(context) if context else []
    whole = tokenizer.encode(context + continuation)
    return [tokenizer.bos_id, *ctx], whole[len(ctx) :]


def score_ids(
    model: Transformer,
    pairs: Sequence[tuple[list[int], list[int]]],
    device: torch.device | str | None = None,
    tokens_per_batch: int = TOKENS_PER_BATCH,
) -> list[tuple[float, bool]]:
    """Return (sum of log p(continuation | context), is_greedy) per (context ids, continuation ids).

    Pairs are sorted by length and right-padded into batches of about tokens_per_batch tokens, so
    one forward scores several choices; causal attention keeps padding from changing any score.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    limit = model.cfg.max_seq_len + 1  # the last token is only a target
    seqs = []
    for ctx, cont in pairs:
        if not cont:
            raise ValueError("an empty continuation has no log-likelihood")
        seq = (list(ctx) + list(cont))[-limit:]
        seqs.append((seq, min(len(cont), len(seq) - 1)))  # a continuation longer than the context: its end
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(seqs)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            start = 0
            while start < len(order):
                width = len(seqs[order[start]][0]) - 1  # longest first: the batch's width
                size = max(1, tokens_per_batch // max(width, 1))
                batch = order[start : start + size]
                start += size
                x = torch.zeros(len(batch), width, dtype=torch.long)
                for row, i in enumerate(batch):
                    seq = seqs[i][0]
                    x[row, : len(seq) - 1] = torch.tensor(seq[:-1])
                logp = torch.log_softmax(model(x.to(device)).float(), dim=-1)  # (B, width, vocab)
                for row, i in enumerate(batch):
                    seq, n_cont = seqs[i]
                    pos = torch.arange(len(seq) - 1 - n_cont, len(seq) - 1, device=logp.device)
                    target = torch.tensor(seq[-n_cont:], device=logp.device)
                    rows = logp[row, pos]  # (n_cont, vocab)
                    ll = float(rows.gather(1, target[:, None]).sum())
                    out[i] = (ll, bool((rows.argmax(-1) == target).all()))
    finally:
        model.train(was_training)
    return out


def loglikelihoods(
    model: Transformer,
    tokenizer: Tokenizer,
    pairs: Sequence[tuple[str, str]],
    device: torch.device | str | None = None,
) -> list[float]:
    """Return log p(continuation | context) in nats for each (context, continuation) text pair."""
    ids = [encode_pair(tokenizer, c, x) for c, x in pairs]
    return [ll for ll, _ in score_ids(model, ids, device)]


def choose(lls: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """Return (acc's pick, acc_norm's pick): the best total and the best per-character log-likelihood."""
    pick = max(range(len(lls)), key=lambda i: lls[i])
    pick_norm = max(range(len(lls)), key=lambda i: lls[i] / max(len(choices[i]), 1))
    return pick, pick_norm


def calibrated_picks(lls: Sequence[Sequence[float]]) -> list[int]:
    """Return each item's pick after batch calibration (Zhou et al. 2024, "Batch Calibration").

    For items that share their choices (labels), a model's preference for one label whatever the
    input is estimated as each label's mean probability over the items, and subtracted: the pick is
    argmax_j p_j(item) - mean over items of p_j, p = softmax of the item's log-likelihoods. A model
    that ranks the items right scores 100 % however biased; constant scores tie and pick the first.
    """
    probs = [torch.softmax(torch.tensor(item, dtype=torch.float64), 0) for item in lls]
    bias = torch.stack(probs).mean(0)
    return [int(torch.argmax(p - bias)) for p in probs]
