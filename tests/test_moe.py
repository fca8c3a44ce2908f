"""The Mixture-of-Experts feed-forward layer: routing, losses, gradients, config checks."""

import pytest
import torch

from qinglm.config import ModelConfig, resolve_model
from qinglm.errors import QingLMError
from qinglm.model.moe import MoE
from qinglm.model.transformer import MLP, Transformer


def cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, dropout=0.0)
    base.update(kw)
    return resolve_model(ModelConfig(**base))


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_one_expert_top1_equals_the_dense_mlp(mlp):
    c = cfg(mlp=mlp, n_experts=1, experts_per_token=1)
    torch.manual_seed(0)
    dense, moe = MLP(c), MoE(c, MLP)
    moe.experts[0].load_state_dict(dense.state_dict())
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(moe(x), dense(x), rtol=1e-6, atol=1e-6)
    assert moe.utilisation.tolist() == [1.0]


def test_aux_loss_is_one_for_a_uniform_router_and_grows_when_biased():
    c = cfg(n_experts=4, experts_per_token=1)
    torch.manual_seed(0)
    moe = MoE(c, MLP)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        moe.router.weight.zero_()
    moe(x)
    assert moe.aux_loss.item() == pytest.approx(1.0, abs=1e-6)
    assert moe.z_loss.item() == pytest.approx(torch.log(torch.tensor(4.0)).item() ** 2, rel=1e-6)
    losses = []
    for scale in (0.005, 0.02, 0.1):  # a router ever more biased toward expert 0 (x . w0 > 0)
        with torch.no_grad():
            moe.router.weight.zero_()
            moe.router.weight[0] = scale * torch.ones(32)
        moe(x.abs())
        losses.append(moe.aux_loss.item())
    assert 1.0 < losses[0] < losses[1] < losses[2] <= 4.0 + 1e-6
    assert moe.utilisation.tolist() == [1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_gradients_reach_exactly_the_selected_experts(router):
    c = cfg(n_experts=4, experts_per_token=2, shared_experts=1, router=router)
    torch.manual_seed(0)
    moe = MoE(c, MLP)
    with torch.no_grad():  # positive inputs: expert 3's logit is always the lowest, so it gets no tokens
        moe.router.weight.normal_(0.0, 0.3)
        moe.router.weight[3] = -10.0
    x = torch.rand(2, 16, 32, generator=torch.Generator().manual_seed(1))
    moe(x).square().sum().backward()
    used = moe.utilisation > 0
    assert used.tolist() == [True, True, True, False]
    for e, expert in enumerate(moe.experts):
        grads = [p.grad for p in expert.parameters()]
        if used[e]:
            assert all(g is not None and g.abs().sum() > 0 for g in grads), e
        else:
            assert all(g is None or g.abs().sum() == 0 for g in grads), e
    assert all(p.grad.abs().sum() > 0 for p in moe.shared.parameters())
    assert moe.router.weight.grad.abs().sum() > 0


def test_model_adds_router_losses_in_training_and_reports_stats():
    torch.manual_seed(0)
    model = Transformer(cfg(n_experts=4, experts_per_token=2, moe_every=2, n_layers=4, moe_z_coef=1e-3))
    assert list(model.moe_layers()) == [1, 3]
    g = torch.Generator().manual_seed(1)
    idx, targets = torch.randint(0, 97, (2, 12), generator=g), torch.randint(0, 97, (2, 12), generator=g)
    ce = model.eval()(idx, targets)
    loss = model.train()(idx, targets)
    moes = model.moe_layers().values()
    extra = 0.01 * sum(m.aux_loss for m in moes) + 1e-3 * sum(m.z_loss for m in moes)
    torch.testing.assert_close(loss, ce + extra)
    stats = model.moe_stats()
    assert list(stats) == ["blocks.1", "blocks.3"]
    assert all(len(u) == 4 and sum(u) == pytest.approx(1.0) for u in stats.values())
    loss.backward()
    assert model.blocks[1].mlp.router.weight.grad.abs().sum() > 0


def test_dense_default_is_unchanged():
    names = set(Transformer(cfg()).state_dict())
    assert not any("router" in n or "experts" in n for n in names)
    assert Transformer(cfg()).moe_stats() == {}


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(n_experts=2, experts_per_token=3), "experts_per_token"),
        (dict(n_experts=2, experts_per_token=0), "--experts-per-token must be 1 or more"),
        (dict(n_experts=-1), "--n-experts must be 0 or more"),
        (dict(n_experts=2, moe_every=0), "--moe-every must be 1 or more"),
        (dict(n_experts=2, router="weird"), "unknown router"),
        (dict(n_experts=2, moe_aux_coef=-1.0), "--moe-aux-coef must be 0 or more"),
        (dict(shared_experts=1), "needs n_experts"),
    ],
)
def test_impossible_moe_settings_are_user_errors(kw, msg):
    with pytest.raises(QingLMError, match=msg):
        cfg(**kw)


def test_flops_count_the_active_experts_only():
    base = dict(vocab_size=100, d_model=64, n_layers=2, n_heads=4, max_seq_len=32, d_ff=96)
    moe = Transformer(ModelConfig(**base, n_experts=8, experts_per_token=2))
    dense_same_active = Transformer(ModelConfig(**{**base, "d_ff": 192}))
    router = 2 * 8 * 64
    assert moe.active_matmul_params() == dense_same_active.active_matmul_params() + router
    assert moe.param_counts()["total"] > 3 * dense_same_active.param_counts()["blocks"]
