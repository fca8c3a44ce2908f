"""Agentic RL: multi-turn episodes with tools (masks, tool turns, the call limit, seeds), the reward terms,
user tools under the built-in limits, the `tools` task and GRPO over episodes (config errors, resume)."""

import re

import pytest
import torch

from qinglm.chat_template import CONTROL_TOKENS, IM_END, Piece, render_chat
from qinglm.config import SamplingConfig
from qinglm.data.builtin_tools import run_tool
from qinglm.errors import QingLMError
from qinglm.infer import episodes as eps
from qinglm.infer.chat import encode_chat, encode_pieces
from qinglm.post import agentic
from qinglm.post.tasks import Example, load_task

TOOLS = [{"type": "function", "function": {"name": "calculator", "parameters": {}}}]
PROMPT = [{"role": "system", "content": "", "tools": TOOLS}, {"role": "user", "content": "3 × 4 等于多少？"}]
CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "3 * 4"}}\n</tool_call>'
SAMPLING = SamplingConfig(max_new_tokens=200, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0)
_CONTROL = re.compile("(" + "|".join(map(re.escape, CONTROL_TOKENS)) + ")")


def reply_ids(tok, text: str) -> list[int]:
    """Return the ids a model would sample for text, control tokens by id, ending at <|im_end|>."""
    pieces = [Piece(p, control=p in CONTROL_TOKENS) for p in _CONTROL.split(text) if p]
    return encode_pieces(tok, [*pieces, Piece(IM_END, control=True)]).ids


class Model:  # only its context is read: the replies are planted
    class cfg:
        max_seq_len = 4096


@pytest.fixture
def planted(monkeypatch):
    """Replies come from scripts: episode k's base seed is 100 * (k + 1), its turn t's reply is
    script[k][t]; every request's seed is recorded."""
    scripts: list[list[str]] = []
    seeds: list[int] = []

    def decode(model, tok, requests):
        ids, texts, finish = [], [], []
        for r in requests:
            seeds.append(r.sampling.seed)
            k, turn = divmod(r.sampling.seed, 100)
            text = scripts[k - 1][turn]
            full = reply_ids(tok, text)
            cut = len(full) > r.sampling.max_new_tokens  # as the engine does (the text is not cut here)
            ids.append(full[: r.sampling.max_new_tokens])
            texts.append(text)
            finish.append("length" if cut else "stop")
        return ids, texts, finish

    monkeypatch.setattr(eps, "decode", decode)
    return scripts, seeds


def play(tok, scripts, n, **kw):
    kw = {"max_tool_calls": 4, **kw}
    return eps.run_episodes(
        Model, tok, [PROMPT] * n, [100 * (k + 1) for k in range(n)], SAMPLING, run_tool, **kw
    )


def test_an_episode_runs_the_call_appends_the_tool_turn_and_masks_all_but_the_models_tokens(
    planted, chat_tok
):
    scripts, seeds = planted
    scripts += [[CALL, "3 × 4 = 12。"], ["12"]]
    first, second = play(chat_tok, scripts, 2)
    assert seeds == [100, 200, 101]  # per episode and turn: base + turn
    assert first.status == "answered" and first.n_calls == 1 and first.answer == "3 × 4 = 12。"
    assert first.messages[-1] == {"role": "tool", "content": "12"}  # the tool really ran
    # the ids are the template's rendering of the history, and only the replies are in the mask
    history = [*first.messages, {"role": "assistant", "content": "3 × 4 = 12。", "reasoning_content": ""}]
    assert first.ids == encode_chat(chat_tok, history, thinking=False).ids[: len(first.ids)]
    assert render_chat(history).count("<tool_response>\n12\n</tool_response>") == 1
    model_ids = reply_ids(chat_tok, CALL) + reply_ids(chat_tok, "3 × 4 = 12。")
    assert [i for i, m in zip(first.ids, first.mask) if m] == model_ids
    prompt = encode_chat(chat_tok, PROMPT, True, thinking=False).ids
    assert first.ids[: len(prompt)] == prompt and not any(first.mask[: len(prompt)])
    assert second.status == "answered" and second.n_calls == 0 and len(second.turns) == 1
    ids, mask = eps.episode_batch([first, second], chat_tok.pad_id, torch.device("cpu"))
    assert ids.shape == mask.shape == (2, len(first.ids)) and mask.sum() == len(
        model_ids
    ) + second.mask.count(True)


