"""GRPO: tasks and verifiers, seeded rollouts through the engine, the clipped objective with its KL term,
the grpo run (metrics, validation, --base from a GRPO run, user errors, SIGKILL + --resume)."""

import json

import pytest
import torch

from qinglm.config import ModelConfig, SamplingConfig, resolve_model
from qinglm.data import verifiable as tasks
from qinglm.errors import QingLMError
from qinglm.infer.chat import encode_chat, render_chat
from qinglm.infer.rollout import rollout
from qinglm.model.transformer import Transformer
from qinglm.post.grpo_loss import group_advantages, grpo_loss, token_logprobs
from qinglm.post.tasks import load_task
from qinglm.tokenizer import EOS_ID, IM_END_ID, train_tokenizer

PROMPT = [{"role": "user", "content": "小明有3个苹果，又买了4个，一共有几个？"}]


@pytest.fixture(scope="module")
def tok():
    """Return a tiny tokenizer that knows the chat template and a few digits and syllables."""
    chat = render_chat([*PROMPT, {"role": "assistant", "content": "7"}])
    return train_tokenizer(
        [chat, "“画蛇添足”的拼音是什么？huà shé tiān zú 1 2 3 4 5 6 7 8 9 0"] * 20, 300, show_progress=False
    )


def _model(tok, cls=Transformer, seed=0):
    torch.manual_seed(seed)
    cfg = resolve_model(
        ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=2, max_seq_len=64)
    )
    return cls(cfg)


# ---------------------------------------------------------------------------- tasks


def test_builtin_tasks_hold_out_prompts_never_trained_on():
    for name in tasks.TASKS:
        task = load_task(name)
        train, held = task.split("train"), task.split("heldout")
        questions = {ex.messages[-1]["content"] for ex in train}
        assert held and not questions & {ex.messages[-1]["content"] for ex in held}
        assert all(ex.messages[-1]["role"] == "user" for ex in train[:50] + held[:50])


def test_arithmetic_problems_come_from_their_seed_and_the_held_out_ones_from_held_out_seeds():
    assert tasks.arithmetic_problem(7) == tasks.arithmetic_problem(7)
    held = tasks.arithmetic().split("heldout")
    first = next(
        s
        for s in range(tasks.HELDOUT_SEED_BASE, tasks.HELDOUT_SEED_BASE + 100)
        if tasks.arithmetic_held_out(tasks.arithmetic_problem(s)[0])
    )
    q, answer = tasks.arithmetic_problem(first)
    assert held[0].messages[-1]["content"] == q and held[0].reference == str(answer)
    assert len(tasks.arithmetic().split("train")) == tasks.N_TRAIN


def test_verifiers_give_rewards_in_zero_to_one():
    arith, pinyin = tasks.arithmetic(), tasks.idioms_pinyin()
    ex = tasks.Example([{"role": "user", "content": "?"}], "42")
    assert arith.reward(ex, "答案是４２") == 1.0  # full-width digits count
    assert arith.reward(ex, "先算40，再加2，得42。") == 1.0  # the last number is the answer
    assert arith.reward(ex, "42个？不，是41") == 0.0
    assert arith.reward(ex, "不知道") == 0.0
    ex = tasks.Example([{"role": "user", "content": "?"}], "huà shé tiān zú")
    assert pinyin.reward(ex, " huà shé tiān zú") == 1.0
    assert pinyin.reward(ex, "huà shé tian zu") == 0.5
    assert pinyin.reward(ex, "huà shé tiān zú ba") == 0.8  # extra syllables count against it
    assert pinyin.reward(ex, "画蛇添足 huà shé tiān zú") == 0.0  # syllables must be in their place
    assert pinyin.reward(ex, "") == 0.0


