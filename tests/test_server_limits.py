"""`qinglm serve` under hostile or careless clients: bad values, huge or malformed bodies, slow clients, foreign hosts.

Every server here listens on 127.0.0.1 only.
"""
# ruff: noqa: F811  (lm and run_dir are fixtures imported from test_server)

import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http.client import HTTPConnection
from urllib.parse import urlsplit

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from test_server import CAP, CTX, PROMPTS, lm, reference, run_dir  # noqa: E402, F401  (fixtures)

import qinglm.infer.sampling  # noqa: E402
from qinglm.cli import main  # noqa: E402
from qinglm.errors import QingLMError  # noqa: E402
from qinglm.infer.text import encode_prompt  # noqa: E402
from qinglm.serve.app import create_app, serve_in_thread  # noqa: E402
from qinglm.serve.config import ServeConfig  # noqa: E402

JSON = {"Content-Type": "application/json"}


@contextmanager
def serving(lm, **kw):
    """Yield the base URL of a server for lm with ServeConfig(**kw) (no API key unless given)."""
    with serve_in_thread(create_app(lm, ServeConfig(max_tokens_cap=CAP, **kw))) as base:
        yield base


@pytest.fixture(scope="module")
def url(lm):
    with serving(lm, request_timeout=1.5, max_request_bytes=512 * 1024) as base:
        yield base


def post(url, path, body, **kw):
    content = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
    return httpx.post(
        url + path, content=content, headers={**JSON, **kw.pop("headers", {})}, timeout=60, **kw
    )


@contextmanager
def held_worker(lm):
    """Block the model's first forward until the yielded release() is called: later requests queue up."""
    gate, entered = threading.Event(), threading.Event()

    def hook(*_):
        entered.set()
        gate.wait(30)

    handle = lm.model.register_forward_pre_hook(hook)
    try:
        yield entered, gate.set
    finally:
        gate.set()
        handle.remove()


def health(url):
    return httpx.get(url + "/health", timeout=10).json()


def wait_in_flight(url, n):
    deadline = time.monotonic() + 30
    while health(url)["in_flight"] < n:
        assert time.monotonic() < deadline, "the requests did not arrive"
        time.sleep(0.05)


# ---------------------------------------------------------------------------- 14: values the sampler cannot use


def test_values_that_break_sampling_get_400_and_the_good_requests_of_the_batch_finish(url, lm):
    prompts = PROMPTS + ["今天天气", "人工"]  # 10 good requests
    want = [reference(lm, encode_prompt(lm.tokenizer, p), 8) for p in prompts]
    bad = [
        b'{"prompt": "x", "temperature": NaN}',
        b'{"prompt": "x", "temperature": 1e-40}',
        b'{"prompt": "x", "temperature": Infinity}',
        b'{"prompt": "x", "repetition_penalty": NaN}',
        b'{"prompt": "x", "repetition_penalty": 1e-300}',
        b'{"prompt": "x", "top_p": NaN}',
        json.dumps({"prompt": "x", "seed": 2**64}).encode(),
        json.dumps({"prompt": "x", "seed": -(2**63) - 1}).encode(),
        json.dumps({"prompt": "x", "temperature": 10**400}).encode(),
    ]
    good = [json.dumps({"prompt": p, "max_tokens": 8, "temperature": 0}).encode() for p in prompts]
    bodies = good[:1] + [b for pair in zip(bad, good[1:]) for b in pair]  # interleaved
    with held_worker(lm) as (entered, release):
        with ThreadPoolExecutor(len(bodies)) as pool:
            futures = [pool.submit(post, url, "/v1/completions", b) for b in bodies]
            entered.wait(30)
            wait_in_flight(url, len(good))  # every good request is queued
            time.sleep(0.2)  # and the bad ones answered or about to be
            release()
            answers = [f.result() for f in futures]
    by_body = dict(zip(bodies, answers))
    for b in bad:
        r = by_body[b]
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", (b, r.text)
    assert [by_body[g].status_code for g in good] == [200] * len(good)
    assert [by_body[g].json()["choices"][0]["text"] for g in good] == want
    ok = post(
        url, "/v1/completions", {"prompt": "x", "max_tokens": 2, "temperature": 1e-2, "seed": 2**64 - 1}
    )
    assert ok.status_code == 200, ok.text  # the bounds themselves are accepted


