"""The training loop, its lr schedule and optimizer groups, on a tiny model and a tiny corpus."""

from __future__ import annotations

import math
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import qinglm.train.loop as loop
import qinglm.train.pretrain as pretrain
import qinglm.train.session as session
from qinglm.config import ModelConfig
from qinglm.device import resolve_compile
from qinglm.errors import QingLMError
from qinglm.model.transformer import Transformer
from qinglm.train import train
from qinglm.train.checkpoint import latest_checkpoint, load_trainer_state
from qinglm.train.config import TrainConfig
from qinglm.train.metrics import TRAIN_KEYS, VAL_KEYS, read_metrics
from qinglm.train.optim import build_optimizer
from qinglm.train.schedule import (
    RunLength,
)


@pytest.fixture(scope="module")
def corpus(phrase_corpus) -> tuple[Path, Path, int]:
    """Return (data_dir, tokenizer_dir, vocab_size) of a small repetitive corpus."""
    return phrase_corpus


def configs(vocab: int, **train_kw) -> tuple[ModelConfig, TrainConfig]:
    model = ModelConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, dropout=0.1)
    kw = dict(
        max_steps=12,
        batch_size=4,
        seq_len=16,
        lr=3e-3,
        warmup_steps=1000,
        eval_every=4,
        eval_tokens=256,
        log_every=4,
        save_every=4,
        keep_checkpoints=2,
        num_threads=1,
        device="cpu",
        dtype="fp32",
        compile=False,
    )
    return model, TrainConfig(**{**kw, **train_kw})


def quiet(_line: str) -> None:
    pass


def assert_same_run(a: Path, b: Path) -> None:
    wa, wb = (
        load_file(latest_checkpoint(a) / "model.safetensors"),
        load_file(latest_checkpoint(b) / "model.safetensors"),
    )
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    sa, sb = (load_trainer_state(latest_checkpoint(r))["optimizer"] for r in (a, b))
    # a combined optimizer (Muon + AdamW) stores {"optimizers": [state_dict, ...]}
    sa, sb = (sd.get("optimizers", [sd]) for sd in (sa, sb))
    assert len(sa) == len(sb)
    for j, (oa, ob) in enumerate(zip((sd["state"] for sd in sa), (sd["state"] for sd in sb))):
        assert oa.keys() == ob.keys()
        for i in oa:
            for k in oa[i]:
                assert torch.equal(oa[i][k], ob[i][k]), (j, i, k)


# ---------------------------------------------------------------------------- the loop


def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(corpus, tmp_path):
    data, _, vocab = corpus
    # min_lr_ratio 1: the lr then does not depend on max_steps, which B changes from 8 to 12.
    m, t = configs(vocab, min_lr_ratio=1.0)
    ra = train(m, t, tmp_path / "a", data, log=quiet)
    m, t8 = configs(vocab, min_lr_ratio=1.0, max_steps=8)
    assert train(m, t8, tmp_path / "b", data, log=quiet)["step"] == 8
    lines = []
    m, t12 = configs(vocab, min_lr_ratio=1.0, resume=True)
    rb = train(m, t12, tmp_path / "b", data, log=lines.append)
    assert any("resuming from" in line and "step 8" in line for line in lines)
    assert ra["step"] == rb["step"] == 12 and ra["tokens_seen"] == rb["tokens_seen"]
    assert_same_run(tmp_path / "a", tmp_path / "b")
    # metrics of the resumed run continue the file, without duplicate steps
    steps = [r["step"] for r in read_metrics(tmp_path / "b") if r["kind"] == "train"]
    assert steps == [4, 8, 12]