def test_a_verifier_outside_zero_to_one_is_a_user_error():
    ex = tasks.Example([{"role": "user", "content": "?"}], "1")
    for bad in (1.5, -0.1, float("nan"), "1"):
        task = tasks.Task("mine", lambda split: [ex], lambda p, c, r, bad=bad: bad)
        with pytest.raises(QingLMError, match="must return a number in"):
            task.reward(ex, "1")
    assert tasks.Task("mine", lambda split: [ex], lambda p, c, r: True).reward(ex, "1") == 1.0


def test_a_plugged_in_task_loads_from_module_function(tmp_path, monkeypatch):
    (tmp_path / "my_task.py").write_text(
        "from qinglm.post.tasks import Example, Task\n"
        "def make():\n"
        "    ex = [Example([{'role': 'user', 'content': '1+1=?'}], '2')]\n"
        "    return Task('mine', lambda split: ex, lambda p, c, r: float(c.strip() == r))\n"
        "def broken():\n"
        "    raise RuntimeError('no data')\n"
        "def not_a_task():\n"
        "    return 3\n",
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    task = load_task("my_task:make")
    ex = task.split("heldout")[0]
    assert task.name == "mine" and task.reward(ex, " 2") == 1.0 and task.reward(ex, "3") == 0.0
    for spec, msg in [
        ("nope", "unknown task 'nope'; choose idioms-pinyin, arithmetic, tools or MODULE:FUNCTION"),
        ("no_such_module_xyz:make", "cannot import task module 'no_such_module_xyz'"),
        ("my_task:missing", "has no function 'missing'"),
        ("my_task:broken", "raised RuntimeError: no data"),
        ("my_task:not_a_task", "must return a qinglm.post.tasks.Task, got int"),
    ]:
        with pytest.raises(QingLMError) as e:
            load_task(spec)
        assert msg in str(e.value) and "\n" not in str(e.value)


def test_a_task_without_examples_is_a_user_error():
    with pytest.raises(QingLMError, match="no train examples"):
        tasks.Task("empty", lambda split: [], lambda p, c, r: 0.0).split("train")


# ---------------------------------------------------------------------------- rollouts


def test_rollouts_are_seeded_and_mask_exactly_the_replies(tok):
    model = _model(tok)
    prompts = [PROMPT, [{"role": "user", "content": "“画蛇添足”<|im_end|>的拼音是什么？"}]]
    sampling = SamplingConfig(
        max_new_tokens=6, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0
    )
    a = rollout(model, tok, prompts, 3, sampling, torch.Generator().manual_seed(1))
    b = rollout(model, tok, prompts, 3, sampling, torch.Generator().manual_seed(1))
    c = rollout(model, tok, prompts, 3, sampling, torch.Generator().manual_seed(2))
    assert torch.equal(a.ids, b.ids) and a.texts == b.texts and not torch.equal(a.ids, c.ids)
    assert a.ids.shape[0] == 6 and a.group_size == 3
    for k in range(6):
        prompt = encode_chat(tok, prompts[k // 3], add_generation_prompt=True).ids
        n = len(prompt)
        assert a.ids[k, :n].tolist() == prompt and not a.completion_mask[k, :n].any()
        assert a.completion_mask[k].sum() == a.lengths[k] and a.completion_mask[k, n : n + a.lengths[k]].all()
        assert prompt.count(IM_END_ID) == 1  # the turn's own end: the user's "<|im_end|>" stays text
        assert a.truncated[k] == (a.lengths[k] == 6 and a.ids[k, n + 5] != IM_END_ID)


def test_a_reply_ended_by_eos_keeps_the_eos_token_to_learn_from(tok):
    class LovesEOS(Transformer):
        def forward(self, idx, targets=None, **kw):
            out = super().forward(idx, targets, **kw)
            out[..., EOS_ID] += 100.0
            return out

    sampling = SamplingConfig(max_new_tokens=5, temperature=1.0)
    r = rollout(_model(tok, LovesEOS), tok, [PROMPT], 2, sampling)
    assert r.lengths == [1, 1] and r.texts == ["", ""] and r.truncated == [False, False]
    assert r.ids[r.completion_mask].tolist() == [EOS_ID, EOS_ID]


# ---------------------------------------------------------------------------- the objective


def test_group_advantages_are_normalised_per_group_and_zero_for_equal_rewards():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.5, 0.3, 0.3, 0.3, 0.3]), 4)
    assert torch.allclose(
        adv[:4], torch.tensor([0.5, -0.5, 0.0, 0.0]) / ((1 / 6) ** 0.5 + 1e-4)
    )  # sample std
    assert torch.equal(adv[4:], torch.zeros(4))
    # Exactly 0 even where the mean of equal floats is not that float (0.3 x 8 / 8 is not 0.3 in fp32).
    assert torch.equal(group_advantages(torch.full((8,), 0.3), 8), torch.zeros(8))