def test_max_tool_calls_is_honoured_and_bad_calls_are_told_apart(planted, chat_tok):
    scripts, _ = planted
    scripts += [[CALL] * 10, [CALL, "12"], ["<tool_call>\n{not json}\n</tool_call>"]]
    looping, none_allowed, malformed = play(chat_tok, scripts, 3, max_tool_calls=2)
    assert looping.status == "calls" and looping.n_calls == 2 and len(looping.turns) == 3
    assert looping.messages.count({"role": "tool", "content": "12"}) == 2
    assert malformed.status == "answered" and not malformed.well_formed
    scripts[:] = [[CALL]]
    none = play(chat_tok, scripts, 1, max_tool_calls=0)[0]
    assert none.status == "calls" and none.n_calls == 0 and none_allowed.n_calls == 1


def test_an_episode_ends_when_the_next_reply_would_not_fit(planted, chat_tok):
    scripts, _ = planted
    scripts += [[CALL] * 10]
    prompt = len(encode_chat(chat_tok, PROMPT, True, thinking=False).ids)
    limit = prompt + len(reply_ids(chat_tok, CALL)) + 3
    ep = play(chat_tok, scripts, 1, max_tokens=limit)[0]
    assert ep.status == "context" and ep.n_calls == 0 and len(ep.ids) <= limit and len(ep.turns) == 1
    roomy = play(chat_tok, scripts, 1, max_tokens=limit + 60)[0]  # the tool turn fits, a second reply not
    assert roomy.status == "length" and roomy.n_calls == 1 and len(roomy.ids) == limit + 60


def test_the_reward_is_verifier_and_format_terms(planted, chat_tok):
    scripts, _ = planted
    scripts += [
        [CALL, "3 × 4 = 12。"],
        [CALL, "3 × 4 = 13。"],
        ["<tool_call>\n{bad\n</tool_call>"],
        [CALL] * 9,
    ]
    task = load_task("tools")
    ex = Example(PROMPT, "3 × 4 = 12。")
    got = [agentic.episode_reward(task, ex, ep) for ep in play(chat_tok, scripts, 4, max_tool_calls=1)]
    assert got == [(1.0, 1.0, 1.0), (pytest.approx(0.2), 0.0, 1.0), (0.0, 0.0, 0.0), (0.0, 0.0, 0.0)]


def test_episodes_are_the_same_for_the_same_seeds_whatever_the_batch(chat_tok, tiny_model):
    model = tiny_model(chat_tok.vocab_size, max_seq_len=512)
    chats = [PROMPT, [{"role": "user", "content": "你好"}]]
    sampling = SamplingConfig(max_new_tokens=12, temperature=1.0, top_k=None, top_p=None)
    run = lambda prompts, seeds: eps.run_episodes(  # noqa: E731
        model, chat_tok, prompts, seeds, sampling, run_tool, max_tool_calls=2
    )
    a, b = run(chats, [7, 8]), run(chats, [7, 8])
    alone = run(chats[1:], [8])
    assert [e.ids for e in a] == [e.ids for e in b] and a[1].ids == alone[0].ids
    assert run(chats, [9, 8])[0].ids != a[0].ids


