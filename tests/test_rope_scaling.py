"""RoPE scaling (linear, dynamic NTK, YaRN): transformers' formulas, the config, the model past its length."""

import pytest
import torch

from qinglm.config import ModelConfig, resolve_model, with_context
from qinglm.errors import QingLMError
from qinglm.export.hf_config import hf_config
from qinglm.model.rope import rope_frequencies, yarn_attention_factor
from qinglm.model.transformer import Transformer

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=64, d_model=64, n_layers=1, n_heads=2, max_seq_len=128)
SCALINGS = [
    ("linear", {}),
    ("dynamic", {}),
    ("yarn", {}),
    ("yarn", dict(rope_beta_fast=16.0, rope_beta_slow=2.0, rope_attention_factor=1.3, rope_theta=500_000.0)),
    ("yarn", dict(rope_factor=3.0)),  # an explicit factor, not context / original
]


def _hf_rope(cfg: ModelConfig, seq_len=None):
    """Return (inv_freq, attention factor) transformers computes from QingLM's exported config.json."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = transformers.LlamaConfig(**hf_config(cfg))
    return ROPE_INIT_FUNCTIONS[hf.rope_parameters["rope_type"]](hf, "cpu", seq_len=seq_len)


@pytest.mark.parametrize("kind,extra", SCALINGS, ids=[f"{k}-{i}" for i, (k, _) in enumerate(SCALINGS)])
def test_frequencies_and_attention_factor_are_transformers(kind, extra):
    base = ModelConfig(**SMALL, **{k: v for k, v in extra.items() if k == "rope_theta"})
    factor = extra.get("rope_factor")
    cfg = with_context(base, 512, kind, rope_factor=factor)
    cfg = resolve_model(
        ModelConfig(**{**vars(cfg), **{k: v for k, v in extra.items() if k != "rope_factor"}})
    )
    assert cfg.rope_original_max_position_embeddings == 128 and cfg.max_seq_len == 512
    assert cfg.rope_factor == (factor or 4.0)
    for seq_len in [None, 100, 128, 129, 300, 512] if kind == "dynamic" else [None]:
        inv_freq, attention = _hf_rope(cfg, seq_len)
        ours = rope_frequencies(cfg, seq_len)
        torch.testing.assert_close(ours.float(), inv_freq, rtol=1e-6, atol=0)
        assert yarn_attention_factor(cfg) == pytest.approx(attention, rel=1e-12)
    plain = rope_frequencies(base)
    assert not torch.allclose(rope_frequencies(cfg, 512), plain)  # it scaled something


def test_yarn_keeps_fast_dimensions_and_interpolates_slow_ones():
    cfg = with_context(ModelConfig(**SMALL), 512, "yarn")
    plain, yarn = rope_frequencies(resolve_model(ModelConfig(**SMALL))), rope_frequencies(cfg)
    assert yarn[0] == plain[0]  # 20 turns in 128 positions: extrapolated as trained
    assert plain[1] / 4 < yarn[1] < plain[1]  # on the ramp
    torch.testing.assert_close(yarn[-2:], plain[-2:] / 4)  # under one turn: interpolated
    assert yarn_attention_factor(cfg) == pytest.approx(0.1 * torch.tensor(4.0).log().item() + 1)


def test_without_scaling_the_tables_are_plain_rope():
    cfg = resolve_model(ModelConfig(**SMALL))
    inv = 1.0 / 10_000.0 ** (torch.arange(0, 32, 2, dtype=torch.float64) / 32)
    assert torch.equal(rope_frequencies(cfg), inv)
    model = Transformer(cfg)
    assert torch.equal(model.rope_cos[5], torch.cat([5 * inv, 5 * inv]).cos().float())


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(family="classic", rope_scaling="yarn"), "RoPE scaling needs RoPE positions"),
        (dict(pos_encoding="learned", rope_scaling="linear"), "learned positions cannot be scaled"),
        (dict(rope_factor=2.0), "rope_factor needs --rope-scaling"),
        (dict(rope_scaling="yarn", rope_factor=0.5), "rope-factor must be 1 or more"),
        (
            dict(rope_scaling="yarn", rope_beta_fast=1.0, rope_beta_slow=2.0),
            "rope_beta_slow < rope_beta_fast",
        ),
    ],
)
def test_settings_that_cannot_work_are_refused_in_one_line(change, match):
    with pytest.raises(QingLMError, match=match):
        resolve_model(ModelConfig(**{**SMALL, **change}))


def test_with_context_keeps_the_trained_length_as_the_original_one():
    once = with_context(ModelConfig(**SMALL), 512, "yarn")
    twice = with_context(once, 1024)  # a run trained at 512 with YaRN, asked for 1024
    assert (twice.rope_original_max_position_embeddings, twice.rope_factor, twice.max_seq_len) == (
        128,
        8.0,
        1024,
    )
    plain = with_context(ModelConfig(**SMALL), 256)  # no scaling: positions simply go further
    assert plain.rope_scaling == "none" and plain.max_seq_len == 256
    with pytest.raises(QingLMError, match="learned positions stop at 128"):
        with_context(ModelConfig(**SMALL, family="classic", pos_encoding="learned"), 256)


@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn"])
def test_the_model_runs_past_its_trained_length_and_caches_agree(kind):
    torch.manual_seed(0)
    cfg = with_context(ModelConfig(**SMALL), 256, kind)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, 64, (1, 200))
    with torch.no_grad():
        full = model(ids)
        assert full.isfinite().all()
        if kind != "dynamic":  # dynamic's frequencies change with the length, as in transformers
            from qinglm.model.transformer import KVCache

            cache = KVCache(cfg, 1)
            first = model(ids[:, :150], cache=cache)
            rest = model(ids[:, 150:], cache=cache, start=150)
            torch.testing.assert_close(torch.cat([first, rest], 1), full, rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match="exceed max_seq_len 256"):
            model(torch.randint(0, 64, (1, 257)))


# ---------------------------------------------------------------------------- inference: --context N


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, tiny_run):
    """Return a tiny run trained (here: made) at 32 positions."""
    from qinglm.tokenizer import train_tokenizer

    tok = train_tokenizer(
        [f"今天天气真不错，人工智能的未来{i}" for i in range(100)], 300, show_progress=False
    )
    return tiny_run(tmp_path_factory.mktemp("short-run"), tok, max_seq_len=32)


def test_generate_decodes_past_the_trained_length_with_context(short_run, capsys):
    import qinglm
    from qinglm.cli import main
    from qinglm.config import ContextConfig, SamplingConfig
    from qinglm.infer.generate import generate_ids

    greedy = SamplingConfig(max_new_tokens=70, temperature=0, stop_at_eos=False)
    prompt = list(range(10, 30))
    plain = qinglm.load(short_run, device="cpu")
    assert (
        len(list(generate_ids(plain.model, prompt, greedy, eos_id=None))) <= 32 - 20 + 1
    )  # the context is full
    lm = qinglm.load(short_run, device="cpu", context=ContextConfig(context=128, rope_scaling="yarn"))
    cfg = lm.model.cfg
    assert (cfg.max_seq_len, cfg.rope_scaling, cfg.rope_factor, cfg.rope_original_max_position_embeddings) == (
        128, "yarn", 4.0, 32,
    )  # fmt: skip
    assert len(list(generate_ids(lm.model, prompt, greedy, eos_id=None))) == 70
    args = ["generate", "--model", str(short_run), "--prompt", "今天天气", "--temperature", "0"]
    assert main([*args, "--max-new-tokens", "60", "--context", "96", "--rope-scaling", "yarn"]) == 0
    assert len(capsys.readouterr().out) > 0
    assert main([*args, "--context", "96", "--rope-factor", "2"]) == 2
    assert "rope_factor needs --rope-scaling" in capsys.readouterr().err


def test_the_server_reports_and_accepts_the_longer_context(short_run):
    import json
    import urllib.request

    import qinglm
    from qinglm.config import ContextConfig
    from qinglm.serve.app import create_app, serve_in_thread
    from qinglm.serve.config import ServeConfig

    lm = qinglm.load(short_run, device="cpu", context=ContextConfig(context=128, rope_scaling="yarn"))
    with serve_in_thread(create_app(lm, ServeConfig(max_tokens_cap=8))) as base:
        with urllib.request.urlopen(base + "/v1/models") as r:
            assert json.load(r)["data"][0]["context"] == 128
        rare = "".join(chr(0x4E00 + 37 * i) for i in range(15))  # several byte tokens each
        body = json.dumps({"prompt": rare, "max_tokens": 4, "temperature": 0}).encode()
        req = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req) as r:  # a prompt longer than 32 tokens: answered, not 400
            assert json.load(r)["usage"]["prompt_tokens"] > 32


# ---------------------------------------------------------------------------- export and import


EXPORTS = [(layout, kind) for layout in ("llama", "qwen3") for kind in ("linear", "dynamic", "yarn")]


@pytest.mark.parametrize("layout,kind", EXPORTS, ids=[f"{a}-{k}" for a, k in EXPORTS])
def test_transformers_computes_the_same_logits_past_the_original_length(
    tmp_path, perturbed_run, layout, kind
):
    import qinglm
    from qinglm.export.hf import export_hf, import_hf
    from qinglm.export.hf_config import same_function
    from qinglm.tokenizer import train_tokenizer

    tok = train_tokenizer(
        [f"今天天气真不错，人工智能的未来{i}" for i in range(100)], 300, show_progress=False
    )
    options = dict(qk_norm=True, tie_embeddings=False) if layout == "qwen3" else {}
    scaled = dict(rope_scaling=kind, max_seq_len=256, rope_original_max_position_embeddings=64)
    run = perturbed_run(
        tmp_path / "run", tok, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, **options, **scaled
    )
    out = export_hf(run, tmp_path / "hf")
    lm = qinglm.load(run, device="cpu")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.manual_seed(0)
    ids = torch.randint(6, tok.vocab_size, (1, 240))
    with torch.no_grad():
        for n in (40, 100, 240):  # within, past and far past the 64 positions it was trained at
            torch.testing.assert_close(hf(ids[:, :n]).logits, lm.model(ids[:, :n]), rtol=0, atol=1e-4)
    if kind != "dynamic":  # greedy decoding past 64 with transformers' KV cache picks QingLM's tokens
        from qinglm.config import SamplingConfig
        from qinglm.infer.generate import generate_ids

        greedy = SamplingConfig(max_new_tokens=24, temperature=0, repetition_penalty=1.0, stop_at_eos=False)
        ours = list(generate_ids(lm.model, ids[0, :100].tolist(), greedy, eos_id=None))
        with torch.no_grad():
            theirs = hf.generate(ids[:, :100], max_new_tokens=24, do_sample=False, repetition_penalty=1.0)
        assert theirs[0, 100:].tolist() == ours
    imported = import_hf(out, tmp_path / "back")
    assert same_function(qinglm.load(imported, device="cpu").model.cfg, lm.model.cfg)


HF_BASE = dict(
    model_type="qwen3", vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
    num_key_value_heads=2, intermediate_size=96, max_position_embeddings=4096, rope_theta=1e6,
)  # fmt: skip


def test_import_reads_the_rope_scaling_configs_transformers_writes():
    from qinglm.export.hf_config import model_config_from_hf

    qwen_yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}  # Qwen's README
    cfg = model_config_from_hf({**HF_BASE, "rope_scaling": qwen_yarn})
    assert (cfg.rope_scaling, cfg.rope_factor, cfg.rope_original_max_position_embeddings) == (
        "yarn",
        4.0,
        1024,
    )
    assert (cfg.max_seq_len, cfg.rope_theta, cfg.rope_beta_fast, cfg.rope_attention_factor) == (
        4096,
        1e6,
        32,
        None,
    )
    v5 = {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}  # transformers 5: rope_parameters only
    cfg = model_config_from_hf({**HF_BASE, "rope_parameters": v5})
    assert (cfg.rope_scaling, cfg.rope_factor, cfg.rope_theta, cfg.max_seq_len) == ("linear", 2.0, 5e5, 4096)
    cfg = model_config_from_hf({**HF_BASE, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
    assert (cfg.rope_original_max_position_embeddings, cfg.max_seq_len) == (4096, 8192)


@pytest.mark.parametrize(
    "scaling,match",
    [
        ({"rope_type": "llama3", "factor": 8.0}, "'llama3' RoPE scaling, which QingLM does not implement"),
        ({"rope_type": "longrope", "factor": 8.0}, "'longrope' RoPE scaling"),
        ({"rope_type": "yarn", "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 1.0}, "mscale"),
        ({"rope_type": "linear"}, "linear RoPE scaling needs a factor"),
    ],
)
def test_import_refuses_rope_it_does_not_compute(scaling, match):
    from qinglm.export.hf_config import model_config_from_hf

    with pytest.raises(QingLMError, match=match):
        model_config_from_hf({**HF_BASE, "rope_scaling": scaling})


@pytest.mark.parametrize("kind", ["linear", "yarn", "dynamic"])
def test_gguf_carries_llama_cpps_rope_scaling_keys(tmp_path, perturbed_run, kind):
    gguf = pytest.importorskip("gguf")
    import qinglm
    from qinglm.export.gguf import export_gguf
    from qinglm.tokenizer import train_tokenizer

    tok = train_tokenizer(
        [f"今天天气真不错，人工智能的未来{i}" for i in range(100)], 300, show_progress=False
    )
    scaled = dict(rope_scaling=kind, max_seq_len=256, rope_original_max_position_embeddings=64)
    run = perturbed_run(tmp_path / "run", tok, vocab_size=320, d_model=32, n_layers=1, n_heads=4, **scaled)
    if kind == "dynamic":
        with pytest.raises(QingLMError, match="rope_scaling 'dynamic' is not reproduced"):
            export_gguf(run, tmp_path / "m.gguf")
        return
    fields = gguf.GGUFReader(export_gguf(run, tmp_path / "m.gguf")).fields
    got = {k.removeprefix("llama."): fields[k].contents() for k in fields if k.startswith("llama.")}
    want = {"context_length": 256, "rope.scaling.type": kind, "rope.scaling.factor": 4.0}
    if kind == "yarn":
        want.update({
            "rope.scaling.original_context_length": 64,
            "rope.scaling.yarn_beta_fast": 32.0,
            "rope.scaling.yarn_beta_slow": 1.0,
        })  # fmt: skip
    assert {k: got[k] for k in want} == want
    assert "rope.scaling.yarn_attn_factor" not in got  # llama.cpp derives 0.1*ln(4)+1 as transformers does
    cos, sin = llama_cpp_rope(got, n_dims=8, positions=torch.arange(256))
    model = qinglm.load(run, device="cpu").model
    torch.testing.assert_close(model.rope_cos[:, :4], cos, rtol=0, atol=1e-5)
    torch.testing.assert_close(model.rope_sin[:, :4], sin, rtol=0, atol=1e-5)


def llama_cpp_rope(kv: dict, n_dims: int, positions: torch.Tensor):
    """Return (cos, sin) (T, n_dims/2) as ggml's rope_yarn computes them from a GGUF's rope keys
    (ggml_rope_yarn_corr_dims, rope_yarn_ramp, mscale *= 1 + 0.1*ln(1/freq_scale) when ext_factor != 0)."""
    import math

    base, scaling = kv["rope.freq_base"], kv.get("rope.scaling.type", "none")
    freq_scale = 1.0 / kv["rope.scaling.factor"] if scaling != "none" else 1.0
    ext_factor = 1.0 if scaling == "yarn" else 0.0  # llama.cpp's default yarn_ext_factor for YaRN models
    n_ctx_orig = kv.get("rope.scaling.original_context_length", kv["context_length"])

    def corr_dim(n_rot):
        return n_dims * math.log(n_ctx_orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(0.0, math.floor(corr_dim(kv.get("rope.scaling.yarn_beta_fast", 32.0))))
    high = min(n_dims - 1.0, math.ceil(corr_dim(kv.get("rope.scaling.yarn_beta_slow", 1.0))))
    mscale = kv.get("rope.scaling.yarn_attn_factor", 1.0)
    if ext_factor != 0.0:
        mscale *= 1.0 + 0.1 * math.log(1.0 / freq_scale)
    cos, sin = torch.zeros(len(positions), n_dims // 2), torch.zeros(len(positions), n_dims // 2)
    for i0 in range(0, n_dims, 2):
        theta_extrap = positions.double() * base ** (-i0 / n_dims)
        theta = freq_scale * theta_extrap
        if ext_factor != 0.0:
            ramp_mix = (1 - min(1.0, max(0.0, (i0 // 2 - low) / max(0.001, high - low)))) * ext_factor
            theta = theta * (1 - ramp_mix) + theta_extrap * ramp_mix
        cos[:, i0 // 2], sin[:, i0 // 2] = theta.cos() * mscale, theta.sin() * mscale
    return cos, sin


# ---------------------------------------------------------------------------- continued pretraining


def test_init_from_continues_pretraining_at_four_times_the_length_with_yarn(phrase_corpus, tmp_path):
    import json

    from qinglm.pipeline import run_train

    data, tok, _ = phrase_corpus
    train = dict(data=[str(data)], tokenizer=str(tok), max_steps=2, batch_size=2, lr=1e-3, warmup_steps=1,
                 eval_every=2, eval_tokens=128, num_threads=1, device="cpu", dtype="fp32", compile=False,
                 sample_prompts=["你好"], sample_tokens=2)  # fmt: skip
    small = dict(d_model=32, n_layers=1, n_heads=2, max_seq_len=16)
    base = run_train(small, {**train, "seq_len": 16, "out": str(tmp_path / "base")}, log=lambda _: None)
    longer = {**train, "seq_len": 64, "out": str(tmp_path / "long"), "init_from": str(base)}
    out = run_train({"rope_scaling": "yarn"}, longer, log=lambda _: None)
    config = json.loads((out / "config.json").read_text())
    model = config["model"]
    assert (model["max_seq_len"], model["rope_scaling"], model["rope_factor"]) == (64, "yarn", 4.0)
    assert model["rope_original_max_position_embeddings"] == 16 and config["train"]["seq_len"] == 64
    with pytest.raises(QingLMError, match="add --rope-scaling yarn"):  # a longer context is asked for
        run_train({}, {**longer, "out": str(tmp_path / "x")})
    with pytest.raises(QingLMError, match="drop the model flag"):  # the weights' shape stays the base's
        run_train({"rope_scaling": "yarn", "d_model": 64}, {**longer, "out": str(tmp_path / "x")})


def test_cli_refuses_scaling_positions_that_are_not_rope(tmp_path, tiny_run, capsys):
    from qinglm.cli import main
    from qinglm.tokenizer import train_tokenizer

    tok = train_tokenizer([f"今天天气真不错{i}" for i in range(50)], 280, show_progress=False)
    run = tiny_run(tmp_path / "classic", tok, family="classic", max_seq_len=32)
    args = ["generate", "--model", str(run), "--prompt", "今天", "--context", "64"]
    assert main([*args, "--rope-scaling", "yarn"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "RoPE scaling needs RoPE positions; sinusoidal positions" in err
