"""The GRPO objective (DeepSeekMath's, as TRL computes it), on per-token log-probabilities.

For reply i of a group and its token t, with ratio r = exp(logp - old_logp) and advantage A_i:

    loss_it = -min(r * A_i, clip(r, 1 - clip_eps, 1 + clip_eps) * A_i) + kl_coef * k3_it
    k3_it   = exp(ref_logp - logp) - (ref_logp - logp) - 1      (an unbiased, never negative KL estimate)

A_i = (reward_i - mean of the group) / (std of the group + eps); a group whose rewards are all equal
gets A = 0 exactly and gives no policy gradient. old_logp is detached: with one update per rollout the
ratio is 1 and the objective is the plain policy gradient, but the formula stays the general one.

Normalisation: the sum over every reply token divided by a constant, rows x max_new_tokens (TRL's
``loss_type="dr_grpo"``, from "Understanding R1-Zero-Like Training"). TRL's other choices: "grpo" averages
each reply over its own tokens, so a token of a short reply weighs more (short right answers are pushed
up harder, long wrong ones pushed down less: a length bias); "bnpo" divides by the micro-batch's reply
tokens and "dapo" by the whole step's, so a token's weight depends on the other replies and "bnpo"
changes with gradient accumulation. With a constant the weight of a token depends on nothing else: the
engine's mean of micro-batch losses is exactly the whole step's loss, under gradient accumulation and
data parallelism alike. The cost, a smaller gradient when replies are much shorter than
max_new_tokens, is mostly absorbed by Adam (and the learning rate is the knob).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """Return (N,) advantages: each reward minus its group's mean, over the group's sample std + eps.

    rewards (N,): rows g*G .. g*G+G-1 form group g. A group of equal rewards gets exactly 0.
    """
    r = rewards.float().view(-1, group_size)  # (groups, G)
    adv = (r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, keepdim=True) + eps)
    same = (r == r[:, :1]).all(dim=1, keepdim=True)  # the mean of equal floats may round off them
    return adv.masked_fill(same, 0.0).view(-1)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Return (N, T) log-probabilities of targets (N, T) under logits (N, T, V) divided by temperature.

    Sampling divided the logits by the temperature, so the policy's probabilities are those.
    """
    logits = logits.float() / temperature
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return -nll.view_as(targets)


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    max_new_tokens: int,
    clip_eps: float = 0.2,
    kl_coef: float = 0.04,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Return (loss, metrics) of the module doc's objective over the tokens where mask is True.

    logp, old_logp, ref_logp, mask: (N, T) per reply token (ref_logp None: no KL term, none measured);
    advantages (N,). The loss is the masked sum over N x max_new_tokens (see the module doc).
    metrics: "kl" (mean k3 per reply token), "clip_ratio" (tokens whose clipped term stopped the
    gradient), "policy_loss" (the loss without the KL term), all detached.
    """
    mask = mask.float()
    n_tokens = mask.sum().clamp(min=1.0)
    denom = mask.size(0) * max_new_tokens
    ratio = torch.exp(logp - old_logp.detach())
    adv = advantages.float().unsqueeze(1)  # (N, 1)
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    policy = -torch.min(ratio * adv, clipped * adv)  # (N, T)
    policy_loss = (policy * mask).sum() / denom
    stopped = ((ratio < 1.0 - clip_eps) & (adv < 0)) | ((ratio > 1.0 + clip_eps) & (adv > 0))
    metrics = {
        "policy_loss": policy_loss.detach(),
        "clip_ratio": (stopped.float() * mask).sum() / n_tokens,
    }
    loss = policy_loss
    if ref_logp is not None:
        delta = ref_logp.detach() - logp
        k3 = torch.exp(delta) - delta - 1.0
        loss = loss + kl_coef * (k3 * mask).sum() / denom
        metrics["kl"] = ((k3 * mask).sum() / n_tokens).detach()
    return loss, metrics
