"""GRPO as a stage of the training engine: RL with verifiable rewards on a task's prompts.

Each micro-batch is batch_size prompts of the task's train split. In loss(), the bare model samples
group_size replies to each through the batched engine (eval mode, no gradients; the row seeds come from
torch's global RNG, which the engine seeds before every step, so a resumed run samples exactly the
replies of an uninterrupted one); the task's verifier scores them; then the policy's log-probabilities
come from one forward of the training model and the frozen reference's from another, and
qinglm.post.grpo_loss gives the objective. Validation answers held-out prompts greedily:
val_loss = 1 - their mean reward.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import time
from typing import Any

import torch
import torch.nn as nn

from qinglm import run_dir as run_dirs
from qinglm.config import SamplingConfig
from qinglm.device import autocast
from qinglm.errors import QingLMError
from qinglm.evals.chat import held_out_rewards
from qinglm.infer.chat import encode_chat
from qinglm.infer.episodes import episode_batch
from qinglm.infer.rollout import rollout
from qinglm.io import write_json_atomic
from qinglm.memory import check_fits, kv_cache_bytes
from qinglm.post import agentic
from qinglm.post.config import GRPOConfig
from qinglm.post.grpo_loss import group_advantages, grpo_loss, token_logprobs
from qinglm.post.tasks import Example, load_task
from qinglm.sft.stage import BaseRunStage
from qinglm.train import distributed
from qinglm.train.stage import EpochBatches, StepOut

DEFAULT_STEPS = 200  # the run's length when no --max-steps / --num-epochs / --max-time is given


def resolve_grpo(cfg: GRPOConfig, max_seq_len: int) -> GRPOConfig:
    """Return a copy of cfg with defaults filled in (seq_len, length, out); QingLMError if impossible."""
    c = dataclasses.replace(cfg)
    if not c.base:
        raise QingLMError("give the run to start from with --base RUN")
    if c.seq_len is None:
        c.seq_len = max_seq_len
    if not 0 < c.seq_len <= max_seq_len:
        raise QingLMError(f"seq_len must be between 1 and the model's context {max_seq_len}, got {c.seq_len}")
    if c.max_steps is None and c.num_epochs is None and c.max_time is None:
        c.max_steps = DEFAULT_STEPS
    if c.out is None:
        c.out = f"runs/{time.strftime('%Y%m%d-%H%M%S')}-grpo"
    c.__post_init__()
    return c


class GRPOStage(BaseRunStage):
    """Train cfg.base on cfg.task's rewards (cfg resolved by resolve_grpo)."""

    kind = "grpo"
    watch_spikes = False  # the loss is not a cross-entropy: its ratio to a running mean means nothing
    rows = "prompts (group-size replies each)"

    def __init__(self, cfg: GRPOConfig, log: Any = print):
        super().__init__(cfg)
        self.task = load_task(cfg.task)
        self.tools = agentic.load_tools(cfg.tools) if self.task.multi_turn else None
        self.train = self.task.split("train")
        held = self.task.split("heldout")
        self.heldout = held[: cfg.eval_prompts] if cfg.eval_prompts else held
        thinking = False if self.task.multi_turn else None  # episodes pre-fill an empty thinking block
        longest = max(
            len(encode_chat(self.tok, ex.messages, True, thinking=thinking).ids)
            for ex in self.train + self.heldout
        )
        if longest + cfg.max_new_tokens > cfg.seq_len:
            raise QingLMError(
                f"task {self.task.name}: the longest prompt is {longest} tokens, which leaves no room for "
                f"{cfg.max_new_tokens} new tokens in seq_len {cfg.seq_len}; lower --max-new-tokens"
            )
        self.sampling = SamplingConfig(
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_k=None,  # the whole distribution: the one whose log-probabilities the loss uses
            top_p=None,
            repetition_penalty=1.0,
        )
        self.reference: nn.Module | None = None
        log(f"task {self.task.name}: {len(self.train):,} train prompts, {len(held):,} held-out prompts")

    def build_model(self) -> nn.Module:
        model = self.base_model()
        if self.cfg.kl_coef > 0:  # the frozen start: what the KL term keeps the policy near
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        self.before = None if self.ctx.resuming else self.held_out(model)
        if self.before is not None:
            self.ctx.log(f"held-out reward before: {self._figures(self.before)}")
        return model

    def batches(self, cfg: GRPOConfig) -> EpochBatches:
        def order(epoch: int) -> list[int]:
            items = list(range(len(self.train)))
            random.Random(cfg.seed + epoch).shuffle(items)
            return items

        dist = self.ctx.dist
        self._batches = EpochBatches(
            order,
            lambda items: [self.train[i] for i in items],
            cfg.batch_size,
            grad_accum=cfg.grad_accum,
            rank=dist.rank,
            world_size=dist.world_size,
        )
        return self._batches

    def loss(self, forward: Any, model: nn.Module, batch: list[Example]) -> StepOut:
        cfg, G = self.cfg, self.cfg.group_size
        device = next(model.parameters()).device
        extra: dict[str, torch.Tensor] = {}
        if self.tools is not None:  # multi-turn episodes with tools (qinglm.post.agentic)
            episodes, rewards, extra = agentic.play(
                model, self.tok, self.task, batch, G, self.sampling, self.tools,
                max_tool_calls=cfg.max_tool_calls, max_tokens=cfg.seq_len,
            )  # fmt: skip
            ids, completion = episode_batch(episodes, self.tok.pad_id, device)
            truncated = [ep.status in ("length", "context") for ep in episodes]
        else:
            r = rollout(model, self.tok, [ex.messages for ex in batch], G, self.sampling)
            rewards = torch.tensor([self.task.reward(batch[k // G], text) for k, text in enumerate(r.texts)])
            ids, completion, truncated = r.ids, r.completion_mask, r.truncated
        rewards = rewards.to(device)
        x, y, mask = ids[:, :-1], ids[:, 1:], completion[:, 1:]
        logp = token_logprobs(forward(x), y, cfg.temperature)
        ref_logp = None
        if self.reference is not None:
            with torch.no_grad():
                ref_logp = token_logprobs(self.reference(x), y, cfg.temperature)
        loss, metrics = grpo_loss(
            logp,
            logp.detach(),  # one update per rollout: the old policy is the current one
            ref_logp,
            group_advantages(rewards, G),
            mask,
            max_new_tokens=cfg.max_new_tokens,
            clip_eps=cfg.clip_eps,
            kl_coef=cfg.kl_coef,
        )
        group_std = rewards.view(-1, G).std(dim=1)
        metrics.update(
            {
                "reward": rewards.mean(),
                "reward_std": group_std.mean(),
                "frac_reward_zero_std": (group_std == 0).float().mean(),
                "completions/mean_length": mask.sum(dim=1).float().mean(),
                "completions/clipped_ratio": torch.tensor(truncated, dtype=torch.float).mean(),
                **extra,
            }
        )
        return StepOut(model.with_router_losses(loss), int(mask.sum()), metrics)  # MoE: the policy's

    def held_out(self, model: nn.Module) -> dict[str, float]:
        """Return {"val_loss", "val_reward", "val_pass_rate"} of greedy replies to the held-out prompts."""
        cfg = self.cfg
        with autocast(self.ctx.device, self.ctx.dtype):
            if self.tools is not None:
                rewards = agentic.held_out(
                    model, self.tok, self.task, self.heldout, cfg.max_new_tokens, self.tools,
                    max_tool_calls=cfg.max_tool_calls, max_tokens=cfg.seq_len,
                )  # fmt: skip
            else:
                _, rewards = held_out_rewards(model, self.tok, self.task, self.heldout, cfg.max_new_tokens)
        mean = sum(rewards) / len(rewards)
        passed = sum(x >= self.task.pass_reward for x in rewards) / len(rewards)
        return {"val_loss": 1.0 - mean, "val_reward": mean, "val_pass_rate": passed}

    def validate(self, model: nn.Module, step: int) -> dict[str, Any] | None:
        return distributed.broadcast_object(self.ctx.dist, self.held_out(model))

    @staticmethod
    def _figures(v: dict[str, float]) -> str:
        return f"mean {v['val_reward']:.4f}, pass rate {v['val_pass_rate']:.1%}"

    def header(self) -> list[str]:
        cfg = self.cfg
        kl = f"KL to the base x {cfg.kl_coef:g}" if self.reference is not None else "no KL term"
        turns = (
            f"; episodes with tools ({cfg.tools}, up to {cfg.max_tool_calls} calls), "
            f"reward {agentic.VERIFIER_WEIGHT:g} x verifier + {agentic.FORMAT_WEIGHT:g} x format"
            if self.tools is not None
            else ""
        )
        return [
            f"GRPO: {cfg.batch_size} prompts x {cfg.group_size} replies per micro-batch, up to "
            f"{cfg.max_new_tokens} new tokens at temperature {cfg.temperature:g}, clip {cfg.clip_eps:g}, {kl}; "
            f"{len(self.heldout)} held-out prompts per validation{turns}"
        ]

    def state_dict(self) -> dict[str, Any]:
        return {"heldout_before": self.before}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.before = state.get("heldout_before", self.before)

    def finish(self, model: nn.Module, whole: nn.Module | None) -> dict[str, Any]:
        """Return the held-out figures before and after training; write grpo_results.json."""
        after = self.held_out(model)
        self.ctx.log(f"held-out reward after: {self._figures(after)}")
        result = {
            "out": str(self.ctx.run_dir),
            "task": self.task.name,
            "train_prompts": len(self.train),
            "heldout_prompts": len(self.heldout),
            "heldout_before": self.before,
            "heldout_after": after,
        }
        if self.ctx.dist.is_main:
            write_json_atomic(self.ctx.run_dir / "grpo_results.json", result)
        return result


def run_grpo(cfg: GRPOConfig, log: Any = print, flags: dict[str, Any] | None = None) -> dict[str, Any]:
    """Return the engine's result with the held-out figures after a GRPO run of cfg."""
    from qinglm.train.driver import run_stage_command

    model_cfg = run_dirs.model_config(cfg.base) if cfg.base else None
    cfg = resolve_grpo(cfg, model_cfg.max_seq_len if model_cfg else 0)
    rows = cfg.batch_size * cfg.group_size  # every row's KV cache holds room for its whole reply
    check_fits(
        model_cfg,
        kv_cache_bytes(model_cfg, rows, cfg.max_new_tokens),
        f"the rollouts of --batch-size {cfg.batch_size:,} x --group-size {cfg.group_size:,} replies of "
        f"--max-new-tokens {cfg.max_new_tokens:,}",
    )
    res = run_stage_command("grpo", "grpo", cfg, flags or {}, lambda: GRPOStage(cfg, log), log)
    if res:
        log(f"wrote {res['checkpoint']}")
    return res
