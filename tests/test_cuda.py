"""The CUDA paths: precision, flash attention, fused AdamW, compile, GradScaler, the batched engine, FP8.

Every test here is marked `cuda` and skipped (with the reason) on a machine without a CUDA GPU;
`pytest -m cuda` runs them on one (`python -m benchmarks.gpu` does, as its first section).
"""

from __future__ import annotations

import pytest
import torch

from qinglm.config import ModelConfig, SamplingConfig
from qinglm.errors import QingLMError
from qinglm.infer.engine import Generation, Request
from qinglm.infer.generate import generate_ids
from qinglm.model.transformer import KVCache, Transformer
from qinglm.train import train
from qinglm.train.checkpoint import latest_checkpoint
from qinglm.train.config import TrainConfig
from qinglm.train.metrics import read_metrics

HAS_CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
V = 256


def model_on_gpu(dtype: torch.dtype = torch.float32, **kw) -> Transformer:
    torch.manual_seed(0)
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
