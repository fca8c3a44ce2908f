"""Built-in tools (exact, bounded, never eval) and the tools-sft data set built on them."""

import json
from fractions import Fraction

import pytest

from qinglm.data.builtin_tools import TOOL_SCHEMAS, TOOLS, run_tool
from qinglm.data.idioms_sft import is_held_out
from qinglm.data.tools_sft import KINDS, NAME, tools_episodes, tools_sft
from qinglm.sft import data as sft_data


@pytest.mark.parametrize(
    "expr, want",
    [
        ("1/3 + 1/6", "1/2"),
        ("0.1 + 0.2", "3/10"),  # exact, not 0.30000000000000004
        ("(12 × 3) ÷ 4", "9"),
        ("2 ** 100", str(2**100)),
        ("-7 % 3", "2"),
        ("10 // 3", "3"),
    ],
)
def test_calculator_is_exact(expr, want):
    assert run_tool("calculator", {"expression": expr}) == want
    assert Fraction(want) == Fraction(run_tool("calculator", {"expression": expr}))


@pytest.mark.parametrize(
    "expr, why",
    [
        ("__import__('os').system('true')", "only numbers"),
        ("(1).__class__", "only numbers"),
        ("9 ** 9 ** 9", "too large"),
        ("2 ** 0.5", "whole numbers"),
        ("1 / 0", "division by zero"),
        ("1 +", "not valid arithmetic"),
        ("1" * 300, "longer than"),
    ],
)
def test_calculator_refuses_what_it_cannot_do_quickly_and_exactly(expr, why):
    out = run_tool("calculator", {"expression": expr})
    assert out.startswith("error: ") and why in out


def test_date_tool_and_idiom_lookup():
    assert run_tool("date_calc", {"op": "days_between", "date": "2024-01-01", "date2": "2024-03-01"}) == "60"
    assert run_tool("date_calc", {"op": "weekday", "date": "2026-12-06"}) == "星期日"
    assert run_tool("date_calc", {"op": "add_days", "date": "2024-02-28", "days": 2}) == "2024-03-01"
    assert run_tool("date_calc", {"op": "add_days", "date": "2024-02-28", "days": 10**9}).startswith("error")
    assert run_tool("date_calc", {"op": "weekday", "date": "2024-02-30"}).startswith("error: 'date'")
    entry = json.loads(run_tool("idiom_lookup", {"idiom": "画蛇添足"}))
    assert entry["pinyin"] == "huà shé tiān zú" and "多余" in entry["meaning"]
    assert run_tool("idiom_lookup", {"idiom": "不是成语"}).startswith("error: no idiom")


def test_bad_calls_are_results_not_crashes():
    assert run_tool("rm", {}).startswith("error: unknown tool")
    assert run_tool("calculator", {"expr": "1"}).startswith("error: unexpected arguments")
    assert run_tool("calculator", ["1"]).startswith("error: the arguments")
    assert len(run_tool("calculator", {"expression": "9 ** 256"}, max_chars=10)) == 11  # cut, with …


def test_schemas_name_every_tool():
    assert [t["function"]["name"] for t in TOOL_SCHEMAS] == list(TOOLS)


def test_tools_sft_splits_never_share_a_question_and_hold_every_kind():
    train, held = tools_episodes("train"), tools_episodes("heldout")
    question = {k: {c[1]["content"] for _, c in eps} for k, eps in (("train", train), ("held", held))}
    assert not question["train"] & question["held"]
    assert {k for k, _ in held} == set(KINDS) == {k for k, _ in train}
    for kind, chat in held:
        if kind == "idiom":
            assert is_held_out(chat[2]["tool_calls"][0]["function"]["arguments"]["idiom"])
    two = [c for k, c in train if k == "calc2"][0]
    assert len(two[2]["tool_calls"]) == 2 and [m["role"] for m in two[3:5]] == ["tool", "tool"]
    assert any(c[2].get("reasoning_content") for c in tools_sft("train"))  # thinking before a call
    assert all(len(c) == 3 for k, c in train if k == "none")  # answered without a tool


def test_tools_sft_results_are_the_tools_own_and_rows_read_back(tmp_path):
    for _, chat in tools_episodes("heldout"):
        calls = [c for m in chat if m["role"] == "assistant" for c in m.get("tool_calls") or ()]
        results = [m["content"] for m in chat if m["role"] == "tool"]
        assert results == [run_tool(c["function"]["name"], c["function"]["arguments"]) for c in calls]
    # written as OpenAI JSONL rows, the chats read back unchanged through SFT's reader
    chats = tools_sft("heldout")[:12]
    rows = [{"messages": c[1:], "tools": c[0]["tools"]} for c in chats]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    read, report = sft_data.read_sft_jsonl(path)
    assert read == chats and not report.skipped


def test_sft_loads_tools_sft_by_name():
    from qinglm.sft.config import SFTConfig
    from qinglm.sft.prep import load_conversations

    cfg = SFTConfig(base="x", data=NAME, max_examples=5, eval_examples=3)
    train, val = load_conversations(cfg, lambda _: None)
    assert len(train) == 5 and len(val) == 3
    assert all(chat[0]["tools"] and all(t in TOOL_SCHEMAS for t in chat[0]["tools"]) for chat in train + val)
