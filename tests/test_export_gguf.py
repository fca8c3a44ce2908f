"""`qinglm export gguf`: gguf's reader sees llama.cpp's metadata, names, shapes and q/k layout."""

import json

import numpy as np
import pytest
import torch

import qinglm
from qinglm.cli import main
from qinglm.config import ModelConfig
from qinglm.errors import QingLMError
from qinglm.export.gguf import export_gguf, gguf_arch, permute_for_llama_cpp
from qinglm.export.hf import export_hf
from qinglm.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, TOOL_TOKENS, train_tokenizer

gguf = pytest.importorskip("gguf")

LINES = ["今天天气真不错，我们一起去公园散步吧。", "人工智能的未来充满了希望和挑战。", "Hello world 2024!"]
BASE = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
MOE = dict(n_experts=4, experts_per_token=2)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([f"{LINES[i % 3]}{i}" for i in range(150)], 350, show_progress=False)


@pytest.fixture(scope="module")
def make_run(perturbed_run):
    """Return make(run_dir, tokenizer, **options): a perturbed_run of BASE + options, vocab 384 (> 350 tokens)."""
    return lambda run_dir, tokenizer, **options: perturbed_run(
        run_dir, tokenizer, vocab_size=384, **{**BASE, **options}
    )


def field(reader, key):
    return reader.fields[key].contents()


def tensors_of(reader):
    """Return {name: (fp32 array in PyTorch's row-major shape, GGML type)} of a GGUF file."""
    out = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))
        out[t.name] = (gguf.dequantize(t.data, t.tensor_type).reshape(shape), t.tensor_type)
    return out


VARIANTS = [
    ("llama-tied", {}, "llama"),
    ("llama-untied", dict(tie_embeddings=False), "llama"),
    ("qwen3", dict(qk_norm=True), "qwen3"),
    ("mixtral", MOE, "llama"),
    ("qwen3moe", dict(qk_norm=True, tie_embeddings=False, **MOE), "qwen3moe"),
]


