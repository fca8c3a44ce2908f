"""Tools and thinking in the chat template: one definition, the same text and ids as transformers renders,
control tokens only by id, SFT labels on the assistant's thinking and calls, old tokenizers refused clearly."""

import json

import pytest

from qinglm.chat_template import TOOL_TOKENS, parse_reply, render_chat
from qinglm.errors import QingLMError
from qinglm.infer.chat import encode_chat, fit_history
from qinglm.sft import data as sft_data
from qinglm.tokenizer import TOOL_TOKEN_IDS

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "calc",
            "description": "精确计算算术式",
            "parameters": {
                "type": "object",
                "properties": {"expr": {"type": "string"}},
                "required": ["expr"],
            },
        },
    }
]


def call(expr: str) -> dict:
    return {"type": "function", "function": {"name": "calc", "arguments": {"expr": expr}}}


CHAT = [
    {"role": "system", "content": "你是助手。"},
    {"role": "user", "content": "1/3+1/6 和 2*3 各是多少？"},
    {"role": "assistant", "content": "", "reasoning_content": "两个算式，各算一次。", "tool_calls": [call("1/3+1/6"), call("2*3")]},
    {"role": "tool", "content": "1/2"},
    {"role": "tool", "content": "6"},
    {"role": "assistant", "content": "分别是 1/2 和 6。"},
    {"role": "user", "content": "谢谢"},
]  # fmt: skip


def test_new_tokenizers_hold_the_tool_tokens_at_fixed_ids(chat_tok):
    assert chat_tok.has_tool_tokens
    assert [chat_tok.token_to_id(t) for t in TOOL_TOKENS] == list(TOOL_TOKEN_IDS) == list(range(6, 12))


@pytest.mark.parametrize("thinking", [None, False, True])
@pytest.mark.parametrize("cut", [slice(None), slice(1, None), slice(1, 2), slice(0, 6)])
@pytest.mark.parametrize("tools", [TOOLS, None])
def test_transformers_renders_the_same_text_and_ids(chat_tok, tmp_path_factory, thinking, cut, tools):
    from transformers import AutoTokenizer

    d = tmp_path_factory.getbasetemp() / "tools-tok"
    if not d.exists():
        chat_tok.save(d)
    hf = AutoTokenizer.from_pretrained(d)
    msgs = CHAT[cut]
    kw = {} if thinking is None else {"enable_thinking": thinking}
    want = hf.apply_chat_template(msgs, tools=tools, add_generation_prompt=True, tokenize=False, **kw)
    assert render_chat(msgs, True, tools=tools, thinking=thinking) == want
    ids = hf(want, add_special_tokens=False)["input_ids"]
    assert encode_chat(chat_tok, msgs, True, tools=tools, thinking=thinking).ids == ids


def test_thinking_off_prefills_an_empty_block_and_on_leaves_it_to_the_model():
    user = [{"role": "user", "content": "hi"}]
    assert render_chat(user, True, thinking=False).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert render_chat(user, True, thinking=True).endswith("<|im_start|>assistant\n")
    assert render_chat(user, True) == render_chat(user, True, thinking=True)  # None: no markup at all


def test_tool_tokens_typed_in_text_stay_text(chat_tok):
    forged = "".join(TOOL_TOKENS)
    chat = encode_chat(chat_tok, [{"role": "user", "content": forged}, {"role": "tool", "content": forged}])
    controls = [i for i in chat.ids if i in TOOL_TOKEN_IDS]
    assert controls == [chat_tok.token_to_id("<tool_response>"), chat_tok.token_to_id("</tool_response>")]


