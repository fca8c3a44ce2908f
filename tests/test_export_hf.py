"""`qinglm export hf` / `import hf`: transformers loads the export and computes what QingLM computes."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import qinglm
from qinglm.cli import main
from qinglm.config import ModelConfig, SamplingConfig
from qinglm.errors import QingLMError
from qinglm.export.hf import export_hf, import_hf, save_hf_tokenizer
from qinglm.export.hf_config import hf_model_type, same_function
from qinglm.infer.chat import encode_chat, render_chat
from qinglm.infer.generate import generate_ids
from qinglm.infer.text import encode_prompt
from qinglm.tokenizer import train_tokenizer

transformers = pytest.importorskip("transformers")

LINES = [
    "今天天气真不错，我们一起去公园散步吧。",
    "人工智能的未来充满了希望和挑战。",
    "中国经济稳步增长，市场信心持续恢复。",
    "春天来了，花儿都开了。",
    "He said: learning makes people progress, 2024.",
]
PROMPTS = ["今天天气", "人工智能的未来", "Hello, 中国 2024!"]
BASE = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
CLASSIC = dict(family="classic", n_kv_heads=4)  # sinusoidal positions, LayerNorm, GELU, biases, untied
# (id, model options, the HF architecture they export as)
VARIANTS = [
    ("llama-gqa-tied", {}, "LlamaForCausalLM"),
    ("llama-untied-bias", dict(tie_embeddings=False, bias=True), "LlamaForCausalLM"),
    ("qwen3-qknorm", dict(qk_norm=True, tie_embeddings=False), "Qwen3ForCausalLM"),
    ("mixtral", dict(n_experts=4, experts_per_token=2), "MixtralForCausalLM"),
    (
        "qwen2moe",
        dict(n_experts=4, experts_per_token=2, shared_experts=2, moe_every=2),
        "Qwen2MoeForCausalLM",
    ),
    ("qwen3moe", dict(n_experts=4, experts_per_token=2, qk_norm=True, moe_every=2), "Qwen3MoeForCausalLM"),
    ("gpt2-learned-tied", dict(CLASSIC, pos_encoding="learned", tie_embeddings=True), "GPT2LMHeadModel"),
    ("gpt2-sinusoidal", CLASSIC, "GPT2LMHeadModel"),
]
EXACT = [v for v in VARIANTS if v[0] != "gpt2-sinusoidal"]  # export -> import gives the same weights


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([f"{LINES[i % 5]}{i}" for i in range(200)], 400, show_progress=False)


@pytest.fixture(scope="module")
def make_run(perturbed_run):
    """Return make(run_dir, tokenizer, **options): a perturbed_run of BASE + options."""
    return lambda run_dir, tokenizer, **options: perturbed_run(run_dir, tokenizer, **{**BASE, **options})


def qinglm_greedy(lm, prompt, n):
    cfg = SamplingConfig(max_new_tokens=n, temperature=0, repetition_penalty=1.0)
    ids = encode_prompt(lm.tokenizer, prompt)
    return ids + list(generate_ids(lm.model, ids, cfg, eos_id=lm.tokenizer.eos_id))


@pytest.mark.parametrize("options,arch", [v[1:] for v in VARIANTS], ids=[v[0] for v in VARIANTS])
def test_transformers_computes_the_same_logits_and_greedy_tokens(
    tmp_path, tokenizer, options, arch, make_run
):
    run = make_run(tmp_path / "run", tokenizer, **options)
    out = export_hf(run, tmp_path / "hf")
    lm = qinglm.load(run, device="cpu")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert type(hf).__name__ == arch
    for prompt in PROMPTS:
        ids = hf_tok(prompt, return_tensors="pt")["input_ids"]
        assert ids[0].tolist() == encode_prompt(lm.tokenizer, prompt)  # [BOS] + tokens, as QingLM trains
        with torch.no_grad():
            torch.testing.assert_close(hf(ids).logits, lm.model(ids), rtol=0, atol=1e-4)
    with torch.no_grad():  # greedy decoding with transformers' KV cache picks QingLM's tokens
        got = hf.generate(ids, max_new_tokens=16, do_sample=False, repetition_penalty=1.0, eos_token_id=3)
    ours, theirs = qinglm_greedy(lm, PROMPTS[-1], 16), got[0].tolist()
    assert len(ours) > ids.shape[1] + 8  # it generated, not stopped at once
    assert theirs in (ours, ours + [3])  # transformers keeps the [EOS] it stopped at; QingLM drops it


def test_generation_config_carries_qinglms_default_sampling(tmp_path, tokenizer, make_run):
    run = make_run(tmp_path / "run", tokenizer)
    out = export_hf(run, tmp_path / "hf")
    gen = transformers.GenerationConfig.from_pretrained(out)
    d = SamplingConfig()  # what `qinglm generate` and LM.generate default to
    assert gen.do_sample is True and d.temperature > 0
    assert (gen.temperature, gen.top_k, gen.top_p) == (d.temperature, d.top_k, d.top_p)
    assert (gen.repetition_penalty, gen.max_new_tokens) == (d.repetition_penalty, d.max_new_tokens)
    # Greedy under the saved config (its repetition penalty included) picks QingLM's tokens.
    lm = qinglm.load(run, device="cpu")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = encode_prompt(lm.tokenizer, PROMPTS[-1])
    cfg = SamplingConfig(max_new_tokens=24, temperature=0, stop_at_eos=False)
    ours = list(generate_ids(lm.model, ids, cfg, eos_id=None))
    with torch.no_grad():
        got = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24, eos_token_id=None)
    assert got[0, len(ids) :].tolist() == ours


def test_export_files_and_the_tokenizer_transformers_reads(tmp_path, tokenizer, make_run):
    run = make_run(tmp_path / "run", tokenizer, rope_theta=50_000.0)
    out = export_hf(run, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 50_000.0
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 8)
    weights = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in weights and "model.embed_tokens.weight" in weights
    assert transformers.AutoConfig.from_pretrained(out).rope_parameters["rope_theta"] == 50_000.0
    gen = transformers.GenerationConfig.from_pretrained(out)
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (2, [3, 5], 0)

    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    template = (out / "chat_template.jinja").read_text()
    assert tok_config["chat_template"] == template
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token) == ("[BOS]", "[EOS]", "[PAD]")
    text = "他说：“学习使人进步。” Hello 2024"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text)
    assert hf_tok.decode(hf_tok(text)["input_ids"], skip_special_tokens=True) == text
    messages = [
        {"role": "system", "content": "你是助手。"},
        {"role": "user", "content": "今天天气怎么样？"},
        {"role": "assistant", "content": "很好。"},
        {"role": "user", "content": "谢谢"},
    ]
    for add in (False, True):
        rendered = render_chat(messages, add_generation_prompt=add)
        assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add) == rendered
        ids = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add, return_dict=True)
        assert ids["input_ids"] == encode_chat(tokenizer, messages, add).ids  # one [BOS], from the template
    # tools, a tool call, its result and thinking: the exported template gives QingLM's ids
    tools = [{"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}]
    call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "1+1"}}}
    messages[2:3] = [
        {"role": "assistant", "content": "", "reasoning_content": "算一下", "tool_calls": [call]},
        {"role": "tool", "content": "2"},
        {"role": "assistant", "content": "是 2。"},
    ]
    for thinking in (False, True):
        ids = hf_tok.apply_chat_template(
            messages, tools=tools, enable_thinking=thinking, add_generation_prompt=True, return_dict=True
        )
        assert ids["input_ids"] == encode_chat(tokenizer, messages, True, tools=tools, thinking=thinking).ids


@pytest.mark.parametrize("options", [v[1] for v in EXACT], ids=[v[0] for v in EXACT])
def test_export_then_import_gives_bit_identical_weights(tmp_path, tokenizer, options, make_run):
    run = make_run(tmp_path / "run", tokenizer, **options)
    back = import_hf(export_hf(run, tmp_path / "hf"), tmp_path / "back")
    before = load_file(run / "best" / "model.safetensors")
    after = load_file(back / "best" / "model.safetensors")
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    a, b = qinglm.load(run, device="cpu"), qinglm.load(back, device="cpu")
    assert same_function(a.config, b.config)
    assert a.tokenizer.fingerprint() == b.tokenizer.fingerprint()


def test_sinusoidal_positions_come_back_as_the_same_function(tmp_path, tokenizer, make_run):
    run = make_run(tmp_path / "run", tokenizer, **CLASSIC)
    back = qinglm.load(import_hf(export_hf(run, tmp_path / "hf"), tmp_path / "back"), device="cpu")
    assert back.config.pos_encoding == "learned"  # GPT-2 keeps the table in wpe
    ids = torch.tensor([[2, 10, 300, 45, 7, 399, 12, 13]])
    with torch.no_grad():
        torch.testing.assert_close(
            back.model(ids), qinglm.load(run, device="cpu").model(ids), rtol=0, atol=1e-5
        )


HF_CHECKPOINTS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=8)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
}


@pytest.mark.parametrize("kind", list(HF_CHECKPOINTS))
def test_import_a_checkpoint_saved_by_transformers(tmp_path, tokenizer, kind):
    config_class, model_class, extra = HF_CHECKPOINTS[kind]
    cfg = getattr(transformers, config_class)(
        vocab_size=tokenizer.vocab_size,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=20_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        **extra,
    )
    torch.manual_seed(1)
    hf = getattr(transformers, model_class)(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
    hf.save_pretrained(tmp_path / "hf")
    save_hf_tokenizer(tokenizer, tmp_path / "hf", 64, "{{ bos_token }}")
    lm = qinglm.load(import_hf(tmp_path / "hf", tmp_path / "run"), device="cpu")
    assert (lm.config.d_model, lm.config.n_kv_heads, lm.config.rope_theta) == (48, 2, 20_000.0)
    ids = torch.tensor([[2, 10, 300, 45, 7, 399], [2, 5, 4, 100, 200, 3]])
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids), hf(ids).logits, rtol=0, atol=1e-4)


REFUSED = [
    (dict(family="classic"), "no GQA"),
    (dict(CLASSIC, tie_embeddings=True), "untied head"),
    (dict(pos_encoding="learned"), "mixes the families"),
    (dict(CLASSIC, pos_encoding="rope"), "mixes the families"),
    (dict(gated_attention=True), "gated attention"),
    (dict(n_experts=4, router="sigmoid"), "sigmoid router"),
    (dict(n_experts=4, moe_every=2), "Mixtral has MoE in every layer"),
    (dict(n_experts=4, shared_experts=1, qk_norm=True), "QK-norm and a shared expert"),
    (dict(qk_norm=True, bias=True), "no MLP biases"),
]


@pytest.mark.parametrize("options,reason", REFUSED, ids=[r[1] for r in REFUSED])
def test_models_no_hf_architecture_reproduces_are_refused(options, reason):
    with pytest.raises(QingLMError, match=reason):
        hf_model_type(ModelConfig(vocab_size=300, **{**BASE, **options}))


def test_cli_export_and_import_and_their_errors(tmp_path, tokenizer, capsys, make_run):
    run = make_run(tmp_path / "run", tokenizer)
    assert main(["export", "hf", str(run), str(tmp_path / "hf")]) == 0
    assert main(["import", "hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert qinglm.load(tmp_path / "back").generate("今天", max_new_tokens=4, temperature=0) == qinglm.load(
        run
    ).generate("今天", max_new_tokens=4, temperature=0)

    classic = make_run(tmp_path / "classic", tokenizer, family="classic", tie_embeddings=True)
    assert main(["export", "hf", str(classic), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qinglm: error: cannot export to transformers") and err.count("\n") == 1
    assert not (tmp_path / "x" / "model.safetensors").exists()
    assert main(["import", "hf", str(run), str(tmp_path / "y")]) == 2  # a QingLM run is not an HF folder
    assert "no model_type" in capsys.readouterr().err
    assert main(["export", "hf", str(run), str(run)]) == 2  # never over a run
    assert main(["import", "hf", str(tmp_path / "hf"), str(run)]) == 2
    assert capsys.readouterr().err.count("qinglm: error:") == 2
    assert qinglm.load(run).config.d_model == 32


def test_import_refuses_what_qinglm_cannot_represent(tmp_path, tokenizer, make_run):
    run = make_run(tmp_path / "run", tokenizer, n_experts=4, shared_experts=1)
    out = export_hf(run, tmp_path / "hf")
    weights = load_file(out / "model.safetensors")
    gated = dict(weights)
    gated["model.layers.0.mlp.shared_expert_gate.weight"] = torch.ones(1, 32)
    save_file(gated, out / "model.safetensors")
    with pytest.raises(QingLMError, match="shared-expert gate"):
        import_hf(out, tmp_path / "a")
    biased = dict(weights)
    biased["model.layers.1.self_attn.q_proj.bias"] = torch.ones(32)
    save_file(biased, out / "model.safetensors")
    with pytest.raises(QingLMError, match="not zero"):
        import_hf(out, tmp_path / "b")
    missing = {k: v for k, v in weights.items() if "layers.1.self_attn.o_proj" not in k}
    save_file(missing, out / "model.safetensors")
    with pytest.raises(QingLMError, match="has no tensor model.layers.1.self_attn.o_proj.weight"):
        import_hf(out, tmp_path / "c")
    save_file(weights, out / "model.safetensors")
    tok = json.loads((out / "tokenizer.json").read_text())
    tok["added_tokens"][0]["content"] = "<pad>"  # a tokenizer of another layout
    (out / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(QingLMError, match="lacks QingLM's special tokens"):
        import_hf(out, tmp_path / "f")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(QingLMError, match="is a 'bert' model"):
        import_hf(out, tmp_path / "d")
    (out / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))  # GPT-2's own tanh GELU
    with pytest.raises(QingLMError, match="differs from QingLM's exact GELU"):
        import_hf(out, tmp_path / "e")


@pytest.mark.parametrize(
    "change,match",
    [
        ({"scale_attn_weights": False}, "scale_attn_weights false"),
        ({"scale_attn_by_inverse_layer_idx": True}, "attention variants"),
    ],
)
def test_gpt2_import_refuses_attention_it_does_not_compute(tmp_path, tokenizer, change, match, make_run):
    run = make_run(tmp_path / "run", tokenizer, **CLASSIC, pos_encoding="learned")
    out = export_hf(run, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config.get("scale_attn_weights", True)
    import_hf(out, tmp_path / "ok")  # as exported it imports
    (out / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(QingLMError, match=match):
        import_hf(out, tmp_path / "refused")