def test_a_row_whose_sampling_fails_ends_alone_and_its_batch_finishes(url, lm, monkeypatch):
    real = qinglm.infer.sampling.sample_configs

    batched = []  # sizes of the batches a faulty row was sampled in

    def sample_configs(logits, cfgs, uniform):  # a fault of the rows with top_k == 7, as a bug would be
        out = real(logits, cfgs, uniform)  # after every row drew its token
        if any(c.top_k == 7 for c in cfgs):
            batched.append(len(cfgs))
            raise RuntimeError("simulated sampling fault")
        return out

    monkeypatch.setattr(qinglm.infer.sampling, "sample_configs", sample_configs)
    greedy = {"max_tokens": 8, "temperature": 0}
    seeded = {"max_tokens": 8, "temperature": 0.9, "seed": 5}
    alone = post(url, "/v1/completions", {"prompt": "学习", **seeded}).json()["choices"][0]["text"]
    bodies = [{"prompt": p, **greedy} for p in PROMPTS[:4]] + [
        {"prompt": "今天", **greedy, "top_k": 7},
        {"prompt": "公园", **seeded, "top_k": 7},
        {"prompt": "学习", **seeded},
    ]
    before = health(url)
    with held_worker(lm) as (entered, release):
        with ThreadPoolExecutor(len(bodies) + 1) as pool:
            first = pool.submit(post, url, "/v1/completions", {"prompt": "春天", **greedy})
            entered.wait(30)  # the worker holds `first`; the rest queue and start as one batch
            futures = [pool.submit(post, url, "/v1/completions", b) for b in bodies]
            wait_in_flight(url, 1 + len(bodies))
            release()
            answers = [f.result() for f in futures]
    assert first.result().status_code == 200
    assert [r.status_code for r in answers] == [200] * 4 + [500, 500, 200]
    assert answers[4].json()["error"]["type"] == "server_error"
    texts = [r.json()["choices"][0]["text"] for r in answers[:4]]
    assert texts == [reference(lm, encode_prompt(lm.tokenizer, p), 8) for p in PROMPTS[:4]]
    assert answers[6].json()["choices"][0]["text"] == alone  # its generator state was not disturbed
    # The faulty rows were sampled in one batch with the good ones (and `first`: one engine for all).
    assert max(batched) == len(bodies) + 1
    assert health(url)["errors"] == before["errors"] + 2


# ---------------------------------------------------------------------------- 15, 16: big requests


def test_thousands_of_chat_messages_are_trimmed_fast_and_health_answers_meanwhile(url, lm, monkeypatch):
    messages = [
        {"role": ("user", "assistant")[i % 2], "content": f"第{i}句话，今天天气不错。"} for i in range(3001)
    ]
    t = time.monotonic()
    r = post(url, "/v1/chat/completions", {"messages": messages, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    assert time.monotonic() - t < 5  # quadratic trimming took minutes here
    assert r.json()["choices"][0]["message"]["content"] == lm.chat(messages, max_new_tokens=4, temperature=0)

    started = threading.Event()
    encode = lm.tokenizer.encode

    def slow_encode(text):  # a tokenizer busy with a large request for 2 s
        started.set()
        time.sleep(2)
        return encode(text)

    monkeypatch.setattr(lm.tokenizer, "encode", slow_encode)
    with ThreadPoolExecutor(1) as pool:
        big = pool.submit(post, url, "/v1/completions", {"prompt": "今天" * 5, "max_tokens": 2})
        assert started.wait(30)
        t = time.monotonic()
        assert httpx.get(url + "/health", timeout=10).status_code == 200
        assert time.monotonic() - t < 1.0  # not held behind the tokenizer
        assert big.result().status_code == 200


def test_oversize_bodies_get_413_and_oversize_prompts_400_before_tokenizing(url, lm, monkeypatch):
    huge = {"prompt": "今" * 200_000}  # 600 kB of UTF-8 > the 512 kB limit
    r = post(url, "/v1/completions", huge)
    assert r.status_code == 413 and "max-request-bytes" in r.json()["error"]["message"]
    chunked = httpx.post(  # no Content-Length: counted while it arrives
        url + "/v1/completions",
        content=iter([b'{"prompt": "'] + [b"x" * 65536] * 8 + [b'"}']),
        headers=JSON,
        timeout=60,
    )
    assert chunked.status_code == 413
    calls = []
    monkeypatch.setattr(lm.tokenizer, "encode", lambda text: calls.append(len(text)) or [])
    long = "".join(chr(0x4E00 + i % 5000) for i in range(80_000))  # fits the body, never the context
    r = post(url, "/v1/completions", {"prompt": long})
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]
    r = post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": long}]})
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]
    assert calls == []  # refused on their length alone
    too_many = {"messages": [{"role": "user", "content": "x"}] * 5000}
    r = post(url, "/v1/chat/completions", too_many)
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]


