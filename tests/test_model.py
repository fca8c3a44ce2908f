"""The Transformer's core properties, for every architecture switch."""

import pytest
import torch

from qinglm.config import ModelConfig, resolve_model
from qinglm.errors import QingLMError
from qinglm.model.transformer import IGNORE_INDEX, KVCache, Transformer

VARIANTS = [
    dict(family="modern"),
    dict(family="classic"),
    dict(family="modern", pos_encoding="learned"),
    dict(family="modern", n_kv_heads=1),
    dict(family="modern", norm="layernorm", mlp="gelu", tie_embeddings=False, bias=True),
    dict(family="modern", qk_norm=True),
    dict(family="modern", gated_attention=True, qk_norm=True, n_kv_heads=1),
    dict(family="modern", n_experts=4, experts_per_token=2, shared_experts=1, moe_every=1),
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
        (dict(n_layers=0), "--n-layers must be 1 or more"),
    ],
)
def test_impossible_dimensions_are_user_errors(kw, msg):
    base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4)
    base.update(kw)
    with pytest.raises(QingLMError, match=msg):
        resolve_model(ModelConfig(**base))


def test_every_option_takes_only_its_listed_values_from_the_cli_and_from_files():
    import dataclasses

    from qinglm.cli import build_parser

    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    flags = {a.dest: a for a in train._actions}
    for f in dataclasses.fields(ModelConfig):
        if "choices" in f.metadata:
            assert flags[f.name].choices == f.metadata["choices"]  # --help offers what resolve_model takes
            with pytest.raises(QingLMError, match=f"unknown {f.name} 'weird'"):
                resolve_model(ModelConfig(vocab_size=97, d_model=32, n_heads=4, **{f.name: "weird"}))


def test_sdpa_matches_explicit_attention():
    """The fused kernel computes what the textbook formula says (guards against a wrong mask)."""
    model = tiny()
    attn = model.blocks[0].attn
    x = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(5))
    cos, sin = model.rope_cos[:6], model.rope_sin[:6]
    out = attn(x, (cos, sin), None, 0, 0)
    from qinglm.model.transformer import apply_rope

    q, k, v = attn.qkv(x).split([32, 32, 32], dim=-1)
    q, k, v = (t.view(1, 6, 4, 8).transpose(1, 2) for t in (q, k, v))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    scores = q @ k.transpose(-1, -2) / 8**0.5
    scores = scores.masked_fill(torch.ones(6, 6).triu(1).bool(), float("-inf"))
    ref = attn.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(1, 6, 32))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_default_model_has_no_optional_modules():
    names = set(tiny().state_dict())
    assert not any(k in n for n in names for k in ("q_norm", "k_norm", "gate"))
    with_extras = set(tiny(qk_norm=True, gated_attention=True).state_dict())
    assert {
        "blocks.0.attn.q_norm.weight",
        "blocks.0.attn.k_norm.weight",
        "blocks.0.attn.gate.weight",
    } <= with_extras
    assert with_extras - names == {
        f"blocks.{i}.attn.{m}.weight" for i in range(2) for m in ("q_norm", "k_norm", "gate")
    }


def test_qk_norm_normalises_each_head_of_queries_and_keys_before_rope():
    model = tiny(qk_norm=True)
    attn = model.blocks[0].attn
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(5))
    cos, sin = model.rope_cos[:6], model.rope_sin[:6]
    out = attn(x, (cos, sin), None, 0, 0)
    from qinglm.model.transformer import apply_rope

    q, k, v = attn.qkv(x).split([32, 32, 32], dim=-1)
    q, k, v = (t.view(1, 6, 4, 8).transpose(1, 2) for t in (q, k, v))

    def rms(t, w):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    q, k = rms(q, attn.q_norm.weight), rms(k, attn.k_norm.weight)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    scores = q @ k.transpose(-1, -2) / 8**0.5
    scores = scores.masked_fill(torch.ones(6, 6).triu(1).bool(), float("-inf"))
    ref = attn.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(1, 6, 32))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # and it changes the output: the same weights without the norm give something else
    plain = tiny()
    plain.load_state_dict(
        {k: v for k, v in model.state_dict().items() if not k.endswith(("q_norm.weight", "k_norm.weight"))}
    )
    assert not torch.allclose(plain.blocks[0].attn(x, (cos, sin), None, 0, 0), out, atol=1e-4)


