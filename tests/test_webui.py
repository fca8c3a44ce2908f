"""The chat page at /, driven in headless Chromium: type a message, see a streamed reply appear."""

import json
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

if not Path("/usr/bin/chromium").exists():
    pytest.skip("Debian chromium (/usr/bin/chromium) is not installed", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("fastapi")

import qinglm  # noqa: E402
from qinglm.serve.app import create_app, serve_in_thread  # noqa: E402
from qinglm.serve.config import ServeConfig  # noqa: E402
from qinglm.tokenizer import train_tokenizer  # noqa: E402

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
KEY = "sk-page"


@pytest.fixture(scope="module")
def lm(tmp_path_factory, tiny_run):
    """Return a tiny random model loaded from a run directory."""
    run = tmp_path_factory.mktemp("webui-run")
    lines = ["今天天气真不错，我们一起去公园散步吧。", "人工智能的未来充满了希望和挑战。"]
    tok = train_tokenizer([f"{lines[i % 2]}{i}" for i in range(100)], 400, show_progress=False)
    return qinglm.load(tiny_run(run, tok, max_seq_len=128), device="cpu")


@pytest.fixture(scope="module")
def page_url(lm):
    with serve_in_thread(create_app(lm, ServeConfig(api_key=KEY, max_tokens_cap=32))) as url:
        yield url


@contextmanager
def open_page(url):
    """Yield the chat page at url in headless Chromium; its .sent lists the JSON bodies it POSTed."""
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page()
        requests: list[str] = []
        page.sent = []
        page.on("request", lambda r: requests.append(r.url))
        page.on("request", lambda r: r.post_data and page.sent.append((r.url, json.loads(r.post_data))))
        page.goto(url + "/")
        yield page
        browser.close()
        assert all(u.startswith(url) for u in requests), requests  # nothing from the internet


@pytest.fixture()
def page(page_url):
    with open_page(page_url) as page:
        yield page


def send(page, text):
    page.fill("#input", text)
    page.keyboard.press("Enter")


def test_typed_message_gets_a_streamed_reply_over_several_turns(page, lm):
    page.fill("#api_key", KEY)
    page.dispatch_event("#api_key", "change")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "24")
    # Record every text the reply bubble shows, so the test sees it grow piece by piece.
    page.evaluate(
        """() => { window.seen = [];
        new MutationObserver(() => { const r = document.querySelector('.assistant:last-child');
          if (r) window.seen.push(r.textContent); })
        .observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true}); }"""
    )
    slow = lm.model.register_forward_pre_hook(lambda *_: time.sleep(0.02))  # tokens arrive one by one
    try:
        send(page, "你好")
        page.wait_for_selector(".msg.user")
        page.wait_for_function(
            "document.getElementById('status').textContent.includes('tokens')", timeout=30_000
        )
    finally:
        slow.remove()
    reply = page.inner_text(".msg.assistant")
    expected = lm.chat([{"role": "user", "content": "你好"}], max_new_tokens=24, temperature=0)
    assert reply == expected and reply
    seen = [s for s in page.evaluate("window.seen") if s]
    assert len(set(seen)) > 3 and all(expected.startswith(s) for s in seen)  # it grew while streaming

    # Second turn: the page sends the whole conversation, so the reply continues the chat.
    send(page, "再说一遍")
    page.wait_for_function("document.querySelectorAll('.msg.assistant').length == 2")
    page.wait_for_function(
        "document.getElementById('send').textContent == 'Send' && "
        "document.querySelectorAll('.msg.assistant')[1].textContent.length > 0",
        timeout=30_000,
    )
    second = page.locator(".msg.assistant").nth(1).inner_text()
    history = [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": expected},
        {"role": "user", "content": "再说一遍"},
    ]
    assert second == lm.chat(history, max_new_tokens=24, temperature=0)
    assert page.locator(".error").count() == 0


def test_page_without_the_key_shows_the_servers_error(page):
    page.fill("#api_key", "")
    send(page, "你好")
    page.wait_for_selector(".msg.error", timeout=30_000)
    assert "API key" in page.inner_text(".msg.error")
    # the sampling controls are there
    for control in ("#temperature", "#top_p", "#top_k", "#repetition_penalty", "#max_tokens", "#system"):
        assert page.locator(control).count() == 1


@pytest.fixture(scope="module")
def tools_lm(tmp_path_factory, tiny_run, chat_tok):
    """Return a tiny model whose tokenizer has the tool and thinking tokens, with room for the tool list."""
    return qinglm.load(
        tiny_run(tmp_path_factory.mktemp("webui-tools"), chat_tok, max_seq_len=1024), device="cpu"
    )


def test_thinking_is_folded_and_builtin_tool_calls_run(tools_lm, planted_scheduler):
    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "6*7"}}\n</tool_call>'
    planted_scheduler.planted = [
        "<think>\n要用<b>计算器</b>\n</think>\n\n" + call,
        "答案是 <img src=x onerror=\"document.title='xss'\">42",
    ]
    with serve_in_thread(create_app(tools_lm, ServeConfig(api_key=KEY))) as url, open_page(url) as page:
        page.fill("#api_key", KEY)
        page.fill("#max_tokens", "16")
        page.dispatch_event("#api_key", "change")
        page.select_option("#thinking", "on")
        page.check("#tools")
        send(page, "6 乘 7？")
        page.wait_for_function(
            "document.getElementById('status').textContent.includes('tokens')", timeout=30_000
        )
        first, second = page.locator(".msg.assistant").all()
        thinking = first.locator("details.thinking")
        assert thinking.count() == 1 and thinking.get_attribute("open") is None  # folded
        assert thinking.locator(".thinking-text").text_content() == "要用<b>计算器</b>"
        assert not page.locator(".thinking-text").inner_text()  # hidden until opened
        page.click("details.thinking summary")
        assert page.locator(".thinking-text").inner_text() == "要用<b>计算器</b>"
        assert first.locator(".tool-call").inner_text() == '→ calculator({"expression": "6*7"})'
        assert page.inner_text(".msg.tool") == "[calculator] 42"
        assert second.locator("details").count() == 0
        assert second.inner_text() == "答案是 <img src=x onerror=\"document.title='xss'\">42"
        assert page.locator("#log b, #log img").count() == 0 and page.title() != "xss"
        assert page.locator(".error").count() == 0
        chats = [body for u, body in page.sent if u.endswith("/v1/chat/completions")]
    assert [u.removeprefix(url) for u, _ in page.sent] == [
        "/v1/chat/completions", "/v1/tools/builtin/run", "/v1/chat/completions"
    ]  # fmt: skip
    assert all(b["chat_template_kwargs"] == {"enable_thinking": True} for b in chats)
    assert [t["function"]["name"] for t in chats[0]["tools"]] == ["calculator", "date_calc", "idiom_lookup"]
    assistant, tool = chats[1]["messages"][1:]
    assert assistant["reasoning_content"] == "要用<b>计算器</b>"
    assert assistant["tool_calls"][0]["function"] == {
        "name": "calculator",
        "arguments": '{"expression": "6*7"}',
    }
    assert tool == {"role": "tool", "tool_call_id": assistant["tool_calls"][0]["id"], "content": "42"}