def test_memory_returns_to_its_level_after_large_requests(lm):
    psutil = pytest.importorskip("psutil")
    proc = psutil.Process()
    text = "".join(chr(0x4E00 + (i * 7919) % 20000) for i in range(300_000))  # 900 kB, one long "word"
    hi = {"role": "user", "content": "你好"}
    cases = [
        ("/v1/completions", {"prompt": text, "max_tokens": 2}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": text}], "max_tokens": 2}),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": text[:30_000]}] * 9 + [hi], "max_tokens": 2},
        ),
    ]
    with serving(lm, truncate_prompt=True) as base:
        post(base, *cases[0])  # warm up
        base_rss, peak = proc.memory_info().rss, [0]
        done = threading.Event()

        def watch():
            while not done.wait(0.01):
                peak[0] = max(peak[0], proc.memory_info().rss)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            for _ in range(3):
                for path, body in cases:
                    assert post(base, path, body).status_code in (200, 400)
        finally:
            done.set()
            watcher.join()
        grown = (proc.memory_info().rss - base_rss) / 2**20
        peaked = (max(peak[0], proc.memory_info().rss) - base_rss) / 2**20
    assert grown < 25 and peaked < 60, (grown, peaked)  # MiB


# ---------------------------------------------------------------------------- 17: malformed requests


def test_malformed_requests_get_json_400_and_the_connection_stays_usable(url):
    bad = [
        ("/v1/completions", b'{"prompt": "a\\ud800b"}'),
        ("/v1/completions", b'{"prompt": "ab", "stop": ["\\udfff"]}'),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud83d"}]}'),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
        ),
        ("/v1/completions", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        ("/v1/completions", b'{"prompt": "x", "temperature": 1' + b"0" * 400 + b"}"),
        ("/v1/completions", b'{"prompt": "x", "top_p": -1' + b"0" * 400 + b"}"),
        ("/v1/chat/completions", b'{"messages": [{"role": ["user"], "content": "x"}]}'),
        ("/v1/chat/completions", b'{"messages": [{"role": {"a": 1}, "content": "x"}]}'),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": 5}]}'),
    ]
    host = urlsplit(url)
    conn = HTTPConnection(host.hostname, host.port, timeout=60)
    try:
        good = json.dumps({"prompt": "今天", "max_tokens": 2}).encode()
        for path, body in bad:
            conn.request("POST", path, body, JSON)
            r = conn.getresponse()
            assert r.status == 400 and r.getheader("content-type") == "application/json", (
                body[:60],
                r.status,
            )
            assert json.loads(r.read())["error"]["type"] == "invalid_request_error"
            local = conn.sock.getsockname()
            conn.request("POST", "/v1/completions", good, JSON)
            r = conn.getresponse()
            assert r.status == 200 and json.loads(r.read())["usage"]["completion_tokens"] == 2
            assert conn.sock.getsockname() == local  # the same keep-alive connection
    finally:
        conn.close()


# ---------------------------------------------------------------------------- 18: slow and vanishing clients


def _socket(url):
    host = urlsplit(url)
    return socket.create_connection((host.hostname, host.port), timeout=5)


def _seconds_until_closed(sock, head, drip, every=0.5, limit=10.0):
    """Send head, then one byte of drip each `every` seconds; return the seconds until the server closed."""
    t = time.monotonic()
    sock.sendall(head)
    sock.settimeout(every)
    for byte in drip[: int(limit / every)]:
        try:
            if sock.recv(4096) == b"":
                return time.monotonic() - t
        except TimeoutError:
            pass
        except OSError:
            return time.monotonic() - t
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            return time.monotonic() - t
    return float("inf")


