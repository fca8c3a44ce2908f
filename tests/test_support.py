"""The table of supported set-ups (qinglm/train/support.py): every combination of stage x parallel mode x
LoRA x device x dtype x compile x optimizer is either accepted or refused in one line before any process
starts, and the accepted multi-process code paths run on two gloo processes.

Running the whole product end to end is far too slow, so the walk is in two parts:
- every combination is looked up in the table here (fast): refused ones give one line, and the CLI
  refuses them before torchrun starts;
- one run of each distinct multi-process code path runs end to end (slow) on two gloo processes:
  FSDP SFT, full and LoRA, with the held-out pinyin check (rank 0 generates alone), FSDP + LoRA DPO (the
  reference is the policy without adapters), FSDP pretraining with --eval-tasks (rank 0 scores alone),
  FSDP distillation (a whole teacher beside the sharded student), GRPO on DDP (rollouts on every rank).
  DDP pretraining, SFT and DPO run in test_distributed.py, test_stages.py and test_dpo_run.py. A device,
  dtype or compile choice changes no multi-process code: CPU fp32 eager stands for them here; CUDA-only
  rows (fp16, NCCL) are checked as table entries only, and run in test_cuda.py where a GPU is present.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_distributed import descendant_with_rank

import qinglm
from qinglm.cli import main
from qinglm.config import ModelConfig, resolve_model
from qinglm.model.transformer import Transformer
from qinglm.tokenizer import Tokenizer
from qinglm.train import support
from qinglm.train.checkpoint import save_run
from qinglm.train.driver import cli_flags
from qinglm.train.metrics import read_metrics
from qinglm.train.support import Setup, refusal


def test_every_combination_is_accepted_or_refused_in_one_line():
    setups = list(support.every_setup())
    assert len(setups) == 5 * 3 * 2 * 3 * 3 * 2 * 2
    refused = {s: refusal(s) for s in setups if refusal(s) is not None}
    for s, why in refused.items():
        assert why and "\n" not in why, (s, why)
    accepted = set(setups) - set(refused)

    def runs(**kw) -> bool:
        base = dict(stage="sft", parallel="single", lora=False, device="cpu", dtype="fp32", compile=False)
        return Setup(**{**base, **kw}) in accepted

    # What the review found broken, now supported: FSDP with LoRA, FSDP SFT and pretraining.
    assert runs(stage="sft", parallel="fsdp", lora=True) and runs(stage="dpo", parallel="fsdp", lora=True)
    assert runs(stage="pretrain", parallel="fsdp") and runs(stage="distill", parallel="fsdp")
    assert runs(stage="grpo", parallel="ddp") and runs(device="cuda", dtype="fp16", compile=True)
    # What cannot work, whatever the other choices.
    assert not runs(stage="grpo", parallel="fsdp")
    assert not runs(parallel="fsdp", optimizer="muon") and runs(parallel="ddp", optimizer="muon")
    assert not runs(device="cpu", dtype="fp16") and not runs(device="mps", parallel="ddp")
    assert not runs(stage="pretrain", lora=True)


@pytest.mark.parametrize(
    "command, extra, message",
    [
        ("grpo", ["--parallel", "fsdp"], "grpo samples replies with the whole model"),
        ("sft", ["--parallel", "fsdp", "--optimizer", "muon"], "works with --optimizer adamw"),
        ("dpo", ["--dtype", "fp16"], "fp16 is not supported on the CPU"),
        ("train", ["--parallel", "fsdp", "--optimizer", "muon"], "works with --optimizer adamw"),
    ],
)
def test_the_cli_refuses_an_unsupported_setup_in_one_line_before_any_process_starts(
    command, extra, message, tiny_base_run, tmp_path, capsys, monkeypatch
):
    def no_launch(*a, **kw):
        raise AssertionError("a process was started")

    monkeypatch.setattr(subprocess, "Popen", no_launch)
    monkeypatch.setattr("qinglm.train.loop.train_stage", no_launch)
    where = ["--data", str(tmp_path / "x.txt")] if command == "train" else ["--base", str(tiny_base_run)]
    argv = [command, *where, "--out", str(tmp_path / "run"), "--nproc", "2", "--device", "cpu", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_the_engine_refuses_an_unsupported_setup_called_from_python(tiny_base_run, tmp_path):
    from qinglm.errors import QingLMError
    from qinglm.post.config import GRPOConfig
    from qinglm.train.loop import train_stage
    from qinglm.train.stage import Stage

    cfg = GRPOConfig(base=str(tiny_base_run), max_steps=1, device="cpu", parallel="fsdp", nproc=2)
    with pytest.raises(QingLMError, match="use --parallel ddp"):
        train_stage(type("S", (Stage,), {"kind": "grpo"})(), cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- two gloo processes


COMMON = {
    "nproc": 2, "device": "cpu", "dtype": "fp32", "compile": False, "num_threads": 1, "log_every": 1,
    "lr_schedule": "constant", "warmup_steps": 1, "save_every": 100, "report": False,
}  # fmt: skip


def two_processes(command: str, flags: dict, timeout: int = 420) -> str:
    """Return the output of `qinglm COMMAND --nproc 2 ...` after checking it finished in time."""
    cmd = [sys.executable, "-m", "qinglm", command, *cli_flags({**COMMON, **flags})]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:  # the ranks wait for each other: a deadlock
            workers = [descendant_with_rank(p.pid, rank) for rank in (0, 1)]
            for pid in [w for w in workers if w is not None] + [p.pid]:
                os.kill(pid, signal.SIGKILL)
            out, _ = p.communicate()
            raise AssertionError(f"{command} hung: {out[-2000:]}") from None
    assert p.returncode == 0, out[-3000:] + err[-3000:]
    return out


def check_loadable(run: Path) -> None:
    """Assert the run's best/ loads for inference and generates."""
    lm = qinglm.load(run, device="cpu")
    assert isinstance(lm.chat([{"role": "user", "content": "你好"}], max_new_tokens=2), str)


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_fsdp_sft_with_the_pinyin_check_finishes_and_writes_loadable_weights(tiny_base_run, tmp_path, lora):
    out = tmp_path / "sft"
    flags = dict(
        base=str(tiny_base_run), data="idioms-sft", out=str(out), parallel="fsdp", lora=lora, max_steps=2,
        batch_size=2, seq_len=64, max_examples=16, eval_examples=4, eval_every=1, eval_pinyin=2,
    )  # fmt: skip
    stdout = two_processes("sft", flags)
    assert "x 2 processes (fsdp)" in stdout and "held-out pinyin exact match" in stdout
    assert json.loads((out / "sft_results.json").read_text())["pinyin"]["n"] == 2
    check_loadable(out)  # LoRA: merged weights in best/, not base.weight / lora_A
    assert (out / "adapter" / "adapter_model.safetensors").is_file() == lora


