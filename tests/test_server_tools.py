"""Function calling and thinking through /v1/chat/completions: the request's tools rendered by the chat
template, the reply read back as tool_calls / reasoning_content, whole and streamed, with the openai client."""

import json

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

import qinglm  # noqa: E402
from qinglm.errors import QingLMError  # noqa: E402
from qinglm.infer.chat import encode_chat  # noqa: E402
from qinglm.serve.app import create_app, serve_in_thread  # noqa: E402
from qinglm.serve.config import ServeConfig  # noqa: E402
from qinglm.serve.tools import StreamReader, parse_tool_use, reply_message  # noqa: E402

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "calculator",
            "description": "exact arithmetic",
            "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}},
        },
    }
]
CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1+1"}}\n</tool_call>'


def test_tool_choice_and_thinking_switch():
    assert parse_tool_use({}).parses is False
    use = parse_tool_use({"tools": TOOLS, "chat_template_kwargs": {"enable_thinking": False}})
    assert use.tools == TOOLS and use.thinking is False and use.prefill == ""
    assert parse_tool_use({"tools": TOOLS, "tool_choice": "none"}).tools is None
    named = parse_tool_use(
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "calculator"}}}
    )
    assert named.prefill == '<tool_call>\n{"name": "calculator", "arguments": '
    for bad in ({"tool_choice": "required"}, {"tools": TOOLS, "tool_choice": {"function": {"name": "rm"}}},
                {"tools": "x"}, {"tools": [{"type": "function"}]}, {"enable_thinking": "yes"}):  # fmt: skip
        with pytest.raises(QingLMError):
            parse_tool_use(bad)


def test_reply_is_read_into_reasoning_tool_calls_and_content():
    use = parse_tool_use({"tools": TOOLS, "enable_thinking": True})
    message, finish = reply_message(use, "<think>\n先算一下\n</think>\n\n" + CALL, "stop")
    assert (
        finish == "tool_calls" and message["content"] is None and message["reasoning_content"] == "先算一下"
    )
    (call,) = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "calculator", "arguments": '{"expression": "1+1"}'}
    # a call to a tool the request did not offer stays text; no tools and no switch: the text as it is
    other = CALL.replace("calculator", "shell")
    assert reply_message(use, "<think>x</think>" + other, "stop")[0]["content"] == other
    assert reply_message(parse_tool_use({}), CALL, "stop") == ({"role": "assistant", "content": CALL}, "stop")
    # a forced call: the prefill and the generated arguments read as one call
    named = parse_tool_use(
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "calculator"}}}
    )
    message, _ = reply_message(named, '{"expression": "2*3"}}\n</tool_call>', "stop")
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"expression": "2*3"}


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_streamed_deltas_add_up_to_the_whole_reply(step):
    use = parse_tool_use({"tools": TOOLS, "enable_thinking": True})
    text = "<think>\n想一想\n\n再想</think>\n\n好的" + CALL + "\n" + CALL.replace("1+1", "2+2")
    reader, deltas = StreamReader(use), []
    for i in range(0, len(text), step):
        deltas += reader.feed(text[i : i + step])
    deltas += reader.feed("", final=True)
    whole, _ = reply_message(use, text, "stop")
    assert "".join(d.get("reasoning_content", "") for d in deltas) == whole["reasoning_content"]
    content = "".join(d.get("content", "") for d in deltas)  # no newlines of the template before it
    assert content.startswith("好的") and content.rstrip() == whole["content"]
    args = {}
    for d in deltas:
        for c in d.get("tool_calls", ()):
            args[c["index"]] = args.get(c["index"], "") + c["function"]["arguments"]
    assert [json.loads(args[i]) for i in sorted(args)] == [
        json.loads(c["function"]["arguments"]) for c in whole["tool_calls"]
    ]
    assert reader.calls == 2


def test_a_calls_name_then_its_arguments_stream_as_they_are_generated():
    use = parse_tool_use({"tools": TOOLS})
    reader, before_end = StreamReader(use), []
    for k in range(0, len(CALL) - 2, 2):  # all but the last characters of </tool_call>
        before_end += reader.feed(CALL[k : min(k + 2, len(CALL) - 2)])
    first, *rest = [c for d in before_end for c in d["tool_calls"]]
    assert first["id"].startswith("call_") and first["function"] == {"name": "calculator", "arguments": ""}
    sent = "".join(c["function"]["arguments"] for c in rest)
    assert len(rest) > 3 and sent == '{"expression": "1+1"}'  # piece by piece, before </tool_call> came
    assert reader.feed(CALL[-2:]) == [] and reader.feed("", final=True) == [] and reader.calls == 1
    # a call to a tool not offered, or malformed before its name, is read whole: back into the text
    other = StreamReader(use)
    deltas = [d for k in range(len(CALL)) for d in other.feed(CALL.replace("calculator", "shell")[k : k + 1])]
    assert "".join(d["content"] for d in deltas) == CALL.replace("calculator", "shell") and other.calls == 0