def test_slow_clients_are_cut_off_within_the_request_timeout(url):
    port = urlsplit(url).port
    head = f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Slow: ".encode()
    with _socket(url) as s:  # one header byte per half second
        took = _seconds_until_closed(s, b"", head + b"a" * 100)
    assert took < 1.5 + 1.0
    head = f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
    head += "Content-Length: 200\r\n\r\n"
    with _socket(url) as s:  # one body byte per half second
        took = _seconds_until_closed(s, head.encode(), b"{" + b" " * 100)
    assert took < 1.5 + 1.0
    with _socket(url) as s:  # one that says nothing at all
        t = time.monotonic()
        assert s.recv(10) == b"" and time.monotonic() - t < 1.5 + 1.0
    assert health(url)["status"] == "ok"


def test_a_client_that_leaves_mid_body_is_logged_in_one_line(url, caplog):
    port = urlsplit(url).port
    head = f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            with _socket(url) as s:
                s.sendall((head + "Content-Length: 1000\r\n\r\n" + '{"prompt": "').encode())
                time.sleep(0.1)
        deadline = time.monotonic() + 10
        while sum("went away" in r.getMessage() for r in caplog.records) < 3:
            assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
            time.sleep(0.05)
    gone = [r for r in caplog.records if "went away" in r.getMessage()]
    assert all("\n" not in r.getMessage() and r.exc_info is None for r in gone)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


# ---------------------------------------------------------------------------- 19: foreign hosts, cross-site POSTs


def test_without_a_key_only_local_host_names_reach_the_server(url, lm):
    port = urlsplit(url).port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "localhost"):
        assert httpx.get(url + "/health", headers={"Host": host}, timeout=10).status_code == 200, host
    for host in (f"evil.example:{port}", "attacker.test", f"127.0.0.1.evil.example:{port}"):
        r = httpx.get(url + "/v1/models", headers={"Host": host}, timeout=10)
        assert r.status_code == 400 and "--allowed-hosts" in r.json()["error"]["message"], host
        r = post(url, "/v1/completions", {"prompt": "x", "max_tokens": 1}, headers={"Host": host})
        assert r.status_code == 400
    with serving(lm, allowed_hosts=["my.box"]) as base:
        assert httpx.get(base + "/v1/models", headers={"Host": "my.box:80"}, timeout=10).status_code == 200
        assert httpx.get(base + "/v1/models", headers={"Host": "other.box"}, timeout=10).status_code == 400
    with serving(lm, allowed_hosts=["*"]) as base:
        assert httpx.get(base + "/v1/models", headers={"Host": "other.box"}, timeout=10).status_code == 200
    with serving(lm, api_key="k") as base:  # a key guards the API itself
        r = httpx.get(
            base + "/v1/models", headers={"Host": "x.example", "Authorization": "Bearer k"}, timeout=10
        )
        assert r.status_code == 200


def test_api_posts_must_be_json(url):
    body = json.dumps({"prompt": "x", "max_tokens": 1}).encode()
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"Content-Type": kind} if kind else {}
        for path in ("/v1/completions", "/v1/chat/completions"):
            r = httpx.post(url + path, content=body, headers=headers, timeout=10)
            assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", (
                kind,
                path,
            )
    r = httpx.post(
        url + "/v1/completions", content=body, headers={"Content-Type": "Application/JSON; charset=utf-8"}
    )
    assert r.status_code == 200


def test_create_app_checks_its_config_as_the_cli_does(lm, tmp_path, capsys):
    with pytest.raises(QingLMError, match="max-queue"):
        ServeConfig(max_queue=0)
    with pytest.raises(QingLMError, match="port"):
        ServeConfig(port="8000")  # a wrong type is a user error too, as in every config
    with pytest.raises(QingLMError, match="quantize"):
        ServeConfig(quantize="int4")  # the set the CLI offers (int8, bf16) is the one the config checks
    cfg = ServeConfig()
    for field, value in (("max_batch_size", 0), ("port", 70000), ("request_timeout", float("nan"))):
        setattr(cfg, field, value)
        with pytest.raises(QingLMError, match=field.replace("_", "-")):
            create_app(lm, cfg)
        setattr(cfg, field, getattr(ServeConfig(), field))
    assert main(["serve", "--model", str(tmp_path), "--max-request-bytes", "10"]) == 2
    assert "--max-request-bytes" in capsys.readouterr().err


def test_help_says_when_an_api_key_is_needed(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "also set --api-key" in text and "--allowed-hosts" in text and "--request-timeout" in text