def test_user_tools_are_loaded_like_user_tasks_and_kept_to_the_limits(tmp_path, monkeypatch):
    (tmp_path / "my_tools.py").write_text(
        "def run(name, arguments):\n"
        "    if name == 'boom':\n        raise ValueError('no such thing')\n"
        "    if name == 'long':\n        return 'x' * 10000\n"
        "    if name == 'bad':\n        return 3\n"
        "    return name + str(sorted(arguments))\n",
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    tools = agentic.load_tools("my_tools:run")
    assert tools("echo", {"a": 1}) == "echo['a']"
    assert tools("boom", {}) == "error: ValueError: no such thing"
    assert len(tools("long", {})) == agentic.OUTPUT_LIMIT + 1
    with pytest.raises(QingLMError, match="returned int; it must return a string"):
        tools("bad", {})
    assert agentic.load_tools("builtin") is run_tool
    for spec, msg in [("nope", "unknown tools 'nope'; choose builtin or MODULE:FUNCTION"),
                      ("no_such_mod_xyz:f", "cannot import tools module"), ("my_tools:absent", "no function")]:  # fmt: skip
        with pytest.raises(QingLMError, match=msg):
            agentic.load_tools(spec)


def test_the_tools_task_trains_on_the_tools_sets_training_split_only():
    from qinglm.data.tools_sft import tools_sft

    task = load_task("tools")
    train, held = task.split("train"), task.split("heldout")
    assert (
        task.multi_turn and len(train) == len(tools_sft("train")) and len(held) == len(tools_sft("heldout"))
    )
    assert all(ex.messages[0].get("tools") and ex.messages[-1]["role"] == "user" for ex in train[:30])
    assert not {ex.messages[-1]["content"] for ex in train} & {ex.messages[-1]["content"] for ex in held}
    assert task.reward(train[0], " " + train[0].reference.replace("，", " ，")) == 1.0
    assert task.reward(train[0], "不知道") == 0.0


def test_grpo_tool_flags_are_checked_in_one_line(tmp_path, tiny_base_run, capsys):
    from qinglm.cli import main

    common = ["grpo", "--base", str(tiny_base_run), "--device", "cpu", "--max-steps", "1", "--task", "tools"]
    for extra, msg in [
        (["--max-tool-calls", "17"], "--max-tool-calls must be in [0, 16], got 17"),
        (["--tools", "no_such_tools_xyz:f"], "cannot import tools module 'no_such_tools_xyz'"),
        (["--tools", "calc"], "unknown tools 'calc'; choose builtin or MODULE:FUNCTION"),
    ]:
        assert main([*common, *extra, "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and "\n" not in err and "Traceback" not in err, err


AGENT_TASK = '''
from qinglm.post.tasks import Example, Task

TOOLS = [{"type": "function", "function": {"name": "echo", "parameters": {}}}]

def echo():
    """Say the word back; the echo tool says it too."""
    ex = lambda w: Example([{"role": "system", "content": "", "tools": TOOLS}, {"role": "user", "content": w}], w)
    examples = {"train": [ex(w) for w in ("你好", "天气", "画蛇")], "heldout": [ex("添足")]}
    return Task("echo", examples.__getitem__, lambda p, c, r: float(c.strip() == r), multi_turn=True)

def run(name, arguments):
    return str(arguments)
'''


@pytest.fixture
def agent_task(tmp_path, monkeypatch):
    (tmp_path / "agent_task.py").write_text(AGENT_TASK, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)  # subprocesses find the module in their current directory
    return "agent_task:echo"


@pytest.fixture
def long_base(tmp_path, tiny_run, chat_tok):
    return tiny_run(tmp_path / "base", chat_tok, max_seq_len=256)


def _flags(base, task, out, **kw):
    return {
        "base": str(base), "task": task, "tools": "agent_task:run", "out": str(out), "group_size": 2,
        "batch_size": 1, "max_new_tokens": 8, "max_tool_calls": 2, "max_steps": 3, "lr": 3e-3, "eval_every": 2,
        "log_every": 1, "save_every": 1, "device": "cpu", "dtype": "fp32", "num_threads": 1, **kw,
    }  # fmt: skip


def test_a_grpo_run_over_episodes_logs_the_reward_terms(tmp_path, agent_task, long_base):
    from qinglm.post.grpo import GRPOConfig, run_grpo
    from qinglm.train.metrics import read_metrics

    n = torch.get_num_threads()
    try:
        res = run_grpo(GRPOConfig(**_flags(long_base, agent_task, tmp_path / "g")), log=lambda _: None)
    finally:
        torch.set_num_threads(n)
    assert res["step"] == 3 and res["task"] == "echo" and 0 <= res["heldout_after"]["val_reward"] <= 1
    train = [r for r in read_metrics(tmp_path / "g") if r["kind"] == "train"]
    for key in ("reward", "reward_verifier", "reward_format", "tool_calls", "finished", "kl"):
        assert all(key in r for r in train), key


@pytest.mark.slow
def test_sigkill_during_agentic_grpo_then_resume_is_bit_identical(
    tmp_path, agent_task, long_base, sigkill_resume
):
    import sys

    from qinglm.post.grpo import GRPOConfig, run_grpo
    from qinglm.train.driver import cli_flags

    steps = 12
    flags = _flags(long_base, agent_task, tmp_path / "ref", max_steps=steps, eval_every=5)
    run_grpo(GRPOConfig(**flags, resume=True), log=lambda _: None)
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "qinglm", "grpo", *cli_flags({**flags, "out": str(run), "resume": True})]
    print("\n".join(sigkill_resume(cmd, tmp_path / "ref", run, steps, kills=2, seed=20261206)))
