"""A QingLM LoRA adapter loads with PEFT onto the `qinglm export hf` model and computes the same logits."""

import pytest
import torch

import qinglm
from qinglm.config import ModelConfig, resolve_model
from qinglm.export.hf import export_hf
from qinglm.model.lora import ALL_TARGETS, apply_lora, save_adapter
from qinglm.model.transformer import Transformer
from qinglm.tokenizer import train_tokenizer
from qinglm.train.checkpoint import save_run

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


VARIANTS = {
    "llama": dict(tie_embeddings=False),
    "qwen3": dict(qk_norm=True),
    "mixtral": dict(n_experts=4, experts_per_token=2),  # LoRA on attention; experts stay as they are
}


@pytest.mark.parametrize("options", list(VARIANTS.values()), ids=list(VARIANTS))
def test_peft_loads_the_qinglm_adapter_onto_the_exported_model(tmp_path, options, tiny_run):
    tok = train_tokenizer(
        [f"今天天气真不错，人工智能的未来。{i}" for i in range(100)], 300, show_progress=False
    )
    run = tiny_run(tmp_path / "run", tok, n_kv_heads=2, max_seq_len=512, **options)

    lm = qinglm.load(run, device="cpu")
    ids = torch.tensor([[2] + tok.encode("今天天气真不错，人工智能")])
    with torch.no_grad():
        without = lm.model(ids)
    model = apply_lora(lm.model, rank=4, alpha=8.0, dropout=0.0, targets=ALL_TARGETS)
    with torch.no_grad():  # B starts at zero; random B makes every adapter matrix count
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    adapter = save_adapter(model, tmp_path / "adapter", base=str(run))
    base = transformers.AutoModelForCausalLM.from_pretrained(
        export_hf(run, tmp_path / "hf"), dtype=torch.float32
    )
    with_lora = peft.PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        ours, theirs = model.eval()(ids), with_lora(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    assert (ours - without).abs().max() > 1e-2  # the adapter does change the output


def test_rslora_adapter_written_by_peft_merges_as_peft_merges_it(tmp_path):
    from qinglm.export.hf import qinglm_to_hf
    from qinglm.model.lora import load_adapter, merge_lora
    from qinglm.train.checkpoint import model_tensors

    tok = train_tokenizer([f"今天天气真不错。{i}" for i in range(100)], 300, show_progress=False)
    cfg = resolve_model(
        ModelConfig(
            vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, tie_embeddings=False
        )
    )
    torch.manual_seed(0)
    run = save_run(tmp_path / "run", Transformer(cfg), tok)
    hf_dir = export_hf(run, tmp_path / "hf")
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    lora = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=list(ALL_TARGETS))
    with_lora = peft.get_peft_model(base, lora)
    with torch.no_grad():
        for name, p in with_lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    with_lora.save_pretrained(tmp_path / "adapter")
    theirs = with_lora.merge_and_unload().state_dict()
    merged = merge_lora(load_adapter(qinglm.load(run, device="cpu").model, tmp_path / "adapter"))
    ours = qinglm_to_hf(model_tensors(merged), cfg)
    base_sd = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).state_dict()
    assert max((ours[k] - base_sd[k]).abs().max() for k in ours) > 1e-2  # the adapter changes weights
    assert max((ours[k] - theirs[k]).abs().max() for k in ours) < 1e-6
