"""`qinglm dpo` runs: TRL's metrics, held-out figures, LoRA, exact resume after SIGKILL, 2 processes,
and DPO runs as the --base / --init-from of later runs."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import qinglm
from qinglm import run_dir as run_dirs
from qinglm.config import ModelConfig, resolve_model
from qinglm.errors import QingLMError
from qinglm.model.transformer import Transformer
from qinglm.post.config import DPOConfig
from qinglm.post.dpo import run_dpo
from qinglm.sft.config import SFTConfig
from qinglm.sft.train import run_sft
from qinglm.tokenizer import Tokenizer
from qinglm.train.checkpoint import inference_weights, latest_checkpoint, save_run
from qinglm.train.driver import cli_flags
from qinglm.train.metrics import read_metrics

TRL_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """Return a JSONL file of 42 preference pairs in both forms (40 train: 5 whole global batches of 8)."""
    good, bad = (
        ["比喻做了多余的事。", "huà shé tiān zú", "今天天气很好。", "多此一举"],
        ["画蛇", "tiān", "很好", "添足"],
    )
    lines = []
    for i in range(42):
        q, c, r = f"“画蛇添足”是什么意思？{i % 5}", good[i % 4], bad[(i + 1) % 4]
        if i % 2:
            lines.append({"prompt": q, "chosen": c, "rejected": r})
        else:
            user = {"role": "user", "content": q}
            lines.append(
                {
                    "chosen": [user, {"role": "assistant", "content": c}],
                    "rejected": [user, {"role": "assistant", "content": r}],
                }
            )
    path = tmp_path_factory.mktemp("dpo-data") / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n", encoding="utf-8")
    return path


def flags(base: Path, data: Path, out: Path, **kw) -> dict:
    """Return the fields of a tiny deterministic CPU DPO run (kw overrides)."""
    return {
        "base": str(base), "data": str(data), "out": str(out), "max_steps": 12, "batch_size": 4,
        "lr": 1e-3, "warmup_steps": 1, "eval_every": 100, "log_every": 1, "save_every": 4,
        "device": "cpu", "dtype": "fp32", "compile": False, "num_threads": 1, **kw,
    }  # fmt: skip


def command(**fields) -> list[str]:
    return [sys.executable, "-m", "qinglm", "dpo", *cli_flags(fields)]


def train_records(run: Path) -> list[dict]:
    return [r for r in read_metrics(run) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def lora_run(tiny_base_run, pairs, tmp_path_factory) -> Path:
    """Return a finished LoRA DPO run of the tiny base (read-only)."""
    out = tmp_path_factory.mktemp("dpo") / "lora"
    run_dpo(
        DPOConfig(**flags(tiny_base_run, pairs, out, lora=True, lr=1e-2, max_steps=8)), log=lambda _: None
    )
    return out


def test_full_dpo_logs_trl_metrics_learns_the_preferences_and_writes_a_run(tiny_base_run, pairs, tmp_path):
    cfg = DPOConfig(**flags(tiny_base_run, pairs, tmp_path / "dpo", max_steps=30, eval_every=15))
    lines: list[str] = []
    res = run_dpo(cfg, log=lines.append)
    records = train_records(tmp_path / "dpo")
    assert all(set(TRL_METRICS) <= set(r) for r in records) and len(records) == 30
    first = records[0]  # before the first update the policy is the reference, dropout off: loss = log 2
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["rewards/margins"] == 0.0
    assert first["rewards/chosen"] == first["rewards/rejected"] == 0.0
    last = records[-1]
    assert last["loss"] < 0.6 and last["rewards/accuracies"] == 1.0 and last["rewards/margins"] > 0
    assert last["logps/chosen"] > first["logps/chosen"]
    vals = [r for r in read_metrics(tmp_path / "dpo") if r["kind"] == "val"]
    assert [v["step"] for v in vals] == [15, 30] and vals[-1]["val_loss"] < math.log(2)
    assert res["held_out_pairs"] == 2 and res["rewards/accuracies"] == vals[-1]["val_rewards/accuracies"]
    assert any("held-out pairs: DPO loss" in line for line in lines)
    saved = run_dirs.read_config(tmp_path / "dpo")
    assert saved["kind"] == "dpo" and saved["dpo"]["beta"] == 0.1 and saved["base"] == str(tiny_base_run)
    assert json.loads((tmp_path / "dpo" / "dpo_results.json").read_text())["pairs"] == 40
    qinglm.load(tmp_path / "dpo", device="cpu").chat([{"role": "user", "content": "你好"}], max_new_tokens=3)
    with pytest.raises(QingLMError, match="already holds a run"):
        run_dpo(cfg, log=lambda _: None)


def test_lora_dpo_writes_an_adapter_and_merged_weights(lora_run, tiny_base_run):
    records = train_records(lora_run)
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # B = 0: policy = reference
    assert records[-1]["rewards/margins"] > 0
    assert (lora_run / "adapter" / "adapter_model.safetensors").is_file()
    best = load_file(lora_run / "best" / "model.safetensors")
    base = load_file(inference_weights(tiny_base_run))
    assert best.keys() == base.keys() and not all(torch.equal(best[k], base[k]) for k in base)
    assert json.loads((lora_run / "dpo_results.json").read_text())["trainable_params"] < 45_000


def test_a_dpo_run_is_the_base_of_sft_dpo_and_init_from(lora_run, pairs, tmp_path):
    one = dict(max_steps=1, batch_size=2, device="cpu", compile=False, num_threads=1)
    chat = tmp_path / "chat.jsonl"
    line = {"conversations": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "好的"}]}
    chat.write_text("\n".join([json.dumps(line, ensure_ascii=False)] * 10), encoding="utf-8")
    run_sft(
        SFTConfig(base=str(lora_run), data=str(chat), out=str(tmp_path / "sft"), **one), log=lambda _: None
    )
    run_dpo(
        DPOConfig(base=str(lora_run), data=str(pairs), out=str(tmp_path / "dpo2"), **one), log=lambda _: None
    )
    assert run_dirs.read_config(tmp_path / "dpo2")["base"] == str(lora_run)
    text = tmp_path / "t.txt"
    text.write_text("".join(f"今天天气很好。画蛇添足，多此一举{i}。\n" for i in range(200)), encoding="utf-8")
    out = tmp_path / "pre"
    proc = subprocess.run(
        [sys.executable, "-m", "qinglm", "train", "--data", str(text), "--init-from", str(lora_run), "--out",
         str(out), "--max-steps", "1", "--seq-len", "32", "--batch-size", "2", "--device", "cpu",
         "--no-compile", "--sample-tokens", "2", "--warmup-steps", "1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"starting from the weights of {lora_run}" in proc.stdout


def test_ref_gives_another_frozen_reference_with_the_same_tokenizer(
    lora_run, tiny_base_run, pairs, phrase_corpus, tmp_path
):
    # the DPO run as the policy, its own base as the reference: they differ, so step 1 is not at log 2
    run_dpo(
        DPOConfig(**flags(lora_run, pairs, tmp_path / "r", ref=str(tiny_base_run), max_steps=1)), log=print
    )
    first = train_records(tmp_path / "r")[0]
    assert first["rewards/margins"] != 0.0 and first["loss"] != pytest.approx(math.log(2), abs=1e-4)
    assert run_dirs.read_config(tmp_path / "r")["dpo"]["ref"] == str(tiny_base_run)
    tok = Tokenizer.load(phrase_corpus[1])
    cfg = resolve_model(
        ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2, max_seq_len=64)
    )
    foreign = save_run(tmp_path / "foreign", Transformer(cfg), tok)
    with pytest.raises(QingLMError, match="another tokenizer"):
        run_dpo(DPOConfig(**flags(tiny_base_run, pairs, tmp_path / "x", ref=str(foreign))), log=print)


@pytest.mark.slow
def test_sigkill_during_lora_dpo_then_resume_is_bit_identical(tiny_base_run, pairs, tmp_path, sigkill_resume):
    # LoRA dropout: the resumed run must also draw the same dropout masks
    kw = dict(lora=True, lora_dropout=0.1, max_steps=24, save_every=2, num_threads=2, resume=True)
    ref = tmp_path / "reference"
    subprocess.run(command(**flags(tiny_base_run, pairs, ref, **kw)), check=True, capture_output=True)
    run = tmp_path / "killed"
    kills = sigkill_resume(command(**flags(tiny_base_run, pairs, run, **kw)), ref, run, 24, 3, seed=20261127)
    print("\n" + "\n".join(kills))


@pytest.mark.slow
def test_two_processes_follow_the_loss_of_one_with_the_same_global_batch(tiny_base_run, pairs, tmp_path):
    one = flags(tiny_base_run, pairs, tmp_path / "one", batch_size=4, grad_accum=2)
    run_dpo(DPOConfig(**one), log=lambda _: None)
    two = flags(tiny_base_run, pairs, tmp_path / "two", batch_size=2, grad_accum=2, nproc=2)
    p = subprocess.run(command(**two), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "x 2 processes (ddp)" in p.stdout
    a, b = train_records(tmp_path / "one"), train_records(tmp_path / "two")
    assert len(a) == len(b) == 12 and a[-1]["loss"] < a[0]["loss"]
    for k in ("loss", *TRL_METRICS):
        assert [r[k] for r in b] == pytest.approx([r[k] for r in a], rel=1e-4, abs=1e-6), k
    wa, wb = (
        load_file(latest_checkpoint(d) / "model.safetensors") for d in (tmp_path / "one", tmp_path / "two")
    )
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_moe_dpo_adds_the_routers_load_balancing_loss(chat_tok, pairs, tmp_path, monkeypatch, lora):
    # A MoE base: before the first update the DPO loss is log 2, so what the step adds is the router
    # losses of the policy's forward (with LoRA the reference is the same model: not its forward's).
    from qinglm.post.dpo import DPOStage

    torch.manual_seed(0)
    cfg = resolve_model(
        ModelConfig(
            vocab_size=chat_tok.vocab_size, d_model=32, n_layers=2, n_heads=2, max_seq_len=64, n_experts=4,
            experts_per_token=2, moe_z_coef=1e-3,
        )
    )  # fmt: skip
    base = save_run(tmp_path / "moe", Transformer(cfg), chat_tok)
    seen: list[tuple[float, float]] = []
    loss = DPOStage.loss

    def recorded(self, forward, model, batch):
        out = loss(self, forward, model, batch)
        model.train()
        with torch.no_grad():  # the policy's forward again: its router losses
            model(batch[0])
        seen.append((out.loss.item(), model.with_router_losses(torch.zeros(())).item()))
        return out

    monkeypatch.setattr(DPOStage, "loss", recorded)
    run_dpo(DPOConfig(**flags(base, pairs, tmp_path / "dpo", max_steps=1, lora=lora)), log=lambda _: None)
    got, router = seen[0]
    assert router > 0.01  # about moe_aux_coef per MoE layer
    assert got == pytest.approx(math.log(2) + router, abs=1e-6)
    assert train_records(tmp_path / "dpo")[0]["loss"] == pytest.approx(got, abs=1e-6)


def test_lora_dropout_is_off_in_the_dpo_policy_so_its_log_ratios_are_exact(tiny_base_run, pairs, tmp_path):
    from qinglm.post.dpo import DPOStage, resolve_dpo
    from qinglm.train.distributed import Dist
    from qinglm.train.stage import StageContext

    cfg = resolve_dpo(
        DPOConfig(**flags(tiny_base_run, pairs, tmp_path / "d", lora=True, lora_dropout=0.5)), 64
    )
    stage = DPOStage(cfg, log=lambda _: None)
    stage.bind(StageContext(torch.device("cpu"), "fp32", Dist(), tmp_path, lambda _: None))
    policy = stage.build_model().train()
    assert not [m for m in policy.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    with torch.no_grad():  # adapters that have learned something: LoRA's dropout would now show
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_()
    x = torch.randint(0, policy.cfg.vocab_size, (2, 8))
    torch.manual_seed(0)
    a = policy(x)
    torch.manual_seed(1)
    assert torch.equal(a, policy(x))  # in training mode, as each step runs it