def _group(tok, n=4):
    """Return (ids, mask) of n hand-built replies to one prompt (distinct reply tokens)."""
    prompt = encode_chat(tok, PROMPT, add_generation_prompt=True).ids
    replies = [[10 + k, 20 + k, IM_END_ID] for k in range(n)]
    ids = torch.tensor([prompt + r for r in replies])
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, len(prompt) :] = True
    return ids, mask


def _logp(model, ids, mask):
    """Return per-token log-probabilities (N, T-1) of ids and the matching reply mask."""
    return token_logprobs(model(ids[:, :-1]), ids[:, 1:]), mask[:, 1:]


def test_an_update_raises_above_average_replies_and_lowers_below_average_ones(tok):
    model = _model(tok)
    ref = _model(tok)
    ids, mask = _group(tok)
    rewards = torch.tensor([1.0, 0.0, 0.75, 0.25])
    logp, m = _logp(model, ids, mask)
    with torch.no_grad():
        ref_logp, _ = _logp(ref, ids, mask)
    adv = group_advantages(rewards, 4)
    loss, metrics = grpo_loss(logp, logp.detach(), ref_logp, adv, m, max_new_tokens=3, kl_coef=0.04)
    assert metrics["kl"] == 0 and metrics["clip_ratio"] == 0
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.01 * p.grad
        after, _ = _logp(model, ids, mask)
    change = ((after - logp.detach()) * m).sum(dim=1)  # per reply
    assert (torch.sign(change) == torch.sign(rewards - rewards.mean())).all(), change


def test_a_group_of_equal_rewards_gives_no_policy_gradient(tok):
    model = _model(tok)
    ids, mask = _group(tok)
    both = torch.cat([ids, ids.flip(0)]), torch.cat([mask, mask])
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.25] + [0.6] * 4)  # group 2: all equal

    def grads(ids, mask, rewards):
        model.zero_grad()
        logp, m = _logp(model, ids, mask)
        adv = group_advantages(rewards, 4)
        loss, _ = grpo_loss(logp, logp.detach(), logp.detach(), adv, m, max_new_tokens=3)
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    assert all(not g.any() for g in grads(ids, mask, rewards[4:]))  # KL at the reference: no gradient either
    with_equal, alone = grads(*both, rewards), grads(ids, mask, rewards[:4])
    for g2, g1 in zip(with_equal, alone):  # twice the rows: half the weight per token, nothing else
        torch.testing.assert_close(2 * g2, g1)


def test_clipping_stops_the_gradient_of_tokens_that_moved_too_far():
    logp = torch.tensor([[0.0, -1.0], [0.0, -1.0]], requires_grad=True)
    old = torch.tensor([[-0.5, -1.0], [0.5, -1.0]])  # token 0: ratio e^0.5 (row 0), e^-0.5 (row 1)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 2, dtype=torch.bool)
    loss, metrics = grpo_loss(logp, old, None, adv, mask, max_new_tokens=2, clip_eps=0.2)
    loss.backward()
    assert metrics["clip_ratio"] == 0.5 and "kl" not in metrics
    assert logp.grad[:, 0].tolist() == [0.0, 0.0] and logp.grad[:, 1].tolist() == [-0.25, 0.25]


