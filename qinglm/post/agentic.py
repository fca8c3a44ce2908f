"""Agentic RL: GRPO over multi-turn episodes with tools (a task with `multi_turn`, e.g. the built-in `tools`).

Each prompt gets group_size episodes (qinglm.infer.episodes): the model's tool calls are parsed and run,
their results come back as tool turns, and decoding resumes, up to --max-tool-calls calls. An episode's
reward is

    VERIFIER_WEIGHT x the task's verifier on the final answer  (0 when the episode did not finish)
  + FORMAT_WEIGHT   x format: 1 when every call the model wrote parses and the episode finished

and the loss covers the model's own tokens only (the tool results and the template's glue are masked).
Episode k's base seed is drawn from torch's global RNG, which the engine seeds before every step, and
turn t samples with base + t: a resumed run plays exactly the episodes of an uninterrupted one.

Tools (--tools): ``builtin`` (qinglm.data.builtin_tools: calculator, date_calc, idiom_lookup, with their
time and output limits) or ``MODULE:FUNCTION``, loaded as a user task is (qinglm.post.tasks): FUNCTION(name,
arguments) returns the result as text. The same limits hold for it: what it raises goes back to the model
as "error: ..." text, a result over OUTPUT_LIMIT characters is cut, one slower than TIME_LIMIT_S is
replaced by an error; a result that is not a string is the user's bug (QingLMError).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from qinglm.config import SamplingConfig
from qinglm.data.builtin_tools import OUTPUT_LIMIT, TIME_LIMIT_S, run_tool
from qinglm.errors import QingLMError
from qinglm.infer.episodes import Episode, ToolRunner, run_episodes
from qinglm.infer.rollout import row_seeds
from qinglm.model.transformer import Transformer
from qinglm.post.tasks import Example, Task, import_function
from qinglm.tokenizer import Tokenizer

BUILTIN = "builtin"
VERIFIER_WEIGHT, FORMAT_WEIGHT = 0.8, 0.2


def load_tools(spec: str) -> ToolRunner:
    """Return the tool runner --tools names: the built-in tools, or MODULE:FUNCTION with the same limits."""
    if spec == BUILTIN:
        return run_tool
    return limited(import_function(spec, "tools", BUILTIN), spec)


def limited(fn: Callable[..., Any], spec: str) -> ToolRunner:
    """Return fn(name, arguments) under the built-in tools' limits (see the module doc)."""

    def run(name: str, arguments: Mapping[str, Any]) -> str:
        t0 = time.monotonic()
        try:
            out = fn(name, dict(arguments))
        except Exception as e:  # a bad call by the model: the answer goes back to it, as an API's would
            return f"error: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
        if not isinstance(out, str):
            raise QingLMError(f"tools function {spec} returned {type(out).__name__}; it must return a string")
        if time.monotonic() - t0 > TIME_LIMIT_S:
            return "error: the tool took too long"
        return out if len(out) <= OUTPUT_LIMIT else out[:OUTPUT_LIMIT] + "…"

    return run


def format_ok(ep: Episode) -> bool:
    """Return True when every call of ep parsed and ep finished with an answer."""
    return ep.well_formed and ep.finished


def episode_reward(task: Task, ex: Example, ep: Episode) -> tuple[float, float, float]:
    """Return (reward, the verifier's term, the format term) of one episode (see the module doc)."""
    verified = task.reward(ex, ep.answer) if ep.finished else 0.0
    fmt = float(format_ok(ep))
    return VERIFIER_WEIGHT * verified + FORMAT_WEIGHT * fmt, verified, fmt


def play(
    model: Transformer,
    tokenizer: Tokenizer,
    task: Task,
    examples: Sequence[Example],
    group_size: int,
    sampling: SamplingConfig,
    tools: ToolRunner,
    *,
    max_tool_calls: int,
    max_tokens: int,
    generator: torch.Generator | None = None,
) -> tuple[list[Episode], torch.Tensor, dict[str, torch.Tensor]]:
    """Return (episodes, rewards (N,), metrics) of group_size episodes per example (rows g*G .. g*G+G-1
    play example g); the base seeds come from generator (torch's global RNG by default)."""
    n = len(examples) * group_size
    seeds = row_seeds(n, generator)
    prompts = [ex.messages for ex in examples for _ in range(group_size)]
    episodes = run_episodes(
        model,
        tokenizer,
        prompts,
        seeds,
        sampling,
        tools,
        max_tool_calls=max_tool_calls,
        max_tokens=max_tokens,
    )
    terms = [episode_reward(task, examples[k // group_size], ep) for k, ep in enumerate(episodes)]
    rewards = torch.tensor([t[0] for t in terms])
    metrics = {
        "reward_verifier": torch.tensor([t[1] for t in terms]).mean(),
        "reward_format": torch.tensor([t[2] for t in terms]).mean(),
        "tool_calls": torch.tensor([float(ep.n_calls) for ep in episodes]).mean(),
        "finished": torch.tensor([float(ep.finished) for ep in episodes]).mean(),
    }
    return episodes, rewards, metrics


def held_out(
    model: Transformer,
    tokenizer: Tokenizer,
    task: Task,
    examples: Sequence[Example],
    max_new_tokens: int,
    tools: ToolRunner,
    *,
    max_tool_calls: int,
    max_tokens: int,
) -> list[float]:
    """Return the rewards of greedy episodes on examples (validation of a multi-turn task)."""
    greedy = SamplingConfig(
        max_new_tokens=max_new_tokens, temperature=0.0, top_k=None, top_p=None, repetition_penalty=1.0
    )
    _, rewards, _ = play(
        model, tokenizer, task, examples, 1, greedy, tools, max_tool_calls=max_tool_calls,
        max_tokens=max_tokens, generator=torch.Generator(),  # greedy: the global RNG is left alone
    )  # fmt: skip
    return rewards.tolist()
