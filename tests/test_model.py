"""The Transformer's core properties, for every architecture switch."""

import pytest
import torch

from qinglm.config import ModelConfig, resolve_model
from qinglm.errors import QingLMError
from qinglm.model import IGNORE_INDEX, KVCache, Transformer

VARIANTS = [
    dict(family="modern"),
    dict(family="classic"),
    dict(family="modern", pos_encoding="learned"),
    dict(family="modern", n_kv_heads=1),
    dict(family="modern", norm="layernorm", mlp="gelu", tie_embeddings=False, bias=True),
]


def tiny(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, dropout=0.0, **kw)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_changing_a_future_token_never_changes_earlier_logits(kw):
    model = tiny(**kw)
    idx = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    base = model(idx)
    for t in (1, 7, 23):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 5) % 97
        out = model(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, t:], base[:, t:])  # the change is seen from t on


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_kv_cache_decoding_equals_full_recomputation(kw):
    model = tiny(**kw)
    idx = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(2))
    full = model(idx)
    cache = KVCache(model.cfg, batch_size=3, max_len=32)
    pieces = [model(idx[:, :8], cache=cache, start=0)]  # prefill 8
    pieces.append(model(idx[:, 8:12], cache=cache, start=8))  # a chunk of 4 after the cache
    for t in range(12, 20):  # then one token at a time
        pieces.append(model(idx[:, t : t + 1], cache=cache, start=t))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    last = model(idx[:, :5], cache=KVCache(model.cfg, 3), last_only=True)
    torch.testing.assert_close(last[:, 0], full[:, 4], rtol=1e-5, atol=1e-5)


def test_loss_ignores_padding_and_learns_eos():
    model = tiny()
    idx = torch.randint(4, 97, (2, 10), generator=torch.Generator().manual_seed(3))
    targets = torch.randint(4, 97, (2, 10), generator=torch.Generator().manual_seed(4))
    targets[:, 6] = 3  # EOS is a target like any other token
    padded = targets.clone()
    padded[:, 8:] = IGNORE_INDEX
    logits = model(idx)
    manual = torch.nn.functional.cross_entropy(logits[:, :8].reshape(-1, 97), targets[:, :8].reshape(-1))
    torch.testing.assert_close(model(idx, padded), manual)
    # whatever the model predicts at padded positions, the loss does not move
    idx2 = idx.clone()
    idx2[:, 9] = 0
    torch.testing.assert_close(model(idx2, padded), manual)
    # gradient flows into the EOS row of the head: EOS is learned
    model.zero_grad()
    model(idx, padded).backward()
    assert model.head.weight.grad[3].abs().sum() > 0


def test_param_counts_add_up_and_tied_head():
    model = tiny()
    counts = model.param_counts()
    assert counts["head"] == 0 and model.head.weight is model.embed.weight
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    untied = tiny(tie_embeddings=False).param_counts()
    assert untied["head"] == 97 * 32


def test_presets_match_the_seeds():
    from qinglm.config import PRESETS

    sizes = {}
    for name, kw in PRESETS.items():
        m = Transformer(ModelConfig(**kw))
        sizes[name] = m.param_counts()["total"]
    assert sizes["tiny"] < sizes["small"] < sizes["medium"]


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(d_model=30, n_heads=4), "divisible by n_heads"),
        (dict(n_heads=4, n_kv_heads=3), "divisible by n_kv_heads"),
        (dict(dropout=1.5), "dropout"),
        (dict(family="weird"), "unknown family"),
        (dict(n_layers=0), "positive"),
    ],
)
def test_impossible_dimensions_are_user_errors(kw, msg):
    base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4)
    base.update(kw)
    with pytest.raises(QingLMError, match=msg):
        resolve_model(ModelConfig(**base))


def test_sdpa_matches_explicit_attention():
    """The fused kernel computes what the textbook formula says (guards against a wrong mask)."""
    model = tiny()
    attn = model.blocks[0].attn
    x = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(5))
    cos, sin = model.rope_cos[:6], model.rope_sin[:6]
    out = attn(x, (cos, sin), None, 0, 0)
    from qinglm.model import apply_rope

    q, k, v = attn.qkv(x).split([32, 32, 32], dim=-1)
    q, k, v = (t.view(1, 6, 4, 8).transpose(1, 2) for t in (q, k, v))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    scores = q @ k.transpose(-1, -2) / 8**0.5
    scores = scores.masked_fill(torch.ones(6, 6).triu(1).bool(), float("-inf"))
    ref = attn.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(1, 6, 32))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