@pytest.mark.skipif(not resolve_compile(None, torch.device("cpu")), reason="no C++ compiler: compile is off")
def test_two_fresh_runs_under_the_default_compile_give_bit_identical_weights(corpus, tmp_path):
    # Inductor's 2-thread CPU kernels used to add the embedding gradient with atomic adds in a
    # different order each run (the weights differed by ~1e-4 after 20 steps; 1.3e-3 after 60).
    data, _, vocab = corpus
    m, t = configs(
        vocab, max_steps=20, eval_every=100, save_every=100, compile=None, dtype="auto", num_threads=2
    )
    lines: list[str] = []
    train(m, t, tmp_path / "a", data, log=lines.append)
    assert any("compile on" in line for line in lines)
    train(m, t, tmp_path / "b", data, log=quiet)
    assert_same_run(tmp_path / "a", tmp_path / "b")
    assert not torch.are_deterministic_algorithms_enabled()  # the process's setting is given back


def test_a_run_that_dies_in_its_warmup_resumes_onto_the_same_schedule_and_weights(corpus, tmp_path):
    data, _, vocab = corpus
    # 60 steps: warmup 3 (5% of the run), then cosine to the floor; the crash comes after step 3,
    # whose checkpoint is not written yet, so the run resumes from step 2, inside the warmup.
    m, t = configs(vocab, max_steps=60, log_every=3, save_every=2, eval_every=30)
    train(m, t, tmp_path / "a", data, log=quiet)

    def crash_at_step_3(line: str) -> None:
        if line.startswith("step 3/"):
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError, match="crash"):
        train(m, t, tmp_path / "b", data, log=crash_at_step_3)
    assert latest_checkpoint(tmp_path / "b").name == "step-00000002"
    m, t = configs(vocab, max_steps=60, log_every=3, save_every=2, eval_every=30, resume=True)
    assert train(m, t, tmp_path / "b", data, log=quiet)["step"] == 60
    assert_same_run(tmp_path / "a", tmp_path / "b")
    ra, rb = ([r for r in read_metrics(d) if r["kind"] == "train"] for d in (tmp_path / "a", tmp_path / "b"))
    assert [(r["step"], r["lr"]) for r in ra] == [(r["step"], r["lr"]) for r in rb]
    # the losses too, but step 3's: its log window began before the crash
    assert [r["loss"] for r in ra[1:]] == [r["loss"] for r in rb[1:]]
    floor_side = 0.1 + 0.45 * (1 + math.cos(math.pi * 56 / 57))  # update 59 of a cosine over 3..60
    assert ra[0]["lr"] == pytest.approx(3e-3) and ra[-1]["lr"] == pytest.approx(3e-3 * floor_side)


def test_ctrl_c_saves_a_checkpoint_and_resume_continues_exactly(corpus, tmp_path):
    data, _, vocab = corpus
    m, t = configs(vocab)  # the default cosine schedule over 12 steps
    train(m, t, tmp_path / "a", data, log=quiet)

    lines: list[str] = []

    def log_and_interrupt(line: str) -> None:
        lines.append(line)
        if line.startswith("step 8/"):  # Ctrl-C arrives right after step 8
            signal.raise_signal(signal.SIGINT)

    r = train(m, t, tmp_path / "b", data, log=log_and_interrupt)
    assert r["stop_reason"] == "interrupted" and r["step"] == 8
    assert any(f"resume with: qinglm train --out {tmp_path / 'b'} --resume" in line for line in lines)
    assert latest_checkpoint(tmp_path / "b").name == "step-00000008"
    m, t = configs(vocab, resume=True)
    assert train(m, t, tmp_path / "b", data, log=quiet)["step"] == 12
    assert_same_run(tmp_path / "a", tmp_path / "b")


