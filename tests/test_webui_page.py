"""The chat page's thinking, tools and the built-in tool routes it uses, without a browser: the page's
source, GET /v1/tools/builtin and POST /v1/tools/builtin/run (key, bad input), and the openai client's
function-calling loop run with the server's built-in tools."""

import json
import re

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

import qinglm  # noqa: E402
from qinglm.data.builtin_tools import TOOL_SCHEMAS  # noqa: E402
from qinglm.serve.app import create_app, serve_in_thread  # noqa: E402
from qinglm.serve.config import ServeConfig  # noqa: E402

KEY = "sk-tools"
RUN = "/v1/tools/builtin/run"


@pytest.fixture(scope="module")
def lm(tmp_path_factory, tiny_run, chat_tok):
    return qinglm.load(
        tiny_run(tmp_path_factory.mktemp("page-run"), chat_tok, max_seq_len=1024), device="cpu"
    )


@pytest.fixture(scope="module")
def url(lm):
    with serve_in_thread(create_app(lm, ServeConfig(api_key=KEY, max_tokens_cap=8))) as base:
        yield base


def auth():
    return {"Authorization": f"Bearer {KEY}"}


def post(url, body, **kw):
    return httpx.post(url + RUN, json=body, headers=kw.pop("headers", auth()), timeout=30, **kw)


def test_page_folds_thinking_switches_it_and_offers_the_builtin_tools(url):
    page = httpx.get(url + "/", timeout=10).text
    script = page.split("<script>")[1]
    assert 'document.createElement("details")' in script and "reasoning_content" in script
    assert re.search(r'<select id="thinking">.*value="on".*value="off"', page, re.S)
    assert "enable_thinking" in script and 'id="tools" type="checkbox"' in page
    assert "/v1/tools/builtin" in script and RUN in script and "tool_calls" in script
    # user, model and tool text only ever goes in as text
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, sink


def test_builtin_tools_are_listed_behind_the_api_key(url):
    r = httpx.get(url + "/v1/tools/builtin", headers=auth(), timeout=10)
    assert r.status_code == 200 and r.json() == {"object": "list", "data": TOOL_SCHEMAS}
    assert [t["function"]["name"] for t in r.json()["data"]] == ["calculator", "date_calc", "idiom_lookup"]
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        for r in (httpx.get(url + "/v1/tools/builtin", headers=headers, timeout=10),
                  post(url, {"name": "calculator", "arguments": "{}"}, headers=headers)):  # fmt: skip
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_a_builtin_call_runs_on_the_server_with_the_tools_limits(url):
    args = json.dumps({"expression": "1/3 + 1/6"})
    assert post(url, {"name": "calculator", "arguments": args}).json() == {
        "name": "calculator",
        "content": "1/2",
    }
    r = post(url, {"name": "date_calc", "arguments": {"op": "weekday", "date": "2026-12-06"}})
    assert r.json()["content"] == "星期日"
    # the model's mistakes are results it reads back, not client errors
    assert post(url, {"name": "calculator", "arguments": "{1+1"}).json()["content"].startswith("error:")
    huge = post(url, {"name": "calculator", "arguments": {"expression": "9**9**9"}}).json()["content"]
    assert huge.startswith("error:")
    wrong = post(url, {"name": "calculator", "arguments": {"x": 1}}).json()["content"]
    assert wrong.startswith("error: unexpected arguments")


@pytest.mark.parametrize(
    "body, message",
    [
        ({"name": "shell", "arguments": "{}"}, "built-in tools"),
        ({"arguments": "{}"}, "built-in tools"),
        ({"name": "calculator", "arguments": [1]}, "'arguments'"),
        ([1, 2], "JSON object"),
    ],
)
def test_a_bad_tool_request_is_answered_400_json(url, body, message):
    r = post(url, body)
    assert r.status_code == 400 and message in r.json()["error"]["message"]


def test_a_tool_request_that_is_not_json_is_refused(url):
    r = httpx.post(url + RUN, content=b"{not json", headers={**auth(), "Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(url + RUN, content=b"name=calculator", headers={**auth(), "Content-Type": "text/plain"})
    assert r.status_code == 415 and "error" in r.json()


def test_openai_client_loop_with_the_servers_builtin_tools(lm, planted_scheduler):
    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "6*7"}}\n</tool_call>'
    planted_scheduler.planted = ["<think>\n算一下\n</think>\n\n" + call, "6*7 = 42。"]
    with serve_in_thread(create_app(lm, ServeConfig(api_key=KEY))) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=60)
        tools = httpx.get(base + "/v1/tools/builtin", headers=auth(), timeout=10).json()["data"]
        messages = [{"role": "user", "content": "6 乘 7 等于几？"}]
        extra = {"chat_template_kwargs": {"enable_thinking": True}}
        for _ in range(3):  # the client's loop: ask, run the calls, send the results back
            r = client.chat.completions.create(
                model="t", messages=messages, tools=tools, extra_body=extra, max_tokens=16
            )
            m = r.choices[0].message
            messages.append(m.model_dump(exclude_none=True))
            if not m.tool_calls:
                break
            for c in m.tool_calls:
                result = post(base, c.function.model_dump()).json()["content"]
                messages.append({"role": "tool", "tool_call_id": c.id, "content": result})
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    assert messages[1]["reasoning_content"] == "算一下" and messages[2]["content"] == "42"
    assert messages[3]["content"] == "6*7 = 42。" and r.choices[0].finish_reason == "stop"
    assert "42" in lm.tokenizer.decode(planted_scheduler.prompts[1])  # the result reached the model
