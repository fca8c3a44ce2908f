"""The chat page at /, driven in headless Chromium: type a message, see a streamed reply appear."""

import time
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


@pytest.fixture()
def page(page_url):
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page()
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(page_url + "/")
        yield page
        browser.close()
        assert all(u.startswith(page_url) for u in requests), requests  # nothing from the internet


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