def test_loss_falls_and_metrics_carry_the_required_keys(corpus, tmp_path):
    data, _, vocab = corpus
    m, t = configs(vocab, max_steps=40, batch_size=8, log_every=5, eval_every=20, save_every=20)
    r = train(m, t, tmp_path / "run", data, log=quiet)
    records = read_metrics(tmp_path / "run")
    train_lines = [x for x in records if x["kind"] == "train"]
    val_lines = [x for x in records if x["kind"] == "val"]
    assert [x["step"] for x in train_lines] == list(range(5, 41, 5))
    assert [x["step"] for x in val_lines] == [20, 40]
    for x in train_lines:
        assert set(TRAIN_KEYS) <= x.keys() and x["tokens_per_s"] > 0
    for x in val_lines:
        assert set(VAL_KEYS) <= x.keys() and math.isclose(x["val_ppl"], math.exp(x["val_loss"]), rel_tol=1e-6)
    assert train_lines[-1]["loss"] < train_lines[0]["loss"] - 1.0  # clearly learning, not noise
    assert val_lines[-1]["val_loss"] < val_lines[0]["val_loss"]
    assert r["val_loss"] == pytest.approx(val_lines[-1]["val_loss"]) and r["best_val_loss"] == r["val_loss"]
    assert (tmp_path / "run" / "best" / "model.safetensors").is_file()


def test_patience_stops_a_run_whose_val_loss_no_longer_improves(corpus, tmp_path):
    data, _, vocab = corpus
    # lr 1e-12 leaves the fp32 weights unchanged, so after the first validation none improves.
    m, t = configs(vocab, max_steps=50, lr=1e-12, eval_every=2, patience=2)
    r = train(m, t, tmp_path / "run", data, log=quiet)
    assert (r["stop_reason"], r["step"]) == ("early stop", 6)  # best at 2, no better at 4 and 6
    assert latest_checkpoint(tmp_path / "run").name == "step-00000006"


def test_existing_checkpoints_without_resume_are_refused(corpus, tmp_path):
    data, _, vocab = corpus
    m, t = configs(vocab, max_steps=4)
    train(m, t, tmp_path / "run", data, log=quiet)
    with pytest.raises(QingLMError, match="--resume"):
        train(m, t, tmp_path / "run", data, log=quiet)


def test_resume_without_checkpoints_starts_fresh(corpus, tmp_path):
    data, _, vocab = corpus
    m, t = configs(vocab, max_steps=2, resume=True)
    lines: list[str] = []
    assert train(m, t, tmp_path / "run", data, log=lines.append)["step"] == 2
    assert any("starting a fresh run" in line for line in lines)


def test_data_of_another_vocabulary_is_refused(corpus, tmp_path):
    data, _, vocab = corpus
    m, t = configs(vocab + 7, max_steps=2)
    with pytest.raises(QingLMError, match="vocab"):
        train(m, t, tmp_path / "run", data, log=quiet)


def test_ten_non_finite_losses_in_a_row_stop_the_run(corpus, tmp_path, monkeypatch):
    class Diverged(Transformer):
        def forward(self, idx, targets=None, **kw):
            return super().forward(idx, targets, **kw) * float("nan")

    monkeypatch.setattr(pretrain, "Transformer", Diverged)
    data, _, vocab = corpus
    m, t = configs(vocab, max_steps=50)
    with pytest.raises(QingLMError, match="not finite for 10 steps"):
        train(m, t, tmp_path / "run", data, log=quiet)


def test_a_non_finite_step_under_a_grad_scaler_is_skipped_and_lowers_the_scale(
    corpus, tmp_path, monkeypatch, faulty_transformer
):
    # fp16 on CUDA trains with a GradScaler; a CPU scaler stands in for it. A skipped step used to
    # leave the scaler unscaled-but-not-updated, so the next step's unscale_() raised.
    monkeypatch.setattr(pretrain, "Transformer", faulty_transformer({5: float("nan")}))
    monkeypatch.setattr(
        session, "grad_scaler", lambda dtype, device: torch.amp.GradScaler("cpu", init_scale=1024.0)
    )
    data, _, vocab = corpus
    m, t = configs(vocab, max_steps=10, eval_every=100, save_every=100)
    r = train(m, t, tmp_path / "run", data, log=quiet)
    assert r["step"] == 10 and r["skipped_steps"] == 1
    assert load_trainer_state(latest_checkpoint(tmp_path / "run"))["scaler"]["scale"] == 512.0


