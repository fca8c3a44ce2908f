"""chat-tools: a chat model using the built-in tools on tools-sft's held-out chats, scored step by step.

Each held-out chat's prompt (the tool list and the question) is played as an episode
(qinglm.infer.episodes, the path agentic RL trains on), greedy, with thinking off (the template's
pre-filled empty block) or on: every reply is read back (qinglm.chat_template.parse_reply), the tools the
model calls really run (run_tool) and their results go back as tool turns, up to MAX_CALLS calls.
Figures, each a count, a rate and a Wilson interval over its own episodes:
  call_ok       where a tool is needed: the model called one, and every call it wrote parsed
  tool_right    every turn called the reference's tools, in order (none where no tool is needed)
  args_right    ... with the reference's arguments too (strings compared without spaces)
  answer_right  the episode ended with a reply whose text equals the reference's final answer
  no_call_ok    where no tool is needed: the model wrote no call at all
(call_ok over the episodes whose reference calls a tool, no_call_ok over the others, the rest over all.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qinglm.config import SamplingConfig
from qinglm.data.builtin_tools import run_tool
from qinglm.errors import QingLMError
from qinglm.evals.chat import BATCH
from qinglm.evals.stats import wilson_interval
from qinglm.infer.chat import encode_chat
from qinglm.infer.episodes import Episode, run_episodes
from qinglm.model.transformer import Transformer
from qinglm.tokenizer import Tokenizer

MAX_CALLS = 4  # tool calls an episode may make (the held-out chats need at most 2)
FIGURES = ("call_ok", "tool_right", "args_right", "answer_right", "no_call_ok")


def _calls(message: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls") or ()]


def _same_args(got: Any, want: Any) -> bool:
    if isinstance(got, str) and isinstance(want, str):
        return "".join(got.split()) == "".join(want.split())
    if isinstance(got, dict) and isinstance(want, dict):
        return got.keys() == want.keys() and all(_same_args(got[k], want[k]) for k in want)
    return got == want and type(got) is type(want)


def _figures(ep: Episode, want: list[dict[str, Any]]) -> dict[str, bool]:
    """Return the figures of one played episode against the reference's assistant turns."""
    got, expected = ep.calls, [_calls(m) for m in want]
    needs = any(expected)
    return {
        "call_ok": needs and ep.n_calls > 0 and ep.well_formed,
        "tool_right": [[n for n, _ in t] for t in got] == [[n for n, _ in t] for t in expected],
        "args_right": len(got) == len(expected)
        and all(
            len(g) == len(w) and all(a[0] == b[0] and _same_args(a[1], b[1]) for a, b in zip(g, w))
            for g, w in zip(got, expected)
        ),
        "answer_right": ep.finished and ep.answer == want[-1]["content"].strip(),
        "no_call_ok": not needs and not any(got) and ep.well_formed,
    }


def score_episodes(
    model: Transformer,
    tokenizer: Tokenizer,
    episodes: Sequence[Sequence[dict[str, Any]]],
    max_new_tokens: int,
    thinking: bool = False,
) -> dict[str, Any]:
    """Return {"n", figure: count, figure + "_n", figure + "_rate", figure + "_interval", "examples"}
    of greedy episodes (thinking off or on) played from the held-out chats."""
    prompts, wants = [], []
    for chat in episodes:
        first = next(i for i, m in enumerate(chat) if m["role"] == "assistant")
        prompts.append([dict(m) for m in chat[:first]])
        wants.append([m for m in chat if m["role"] == "assistant"])
    context = model.cfg.max_seq_len
    head = len(encode_chat(tokenizer, prompts[0], True, thinking=thinking).ids) if prompts else 0
    if head + max_new_tokens > context:
        raise QingLMError(
            f"chat-tools needs a context of at least {head + max_new_tokens} tokens (the tool list and a "
            f"question with room for a reply); this model has {context}"
        )
    greedy = SamplingConfig(
        max_new_tokens=max_new_tokens, temperature=0.0, top_k=None, top_p=None, repetition_penalty=1.0
    )
    played: list[Episode] = []
    for i in range(0, len(prompts), BATCH):  # a batch's rows share one KV cache
        batch = prompts[i : i + BATCH]
        played += run_episodes(
            model, tokenizer, batch, [0] * len(batch), greedy, run_tool, max_tool_calls=MAX_CALLS,
            thinking=thinking,
        )  # fmt: skip
    scored = [_figures(ep, want) for ep, want in zip(played, wants)]
    needs = [any(_calls(m) for m in want) for want in wants]
    out: dict[str, Any] = {"n": len(scored), "thinking": thinking}
    for fig in FIGURES:
        over = [
            s for s, need in zip(scored, needs) if {"call_ok": need, "no_call_ok": not need}.get(fig, True)
        ]
        k, n = sum(s[fig] for s in over), len(over)
        out[fig], out[fig + "_n"], out[fig + "_rate"] = k, n, k / max(n, 1)
        out[fig + "_interval"] = list(wilson_interval(k, n))
    out["examples"] = [
        {"question": p[-1]["content"], "want": w[-1]["content"], "got": [t.text for t in ep.turns]}
        for p, w, ep in zip(prompts[:3], wants, played)
    ]
    return out
