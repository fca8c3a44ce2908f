"""`qinglm serve`: the OpenAI-compatible API, checked with the official openai client on a live server."""

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import qinglm  # noqa: E402
from qinglm.cli import main  # noqa: E402
from qinglm.config import SamplingConfig  # noqa: E402
from qinglm.infer.chat import encode_chat  # noqa: E402
from qinglm.infer.generate import generate_ids  # noqa: E402
from qinglm.infer.text import encode_prompt  # noqa: E402
from qinglm.serve.app import create_app, serve_in_thread  # noqa: E402
from qinglm.serve.config import ServeConfig  # noqa: E402
from qinglm.serve.protocol import parse_completion  # noqa: E402
from qinglm.tokenizer import train_tokenizer  # noqa: E402

LINES = ["今天天气真不错，我们一起去公园散步吧。", "人工智能的未来充满了希望和挑战。", "中国经济稳步增长。"]
KEY = "sk-test"
CAP = 24  # the server's max_tokens cap
CTX = 64
LONG = "".join(chr(0x4E00 + 37 * i) for i in range(80))  # rare characters: several tokens each
PROMPTS = ["今天", "人工智能", "中国经济", "我们一起", "春天来了", "学习", "公园", "未来充满"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_run):
    """Return a tiny random model as a run directory (config.json, tokenizer/, best/)."""
    tok = train_tokenizer([f"{LINES[i % 3]}{i}" for i in range(120)], 400, show_progress=False)
    return tiny_run(tmp_path_factory.mktemp("serve-run"), tok, max_seq_len=CTX)


@pytest.fixture(scope="module")
def lm(run_dir):
    return qinglm.load(run_dir, device="cpu")


@pytest.fixture(scope="module")
def url(lm):
    cfg = ServeConfig(api_key=KEY, max_tokens_cap=CAP, model_name="tiny-test")
    with serve_in_thread(create_app(lm, cfg)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def auth():
    return {"Authorization": f"Bearer {KEY}"}


def reference(lm, ids, n, stop_id=None):
    """Return the greedy continuation of ids, decoded on its own (one request, no server)."""
    d = SamplingConfig()  # the server's defaults are QingLM's: repetition penalty included
    cfg = SamplingConfig(max_new_tokens=n, temperature=0, repetition_penalty=d.repetition_penalty)
    out = []
    for t in generate_ids(lm.model, ids, cfg, eos_id=lm.tokenizer.eos_id):
        if t == stop_id:
            break
        out.append(t)
    return lm.tokenizer.decode(out)


def chat_ids(lm, messages):
    return encode_chat(lm.tokenizer, messages, add_generation_prompt=True).ids


def test_openai_client_lists_models_completes_and_chats(client, lm):
    assert [m.id for m in client.models.list().data] == ["tiny-test"]

    r = client.completions.create(model="tiny-test", prompt="今天天气", max_tokens=12, temperature=0)
    ids = encode_prompt(lm.tokenizer, "今天天气")
    assert (
        r.choices[0].text
        == reference(lm, ids, 12)
        == lm.generate("今天天气", max_new_tokens=12, temperature=0)
    )
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        len(ids),
        12,
        len(ids) + 12,
    )

    messages = [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "你好"}]
    r = client.chat.completions.create(model="tiny-test", messages=messages, max_tokens=10, temperature=0)
    reply = r.choices[0].message
    assert reply.role == "assistant"
    assert reply.content == reference(lm, chat_ids(lm, messages), 10, lm.tokenizer.im_end_id)
    assert reply.content == lm.chat(messages, max_new_tokens=10, temperature=0)
    assert r.usage.prompt_tokens == len(chat_ids(lm, messages)) and r.choices[0].finish_reason in (
        "length",
        "stop",
    )


