"""LoRA: zero-init B leaves the model unchanged, only adapters train, merging is exact, PEFT's format."""

import json

import pytest
import torch
from safetensors.torch import load_file

from qinglm.config import ModelConfig
from qinglm.errors import QingLMError
from qinglm.model.hf_layout import hf_parts
from qinglm.model.lora import (
    ALL_TARGETS,
    LoRALinear,
    adapters_disabled,
    apply_lora,
    load_adapter,
    lora_layers,
    merge_lora,
    save_adapter,
    trainable_parameters,
)
from qinglm.model.transformer import Transformer

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


def model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(CFG).eval()


def trained_lora(rank: int = 4, targets=ALL_TARGETS, steps: int = 5) -> tuple[Transformer, dict]:
    """Return (model with LoRA trained a few AdamW steps, a copy of its base weights taken before)."""
    m = model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    apply_lora(m, rank=rank, alpha=8.0, targets=targets)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    m.train()
    for _ in range(steps):
        m(IDS[:, :-1], IDS[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
    return m.eval(), before


def test_zero_b_leaves_the_output_unchanged_and_only_lora_trains():
    m = model()
    want = m(IDS)
    apply_lora(m, rank=4, alpha=8.0, dropout=0.1, targets=ALL_TARGETS)
    assert torch.equal(m(IDS), want)
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    c = m.cfg
    per_layer = 4 * (c.d_model + c.n_heads * c.head_dim) + 2 * 4 * (c.d_model + c.n_kv_heads * c.head_dim)
    per_layer += 4 * (c.d_model + c.d_model) + 2 * 4 * (c.d_model + c.d_ff) + 4 * (c.d_ff + c.d_model)
    assert trainable_parameters(m) == c.n_layers * per_layer
    layer = lora_layers(m)["blocks.0.attn.qkv"]
    assert layer.scaling == 2.0 and set(layer.lora_A) == {"q_proj", "k_proj", "v_proj"}


def test_training_moves_only_adapters_and_merging_gives_the_same_logits():
    m, before = trained_lora()
    base_now = {k.replace(".base.", "."): v for k, v in m.state_dict().items() if "lora_" not in k}
    assert base_now.keys() == before.keys()
    assert all(torch.equal(base_now[k], before[k]) for k in before)  # base weights bit-identical
    assert any(p.abs().sum() > 0 for n, p in m.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        adapted = m(IDS)
        assert not torch.allclose(adapted, model()(IDS))
        merged = merge_lora(m)
        assert not lora_layers(merged) and isinstance(merged.blocks[0].attn.qkv, torch.nn.Linear)
        torch.testing.assert_close(merged(IDS), adapted, rtol=1e-5, atol=1e-5)


def test_untargeted_row_blocks_get_no_update():
    m, before = trained_lora(targets=["q_proj", "v_proj"])
    merged = merge_lora(m)
    qkv = merged.blocks[1].attn.qkv.weight
    q, k = CFG.n_heads * CFG.d_model // CFG.n_heads, CFG.n_kv_heads * CFG.d_model // CFG.n_heads
    old = before["blocks.1.attn.qkv.weight"]
    assert torch.equal(qkv[q : q + k], old[q : q + k])  # k rows untouched
    assert not torch.equal(qkv[:q], old[:q]) and not torch.equal(qkv[q + k :], old[q + k :])
    assert torch.equal(merged.blocks[1].mlp.up.weight, before["blocks.1.mlp.up.weight"])


def test_adapter_is_saved_in_peft_format_and_loads_back(tmp_path):
    m, _ = trained_lora()
    save_adapter(m, tmp_path, base="runs/base")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 4
    assert cfg["lora_alpha"] == 8.0 and cfg["target_modules"] == list(ALL_TARGETS)
    assert cfg["base_model_name_or_path"] == "runs/base"
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"
    assert tensors[key].shape == (CFG.n_kv_heads * 8, 4)
    assert tensors["base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight"].shape == (4, 32)
    assert len(tensors) == CFG.n_layers * len(ALL_TARGETS) * 2
    fresh = load_adapter(model(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS), m(IDS))


def test_bad_settings_are_user_errors(tmp_path):
    with pytest.raises(QingLMError, match="unknown LoRA target"):
        apply_lora(model(), targets=["qkv"])
    with pytest.raises(QingLMError, match="rank"):
        apply_lora(model(), rank=0)
    with pytest.raises(QingLMError, match="adapter_config.json"):
        load_adapter(model(), tmp_path)
    with pytest.raises(QingLMError, match="no LoRA layers"):
        save_adapter(model(), tmp_path)


@pytest.mark.parametrize(
    "option",
    [
        {"use_dora": True},
        {"bias": "lora_only"},
        {"bias": "all"},
        {"fan_in_fan_out": True},
        {"alpha_pattern": {"q_proj": 32}},
        {"rank_pattern": {"v_proj": 2}},
        {"layers_to_transform": [0]},
    ],
)
def test_peft_options_qinglm_does_not_implement_are_refused(tmp_path, option):
    m, _ = trained_lora()
    save_adapter(m, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, **option}))
    with pytest.raises(QingLMError, match=f"sets {next(iter(option))}="):
        load_adapter(model(), tmp_path)


def test_rslora_scales_by_alpha_over_sqrt_rank(tmp_path):
    plain, rs = apply_lora(model(), rank=4, alpha=8.0), apply_lora(model(), rank=4, alpha=8.0, rslora=True)
    assert {layer.scaling for layer in lora_layers(plain).values()} == {2.0}
    assert {layer.scaling for layer in lora_layers(rs).values()} == {4.0}
    save_adapter(rs, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_rslora"] is True
    assert {layer.scaling for layer in lora_layers(load_adapter(model(), tmp_path)).values()} == {4.0}


def test_lora_on_a_classic_family_model_is_refused():
    classic = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, family="classic"))
    with pytest.raises(QingLMError, match="GPT-2 export"):
        apply_lora(classic)


