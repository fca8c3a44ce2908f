"""Post-training stages on the one engine: SFT and LoRA-SFT resume exactly after SIGKILL, run on two
processes like on one, and write runs that --base and --init-from accept."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qinglm
from qinglm.sft.config import SFTConfig
from qinglm.sft.train import run_sft
from qinglm.train.driver import cli_flags
from qinglm.train.metrics import read_metrics

STEPS = 30


def write_chats(path: Path, n: int = 64) -> Path:
    """Return path after writing n one-turn chats whose replies all have the same length (so any split of
    a step's rows into micro-batches weighs every target token alike)."""
    rows = [
        {
            "conversations": [
                {"role": "user", "content": f"第{i % 8}题"},
                {"role": "assistant", "content": "画蛇添足"},
            ]
        }
        for i in range(n)
    ]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    return path


def sft_flags(base: Path, data: Path, out: Path, **kw) -> dict:
    return {
        "base": str(base), "data": str(data), "out": str(out), "max_steps": STEPS, "batch_size": 4,
        "lr": 3e-3, "warmup_steps": 3, "log_every": 1, "eval_every": 10, "save_every": 2, "seq_len": 32,
        "device": "cpu", "dtype": "fp32", "num_threads": 1, "compile": False, "eval_examples": 8, **kw,
    }  # fmt: skip


def sft_command(flags: dict) -> list[str]:
    return [sys.executable, "-m", "qinglm", "sft", *cli_flags(flags)]


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sft_killed_at_random_moments_resumes_bit_identical(tiny_base_run, tmp_path, sigkill_resume, lora):
    data = write_chats(tmp_path / "chats.jsonl")
    extra = {"lora": True, "lora_dropout": 0.1} if lora else {}  # dropout: the RNG state matters
    ref, run = tmp_path / "reference", tmp_path / "killed"
    run_sft(SFTConfig(**sft_flags(tiny_base_run, data, ref, **extra)), log=lambda _: None)
    sigkill_resume(
        sft_command(sft_flags(tiny_base_run, data, run, resume=True, **extra)), ref, run, STEPS, 3, 7
    )
    if lora:  # the adapter and merged best/ of the resumed run are the uninterrupted run's
        assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == (
            ref / "adapter" / "adapter_model.safetensors"
        ).read_bytes()


@pytest.mark.slow
def test_sft_on_two_processes_follows_one_with_the_same_global_batch(tiny_base_run, tmp_path):
    data = write_chats(tmp_path / "chats.jsonl")
    one = tmp_path / "one"
    # pad: a row per chat, so every micro-batch of any split holds the same number of target tokens
    flags = sft_flags(tiny_base_run, data, one, max_steps=8, grad_accum=2, batching="pad")
    run_sft(SFTConfig(**flags), log=lambda _: None)
    two = tmp_path / "two"
    flags = {**flags, "out": str(two), "batch_size": 2, "nproc": 2}
    p = subprocess.run(sft_command(flags), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "x 2 processes (ddp)" in p.stdout
    a, b = ([r["loss"] for r in read_metrics(d) if r["kind"] == "train"] for d in (one, two))
    assert len(a) == len(b) == 8 and a[-1] < a[0]
    assert b == pytest.approx(a, rel=1e-4)  # float rounding: gradients averaged over ranks, other padding


def test_a_resumed_sft_run_reports_the_held_out_loss_measured_before_its_first_step(tiny_base_run, tmp_path):
    data = write_chats(tmp_path / "chats.jsonl", n=16)
    out = tmp_path / "sft"
    flags = sft_flags(tiny_base_run, data, out, max_steps=2, save_every=2, lr_schedule="constant")
    first = run_sft(SFTConfig(**flags), log=lambda _: None)
    lines: list[str] = []
    resumed = run_sft(SFTConfig(**{**flags, "max_steps": 4, "resume": True}), log=lines.append)
    assert resumed["step"] == 4 and resumed["val_loss_before"] == first["val_loss_before"] is not None
    assert f"(before {first['val_loss_before']:.4f})" in next(x for x in lines if "loss after" in x)
    saved = json.loads((out / "sft_results.json").read_text())
    assert saved["val_loss_before"] == first["val_loss_before"]


def test_base_and_init_from_accept_an_sft_run(tiny_base_run, tmp_path):
    data = write_chats(tmp_path / "chats.jsonl", n=16)
    first = tmp_path / "sft1"
    run_sft(
        SFTConfig(**sft_flags(tiny_base_run, data, first, max_steps=3, eval_every=100)), log=lambda _: None
    )
    assert json.loads((first / "config.json").read_text())["kind"] == "sft"
    second = tmp_path / "sft2"  # SFT of an SFT run
    res = run_sft(SFTConfig(**sft_flags(first, data, second, max_steps=2)), log=lambda _: None)
    assert res["val_loss_before"] == pytest.approx(qinglm_loss(first, data, second))
    # continued pretraining from an SFT run
    from qinglm.train.config import TrainConfig

    text = tmp_path / "text.txt"
    text.write_text("".join(f"画蛇添足，多此一举。{i}\n" for i in range(2000)), encoding="utf-8")
    out = tmp_path / "pre"
    train = TrainConfig(
        data=[str(text)], out=str(out), init_from=str(second), max_steps=2, batch_size=2, seq_len=16,
        device="cpu", compile=False, num_threads=1, sample_tokens=1, eval_tokens=64,
    )  # fmt: skip
    from qinglm.pipeline import run_train

    run_train({}, {k: getattr(train, k) for k in ("data", "out", "init_from", "max_steps", "batch_size",
               "seq_len", "device", "compile", "num_threads", "sample_tokens", "eval_tokens")}, log=lambda _: None)  # fmt: skip
    assert json.loads((out / "config.json").read_text())["kind"] == "pretrain"


def qinglm_loss(run: Path, data: Path, sft_run: Path) -> float:
    """Return the held-out assistant-token loss of run's weights on the examples sft_run held out."""
    from qinglm.sft import data as sft_data
    from qinglm.sft.train import assistant_loss, load_conversations, resolve_sft

    cfg = SFTConfig(**{k: v for k, v in json.loads((sft_run / "config.json").read_text())["sft"].items()})
    _, val = load_conversations(resolve_sft(cfg, 64), lambda _: None)
    lm = qinglm.load(run, device="cpu")
    samples, _ = sft_data.make_samples(lm.tokenizer, val, cfg.seq_len)
    torch.manual_seed(0)
    return assistant_loss(lm.model, samples, lm.tokenizer.pad_id, torch.device("cpu"))


def test_eval_tasks_are_scored_at_each_validation(phrase_corpus, tmp_path):
    from qinglm.pipeline import run_train

    data, tok, _ = phrase_corpus
    out = tmp_path / "run"
    flags = dict(
        data=[str(data)], tokenizer=str(tok), out=str(out), max_steps=4, eval_every=2, batch_size=4, seq_len=16,
        eval_tokens=256, device="cpu", compile=False, num_threads=1, sample_tokens=1, sample_prompts=["你好"],
        eval_tasks=["pd1998-cloze", "bpc-idioms"], eval_task_limit=8,
    )  # fmt: skip
    run_train(dict(d_model=32, n_layers=1, n_heads=2, max_seq_len=16), flags, log=lambda _: None)
    vals = [r for r in read_metrics(out) if r["kind"] == "val"]
    assert [r["step"] for r in vals] == [2, 4]
    for r in vals:
        assert 0.0 <= r["task/pd1998-cloze"] <= 1.0 and r["task/bpc-idioms"] > 0 and "task/summary" in r


def test_epoch_batches_build_each_epoch_once_for_counting_and_training():
    from qinglm.train.stage import EpochBatches

    built: list[int] = []

    def items(epoch: int) -> list[int]:  # epochs of different lengths, as packed rows give
        built.append(epoch)
        return list(range(10 + epoch))

    b = EpochBatches(items, list, 2, grad_accum=2)
    assert b.steps_for_epochs(3) == 3 + 3 + 3
    served = [next(b) for _ in range(b.steps_for_epochs(3) * 2)]
    assert b.steps_for_epochs(1) == 3 and b.epoch == 2  # counted again at the end (finish), not rebuilt
    assert built == [0, 1, 2]
    assert sorted({x for m in served[12:] for x in m}) == list(range(12))  # epoch 2 trained on all of its own


def test_nproc_launches_every_stage_with_the_launchers_resolved_config(tiny_base_run, tmp_path, monkeypatch):
    # The processes under torchrun resolve nothing themselves: a default out (a timestamp), seq_len,
    # lr and length are handed over as flags, the same way for every stage.
    import dataclasses

    import qinglm.train.driver as driver
    from qinglm.post.config import DPOConfig
    from qinglm.post.dpo import resolve_dpo, run_dpo
    from qinglm.sft.prep import resolve_sft

    monkeypatch.chdir(tmp_path)  # the default out, runs/<time>-sft, is relative
    launched: list[dict] = []
    monkeypatch.setattr(driver, "launch_torchrun", lambda command, n, flags, **kw: launched.append(flags))
    for cls, resolve, run in ((SFTConfig, resolve_sft, run_sft), (DPOConfig, resolve_dpo, run_dpo)):
        given = {"base": str(tiny_base_run), "nproc": 2, "device": "cpu", "lora": True}
        assert run(cls(**given), log=lambda _: None, flags=given) == {}
        flags = launched[-1]
        assert flags["out"].startswith("runs/") and flags["num_epochs"] == 1.0 and flags["seq_len"] == 64
        launcher = dataclasses.replace(resolve(cls(**given), 64), out=flags["out"])
        assert resolve(cls(**flags), 64) == launcher  # what each process under torchrun runs
