"""The CUDA paths: precision, flash attention, fused AdamW, compile, GradScaler, the batched engine, FP8,
and the post-training stages (DPO log-probabilities, GRPO rollouts, the distillation loss, the four commands).

Every test here is marked `cuda` and skipped (with the reason) on a machine without a CUDA GPU;
`pytest -m cuda` runs them on one (`python -m benchmarks.gpu` does, as its first section).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import CHAT
from test_distill import STUDENT, teacher, train_flags  # noqa: F401  (teacher is a fixture)
from test_dpo_run import flags as dpo_flags
from test_dpo_run import pairs  # noqa: F401  (a fixture)
from test_grpo import _grpo_flags
from test_sft import _jsonl

from qinglm.cli import main
from qinglm.config import ModelConfig, SamplingConfig
from qinglm.device import autocast
from qinglm.errors import QingLMError
from qinglm.infer.engine import Generation, Request
from qinglm.infer.generate import generate_ids
from qinglm.infer.rollout import rollout
from qinglm.model.transformer import IGNORE_INDEX, KVCache, Transformer
from qinglm.post.distill import kd_loss
from qinglm.post.dpo_loss import dpo_loss, pair_logps
from qinglm.train import train
from qinglm.train.checkpoint import latest_checkpoint
from qinglm.train.config import TrainConfig
from qinglm.train.driver import cli_flags
from qinglm.train.metrics import read_metrics
from qinglm.train.session import step_seed

HAS_CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
V = 256


def model_on_gpu(dtype: torch.dtype = torch.float32, seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=V, d_model=128, n_layers=2, n_heads=4, max_seq_len=128, dropout=0.0, **kw)
    return Transformer(cfg).to("cuda", dtype).eval()


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize(
    "kw", [{}, {"n_kv_heads": 2}, {"family": "classic"}], ids=["modern", "gqa", "classic"]
)
@torch.no_grad()
def test_future_tokens_never_change_earlier_logits_on_gpu(dt, kw):
    model = model_on_gpu(DTYPES[dt], **kw)
    idx = torch.randint(0, V, (2, 96), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    base = model(idx)
    for t in (1, 40, 95):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 5) % V
        out = model(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-2)
        assert (out[:, t:] - base[:, t:]).abs().max() > 1e-2  # the change is seen from t on


@pytest.mark.parametrize("dt", DTYPES)
@torch.no_grad()
def test_kv_cache_decoding_equals_full_recomputation_on_gpu(dt):
    model = model_on_gpu(DTYPES[dt], n_kv_heads=2)
    idx = torch.randint(0, V, (3, 40), device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    full = model(idx).float()
    cache = KVCache(model.cfg, batch_size=3, max_len=64, device=torch.device("cuda"), dtype=DTYPES[dt])
    pieces = [model(idx[:, :16], cache=cache, start=0)]
    for t in range(16, 40):
        pieces.append(model(idx[:, t : t + 1], cache=cache, start=t))
    got = torch.cat(pieces, dim=1).float()
    # half precision: the cached path multiplies in other shapes, so allow rounding, not a different model
    assert (got - full).abs().max() < 0.05 * full.abs().max()
    assert (got.argmax(-1) == full.argmax(-1)).float().mean() > 0.95


def test_training_attention_runs_on_the_flash_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = model_on_gpu(torch.bfloat16).train()
    idx = torch.randint(0, V, (4, 128), device="cuda")
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # raises if our call cannot take the flash kernel
        loss = model(idx, idx)
        loss.backward()
    assert torch.isfinite(loss)


def tiny_train_configs(vocab: int, **kw) -> tuple[ModelConfig, TrainConfig]:
    model = ModelConfig(vocab_size=vocab, d_model=64, n_layers=2, n_heads=2, max_seq_len=32, dropout=0.0)
    t = dict(max_steps=30, batch_size=8, seq_len=32, lr=3e-3, warmup_steps=3, eval_every=10, eval_tokens=256)
    t.update(log_every=10, save_every=10, device="cuda", sample_prompts=[], **kw)
    return model, TrainConfig(**t)


@pytest.mark.parametrize("dt", ["bf16", "fp16"])
def test_amp_training_learns_on_gpu_with_the_scaler_for_fp16(phrase_corpus, tmp_path, dt, monkeypatch):
    import qinglm.train.session as session

    data, _, vocab = phrase_corpus
    seen = {}
    real_setup = session.setup_run

    def spy(*a, **k):
        r = real_setup(*a, **k)
        seen["scaler"], seen["dtype"] = r.scaler, r.dtype
        seen["fused"] = [g.get("fused") for g in r.optimizer.param_groups]
        return r

    monkeypatch.setattr("qinglm.train.loop.setup_run", spy)
    m, t = tiny_train_configs(vocab, dtype=dt, compile=False)
    train(m, t, tmp_path / "run", data, log=lambda _: None)
    assert seen["dtype"] == dt
    assert (seen["scaler"] is not None) == (dt == "fp16")
    assert all(seen["fused"])  # fused AdamW on CUDA
    losses = [r["loss"] for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert losses[-1] < losses[0] - 0.5


def test_compiled_training_matches_eager_and_resumes(phrase_corpus, tmp_path):
    data, _, vocab = phrase_corpus
    runs = {}
    for name, comp in (("eager", False), ("compiled", True)):
        m, t = tiny_train_configs(vocab, dtype="bf16", compile=comp)
        runs[name] = train(m, t, tmp_path / name, data, log=lambda _: None)
    assert abs(runs["eager"]["train_loss"] - runs["compiled"]["train_loss"]) < 0.1
    m, t = tiny_train_configs(vocab, dtype="bf16", compile=True, max_steps=40, resume=True)
    assert train(m, t, tmp_path / "compiled", data, log=lambda _: None)["step"] == 40
    assert latest_checkpoint(tmp_path / "compiled").name.endswith("40")


@torch.no_grad()
def test_batched_engine_equals_one_at_a_time_on_gpu():
    model = model_on_gpu(torch.float32, n_kv_heads=2)
    prompts = [[2, 17, 42, 5, 88, 23, 9, 61, 30], [2, 9], [2, 31, 64, 1, 77], [2, 50, 50, 50]]
    s = SamplingConfig(max_new_tokens=12, temperature=0.0, repetition_penalty=1.0, stop_at_eos=False)
    rows = [[] for _ in prompts]
    for events in Generation(model, [Request(p, s) for p in prompts]):
        for ev in events:
            rows[ev.row] += ev.ids
    for p, got in zip(prompts, rows):
        assert got == list(generate_ids(model, p, s, eos_id=3))


@pytest.mark.parametrize("compile", [False, True])
@torch.no_grad()
def test_speculative_decoding_gives_the_plain_tokens_on_gpu(compile):
    """Drafts verified by the fast step with T tokens a row (eager, beside the CUDA-graph step when compiled)."""
    model = model_on_gpu(torch.float32, n_kv_heads=2)
    prompt = [2, 17, 42, 5, 17, 42, 5, 17, 42]
    out = {}
    for k in (0, 6):
        s = SamplingConfig(max_new_tokens=40, temperature=0.0, stop_at_eos=False, speculate=k)
        gen = Generation(model, [Request(prompt, s)], compile=compile)
        out[k] = [t for events in gen for ev in events for t in ev.ids]
        spec = gen.engine.spec
    assert out[6] == out[0] and len(out[0]) == 40 and spec.accepted > 0


def test_int8_quantization_is_refused_on_gpu():
    from qinglm.model.quantize import quantize

    with pytest.raises(QingLMError, match="CPU"):
        quantize(model_on_gpu(), "int8")


def test_fp8_training_follows_bf16(phrase_corpus, tmp_path):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 needs compute capability 8.9+")
    pytest.importorskip("torchao")
    data, _, vocab = phrase_corpus
    losses = {}
    for fp8 in (False, True):
        m, t = tiny_train_configs(vocab, dtype="bf16", compile=True, fp8=fp8, max_steps=40)
        out = tmp_path / f"fp8-{fp8}"
        train(m, t, out, data, log=lambda _: None)
        losses[fp8] = [r["loss"] for r in read_metrics(out) if r["kind"] == "train"]
    assert abs(losses[True][-1] - losses[False][-1]) < 0.15 * losses[False][-1]
    # the checkpoint holds plain tensors under the usual names
    from safetensors.torch import load_file

    a = load_file(latest_checkpoint(tmp_path / "fp8-True") / "model.safetensors")
    b = load_file(latest_checkpoint(tmp_path / "fp8-False") / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype for k in a)


# ---------------------------------------------------------------------------- post-training stages


def masked_batch(rows: int = 4, length: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """Return CPU (x, y) of random ids whose first 16 targets are IGNORE_INDEX (a prompt)."""
    ids = torch.randint(0, V, (rows, length + 1), generator=torch.Generator().manual_seed(3))
    y = ids[:, 1:].clone()
    y[:, :16] = IGNORE_INDEX
    return ids[:, :-1], y


@torch.no_grad()
def logits_of(models: list[Transformer], x: torch.Tensor, device: str, dtype: str) -> list[torch.Tensor]:
    """Return each model's logits of x on device under dtype's autocast (fp32 weights, as in training)."""
    with autocast(torch.device(device), dtype):
        return [copy.deepcopy(m).to(device)(x.to(device)) for m in models]


def test_dpo_log_probs_under_bf16_autocast_follow_fp32_on_the_cpu():
    models, (x, y) = [model_on_gpu(), model_on_gpu(seed=1)], masked_batch()  # policy, reference
    got = [pair_logps(lg, y.cuda()) for lg in logits_of(models, x, "cuda", "bf16")]
    want = [pair_logps(lg, y) for lg in logits_of(models, x, "cpu", "fp32")]
    # Sums of 32 log-probs near -180. CPU bf16 autocast is off by 2e-5 relative, the loss by 4e-4.
    for g, w in zip(got, want):
        assert g[0].dtype == torch.float32
        torch.testing.assert_close(torch.cat(g).cpu(), torch.cat(w), rtol=1e-3, atol=0.05)
    loss_got, loss_want = (dpo_loss(*a, *b, beta=0.1)[0].item() for a, b in (got, want))
    assert abs(loss_got - loss_want) < 5e-3


def test_distillation_kl_under_bf16_autocast_follows_fp32_on_the_cpu():
    models, (x, y) = [model_on_gpu(), model_on_gpu(seed=1)], masked_batch()  # student, teacher
    got = kd_loss(*logits_of(models, x, "cuda", "bf16"), y.cuda(), 2.0)
    want = kd_loss(*logits_of(models, x, "cpu", "fp32"), y, 2.0)
    assert got.dtype == torch.float32 and want > 0.01  # CPU bf16 autocast: 7e-5 relative
    assert got.item() == pytest.approx(want.item(), rel=1e-2)


@torch.no_grad()
def test_grpo_rollouts_on_gpu_repeat_with_the_same_step_seed(chat_tok, tiny_base_run):
    from qinglm.sft.stage import load_base

    model = load_base(tiny_base_run, torch.device("cuda")).eval()
    sampling = SamplingConfig(
        max_new_tokens=12, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0
    )
    runs = []
    for step in (5, 5, 6):
        torch.manual_seed(step_seed(0, 0, step))  # what the engine does before every step
        with autocast(torch.device("cuda"), "bf16"):  # as in the training step
            runs.append(rollout(model, chat_tok, [CHAT[:2], CHAT[:4]], 4, sampling))
    a, b, c = runs
    assert a.ids.is_cuda and a.ids.shape[0] == 8
    assert torch.equal(a.ids, b.ids) and a.texts == b.texts and a.completion_mask.equal(b.completion_mask)
    assert not torch.equal(a.ids, c.ids)  # another step, other replies


@pytest.mark.parametrize("stage", ["sft", "dpo", "grpo", "distill"])
def test_post_training_commands_run_compiled_in_bf16_on_gpu(stage, request, tiny_base_run, tmp_path, capsys):
    gpu = dict(device="cuda", dtype="bf16", compile=True, max_steps=4, log_every=1, eval_every=1000)
    out = tmp_path / stage
    if stage == "sft":
        data = _jsonl(tmp_path / "chat.jsonl")
        argv = cli_flags(dict(base=str(tiny_base_run), data=str(data), out=str(out), batch_size=4, **gpu))
    elif stage == "dpo":
        argv = cli_flags(dpo_flags(tiny_base_run, request.getfixturevalue("pairs"), out, **gpu))
    elif stage == "grpo":
        argv = cli_flags(_grpo_flags(tiny_base_run, request.getfixturevalue("tiny_task"), out, **gpu))
    else:
        fields = train_flags(request.getfixturevalue("phrase_corpus"), out, **gpu)
        fields["teacher"] = str(request.getfixturevalue("teacher"))
        fields.pop("tokenizer")  # the teacher's
        argv = cli_flags(fields) + cli_flags(STUDENT)
    assert main([stage, *argv]) == 0
    assert "device: cuda | dtype bf16 | compile on" in capsys.readouterr().out
    losses = [r["loss"] for r in read_metrics(out) if r["kind"] == "train"]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
