"""chat-tools: held-out tools-sft episodes replayed with the model in the assistant's seat, scored per step."""

import json

import pytest

from qinglm.data.tools_sft import tools_episodes
from qinglm.errors import QingLMError
from qinglm.evals import tool_use
from qinglm.evals.suite import evaluate_tasks
from qinglm.evals.tasks import resolve
from qinglm.infer import episodes


def episode(kind: str) -> list[dict]:
    return next(chat for k, chat in tools_episodes("heldout") if k == kind)


def as_text(message: dict) -> str:
    calls = []
    for c in message.get("tool_calls") or ():
        args = json.dumps(c["function"]["arguments"], ensure_ascii=False)
        calls.append(f'<tool_call>\n{{"name": "{c["function"]["name"]}", "arguments": {args}}}\n</tool_call>')
    return message["content"] + "\n".join(calls)


@pytest.fixture
def planted(monkeypatch):
    """Replies come from a script per episode (keyed by the question, found in the prompt), the prompts
    are kept (as text) and so is the thinking switch of each (the end of the generation prompt)."""
    script: dict[str, list[str]] = {}
    seen: list[str] = []

    def decode(model, tok, requests):
        ids, texts = [], []
        for r in requests:
            prompt = tok.decode(r.prompt_ids, skip_special_tokens=False)
            seen.append(prompt)
            text = script[next(q for q in script if q in prompt)].pop(0)
            ids.append(tok.encode(text) + [tok.control_id("<|im_end|>")])
            texts.append(text)
        return ids, texts, ["stop"] * len(texts)

    monkeypatch.setattr(episodes, "decode", decode)
    return script, seen


class Model:  # only its context is read: the replies are planted
    class cfg:
        max_seq_len = 4096


def test_right_calls_and_answer_score_all_three_and_results_are_real(planted, chat_tok):
    script, seen = planted
    calc2, date2, none = episode("calc2"), episode("date2"), episode("none")
    for chat in (calc2, date2, none):
        script[chat[1]["content"]] = [as_text(m) for m in chat if m["role"] == "assistant"]
    s = tool_use.score_episodes(Model, chat_tok, [calc2, date2, none], 64)
    assert (s["n"], s["tool_right"], s["args_right"], s["answer_right"]) == (3, 3, 3, 3)
    assert (s["call_ok"], s["call_ok_n"], s["no_call_ok"], s["no_call_ok_n"]) == (2, 2, 1, 1)
    # the second turn of the two-call date episode saw the real result of the model's own call
    later = [p for p in seen if date2[1]["content"] in p][1]
    assert later.endswith(f"<tool_response>\n{date2[3]['content']}\n</tool_response><|im_end|>\n"
                          "<|im_start|>assistant\n<think>\n\n</think>\n\n")  # fmt: skip
    assert s["answer_right_interval"][0] > 0.2 and s["answer_right_interval"][1] == 1.0


def test_wrong_arguments_wrong_tool_and_a_missing_call_are_told_apart(planted, chat_tok):
    script, _ = planted
    calc, idiom, none = episode("calc"), episode("idiom"), episode("none")
    args = calc[2]["tool_calls"][0]["function"]["arguments"]["expression"]
    wrong_args = as_text(calc[2]).replace(json.dumps(args), json.dumps(args + " + 1"))
    script[calc[1]["content"]] = [wrong_args, calc[-1]["content"]]  # right tool, wrong arguments
    script[idiom[1]["content"]] = [idiom[-1]["content"]]  # answered without looking it up
    script[none[1]["content"]] = [as_text(calc[2]), "不知道"]  # called a tool where none was needed
    s = tool_use.score_episodes(Model, chat_tok, [calc, idiom, none], 64)
    # tools: only calc's; arguments: none; answers: calc's and idiom's texts are the reference's
    assert (s["tool_right"], s["args_right"], s["answer_right"]) == (1, 0, 2)
    assert (s["call_ok"], s["call_ok_n"], s["no_call_ok"], s["no_call_ok_n"]) == (1, 2, 0, 1)


def test_thinking_on_lets_the_model_think_and_a_malformed_call_is_not_well_formed(planted, chat_tok):
    script, seen = planted
    calc, none = episode("calc"), episode("none")
    script[calc[1]["content"]] = ["<tool_call>\n{broken\n</tool_call>"]
    script[none[1]["content"]] = [f"<think>\n不需要工具。\n</think>\n\n{none[-1]['content']}"]
    s = tool_use.score_episodes(Model, chat_tok, [calc, none], 64, thinking=True)
    assert s["thinking"] and all(p.endswith("<|im_start|>assistant\n") for p in seen)
    assert (s["call_ok"], s["no_call_ok"], s["answer_right"]) == (0, 1, 1)


def test_chat_tools_is_asked_by_name_and_needs_room_for_the_tool_list(tiny_model, chat_tok):
    assert "chat-tools" not in [t.name for t in resolve("all", "sft")]
    small = tiny_model(chat_tok.vocab_size, max_seq_len=64)
    with pytest.raises(QingLMError, match="chat-tools needs a context of at least"):
        evaluate_tasks(small, chat_tok, "chat-tools", limit=1, kind="sft")
    model = tiny_model(chat_tok.vocab_size, max_seq_len=2048)
    r = evaluate_tasks(model, chat_tok, "chat-tools", limit=2, kind="sft")["tasks"]["chat-tools"]
    figures = set(tool_use.FIGURES) | {f + "_thinking" for f in tool_use.FIGURES}
    assert r["n"] == 2 and set(r["details"]) == set(r["intervals"]) == figures
    assert 0 <= r["interval"][0] <= r["score"] <= r["interval"][1] <= 1
    assert all(lo <= r["details"][f] <= hi for f, (lo, hi) in r["intervals"].items())


def test_detail_figures_show_their_intervals_in_the_table_and_the_report_card():
    from qinglm.evals.report import _tasks_table
    from qinglm.evals.suite import format_table

    r = {"kind": "chat", "metric": "answer_right", "score": 0.5, "interval": [0.2, 0.8], "random": 0.0, "n": 4,
         "details": {"call_ok": 0.75, "call_ok_thinking": 0.5}, "intervals": {"call_ok": [0.3, 0.95]}}  # fmt: skip
    out = {"tasks": {"chat-tools": r}, "summary": None}
    assert "chat-tools: call_ok 0.7500 [0.3000, 0.9500]" in format_table(out)
    assert "- chat-tools: call_ok 0.7500 [0.3000, 0.9500]" in _tasks_table(out)
    assert "- chat-tools: call_ok_thinking 0.5000" in _tasks_table(out)