@pytest.mark.parametrize("options,arch", [v[1:] for v in VARIANTS], ids=[v[0] for v in VARIANTS])
def test_metadata_names_shapes_and_values(tmp_path, tokenizer, options, arch, make_run):
    run = make_run(tmp_path / "run", tokenizer, **options)
    path = export_gguf(run, tmp_path / "model.gguf", dtype="f32")
    cfg = qinglm.load(run, device="cpu").config
    r = gguf.GGUFReader(path)
    assert field(r, "general.architecture") == arch
    expected = {
        "context_length": 64,
        "embedding_length": 32,
        "block_count": 2,
        "feed_forward_length": cfg.d_ff,
        "attention.head_count": 4,
        "attention.head_count_kv": 2,
        "rope.dimension_count": 8,
        "rope.freq_base": 10_000.0,
        "vocab_size": 384,
    }
    if cfg.n_experts:
        expected.update(expert_count=4, expert_used_count=2, expert_feed_forward_length=cfg.d_ff)
    for key, value in expected.items():
        assert field(r, f"{arch}.{key}") == pytest.approx(value), key
    assert field(r, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.norm_eps)

    # Tokenizer: byte-level BPE with the Qwen2 split, special tokens as control tokens, padded vocab.
    assert (field(r, "tokenizer.ggml.model"), field(r, "tokenizer.ggml.pre")) == ("gpt2", "qwen2")
    tokens, types = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == 384
    assert tokens[:12] == [*SPECIAL_TOKENS, *TOOL_TOKENS]  # tool and thinking tokens are control tokens too
    assert set(types[:12]) == {gguf.TokenType.CONTROL} and types[12] == gguf.TokenType.NORMAL
    assert types[-1] == gguf.TokenType.UNUSED and tokens[-1] == "[PAD383]"
    vocab = tokenizer.backend.get_vocab()
    assert all(tokens[i] == t for t, i in vocab.items())
    merges = json.loads(tokenizer.backend.to_str())["model"]["merges"]
    assert field(r, "tokenizer.ggml.merges") == [m if isinstance(m, str) else " ".join(m) for m in merges]
    ids = {k: field(r, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding", "eot")}
    assert ids == {"bos": 2, "eos": 3, "padding": 0, "eot": 5}
    assert field(r, "tokenizer.ggml.add_bos_token") is True
    assert field(r, "tokenizer.chat_template") == CHAT_TEMPLATE  # tools and thinking included

    # Tensors: llama.cpp names and shapes, values equal to the HF export's (q/k un-permuted for llama).
    got = tensors_of(r)
    hf = {k: v.float().numpy() for k, v in _hf_weights(run, tmp_path).items()}
    assert ("output.weight" in got) == (not cfg.tie_embeddings)
    assert got["token_embd.weight"][0].shape == (384, 32)
    np.testing.assert_array_equal(got["token_embd.weight"][0], hf["model.embed_tokens.weight"])
    q, k = got["blk.1.attn_q.weight"][0], got["blk.1.attn_k.weight"][0]
    assert q.shape == (32, 32) and k.shape == (16, 32)
    if arch == "llama":  # interleaved pairs: undo the permutation and get HF's rows back
        q = _unpermute(q, 4)
        k = _unpermute(k, 2)
    np.testing.assert_array_equal(q, hf["model.layers.1.self_attn.q_proj.weight"])
    np.testing.assert_array_equal(k, hf["model.layers.1.self_attn.k_proj.weight"])
    if cfg.qk_norm:
        assert got["blk.0.attn_q_norm.weight"][0].shape == (8,)
    if cfg.n_experts:
        gate = got["blk.0.ffn_gate_exps.weight"][0]
        assert gate.shape == (4, cfg.d_ff, 32) and got["blk.0.ffn_down_exps.weight"][0].shape == (
            4,
            32,
            cfg.d_ff,
        )
        assert got["blk.0.ffn_gate_inp.weight"][0].shape == (4, 32)
        expert = "block_sparse_moe.experts.3.w1" if arch == "llama" else "mlp.experts.3.gate_proj"
        np.testing.assert_array_equal(gate[3], hf[f"model.layers.0.{expert}.weight"])
    else:
        assert got["blk.0.ffn_gate.weight"][0].shape == (cfg.d_ff, 32)


def _hf_weights(run, tmp_path):
    from safetensors.torch import load_file

    return load_file(export_hf(run, tmp_path / "hf") / "model.safetensors")


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_permutation_is_llama_cpps_interleaving():
    # head_dim 4: rotate-half pairs (0, 2) and (1, 3) become adjacent rows (0, 1) and (2, 3)
    w = torch.arange(8.0)[:, None]  # two heads
    assert permute_for_llama_cpp(w, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.parametrize("dtype,tol", [("f32", 1e-4), ("f16", 2e-3), ("q8_0", 3e-2)])
def test_transformers_reads_the_gguf_back_to_the_same_logits(tmp_path, tokenizer, dtype, tol, make_run):
    transformers = pytest.importorskip("transformers")
    run = make_run(tmp_path / "run", tokenizer)
    path = export_gguf(run, tmp_path / f"model-{dtype}.gguf", dtype=dtype)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    want = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}[dtype]
    assert types["blk.0.attn_q.weight"].name == want and types["blk.0.attn_norm.weight"].name == "F32"
    # transformers undoes llama.cpp's q/k permutation itself: equal logits confirm the layout
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    lm = qinglm.load(run, device="cpu")
    ids = torch.tensor([[2] + tokenizer.encode("今天天气真不错，人工智能的未来 Hello 2024")])
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(ids).logits, lm.model(ids), rtol=0, atol=tol)
    if dtype == "f32":
        hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
        text = "他说：“今天天气真不错。” Hello world 2024"
        assert hf_tok(text)["input_ids"] == [2] + tokenizer.encode(text)


def test_qk_norm_models_read_back_as_qwen3(tmp_path, tokenizer, make_run):
    transformers = pytest.importorskip("transformers")
    run = make_run(tmp_path / "run", tokenizer, qk_norm=True, **MOE)
    path = export_gguf(run, tmp_path / "m.gguf", dtype="f32")
    # transformers' GGUF reader ignores qwen3moe's expert width, so the config comes from the HF export
    config = transformers.AutoConfig.from_pretrained(export_hf(run, tmp_path / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, config=config, dtype=torch.float32
    )
    lm = qinglm.load(run, device="cpu")
    ids = torch.tensor([[2] + tokenizer.encode("人工智能的未来充满了希望")])
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(ids).logits, lm.model(ids), rtol=0, atol=1e-4)


REFUSED = [
    (dict(n_experts=4, shared_experts=1), "qwen2moe does not renormalise"),
    (dict(n_experts=4, qk_norm=True, moe_every=2), "needs MoE in every block"),
    (dict(family="classic", n_kv_heads=4), "tanh approximation of GELU"),
    (dict(gated_attention=True), "gated attention"),
]


@pytest.mark.parametrize("options,reason", REFUSED, ids=[r[1] for r in REFUSED])
def test_models_llama_cpp_cannot_run_exactly_are_refused(options, reason):
    with pytest.raises(QingLMError, match=reason):
        gguf_arch(ModelConfig(vocab_size=300, **{**BASE, **options}))


def test_cli_export_gguf(tmp_path, tokenizer, capsys, make_run):
    run = make_run(tmp_path / "run", tokenizer)
    assert main(["export", "gguf", str(run), str(tmp_path / "m.gguf"), "--dtype", "q8_0"]) == 0
    assert "q8_0" in capsys.readouterr().out
    assert field(gguf.GGUFReader(tmp_path / "m.gguf"), "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    with pytest.raises(SystemExit) as exit_info:  # argparse rejects an unknown dtype
        main(["export", "gguf", str(run), str(tmp_path / "x.gguf"), "--dtype", "q4_0"])
    assert exit_info.value.code == 2
    shared = make_run(tmp_path / "shared", tokenizer, n_experts=4, shared_experts=1)
    assert main(["export", "gguf", str(shared), str(tmp_path / "y.gguf")]) == 2
    assert "qwen2moe" in capsys.readouterr().err
    assert not (tmp_path / "y.gguf").exists() and not list(tmp_path.glob(".y.gguf*"))


@pytest.mark.slow
@pytest.mark.parametrize("options", [{}, dict(qk_norm=True, **MOE)], ids=["llama", "qwen3moe"])
def test_llama_cpp_runs_the_export_like_qinglm(tmp_path, tokenizer, options, make_run):
    """Only where llama-cpp-python is installed (an optional CI step: it builds llama.cpp from source)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from qinglm.config import SamplingConfig
    from qinglm.infer.generate import generate_ids

    run = make_run(tmp_path / "run", tokenizer, init_std=0.1, tie_embeddings=False, **options)
    path = export_gguf(run, tmp_path / "m.gguf", dtype="f32")
    lm = qinglm.load(run, device="cpu")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False)
    ids = [2] + tokenizer.encode("今天天气真不错")
    assert llm.tokenize("今天天气真不错".encode(), add_bos=True, special=False) == ids
    llm.eval(ids)
    with torch.no_grad():
        ours = lm.model(torch.tensor([ids]))[0].numpy()
    np.testing.assert_allclose(np.asarray(llm.scores[: len(ids)]), ours, atol=2e-2)  # f16 KV cache
    cfg = SamplingConfig(max_new_tokens=32, temperature=0, repetition_penalty=1.0, stop_at_eos=False)
    want = list(generate_ids(lm.model, ids, cfg, eos_id=None))
    llm.reset()
    got = [t for _, t in zip(range(32), llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0))]
    assert got == want


def test_a_chars_tokenizer_is_refused(tmp_path, make_run):
    # llama.cpp would split its text the Qwen2 way and give other tokens than QingLM.
    chars = train_tokenizer(
        [f"{LINES[i % 3]}{i}" for i in range(150)], 350, show_progress=False, split="chars"
    )
    run = make_run(tmp_path / "run", chars)
    with pytest.raises(QingLMError, match="'chars' split"):
        export_gguf(run, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
