"""chat-tools: held-out tools-sft episodes replayed with the model in the assistant's seat, scored per step."""

import json

import pytest

from qinglm.data.tools_sft import tools_episodes
from qinglm.errors import QingLMError
from qinglm.evals import tool_use
from qinglm.evals.suite import evaluate_tasks
from qinglm.evals.tasks import resolve


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
    """Replies come from a script per episode (keyed by the question), the prompts are kept."""
    script: dict[str, list[str]] = {}
    seen: list[list[dict]] = []

    def replies(model, tokenizer, chats, max_new_tokens, thinking=None):
        assert thinking is False
        seen.extend(list(chat) for chat in chats)  # as asked: the histories grow later
        return [script[chat[1]["content"]].pop(0) for chat in chats]

    monkeypatch.setattr(tool_use, "greedy_replies", replies)
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
    # the second turn of the two-call date episode saw the real result of the model's own call
    later = [c for c in seen if c[1]["content"] == date2[1]["content"]][1]
    assert later[-1] == {"role": "tool", "content": date2[3]["content"]}
    assert s["answer_right_interval"][0] > 0.2 and s["answer_right_interval"][1] == 1.0


def test_wrong_arguments_wrong_tool_and_a_missing_call_are_told_apart(planted, chat_tok):
    script, _ = planted
    calc, idiom, none = episode("calc"), episode("idiom"), episode("none")
    args = calc[2]["tool_calls"][0]["function"]["arguments"]["expression"]
    wrong_args = as_text(calc[2]).replace(json.dumps(args), json.dumps(args + " + 1"))
    script[calc[1]["content"]] = [wrong_args, calc[-1]["content"]]  # right tool, wrong arguments
    script[idiom[1]["content"]] = [idiom[-1]["content"]]  # answered without looking it up
    script[none[1]["content"]] = [as_text(calc[2])]  # called a tool where none was needed
    s = tool_use.score_episodes(Model, chat_tok, [calc, idiom, none], 64)
    # tools: only calc's; arguments: none; answers: calc's and idiom's texts are the reference's
    assert (s["tool_right"], s["args_right"], s["answer_right"]) == (1, 0, 2)


def test_chat_tools_is_asked_by_name_and_needs_room_for_the_tool_list(tiny_model, chat_tok):
    assert "chat-tools" not in [t.name for t in resolve("all", "sft")]
    small = tiny_model(chat_tok.vocab_size, max_seq_len=64)
    with pytest.raises(QingLMError, match="chat-tools needs a context of at least"):
        evaluate_tasks(small, chat_tok, "chat-tools", limit=1, kind="sft")
    model = tiny_model(chat_tok.vocab_size, max_seq_len=2048)
    r = evaluate_tasks(model, chat_tok, "chat-tools", limit=2, kind="sft")["tasks"]["chat-tools"]
    assert r["n"] == 2 and set(r["details"]) == {"tool_right", "args_right", "answer_right"}
    assert 0 <= r["interval"][0] <= r["score"] <= r["interval"][1] <= 1