def test_each_rank_and_update_draws_its_own_dropout_masks(corpus, tmp_path, monkeypatch):
    # Under torchrun every rank used to draw the same dropout masks (all seeded alike for equal weights).
    seeds = {(rank, step): session.step_seed(0, rank, step) for rank in range(4) for step in range(200)}
    assert len(set(seeds.values())) == len(seeds) and session.step_seed(1, 0, 0) != seeds[0, 0]
    assert session.step_seed(0, 1, 5) == seeds[1, 5]  # a function of (seed, rank, step) alone

    def mask(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return torch.nn.functional.dropout(torch.ones(1000), 0.5) > 0

    assert not torch.equal(mask(seeds[0, 5]), mask(seeds[1, 5]))
    calls: list[tuple[int, int, int]] = []

    def spy(seed: int, rank: int, step: int) -> int:
        calls.append((seed, rank, step))
        return session.step_seed(seed, rank, step)

    monkeypatch.setattr(loop, "step_seed", spy)
    data, _, vocab = corpus
    m, t = configs(vocab, max_steps=6, seed=3, eval_every=100, save_every=100)
    train(m, t, tmp_path / "run", data, log=quiet)
    assert calls == [(3, 0, step) for step in range(6)]  # every update, seeded by this process's rank


# ---------------------------------------------------------------------------- schedule in a run


def test_run_length_and_the_run_use_the_configured_schedule(corpus, tmp_path):
    assert RunLength(100, None, 10, kind="constant").lr(99, 1.0, 0.1) == pytest.approx(1.0)
    wsd = RunLength(100, None, 10, kind="wsd", decay_fraction=0.5)
    assert wsd.lr(49, 1.0, 0.1) == pytest.approx(1.0) and wsd.lr(75, 1.0, 0.1) == pytest.approx(0.55)
    data, _, vocab = corpus
    m, t = configs(vocab, lr_schedule="constant", max_steps=8, eval_every=100, save_every=100)
    train(m, t, tmp_path / "run", data, log=quiet)
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert lrs == [pytest.approx(3e-3)] * 2  # cosine would have decayed by step 8 of 8


# ---------------------------------------------------------------------------- optimizer


@pytest.mark.parametrize("tie", [True, False])
def test_optimizer_decays_matrices_only_and_holds_a_tied_weight_once(tie):
    model = Transformer(
        ModelConfig(
            vocab_size=300, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, tie_embeddings=tie, bias=True
        )
    )
    _, cfg = configs(300, weight_decay=0.1, beta1=0.8, beta2=0.95)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0 and decay["betas"] == (0.8, 0.95)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert "embed.weight" in decay["names"] and any(n.endswith("bias") for n in no_decay["names"])
    assert any("norm" in n for n in no_decay["names"])
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert ("head.weight" in decay["names"]) is not tie


# ---------------------------------------------------------------------------- Muon


@pytest.mark.parametrize("tie", [True, False])
def test_muon_takes_the_block_matrices_and_adamw_the_rest(tie):
    model = Transformer(
        ModelConfig(
            vocab_size=300,
            d_model=32,
            n_layers=2,
            n_heads=2,
            max_seq_len=16,
            tie_embeddings=tie,
            bias=True,
            gated_attention=True,
        )
    )
    _, cfg = configs(300, optimizer="muon", lr=1e-3, muon_lr=0.02)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    adamw, muon = opt.optimizers
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, torch.optim.Muon)
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))  # every parameter exactly once
    adamw_names = {n for g in adamw.param_groups for n in g["names"]}
    muon_names = {n for g in muon.param_groups for n in g["names"]}
    assert {"embed.weight", "norm.weight"} <= adamw_names and ("head.weight" in adamw_names) is not tie
    assert all(
        not n.startswith("blocks.") or p.dim() == 1 for n, p in model.named_parameters() if n in adamw_names
    )
    expected = {
        f"blocks.{i}.{m}.weight"
        for i in range(2)
        for m in ("attn.qkv", "attn.out", "attn.gate", "mlp.up", "mlp.down")
    }
    assert muon_names == expected
    assert all(g["lr_scale"] == pytest.approx(20.0) for g in muon.param_groups)


