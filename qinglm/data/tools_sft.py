"""tools-sft: built-in chats that call the built-in tools (qinglm.data.builtin_tools), with a held-out split.

Every chat offers some of the three tools (TOOL_SCHEMAS, on its system message: the ones it needs and a
random choice of the others, in their order) and asks one question of a kind:
calc (one calculator call), calc2 (two calls in one turn, then a comparison), date (one date_calc call),
date2 (two calls), idiom (idiom_lookup) and none (no tool needed: answered directly). The assistant's
calls and the tool results are real: each result is what run_tool gives. About THINKING_PERCENT % of the
chats have a short reasoning before the call (reasoning_content); the others an empty thinking block,
which is what thinking off pre-fills, so a model learns both modes.

Chats come from seeds (the same data on every machine). A question is held out when a hash of its text
says so (HELD_OUT_PERCENT %); questions about an idiom are held out when the idiom is (idioms-sft's
held-out idioms, which no training split of QingLM contains); each split keeps only its own kind, so no
held-out question is ever a training question.
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
import hashlib
import json
import random
from typing import Any

from qinglm.data.builtin_tools import TOOL_SCHEMAS, run_tool
from qinglm.data.idioms_sft import Idiom, idioms, is_held_out, train_idioms
from qinglm.errors import QingLMError

NAME = "tools-sft"
SPLITS = ("train", "heldout")
KINDS = ("calc", "calc2", "date", "date2", "idiom", "none")
HELD_OUT_PERCENT = 10
HELDOUT_SEED_BASE = 1_000_000_000
PER_KIND = {"train": 500, "heldout": 30}  # chats of each kind in each split
THINKING_PERCENT = 30

Chat = list[dict[str, Any]]
_OPS = (("+", "+"), ("-", "-"), ("*", "×"), ("/", "÷"))


def _hash(text: str) -> int:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16)


def held_out(question: str) -> bool:
    """Return True when a question (not about an idiom) belongs to the held-out split."""
    return _hash("tools:" + question) % 100 < HELD_OUT_PERCENT


def _call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def _expression(rng: random.Random) -> tuple[str, str]:
    """Return (the expression for the calculator, the same as shown to people with × ÷)."""
    a, b = rng.randint(2, 999), rng.randint(2, 99)
    op, shown = rng.choice(_OPS)
    expr, text = f"{a} {op} {b}", f"{a} {shown} {b}"
    if rng.random() < 0.4:
        c = rng.randint(2, 99)
        op2, shown2 = rng.choice(_OPS[:3])
        expr, text = f"({expr}) {op2} {c}", f"({text}) {shown2} {c}"
    return expr, text


def _date(rng: random.Random) -> str:
    return (dt.date(1990, 1, 1) + dt.timedelta(days=rng.randint(0, 20_000))).isoformat()


def _tool_turns(calls: list[dict[str, Any]], reasoning: str) -> Chat:
    """Return the assistant turn making calls and the tool turns answering them."""
    out: Chat = [{"role": "assistant", "content": "", "reasoning_content": reasoning, "tool_calls": calls}]
    for c in calls:
        out.append({"role": "tool", "content": run_tool(c["function"]["name"], c["function"]["arguments"])})
    return out


def _calc(rng: random.Random, think: bool) -> tuple[str, Chat]:
    expr, shown = _expression(rng)
    question = rng.choice(("计算 {e}。", "{e} 等于多少？", "帮我算一下 {e}")).format(e=shown)
    turns = _tool_turns(
        [_call("calculator", expression=expr)], f"这是算术题，用计算器精确算 {expr}。" if think else ""
    )
    return question, turns + [{"role": "assistant", "content": f"{shown} = {turns[1]['content']}。"}]


def _calc2(rng: random.Random, think: bool) -> tuple[str, Chat]:
    (e1, s1), (e2, s2) = _expression(rng), _expression(rng)
    question = f"{s1} 和 {s2} 哪个大？"
    calls = [_call("calculator", expression=e1), _call("calculator", expression=e2)]
    turns = _tool_turns(calls, "要比较两个算式，先分别算出来。" if think else "")
    r1, r2 = turns[1]["content"], turns[2]["content"]
    diff = run_tool("calculator", {"expression": f"({e1}) - ({e2})"})
    verdict = "一样大" if diff == "0" else (f"{s1} 更大" if not diff.startswith("-") else f"{s2} 更大")
    return question, turns + [{"role": "assistant", "content": f"{s1} = {r1}，{s2} = {r2}，{verdict}。"}]


def _date_one(rng: random.Random, think: bool) -> tuple[str, Chat]:
    d1, d2, n = _date(rng), _date(rng), rng.randint(1, 1000)
    op = rng.choice(("days_between", "weekday", "add_days"))
    if op == "days_between":
        question, call = f"从 {d1} 到 {d2} 相差多少天？", _call("date_calc", op=op, date=d1, date2=d2)
        answer = "相差 {r} 天。"
    elif op == "weekday":
        question, call = f"{d1} 是星期几？", _call("date_calc", op=op, date=d1)
        answer = f"{d1} 是{{r}}。"
    else:
        question, call = f"{d1} 之后 {n} 天是哪一天？", _call("date_calc", op=op, date=d1, days=n)
        answer = "是 {r}。"
    turns = _tool_turns([call], "日期计算容易出错，用 date_calc。" if think else "")
    return question, turns + [{"role": "assistant", "content": answer.format(r=turns[1]["content"])}]


def _date_two(rng: random.Random, think: bool) -> tuple[str, Chat]:
    d1, n = _date(rng), rng.randint(1, 500)
    question = f"{d1} 之后 {n} 天是哪一天？那天星期几？"
    turns = _tool_turns(
        [_call("date_calc", op="add_days", date=d1, days=n)], "先算日期，再查星期。" if think else ""
    )
    day = turns[1]["content"]
    turns += _tool_turns([_call("date_calc", op="weekday", date=day)], "")
    return question, turns + [{"role": "assistant", "content": f"是 {day}，{turns[3]['content']}。"}]


def _idiom(rng: random.Random, think: bool, pool: tuple[Idiom, ...]) -> tuple[str, Chat]:
    idiom = rng.choice(pool)
    want = rng.choice(("meaning", "pinyin", "source"))
    question = {"meaning": "“{w}”是什么意思？", "pinyin": "“{w}”怎么读？", "source": "“{w}”出自哪里？"}[want]
    turns = _tool_turns([_call("idiom_lookup", idiom=idiom.word)], "查成语词典。" if think else "")
    field = json.loads(turns[1]["content"])[want]  # the tool's answer, as the model sees it
    return question.format(w=idiom.word), turns + [
        {"role": "assistant", "content": field or "词典里没有写。"}
    ]


def _none(rng: random.Random, think: bool, pool: tuple[Idiom, ...]) -> tuple[str, Chat]:
    word = rng.choice(pool).word
    question, answer = rng.choice(
        (
            ("“{w}”有几个字？", f"{len(word)} 个字。"),
            ("请原样重复：{w}", word),
            ("把“{w}”的第一个字告诉我。", f"“{word[0]}”。"),
        )
    )
    reply = {
        "role": "assistant",
        "content": answer,
        "reasoning_content": "不需要工具，直接回答。" if think else "",
    }
    return question.format(w=word), [reply]


def tools_chat(seed: int, pool: tuple[Idiom, ...]) -> tuple[str, Chat, bool]:
    """Return (kind, the chat of seed, whether it is held out); idioms are drawn from pool."""
    rng = random.Random(seed)
    kind, think = KINDS[seed % len(KINDS)], rng.random() < THINKING_PERCENT / 100
    make = {"calc": _calc, "calc2": _calc2, "date": _date_one, "date2": _date_two}.get(kind)
    question, turns = make(rng, think) if make else (_idiom if kind == "idiom" else _none)(rng, think, pool)
    needed = {c["function"]["name"] for m in turns for c in m.get("tool_calls") or ()}
    tools = [t for t in TOOL_SCHEMAS if t["function"]["name"] in needed or rng.random() < 0.5]
    tools = tools or [rng.choice(TOOL_SCHEMAS)]  # a question that needs none still has tools at hand
    chat = [{"role": "system", "content": "", "tools": tools}, {"role": "user", "content": question}]
    return kind, chat + turns, kind != "idiom" and kind != "none" and held_out(question)


@functools.cache
def _chats(split: str) -> tuple[tuple[str, tuple[dict[str, Any], ...]], ...]:
    held = split == "heldout"
    pool = tuple(i for i in idioms() if is_held_out(i.word)) if held else train_idioms()
    seed, out, room = (HELDOUT_SEED_BASE if held else 0), [], dict.fromkeys(KINDS, PER_KIND[split])
    while len(out) < len(KINDS) * PER_KIND[split]:
        kind, chat, q_held = tools_chat(seed, pool)
        # idiom questions follow their pool; the others the hash of their question
        if room[kind] and (kind in ("idiom", "none") or q_held == held):
            out.append((kind, tuple(chat)))
            room[kind] -= 1
        seed += 1
    return tuple(out)


def tools_sft(split: str = "train") -> list[Chat]:
    """Return the chats of split ("train" or "heldout"), fresh copies (callers may change them)."""
    return [chat for _, chat in tools_episodes(split)]


def tools_episodes(split: str = "heldout") -> list[tuple[str, Chat]]:
    """Return (kind, chat) of every chat of split (fresh copies), for scoring tool use."""
    if split not in SPLITS:
        raise QingLMError(f"unknown {NAME} split {split!r}; choose train or heldout")
    return [(kind, copy.deepcopy(list(chat))) for kind, chat in _chats(split)]
