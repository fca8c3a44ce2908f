"""--fp8 without a GPU: refused in one line; which layers torchao would convert; checkpoints unchanged."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from qinglm.config import ModelConfig
from qinglm.errors import QingLMError
from qinglm.model.transformer import Transformer
from qinglm.train.fp8 import enable_fp8, fp8_filter, fp8_refusal


def model(**kw) -> Transformer:
    cfg = ModelConfig(vocab_size=320, d_model=64, n_layers=2, n_heads=4, max_seq_len=32, **kw)
    return Transformer(cfg)


def test_fp8_is_refused_on_the_cpu_in_one_line(tmp_path):
    assert "this run is on cpu" in fp8_refusal(torch.device("cpu"), "bf16")
    with pytest.raises(QingLMError, match="NVIDIA GPU"):
        enable_fp8(model(), torch.device("cpu"), "bf16")
    cmd = [sys.executable, "-m", "qinglm", "train", "--fp8", "--device", "cpu", "--out", str(tmp_path / "r")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "--fp8 needs an NVIDIA GPU" in lines[0], p.stderr
    assert not (tmp_path / "r").exists()  # refused before any work


@pytest.mark.parametrize("kw", [{}, {"gated_attention": True}, {"n_experts": 4, "experts_per_token": 2}])
def test_only_block_matrices_with_sides_divisible_by_16_are_chosen(kw):
    m = model(**kw)
    chosen = {name for name, mod in m.named_modules() if fp8_filter(mod, name)}
    assert chosen and all(n.startswith("blocks.") for n in chosen)
    assert not any(n.endswith((".gate", ".router")) for n in chosen)
    assert "head" not in chosen and "embed" not in chosen
    assert {"blocks.0.attn.qkv", "blocks.0.attn.out"} <= chosen
    odd = torch.nn.Linear(64, 40)  # 40 is not a multiple of 16
    assert not fp8_filter(odd, "blocks.0.attn.qkv")


def test_torchao_conversion_keeps_parameter_names_and_tensors():
    pytest.importorskip("torchao.float8")
    from qinglm.train.fp8 import convert_to_fp8

    m = model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    n = convert_to_fp8(m)
    assert n == 2 * 4  # qkv, out, up, down in each of the 2 blocks
    assert "Float8Linear" in [c.__name__ for c in type(m.blocks[0].attn.qkv).__mro__]
    assert type(m.head) is torch.nn.Linear
    after = m.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_converted_layers_also_run_eagerly_under_autocast_for_validation():
    """torchao's float8 tensor refuses autocast's casts when not compiled; validation runs eagerly."""
    pytest.importorskip("torchao.float8")
    from qinglm.train.fp8 import convert_to_fp8

    torch.manual_seed(0)
    m, ref = model(), model()
    ref.load_state_dict(m.state_dict())
    convert_to_fp8(m)
    x = torch.randint(0, 320, (2, 16))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = m(x), ref(x)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want.float()).abs().max() < 0.1 * want.abs().max()  # float8 rounding only
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(x, x).backward()
    assert m.blocks[0].attn.qkv.weight.grad.dtype == torch.float32  # master weights stay fp32