@pytest.mark.parametrize("shape", [(32, 32), (64, 16), (16, 48)])
def test_one_muon_step_is_a_near_orthogonal_update(shape):
    # A gradient with singular values spread over 1 .. 0.03 (condition number ~32).
    torch.manual_seed(0)
    k = min(shape)
    u, _ = torch.linalg.qr(torch.randn(shape[0], k))
    v, _ = torch.linalg.qr(torch.randn(shape[1], k))
    w = torch.nn.Parameter(torch.randn(*shape))
    w.grad = u @ torch.diag(torch.logspace(0, -1.5, k)) @ v.T
    before = w.detach().clone()
    lr = 0.01
    torch.optim.Muon([w], lr=lr, weight_decay=0.0, adjust_lr_fn="original").step()  # zero momentum
    adjust = math.sqrt(max(1, shape[0] / shape[1]))  # what "original" multiplies the lr by
    s = torch.linalg.svdvals((before - w.detach()) / (lr * adjust))
    # Five quintic Newton-Schulz steps leave the singular values in about 0.68 .. 1.14, not exactly 1.
    assert ((s > 0.6) & (s < 1.3)).all(), s
    assert s.mean().item() == pytest.approx(1.0, abs=0.15)


def test_muon_training_learns_and_resumes_bit_identically(corpus, tmp_path):
    data, _, vocab = corpus
    m, t = configs(vocab, optimizer="muon", min_lr_ratio=1.0)
    ra = train(m, t, tmp_path / "a", data, log=quiet)
    losses = [r["loss"] for r in read_metrics(tmp_path / "a") if r["kind"] == "train"]
    assert losses[-1] < losses[0]
    m, t8 = configs(vocab, optimizer="muon", min_lr_ratio=1.0, max_steps=8)
    assert train(m, t8, tmp_path / "b", data, log=quiet)["step"] == 8
    trainer = load_trainer_state(latest_checkpoint(tmp_path / "b"))
    assert len(trainer["optimizer"]["optimizers"]) == 2
    m, t12 = configs(vocab, optimizer="muon", min_lr_ratio=1.0, resume=True)
    rb = train(m, t12, tmp_path / "b", data, log=quiet)
    assert ra["step"] == rb["step"] == 12
    assert_same_run(tmp_path / "a", tmp_path / "b")


# ---------------------------------------------------------------------------- progressive sequence length


def test_progressive_seq_len_trains_short_rows_first_on_the_same_tokens(corpus, tmp_path, monkeypatch):
    data, _, vocab = corpus
    m, t = configs(vocab, max_steps=8, seq_len_schedule="4:0.25,8:0.5")
    shapes: list[tuple[int, int]] = []
    real_forward = Transformer.forward

    def spy(self, idx, targets=None, **kw):
        if targets is not None and self.training:
            shapes.append(tuple(idx.shape))
        return real_forward(self, idx, targets, **kw)

    monkeypatch.setattr(Transformer, "forward", spy)
    r = train(m, t, tmp_path / "run", data, log=quiet)
    assert shapes == [(16, 4)] * 2 + [(8, 8)] * 2 + [(4, 16)] * 4  # batch 4 x 16 tokens every step
    assert math.isfinite(r["val_loss"])


def test_moe_expert_utilisation_goes_into_the_metrics(corpus, tmp_path):
    data, _, vocab = corpus
    m, t = configs(vocab, max_steps=4, log_every=2)
    m.n_experts, m.experts_per_token = 4, 2
    train(m, t, tmp_path / "run", data, log=quiet)
    lines = [x for x in read_metrics(tmp_path / "run") if x["kind"] == "train"]
    for x in lines:
        assert set(x["expert_util"]) == {"blocks.0", "blocks.1"}
        for util in x["expert_util"].values():
            assert len(util) == 4 and sum(util) == pytest.approx(1.0, abs=1e-3)
        assert x["expert_load_max"] >= 1.0
