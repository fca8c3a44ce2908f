"""The DPO loss (Rafailov et al. 2023) in TRL's default "sigmoid" form, with TRL's metric names.

    loss = -log sigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r)))        averaged over pairs
    rewards/chosen = beta * (pi_c - ref_c), rewards/rejected = beta * (pi_r - ref_r)

where pi_c is the policy's summed log-probability of the chosen reply's tokens (prompt tokens excluded)
and ref_c the frozen reference's. With LoRA the reference is the same model with its adapters switched off.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from qinglm.model.lora import adapters_disabled
from qinglm.post.grpo_loss import token_logprobs


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Return (B,) fp32 sums of log p(target) over each row's positions whose target is not IGNORE_INDEX."""
    # cross_entropy's default ignore_index is IGNORE_INDEX (-100): those positions give exactly 0
    return token_logprobs(logits, targets).sum(dim=-1)


def pair_logps(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (chosen, rejected) (B,) log-probabilities of a [chosen rows; rejected rows] batch."""
    return sequence_logps(logits, targets).chunk(2)


@torch.no_grad()
def reference_logps(
    policy: nn.Module, x: torch.Tensor, targets: torch.Tensor, reference: nn.Module | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the reference's (chosen, rejected) log-probabilities: reference, or policy without adapters.

    The reference runs in eval mode (no dropout), so its log-probabilities are those of the frozen model.
    """
    model = policy if reference is None else reference
    was_training = model.training
    model.eval()
    try:
        with adapters_disabled(model):
            return pair_logps(model(x), targets)
    finally:
        model.train(was_training)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Return (mean sigmoid DPO loss, metrics named as TRL names them) of (B,) log-probabilities."""
    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    loss = -F.logsigmoid(beta * logits).mean()
    chosen = beta * (policy_chosen - ref_chosen).detach()
    rejected = beta * (policy_rejected - ref_rejected).detach()
    metrics = {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/accuracies": (chosen > rejected).float().mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "logps/chosen": policy_chosen.detach().mean(),
        "logps/rejected": policy_rejected.detach().mean(),
    }
    return loss, metrics