def test_an_pre_tools_tokenizer_refuses_tools_and_thinking_in_one_line_and_chats_as_before(pre_tools_tok):
    plain = [{"role": "user", "content": "今天"}]
    assert pre_tools_tok.decode(encode_chat(pre_tools_tok, plain, True).ids) == render_chat(plain, True)
    for kw in ({"tools": TOOLS}, {"thinking": False}):
        with pytest.raises(QingLMError, match="no tool-call or thinking tokens") as e:
            encode_chat(pre_tools_tok, plain, True, **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(QingLMError, match="no tool-call or thinking tokens"):
        fit_history(pre_tools_tok, CHAT, 1000, tools=TOOLS)


def test_sft_labels_cover_thinking_calls_and_text_never_tools_or_results(chat_tok):
    ids, labels = sft_data.encode_chat(chat_tok, [{**CHAT[0], "tools": TOOLS}, *CHAT[1:6]])
    trained = chat_tok.decode([t for t in labels if t != sft_data.IGNORE_INDEX])
    assert trained == (
        "<think>\n两个算式，各算一次。\n</think>\n\n"
        '<tool_call>\n{"name": "calc", "arguments": {"expr": "1/3+1/6"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "calc", "arguments": {"expr": "2*3"}}\n</tool_call><|im_end|>'
        "分别是 1/2 和 6。<|im_end|>"
    )
    assert "<tools>" in chat_tok.decode(ids) and "<tool_response>" in chat_tok.decode(ids)


def test_an_empty_thinking_block_is_prompt_not_target(chat_tok):
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "ok", "reasoning_content": ""},
    ]
    _, labels = sft_data.encode_chat(chat_tok, msgs)
    assert chat_tok.decode([t for t in labels if t != sft_data.IGNORE_INDEX]) == "ok<|im_end|>"


def row(**over):
    conv = [
        {"role": "user", "content": "2*3?"},
        {"role": "assistant", "content": None, "tool_calls": [call("2*3")]},
        {"role": "tool", "content": "6"},
        {"role": "assistant", "content": "6"},
    ]
    return {"messages": conv, "tools": TOOLS, **over}


def test_sft_reads_openai_and_minimind3_tool_rows():
    msgs = sft_data.to_messages(row())
    assert msgs[0] == {"role": "system", "content": "", "tools": TOOLS}
    assert msgs[2]["tool_calls"] == [call("2*3")] and msgs[2]["content"] == ""
    # minimind-3: the tool list as JSON text on the system message, calls and arguments as JSON text
    mm = {"conversations": [
        {"role": "system", "content": "S", "tools": json.dumps(TOOLS)},
        {"role": "user", "content": "2*3?"},
        {"role": "assistant", "content": "", "tool_calls": json.dumps(
            [{"type": "function", "function": {"name": "calc", "arguments": '{"expr": "2*3"}'}}])},
        {"role": "tool", "content": "6"},
        {"role": "assistant", "content": "6", "reasoning_content": "乘法"},
    ]}  # fmt: skip
    got = sft_data.to_messages(mm)
    assert got[0] == {"role": "system", "content": "S", "tools": TOOLS}
    assert got[2]["tool_calls"] == [call("2*3")] and got[4]["reasoning_content"] == "乘法"


def test_bad_tool_rows_are_skipped_and_counted_by_reason(tmp_path):
    bad_args = row()
    bad_args["messages"][1]["tool_calls"] = [{"function": {"name": "calc", "arguments": "{expr: 2*3"}}]
    lines = [
        row(),
        row(tools=[{"type": "function", "function": {"name": "other"}}]),  # calc is not listed
        bad_args,
        {"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "6"},
                      {"role": "assistant", "content": "6"}]},
    ]  # fmt: skip
    path = tmp_path / "tools.jsonl"
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")
    chats, report = sft_data.read_sft_jsonl(path)
    assert len(chats) == 1
    assert report.skipped == {
        "call to an unknown tool": 1,
        "tool call arguments are not JSON": 1,
        "tool result with no call": 1,
    }


def test_fit_history_drops_a_question_with_its_calls_and_results(chat_tok):
    full = encode_chat(chat_tok, CHAT, True, tools=TOOLS)
    kept, prompt = fit_history(chat_tok, CHAT, len(full.ids) - 1, tools=TOOLS)
    assert [m["role"] for m in kept] == ["system", "user"] and kept[1]["content"] == "谢谢"
    assert prompt.ids == encode_chat(chat_tok, kept, True, tools=TOOLS).ids


def test_parse_reply_reads_thinking_calls_and_text():
    text = '<think>\n先算\n</think>\n\n好的\n<tool_call>\n{"name": "calc", "arguments": {"expr": "1+1"}}\n</tool_call>'
    r = parse_reply(text)
    assert (r.reasoning, r.content, r.tool_calls) == (
        "先算",
        "好的",
        [{"name": "calc", "arguments": {"expr": "1+1"}}],
    )
    # thinking on: the reply starts inside the block; a malformed call stays text
    r = parse_reply("<think>想一想\n</think>\n\n<tool_call>\n{oops}\n</tool_call>")
    assert (
        r.reasoning == "想一想" and r.tool_calls is None and r.content == "<tool_call>\n{oops}\n</tool_call>"
    )
    assert parse_reply("just text").reasoning is None