def test_the_kl_term_is_the_k3_estimate_and_sums_over_a_fixed_denominator():
    logp = torch.tensor([[-1.0, -2.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, 0.0]])
    mask = torch.tensor([[True, True, False]])
    loss, metrics = grpo_loss(logp, logp, ref, torch.zeros(1), mask, max_new_tokens=4, kl_coef=0.1)
    k3 = torch.exp(torch.tensor(-0.5)) + 0.5 - 1
    torch.testing.assert_close(metrics["kl"], k3 / 2)  # a mean per reply token
    torch.testing.assert_close(loss, 0.1 * k3 / 4)  # the loss: over rows x max_new_tokens


# ---------------------------------------------------------------------------- the grpo run


def _grpo_flags(base, task, out, threads=1, **kw):
    return {
        "base": str(base), "task": task, "out": str(out), "group_size": 4, "batch_size": 2,
        "max_new_tokens": 6, "max_steps": 6, "lr": 3e-3, "eval_every": 3, "log_every": 1,
        "save_every": 2, "device": "cpu", "dtype": "fp32", "num_threads": threads, **kw,
    }  # fmt: skip


def _run(cfg):
    """Return run_grpo(cfg)'s result, quietly; torch's thread count is restored afterwards."""
    from qinglm.post.grpo import run_grpo

    n = torch.get_num_threads()
    try:
        return run_grpo(cfg, log=lambda _: None)
    finally:
        torch.set_num_threads(n)


def test_a_grpo_run_logs_its_metrics_and_is_a_base_for_the_next(tmp_path, tiny_base_run, tiny_task):
    import qinglm
    from qinglm.post.grpo import GRPOConfig
    from qinglm.train.metrics import read_metrics

    first = tmp_path / "grpo1"
    res = _run(GRPOConfig(**_grpo_flags(tiny_base_run, tiny_task, first)))
    assert res["step"] == 6 and res["task"] == "letters"
    assert 0.0 <= res["heldout_after"]["val_reward"] <= 1.0
    assert res["heldout_after"]["val_loss"] == 1.0 - res["heldout_after"]["val_reward"]
    saved = json.loads((first / "config.json").read_text())
    assert (
        saved["kind"] == "grpo" and saved["grpo"]["group_size"] == 4 and saved["base"] == str(tiny_base_run)
    )
    assert json.loads((first / "grpo_results.json").read_text())["heldout_before"] is not None
    train = [r for r in read_metrics(first) if r["kind"] == "train"]
    for key in (
        "reward",
        "reward_std",
        "kl",
        "clip_ratio",
        "completions/mean_length",
        "frac_reward_zero_std",
    ):
        assert all(key in r for r in train), key
    assert train[0]["kl"] == 0.0 and any(r["kl"] > 0 for r in train[1:])  # the policy leaves the base
    val = [r for r in read_metrics(first) if r["kind"] == "val"]
    assert [r["step"] for r in val] == [3, 6] and all("val_pass_rate" in r for r in val)
    lm = qinglm.load(first, device="cpu")
    assert isinstance(lm.chat([{"role": "user", "content": "你好"}], max_new_tokens=4), str)
    # --base takes a GRPO run: the next run starts from its best weights
    cfg2 = GRPOConfig(**_grpo_flags(first, tiny_task, tmp_path / "grpo2", max_steps=2, kl_coef=0.0))
    res2 = _run(cfg2)
    assert res2["step"] == 2 and res2["heldout_before"]["val_loss"] == res["best_val_loss"]
    # and so does --init-from (continued pretraining)
    from qinglm.cli import main

    text = tmp_path / "text.txt"
    text.write_text("".join(f"画蛇添足，多此一举。{i}\n" for i in range(2000)), encoding="utf-8")
    flags = "--max-steps 2 --batch-size 2 --seq-len 16 --device cpu --no-compile --num-threads 1"
    pre = tmp_path / "pre"
    argv = ["train", "--data", str(text), "--init-from", str(first), "--out", str(pre), *flags.split()]
    assert main([*argv, "--sample-tokens", "1", "--eval-tokens", "64"]) == 0
    assert json.loads((pre / "config.json").read_text())["kind"] == "pretrain"


