"""chat-tools: a chat model using the built-in tools on tools-sft's held-out chats, scored step by step.

Each episode replays a held-out chat (qinglm.data.tools_sft) with the model in the assistant's seat,
greedy and with thinking off (the template's pre-filled empty block): every reply is read back
(qinglm.chat_template.parse_reply); the tools the model calls really run (run_tool), their results go
back as tool messages, and the next reply is asked, up to as many assistant turns as the reference chat
has. Three figures, each with its Wilson interval:
  tool_right    every turn called the reference's tools, in order (none where no tool is needed)
  args_right    ... with the reference's arguments too (strings compared without spaces)
  answer_right  the final reply's text equals the reference's
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qinglm.chat_template import parse_reply
from qinglm.data.builtin_tools import run_tool
from qinglm.errors import QingLMError
from qinglm.evals.chat import greedy_replies
from qinglm.evals.stats import wilson_interval
from qinglm.infer.chat import encode_chat
from qinglm.model.transformer import Transformer
from qinglm.tokenizer import Tokenizer

FIGURES = ("tool_right", "args_right", "answer_right")


def _calls(message: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls") or ()]


def _same_args(got: Any, want: Any) -> bool:
    if isinstance(got, str) and isinstance(want, str):
        return "".join(got.split()) == "".join(want.split())
    if isinstance(got, dict) and isinstance(want, dict):
        return got.keys() == want.keys() and all(_same_args(got[k], want[k]) for k in want)
    return got == want and type(got) is type(want)


def score_episodes(
    model: Transformer,
    tokenizer: Tokenizer,
    episodes: Sequence[Sequence[dict[str, Any]]],
    max_new_tokens: int,
) -> dict[str, Any]:
    """Return {"n", figure: count, figure + "_rate", figure + "_interval", "examples"} over the episodes."""
    state = []
    for chat in episodes:
        first = next(i for i, m in enumerate(chat) if m["role"] == "assistant")
        want = [m for m in chat if m["role"] == "assistant"]
        state.append({"messages": [dict(m) for m in chat[:first]], "want": want, "turn": 0, "done": False,
                      "tool_right": True, "args_right": True, "answer_right": False, "replies": []})  # fmt: skip
    context = model.cfg.max_seq_len
    head = len(encode_chat(tokenizer, state[0]["messages"], True, thinking=False).ids) if state else 0
    if head + max_new_tokens > context:
        raise QingLMError(
            f"chat-tools needs a context of at least {head + max_new_tokens} tokens (the tool list and a "
            f"question with room for a reply); this model has {context}"
        )
    while active := [s for s in state if not s["done"]]:
        for s in active:  # a history grown past the context ends its episode, failed
            if (
                len(encode_chat(tokenizer, s["messages"], True, thinking=False).ids) + max_new_tokens
                > context
            ):
                s["done"] = s["tool_right"] = s["args_right"] = False
        active = [s for s in state if not s["done"]]
        if not active:
            break
        replies = greedy_replies(
            model, tokenizer, [s["messages"] for s in active], max_new_tokens, thinking=False
        )
        for s, text in zip(active, replies):
            reply, want = parse_reply(text), s["want"][s["turn"]]
            got = [(c["name"], c["arguments"]) for c in reply.tool_calls or ()]
            expected = _calls(want)
            s["replies"].append(text)
            s["tool_right"] &= [n for n, _ in got] == [n for n, _ in expected]
            s["args_right"] &= len(got) == len(expected) and all(
                g[0] == w[0] and _same_args(g[1], w[1]) for g, w in zip(got, expected)
            )
            s["turn"] += 1
            if not got or s["turn"] == len(s["want"]):
                s["tool_right"] &= s["turn"] == len(s["want"])  # stopped calling too early
                s["answer_right"] = not got and reply.content == s["want"][-1]["content"].strip()
                s["done"] = True
                continue
            calls = [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in got]
            s["messages"].append({"role": "assistant", "content": reply.content, "tool_calls": calls})
            s["messages"] += [{"role": "tool", "content": run_tool(n, a)} for n, a in got]
    n = len(state)
    out: dict[str, Any] = {"n": n}
    for fig in FIGURES:
        k = sum(s[fig] for s in state)
        out[fig], out[fig + "_rate"] = k, k / max(n, 1)
        out[fig + "_interval"] = list(wilson_interval(k, n))
    out["examples"] = [
        {"question": s["messages"][1]["content"] if len(s["messages"]) > 1 else "", "want": s["want"][-1]["content"],
         "got": s["replies"]} for s in state[:3]
    ]  # fmt: skip
    return out