@pytest.mark.slow
def test_fsdp_lora_dpo_writes_loadable_weights(tiny_base_run, tmp_path):
    out = tmp_path / "dpo"
    flags = dict(
        base=str(tiny_base_run), out=str(out), parallel="fsdp", lora=True, max_steps=2, batch_size=2,
        seq_len=64, max_examples=16, eval_examples=4, eval_every=1,
    )  # fmt: skip
    assert "x 2 processes (fsdp)" in two_processes("dpo", flags)
    check_loadable(out)


@pytest.mark.slow
def test_fsdp_pretraining_scores_eval_tasks_at_each_validation(phrase_corpus, tmp_path):
    data, tok, _ = phrase_corpus
    out = tmp_path / "pre"
    flags = dict(
        data=[str(data)], tokenizer=str(tok), out=str(out), parallel="fsdp", max_steps=2, eval_every=1,
        batch_size=2, seq_len=16, eval_tokens=64, sample_tokens=1, sample_prompts=["你好"],
        eval_tasks=["bpc-idioms"], eval_task_limit=2, d_model=32, n_layers=1, n_heads=2, max_seq_len=16,
    )  # fmt: skip
    assert "x 2 processes (fsdp)" in two_processes("train", flags)
    vals = [r for r in read_metrics(out) if r["kind"] == "val"]
    assert [r["step"] for r in vals] == [1, 2] and all(r["task/bpc-idioms"] > 0 for r in vals)


@pytest.mark.slow
def test_fsdp_distillation_runs(phrase_corpus, tmp_path):
    data, tok_dir, vocab = phrase_corpus
    torch.manual_seed(1)
    model = Transformer(
        resolve_model(ModelConfig(vocab_size=vocab, d_model=32, n_layers=1, n_heads=2, max_seq_len=16))
    )
    teacher = save_run(tmp_path / "teacher", model, Tokenizer.load(tok_dir))
    out = tmp_path / "kd"
    flags = dict(
        data=[str(data)], teacher=str(teacher), out=str(out), parallel="fsdp", max_steps=2, eval_every=2,
        batch_size=2, seq_len=16, eval_tokens=64, sample_tokens=1, sample_prompts=["你好"], d_model=32, n_layers=1, n_heads=2,
        max_seq_len=16,
    )  # fmt: skip
    assert "x 2 processes (fsdp)" in two_processes("distill", flags)
    assert [r["step"] for r in read_metrics(out) if r["kind"] == "val"] == [2]


@pytest.mark.slow
def test_grpo_on_two_ddp_processes_runs(tiny_base_run, tiny_task, tmp_path):
    out = tmp_path / "grpo"
    flags = dict(
        base=str(tiny_base_run), task=tiny_task, out=str(out), parallel="ddp", max_steps=2, batch_size=1,
        group_size=2, max_new_tokens=4, eval_every=2,
    )  # fmt: skip
    assert "x 2 processes (ddp)" in two_processes("grpo", flags)
    assert json.loads((out / "grpo_results.json").read_text())["heldout_before"] is not None