def test_streamed_text_equals_the_whole_response_for_greedy_decoding(client):
    messages = [{"role": "user", "content": "人工智能的未来"}]
    whole = client.chat.completions.create(model="m", messages=messages, max_tokens=16, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="m",
            messages=messages,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and len([c for c in chunks if c.choices]) > 3
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    whole = client.completions.create(model="m", prompt="中国经济", max_tokens=16, temperature=0)
    chunks = list(
        client.completions.create(model="m", prompt="中国经济", max_tokens=16, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_sse_wire_format_ends_with_done(url):
    body = {"prompt": "今天", "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=auth(), timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_stop_strings_end_the_reply_in_both_modes(client):
    kw = dict(model="m", prompt="今天", max_tokens=20, temperature=1.0, seed=3)
    full = client.completions.create(**kw).choices[0].text
    k = next(k for k in range(3, len(full) - 2) if full.index(full[k : k + 2]) == k)  # its first occurrence
    stop = full[k : k + 2]
    r = client.completions.create(**kw, stop=[stop, "不会出现的"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (full[:k], "stop")
    chunks = list(client.completions.create(**kw, stop=stop, stream=True))
    assert (
        "".join(c.choices[0].text for c in chunks) == full[:k]
        and chunks[-1].choices[0].finish_reason == "stop"
    )


def test_bad_requests_get_400_with_a_json_error(url):
    def post(path, content=None, **kw):
        headers = {**auth(), "Content-Type": "application/json"}
        return httpx.post(url + path, content=content, headers=headers, timeout=60, **kw)

    for path in ("/v1/completions", "/v1/chat/completions"):
        r = post(path, content=b"{not json")
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        assert post(path, content=b"[1, 2]").status_code == 400
    cases = [
        ("/v1/completions", {"prompt": 7}, "prompt"),
        ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
        ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
        ("/v1/completions", {"prompt": "x", "n": 2}, "'n'"),
        ("/v1/completions", {"prompt": "x", "max_tokens": True}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "stop": [1]}, "stop"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "role"),
        ("/v1/completions", {"prompt": LONG}, "context"),
    ]
    for path, body, word in cases:
        r = post(path, json=body)
        assert r.status_code == 400, body
        assert word in r.json()["error"]["message"] and r.json()["error"]["type"] == "invalid_request_error"


def test_max_tokens_is_clamped_and_unknown_fields_are_ignored(url):
    def completion_tokens(**kw):
        body = {"prompt": "今天", "temperature": 0, "frobnicate": {"x": 1}, **kw}
        r = httpx.post(url + "/v1/completions", json=body, headers=auth(), timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["completion_tokens"]

    assert completion_tokens(max_tokens=10**9) == CAP
    assert completion_tokens(max_tokens=-5) == 1
    assert completion_tokens(max_tokens=3) == 3


def test_long_prompts_are_truncated_when_configured(lm):
    cfg = ServeConfig(truncate_prompt=True, max_tokens_cap=16)
    req = parse_completion({"prompt": LONG, "max_tokens": 8}, lm.tokenizer, CTX, cfg)
    full = encode_prompt(lm.tokenizer, LONG)
    assert len(req.prompt_ids) == CTX - 8 and req.prompt_ids[0] == lm.tokenizer.bos_id
    assert req.prompt_ids[1:] == full[len(full) - (CTX - 9) :]  # the end of the prompt is kept


def test_a_long_chat_drops_its_oldest_turns_like_lm_chat(url, lm):
    turns = [{"role": "system", "content": "助手"}]
    for i in range(8):
        turns += [
            {"role": "user", "content": LONG[i * 3 : i * 3 + 3]},
            {"role": "assistant", "content": "好"},
        ]
    turns.append({"role": "user", "content": "你好"})
    assert len(chat_ids(lm, turns)) > CTX
    body = {"messages": turns, "max_tokens": 8, "temperature": 0}
    r = httpx.post(url + "/v1/chat/completions", json=body, headers=auth(), timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] <= CTX - 8
    assert r.json()["choices"][0]["message"]["content"] == lm.chat(turns, max_new_tokens=8, temperature=0)
    body = {"messages": [{"role": "user", "content": LONG}], "max_tokens": 8}
    r = httpx.post(url + "/v1/chat/completions", json=body, headers=auth(), timeout=60)
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]


def test_api_key_is_required_on_v1_routes(url):
    assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
    r = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="m", prompt="x", max_tokens=2)
    health = httpx.get(url + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    page = httpx.get(url + "/", timeout=10)
    assert page.status_code == 200 and "<script>" in page.text and "https://" not in page.text  # offline


def test_concurrent_requests_are_batched_and_not_mixed(client, url, lm):
    greedy = {p: reference(lm, encode_prompt(lm.tokenizer, p), 16) for p in PROMPTS}

    def sampled(p, i):  # each request its own seed and settings
        r = client.completions.create(model="m", prompt=p, max_tokens=16, temperature=0.9, seed=i, top_p=0.9)
        return r.choices[0].text

    alone = [sampled(p, i) for i, p in enumerate(PROMPTS)]

    def streamed(p):
        chunks = client.completions.create(model="m", prompt=p, max_tokens=16, temperature=0, stream=True)
        return "".join(c.choices[0].text for c in chunks)

    def whole(p):
        return client.completions.create(model="m", prompt=p, max_tokens=16, temperature=0).choices[0].text

    slow = lm.model.register_forward_pre_hook(lambda *_: time.sleep(0.01))  # make the requests overlap
    try:
        with ThreadPoolExecutor(len(PROMPTS) * 3) as pool:
            got_streamed = pool.map(streamed, PROMPTS)
            got_whole = pool.map(whole, PROMPTS)
            got_sampled = pool.map(sampled, PROMPTS, range(len(PROMPTS)))
            got_streamed, got_whole, got_sampled = list(got_streamed), list(got_whole), list(got_sampled)
    finally:
        slow.remove()
    assert got_streamed == got_whole == [greedy[p] for p in PROMPTS]
    assert got_sampled == alone
    assert len(set(greedy.values())) > 1 and len(set(alone)) == len(alone)  # the outputs really differ
    assert httpx.get(url + "/health", timeout=10).json()["peak_batch"] > 1  # they did decode together


def wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_client_that_disconnects_frees_its_slot(url, lm):
    slow = lm.model.register_forward_pre_hook(lambda *_: time.sleep(0.05))  # 50 ms a token
    try:
        before = httpx.get(url + "/health", timeout=10).json()
        body = {"prompt": "今天", "max_tokens": CAP, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=auth(), timeout=60) as r:
            next(r.iter_lines())  # the first token arrived; dropping the iterator hangs up
        # a non-streaming client that gives up is noticed too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json={**body, "stream": False}, headers=auth(), timeout=0.3)

        def health():
            return httpx.get(url + "/health", timeout=10).json()

        wait_for(lambda: health()["cancelled"] == before["cancelled"] + 2 and health()["in_flight"] == 0)
        assert health()["served"] == before["served"]  # neither ran to the end
    finally:
        slow.remove()
    r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=auth(), timeout=60)
    assert r.status_code == 200  # the worker moved on


def test_a_full_queue_answers_503(lm):
    slow = lm.model.register_forward_pre_hook(lambda *_: time.sleep(0.05))
    try:
        with serve_in_thread(create_app(lm, ServeConfig(max_queue=1))) as base:
            body = {"prompt": "今天", "max_tokens": 20, "temperature": 0, "stream": True}
            with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
                lines = r.iter_lines()  # kept: dropping the iterator closes the connection
                next(lines)  # the only slot is taken
                busy = httpx.post(base + "/v1/completions", json=body, timeout=60)
                assert busy.status_code == 503 and "busy" in busy.json()["error"]["message"]
    finally:
        slow.remove()


def test_cli_serve_reports_user_errors_in_one_line(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "nope")]) == 2
    assert "qinglm: error: run directory not found" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path), "--max-tokens-cap", "0"]) == 2
    assert "--max-tokens-cap" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_serve_answers_on_the_given_port(run_dir):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "qinglm",
        "serve",
        "--model",
        str(run_dir),
        "--port",
        str(port),
        "--api-key",
        KEY,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)

        def up():
            assert proc.poll() is None, proc.stderr.read()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, timeout=90)
        assert [m.id for m in c.models.list().data] == [run_dir.name]
        assert c.chat.completions.create(
            model="x", messages=[{"role": "user", "content": "你好"}], max_tokens=3
        )
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_kv_cache_budget_refuses_what_never_fits_and_queues_the_rest(lm):
    # 32 tokens of cache: one row of up to 32 positions at a time; the others wait their turn.
    cfg = ServeConfig(kv_cache_tokens=32, max_batch_size=4, max_tokens_cap=CAP)
    with serve_in_thread(create_app(lm, cfg)) as base:
        big = httpx.post(base + "/v1/completions", json={"prompt": LONG[:8], "max_tokens": CAP}, timeout=60)
        assert big.status_code == 400 and "KV-cache" in big.json()["error"]["message"]
        body = {"max_tokens": 8, "temperature": 0}
        with ThreadPoolExecutor(4) as pool:
            answers = list(
                pool.map(
                    lambda p: httpx.post(base + "/v1/completions", json={"prompt": p, **body}, timeout=60),
                    PROMPTS[:4],
                )
            )
    texts = [r.json()["choices"][0]["text"] for r in answers]
    ids = [encode_prompt(lm.tokenizer, p) for p in PROMPTS[:4]]
    assert texts == [reference(lm, i, 8) for i in ids]
