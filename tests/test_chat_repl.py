"""Chat: history cut to fit the context, the REPL's commands, and `qinglm chat` driven through stdin."""

import io
import subprocess
import sys
from types import SimpleNamespace

import pytest

import qinglm
from qinglm.chat_repl import chat_loop
from qinglm.errors import QingLMError
from qinglm.infer.chat import encode_chat, fit_history
from qinglm.tokenizer import train_tokenizer

SYSTEM = {"role": "system", "content": "你是一个助手。"}


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["今天天气很好。", "你好，再见。"] * 50, 300, show_progress=False)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tok, tiny_run):
    """Return a run directory with a tiny random model of context 64."""
    return tiny_run(tmp_path_factory.mktemp("run"), tok, n_layers=1, n_heads=2)


def _history(turns: int) -> list[dict[str, str]]:
    msgs = [SYSTEM]
    for i in range(turns):
        msgs += [
            {"role": "user", "content": f"问题{i}：今天天气好吗？"},
            {"role": "assistant", "content": "今天天气很好。"},
        ]
    return msgs + [{"role": "user", "content": "再见"}]


def test_history_drops_the_oldest_turns_and_keeps_the_system_prompt(tok):
    msgs = _history(10)
    full = len(encode_chat(tok, msgs, add_generation_prompt=True).ids)
    kept, prompt = fit_history(tok, msgs, full // 2)
    assert len(prompt.ids) <= full // 2 and prompt == encode_chat(tok, kept, add_generation_prompt=True)
    assert kept[0] == SYSTEM and kept[-1] == msgs[-1] and kept[1]["role"] == "user"
    assert kept[1:] == msgs[len(msgs) - len(kept) + 1 :]  # a suffix of the conversation
    assert fit_history(tok, msgs, full)[0] == msgs
    with pytest.raises(QingLMError, match="context"):
        fit_history(tok, [SYSTEM, {"role": "user", "content": "天气" * 100}], 50)


def test_history_is_fitted_in_linear_time(tok):
    from qinglm.infer.chat import encode_chat

    encoded = []

    class Backend:  # the tokenizers backend, counting the characters it is asked to encode
        def __getattr__(self, name):
            return getattr(tok.backend, name)

        def encode(self, text, *a, **kw):
            encoded.append(len(text))
            return tok.backend.encode(text, *a, **kw)

    class Counting:
        backend = Backend()

        def __getattr__(self, name):
            return getattr(tok, name)

    for turns in (100, 1000):
        msgs = _history(turns)
        encoded.clear()
        kept, prompt = fit_history(Counting(), msgs, 200)
        assert prompt.ids == encode_chat(tok, kept, add_generation_prompt=True).ids and len(prompt.ids) <= 200
        assert kept[-1] == msgs[-1] and len(kept) < 40
        assert len(encoded) <= len(msgs) + 3  # each turn at most once: linear in the history
    huge = [SYSTEM, {"role": "user", "content": "天气" * 50_000}, *_history(3)[1:]]
    encoded.clear()
    kept, _ = fit_history(Counting(), huge, 200, longest_token=40)
    assert kept == [SYSTEM, *huge[2:]] and max(encoded) < 1000  # too long on its length alone: not encoded


def test_stream_chat_fits_a_long_history_into_the_context(run_dir):
    lm = qinglm.load(run_dir, device="cpu")
    reply = lm.chat(_history(20), max_new_tokens=8, seed=0)
    assert isinstance(reply, str) and "<|im_end|>" not in reply
    with pytest.raises(QingLMError, match="context"):
        lm.chat([{"role": "user", "content": "天气" * 200}])


class FakeLM:
    """Replies 'reply N' and records the messages of every call."""

    tokenizer = SimpleNamespace(has_tool_tokens=False)  # from before tools: plain ChatML

    def __init__(self):
        self.calls = []

    def stream_chat(self, messages, **sampling):
        self.calls.append([dict(m) for m in messages])
        return iter(["reply ", str(len(self.calls))])


def test_repl_keeps_history_and_handles_commands():
    lm, out = FakeLM(), io.StringIO()
    lines = iter(["你好", "", "/help", "天气", "/reset", "再见", "/exit", "never read"])
    history = chat_loop(lm, system="S", read=lambda prompt: next(lines), out=out)
    assert [m["content"] for m in lm.calls[1]] == ["S", "你好", "reply 1", "天气"]
    assert [m["content"] for m in lm.calls[2]] == ["S", "再见"]  # /reset forgot the earlier turns
    assert history == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "再见"},
        {"role": "assistant", "content": "reply 3"},
    ]
    text = out.getvalue()
    assert "unknown command /help" in text and "(conversation reset)" in text and "reply 2" in text


def test_repl_ends_at_end_of_input():
    def read(prompt):
        raise EOFError

    assert chat_loop(FakeLM(), read=read, out=io.StringIO()) == []


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_chat_command_through_stdin(run_dir, quantize):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qinglm",
            "chat",
            "--model",
            str(run_dir),
            "--quantize",
            quantize,
            "--system",
            "你是一个助手。",
            "--max-new-tokens",
            "5",
            "--seed",
            "0",
            "--device",
            "cpu",
        ],
        input="你好\n/reset\n再见\n/exit\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("assistant> ") == 2 and "(conversation reset)" in proc.stdout
    assert "Traceback" not in proc.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "qinglm", "chat", "--model", str(run_dir / "missing")],
        input="",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("qinglm: error:")


CALC = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12*(3+4)"}}\n</tool_call>'


@pytest.fixture(scope="module")
def tool_lm(tmp_path_factory, tok, tiny_run):
    """Return an LM whose context holds the built-in tool list (its generation is planted by `planted`)."""
    assert tok.has_tool_tokens
    run = tiny_run(tmp_path_factory.mktemp("tools"), tok, n_layers=1, n_heads=2, max_seq_len=2048)
    return qinglm.load(run, device="cpu")


