"""RoPE scaling (linear, dynamic NTK, YaRN): transformers' formulas, config rules, and the model past its length."""

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
        (dict(rope_scaling="yarn", rope_factor=0.5), "rope_factor must be 1 or more"),
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