def test_zero_gate_halves_the_attention_output():
    gated, plain = tiny(gated_attention=True), tiny()
    assert gated.blocks[0].attn.gate.bias is None  # no bias unless cfg.bias
    with torch.no_grad():
        for block in gated.blocks:
            block.attn.gate.weight.zero_()
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if ".gate." not in k})
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(6))
    rope = (gated.rope_cos[:7], gated.rope_sin[:7])
    out = gated.blocks[0].attn(x, rope, None, 0, 0)
    ref = plain.blocks[0].attn(x, rope, None, 0, 0)
    # out = W_o (0.5 y): the halving happens before the (bias-free) output projection
    torch.testing.assert_close(out, 0.5 * ref, rtol=1e-5, atol=1e-6)
    # a per-head gate: silencing head 0 only zeroes that head's slice before the projection
    with torch.no_grad():
        gated.blocks[0].attn.gate.bias = torch.nn.Parameter(torch.tensor([-1e4, 0.0, 0.0, 0.0]))
    captured = {}
    gated.blocks[0].attn.out.register_forward_hook(lambda m, i, o: captured.setdefault("y", i[0]))
    gated.blocks[0].attn(x, rope, None, 0, 0)
    assert captured["y"][..., :8].abs().max() == 0 and captured["y"][..., 8:].abs().min() > 0


def test_init_choices_set_the_documented_stds():
    import math

    kw = dict(vocab_size=97, d_model=256, n_layers=8, n_heads=4, max_seq_len=64)
    scale = 1 / math.sqrt(2 * 8)

    def weights(init):
        torch.manual_seed(0)
        m = Transformer(ModelConfig(init=init, **kw))
        return m.blocks[0].attn.out.weight, m.blocks[0].mlp.up.weight, m.embed.weight

    out, up, emb = weights("gpt2")
    assert out.std().item() == pytest.approx(0.02 * scale, rel=0.05)
    assert up.std().item() == pytest.approx(0.02, rel=0.05) and emb.std().item() == pytest.approx(
        0.02, rel=0.05
    )
    small = math.sqrt(2 / (5 * 256))
    out, up, emb = weights("small")
    assert out.std().item() == pytest.approx(small * scale, rel=0.05)
    assert up.std().item() == pytest.approx(small, rel=0.05) and emb.std().item() == pytest.approx(
        small, rel=0.05
    )
    # default: nn.Linear's kaiming-uniform, bound 1/sqrt(fan_in), residual projections unscaled
    out, up, emb = weights("default")
    bound = 1 / math.sqrt(256)
    assert out.abs().max().item() <= bound and out.abs().max().item() > 0.95 * bound
    assert out.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert emb.std().item() == pytest.approx(1.0, rel=0.05)  # nn.Embedding's N(0, 1)
    with pytest.raises(QingLMError, match="unknown init"):
        resolve_model(ModelConfig(init="weird"))


@pytest.mark.parametrize("kw", [dict(family="modern"), dict(family="classic")], ids=["modern", "classic"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(kw, monkeypatch):
    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(
        torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k)
    )

    def loss_and_grads(checkpointing: bool):
        torch.manual_seed(0)
        cfg = ModelConfig(
            vocab_size=97,
            d_model=32,
            n_layers=3,
            n_heads=4,
            max_seq_len=64,
            dropout=0.1,
            gradient_checkpointing=checkpointing,
            **kw,
        )
        model = Transformer(cfg).train()
        g = torch.Generator().manual_seed(1)
        idx, targets = torch.randint(0, 97, (2, 24), generator=g), torch.randint(0, 97, (2, 24), generator=g)
        torch.manual_seed(2)  # the same dropout masks in both runs
        loss = model(idx, targets)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    loss_a, grads_a = loss_and_grads(False)
    assert not calls
    loss_b, grads_b = loss_and_grads(True)
    assert len(calls) == 3  # one per block
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-7)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7, msg=name)