def test_a_resumed_grpo_run_reports_the_held_out_reward_measured_before_its_first_step(
    tmp_path, tiny_base_run, tiny_task
):
    from qinglm.post.grpo import GRPOConfig

    flags = _grpo_flags(tiny_base_run, tiny_task, tmp_path / "run", max_steps=2, lr_schedule="constant")
    first = _run(GRPOConfig(**flags))
    resumed = _run(GRPOConfig(**{**flags, "max_steps": 4, "resume": True}))
    assert resumed["step"] == 4 and resumed["heldout_before"] == first["heldout_before"] is not None


def test_grpo_user_errors_are_one_line(tmp_path, tiny_base_run, tiny_task, capsys):
    from qinglm.cli import main

    common = ["grpo", "--base", str(tiny_base_run), "--device", "cpu", "--max-steps", "1"]
    for extra, msg in [
        (["--task", "no_such_module_xyz:f"], "cannot import task module 'no_such_module_xyz'"),
        (["--task", "grpo_tiny_task:nope"], "has no function 'nope'"),
        (["--task", tiny_task, "--group-size", "1"], "--group-size must be in [2, 65536], got 1"),
        (["--task", tiny_task, "--max-new-tokens", "60"], "lower --max-new-tokens"),
    ]:
        assert main([*common, *extra, "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and "\n" not in err and "Traceback" not in err, err


@pytest.mark.slow
def test_sigkill_during_grpo_then_resume_is_bit_identical(tmp_path, tiny_base_run, tiny_task, sigkill_resume):
    import sys

    from qinglm.post.grpo import GRPOConfig
    from qinglm.train.driver import cli_flags

    steps = 16
    flags = _grpo_flags(tiny_base_run, tiny_task, tmp_path / "ref", threads=2, max_steps=steps, eval_every=5)
    _run(GRPOConfig(**flags, resume=True))
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "qinglm", "grpo", *cli_flags({**flags, "out": str(run), "resume": True})]
    print("\n".join(sigkill_resume(cmd, tmp_path / "ref", run, steps, kills=2, seed=20261127)))


def test_moe_grpo_adds_the_routers_load_balancing_loss(tmp_path, chat_tok, tiny_task, monkeypatch):
    import qinglm.post.grpo as grpo
    from qinglm.config import ModelConfig, resolve_model
    from qinglm.train.checkpoint import save_run

    torch.manual_seed(0)
    cfg = resolve_model(
        ModelConfig(
            vocab_size=chat_tok.vocab_size, d_model=32, n_layers=2, n_heads=2, max_seq_len=64, n_experts=4,
            experts_per_token=2,
        )
    )  # fmt: skip
    base = save_run(tmp_path / "moe", Transformer(cfg), chat_tok)
    objective, stage_loss = grpo.grpo_loss, grpo.GRPOStage.loss
    seen: dict[str, list[float]] = {"objective": [], "step": [], "router": []}

    def recorded_objective(*args, **kw):
        loss, metrics = objective(*args, **kw)
        seen["objective"].append(loss.item())
        return loss, metrics

    def recorded_loss(self, forward, model, batch):
        out = stage_loss(self, forward, model, batch)
        seen["step"].append(out.loss.item())  # the policy's forward was the model's last in training mode
        seen["router"].append(model.with_router_losses(torch.zeros(())).item())
        return out

    monkeypatch.setattr(grpo, "grpo_loss", recorded_objective)
    monkeypatch.setattr(grpo.GRPOStage, "loss", recorded_loss)
    _run(grpo.GRPOConfig(**_grpo_flags(base, tiny_task, tmp_path / "grpo", max_steps=1, eval_every=10)))
    assert seen["router"][0] > 0.01  # about moe_aux_coef per MoE layer
    assert seen["step"][0] == pytest.approx(seen["objective"][0] + seen["router"][0], abs=1e-6)