@pytest.fixture(scope="module")
def lm(tmp_path_factory, tiny_run, chat_tok):
    return qinglm.load(
        tiny_run(tmp_path_factory.mktemp("tools-run"), chat_tok, max_seq_len=1024), device="cpu"
    )


@pytest.mark.parametrize("stream", [False, True])
def test_openai_client_function_calling_round_trip(lm, planted_scheduler, stream):
    planted_scheduler.planted = ["<think>\n要用计算器\n</think>\n\n" + CALL, "1+1 = 2。"]
    with serve_in_thread(create_app(lm, ServeConfig(model_name="t"))) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        messages = [{"role": "user", "content": "1+1 等于几？"}]
        extra = {"chat_template_kwargs": {"enable_thinking": True}}
        arg_chunks = []

        def ask(msgs):
            if not stream:
                r = client.chat.completions.create(
                    model="t", messages=msgs, tools=TOOLS, extra_body=extra, max_tokens=16
                )
                m = r.choices[0].message
                calls = [(c.id, c.function.name, c.function.arguments) for c in m.tool_calls or ()]
                return m.content, getattr(m, "reasoning_content", None), calls, r.choices[0].finish_reason
            chunks = list(client.chat.completions.create(
                model="t", messages=msgs, tools=TOOLS, extra_body=extra, stream=True, max_tokens=16))  # fmt: skip
            content, reasoning, calls, finish = "", "", {}, None
            for ch in chunks:
                d = ch.choices[0].delta
                content += d.content or ""
                reasoning += getattr(d, "reasoning_content", None) or ""
                for c in d.tool_calls or ():
                    got = calls.setdefault(c.index, [c.id, c.function.name, ""])
                    got[2] += c.function.arguments or ""
                    if c.function.arguments:
                        arg_chunks.append(c.function.arguments)
                finish = ch.choices[0].finish_reason or finish
            return content or None, reasoning, [tuple(v) for _, v in sorted(calls.items())], finish

        content, reasoning, calls, finish = ask(messages)
        assert (content, reasoning, finish) == (None, "要用计算器", "tool_calls")
        ((call_id, name, args),) = calls
        assert name == "calculator" and json.loads(args) == {"expression": "1+1"}
        assert len(arg_chunks) > 1 if stream else not arg_chunks  # the arguments streamed as deltas
        history = messages + [
            {"role": "assistant", "content": None,
             "tool_calls": [{"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}]},
            {"role": "tool", "tool_call_id": call_id, "content": "2"},
        ]  # fmt: skip
        content, _, calls, finish = ask(history)
        assert (content, calls, finish) == ("1+1 = 2。", [], "stop")
    # the tool list, the call and its result reached the model through the one template
    want = [{"role": "user", "content": "1+1 等于几？"},
            {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": name, "arguments": args}}]},
            {"role": "tool", "content": "2"}]  # fmt: skip
    assert (
        planted_scheduler.prompts[1] == encode_chat(lm.tokenizer, want, True, tools=TOOLS, thinking=True).ids
    )


def test_a_real_model_answers_a_tool_request(lm):
    with serve_in_thread(create_app(lm, ServeConfig(model_name="t", max_tokens_cap=8))) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        named = {"type": "function", "function": {"name": "calculator"}}
        r = client.chat.completions.create(
            model="t",
            messages=[{"role": "user", "content": "hi"}],
            tools=TOOLS,
            tool_choice=named,
            max_tokens=8,
        )
        assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")  # an untrained model: any text
        with pytest.raises(openai.BadRequestError, match="tool_choice"):
            client.chat.completions.create(
                model="t", messages=[{"role": "user", "content": "hi"}], tool_choice="required"
            )


def test_lm_chat_takes_tools_and_the_thinking_switch(lm):
    user = [{"role": "user", "content": "1+1？"}]
    out = lm.chat(user, tools=TOOLS, thinking=False, max_new_tokens=4, temperature=0)
    assert isinstance(out, str)
    with pytest.raises(QingLMError, match="'tools' must be a list"):
        lm.chat(user, tools="calculator", max_new_tokens=4)


def test_an_old_tokenizer_answers_a_tools_request_with_one_line(pre_tools_tok):
    from qinglm.serve.protocol import parse_chat

    body = {"messages": [{"role": "user", "content": "hi"}]}
    assert (
        parse_chat(body, pre_tools_tok, 512, ServeConfig()).tool_use.parses is False
    )  # plain chats as before
    with pytest.raises(QingLMError, match="no tool-call or thinking tokens"):
        parse_chat({**body, "tools": TOOLS}, pre_tools_tok, 512, ServeConfig())