@pytest.mark.slow  # importing transformers + peft
def test_peft_loads_the_adapter_onto_the_hf_llama_layout(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    m, _ = trained_lora()
    base = model()
    c = base.cfg
    hf_cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.d_model,
        intermediate_size=c.d_ff,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads,
        head_dim=c.head_dim,
        max_position_embeddings=c.max_seq_len,
        rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta,
        tie_word_embeddings=True,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    sd = {}
    for name, t in base.state_dict().items():
        if name == "head.weight":
            continue
        for hf_name, first, end in hf_parts(name, c):
            sd[hf_name] = t[first:end] if end is not None else t
    hf.load_state_dict(sd, strict=False)
    hf.tie_weights()
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, base(IDS), rtol=1e-4, atol=1e-4)
    save_adapter(m, tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(IDS).logits, m(IDS), rtol=1e-4, atol=1e-4)


def test_lora_linear_forward_matches_its_delta_weight():
    lin = torch.nn.Linear(8, 6, bias=False)
    layer = LoRALinear(lin, [("a", 2), (None, 4)], rank=2, alpha=4.0, dropout=0.0)
    torch.nn.init.normal_(layer.lora_B["a"])
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), x @ (lin.weight + layer.delta_weight()).T)


def test_adapters_disabled_gives_the_base_model_without_a_copy_and_restores_them():
    m, _ = trained_lora()
    base_logits = model()(IDS)
    tuned = m(IDS)
    assert not torch.allclose(tuned, base_logits)
    params = [p.data_ptr() for p in m.parameters()]
    with adapters_disabled(m) as same:
        assert same is m and [p.data_ptr() for p in m.parameters()] == params
        torch.testing.assert_close(m(IDS), base_logits, rtol=0, atol=0)
    torch.testing.assert_close(m(IDS), tuned, rtol=0, atol=0)
    with pytest.raises(RuntimeError), adapters_disabled(m):
        raise RuntimeError("boom")
    torch.testing.assert_close(m(IDS), tuned, rtol=0, atol=0)


def test_sft_config_and_apply_lora_refuse_a_bad_target_with_one_message():
    from qinglm.sft.config import SFTConfig

    with pytest.raises(QingLMError) as from_config:
        SFTConfig(lora=True, lora_targets=["q_proj", "qkv"])  # parts check themselves
    with pytest.raises(QingLMError) as from_lora:
        apply_lora(model(), targets=["q_proj", "qkv"])
    assert str(from_config.value) == str(from_lora.value)
    assert str(from_lora.value).startswith("unknown LoRA target(s) qkv; choose from q_proj, k_proj")