def typed(*lines):
    """Return a read() that gives lines, then the end of input."""
    it = iter(lines)

    def read(prompt):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return read


def planted(monkeypatch, lm, replies):
    """Make lm generate replies in turn (the last one again and again); return the prompts it was given."""
    prompts = []

    def stream_ids(prompt_ids, cfg, stop, counted=None):
        prompts.append(list(prompt_ids))
        text = replies[min(len(prompts), len(replies)) - 1]
        return iter([text[k : k + 3] for k in range(0, len(text), 3)])  # pieces that split the markers

    monkeypatch.setattr(lm, "_stream_ids", stream_ids)
    return prompts


@pytest.mark.parametrize(
    "kw, tail",
    [
        ({}, "<|im_start|>assistant\n"),  # plain ChatML: what chats without reasoning trained
        ({"thinking": False}, "<|im_start|>assistant\n<think>\n\n</think>\n\n"),
        ({"thinking": True}, "<|im_start|>assistant\n"),
    ],
)
def test_plain_chat_adds_no_thinking_block_unless_asked(tool_lm, monkeypatch, kw, tail):
    """A model SFT'd on chats without reasoning (the pinyin demo) answered one syllable when the chat pre-filled
    an empty thinking block it never saw; without --tools the default is no thinking markup."""
    from qinglm.chat_repl import ChatConfig

    prompts = planted(monkeypatch, tool_lm, ["好的"])
    chat_loop(tool_lm, chat=ChatConfig(**kw), read=typed("你好"), out=io.StringIO())
    first = tool_lm.tokenizer.decode(prompts[0])
    assert first.endswith(tail) and (("<think>" in first) == (kw.get("thinking") is False))


def test_repl_runs_a_builtin_tool_and_feeds_the_result_back(tool_lm, monkeypatch):
    from qinglm.chat_repl import ChatConfig

    prompts = planted(monkeypatch, tool_lm, [CALC, "答案是84。"])
    out = io.StringIO()
    history = chat_loop(tool_lm, chat=ChatConfig(tools="builtin"), read=typed("算一下12*(3+4)"), out=out)
    tok = tool_lm.tokenizer
    first, second = (tok.decode(p) for p in prompts)
    assert '"name": "calculator"' in first  # the tools are offered in the system turn
    assert first.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # thinking off: pre-filled
    response = tok.control_id("<tool_response>")
    assert response in prompts[1] and response not in prompts[0]
    assert "<tool_response>\n84\n</tool_response>" in second and second.startswith(first[:-30])
    assert [m["role"] for m in history] == ["user", "assistant", "tool", "assistant"]
    assert history[2]["content"] == "84" and history[3]["content"] == "答案是84。"
    text = out.getvalue()
    assert '\n[tool call] calculator {"expression": "12*(3+4)"}\n[tool result] 84\n' in text
    assert "assistant> 答案是84。\n" in text and "<tool_call>" not in text, text


def test_repl_stops_at_the_tool_call_cap(tool_lm, monkeypatch):
    from qinglm.chat_repl import ChatConfig

    prompts = planted(monkeypatch, tool_lm, [CALC])  # the model calls again and again
    out = io.StringIO()
    history = chat_loop(
        tool_lm, chat=ChatConfig(tools="builtin", max_tool_calls=2), read=typed("算"), out=out
    )
    assert len(prompts) == 3 and [m["role"] for m in history].count("tool") == 2
    assert "tool_calls" not in history[-1] and history[-1]["role"] == "assistant"  # the third call: not run
    assert out.getvalue().count("[tool result] 84") == 2
    assert "(tool-call limit of 2 per turn reached; 1 call(s) not run)" in out.getvalue()


@pytest.mark.parametrize("tty", [False, True])
def test_repl_shows_thinking_dimmed_on_a_terminal(tool_lm, monkeypatch, tty):
    from qinglm.chat_repl import DIM, UNDIM, ChatConfig

    prompts = planted(monkeypatch, tool_lm, ["<think>\n先想一想\n</think>\n\n好的"])
    out = io.StringIO()
    out.isatty = lambda: tty
    history = chat_loop(tool_lm, chat=ChatConfig(thinking=True), read=typed("你好"), out=out)
    assert tool_lm.tokenizer.decode(prompts[0]).endswith("<|im_start|>assistant\n")  # the model thinks
    assert history[-1] == {"role": "assistant", "content": "好的", "reasoning_content": "先想一想"}
    shown = f"{DIM}先想一想{UNDIM}\n好的" if tty else "(thinking) 先想一想\n好的"
    assert f"assistant> {shown}\n" in out.getvalue()
    assert tty or "\x1b" not in out.getvalue()


def test_tools_or_thinking_with_a_tokenizer_from_before_them(tmp_path, pre_tools_tok, tiny_run):
    from qinglm.chat_repl import ChatConfig

    run = tiny_run(tmp_path / "old", pre_tools_tok, n_layers=1, n_heads=2)
    lm = qinglm.load(run, device="cpu")
    with pytest.raises(QingLMError, match="no tool-call or thinking tokens"):
        chat_loop(lm, chat=ChatConfig(thinking=True), read=typed("你好"), out=io.StringIO())
    proc = subprocess.run(
        [sys.executable, "-m", "qinglm", "chat", "--model", str(run), "--tools", "builtin", "--device", "cpu"],
        input="你好\n", capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.startswith("qinglm: error: this tokenizer has no tool-call")
    assert len(proc.stderr.strip().splitlines()) == 1 and "assistant>" not in proc.stdout
