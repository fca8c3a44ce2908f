"""Dropout on a CPU (qinglm.model.dropout): cheap masks drawn once per forward, and attention's as DropKey."""

import pytest
import torch
import torch.nn.functional as F

from qinglm.config import ModelConfig
from qinglm.model import transformer
from qinglm.model.dropout import Dropout, keep_mask, keep_probability
from qinglm.model.transformer import Transformer
from qinglm.post.dpo import disable_dropout

CPU = torch.device("cpu")


def model(p: float, **kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, dropout=p, **kw)
    return Transformer(cfg).train()


def test_keep_mask_keeps_at_its_rate_and_follows_the_seed():
    torch.manual_seed(3)
    a = keep_mask((1000, 1001), 0.1, CPU)  # an odd count: the last int64 word is cut
    torch.manual_seed(3)
    b = keep_mask((1000, 1001), 0.1, CPU)
    assert a.dtype == torch.bool and a.shape == (1000, 1001)
    assert torch.equal(a, b)
    assert not torch.equal(a, keep_mask((1000, 1001), 0.1, CPU))
    assert abs(a.float().mean().item() - keep_probability(0.1)) < 2e-3
    assert keep_probability(0.1) == 1 - 6554 / 65536
    assert keep_mask((100_000,), 0.5, CPU).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_a_drawn_mask_keeps_the_expected_value():
    drop = Dropout(0.3).train()
    x = torch.ones(400, 500)
    y = drop(x, keep_mask(x.shape, 0.3, CPU))
    kept = y != 0
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / keep_probability(0.3)))
    assert y.mean().item() == pytest.approx(1.0, abs=0.01)


def sdpa_calls(monkeypatch) -> list[dict]:
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        calls.append(kw)
        return real(q, k, v, **kw)

    monkeypatch.setattr(transformer.F, "scaled_dot_product_attention", spy)
    return calls


@pytest.mark.parametrize("how", ["auto", "keys"])
def test_on_a_cpu_attention_drops_keys_through_the_fused_kernels_mask(monkeypatch, how):
    calls = sdpa_calls(monkeypatch)
    m = model(0.1, attention_dropout=how)
    m(torch.randint(0, 97, (2, 16)))
    assert len(calls) == 2
    for kw in calls:
        assert kw["dropout_p"] == 0.0 and kw["is_causal"] is False
        mask = kw["attn_mask"]
        assert mask.shape == (2, 4, 16, 16) and mask.dtype == torch.bool
        assert not mask.triu(1).any()  # causal
        assert mask.diagonal(dim1=-2, dim2=-1).all()  # a query keeps itself
        kept = mask.tril(-1).sum().item() / (2 * 4 * 16 * 15 / 2)
        assert 0.75 < kept < 0.98  # about 90% of the earlier keys
    m.eval()  # no dropout in eval: the plain causal kernel
    calls.clear()
    m(torch.randint(0, 97, (2, 16)))
    assert all(kw["attn_mask"] is None and kw["is_causal"] and kw["dropout_p"] == 0.0 for kw in calls)


def test_weights_keeps_dropout_on_the_attention_weights(monkeypatch):
    calls = sdpa_calls(monkeypatch)
    model(0.1, attention_dropout="weights")(torch.randint(0, 97, (2, 16)))
    assert [(kw["attn_mask"], kw["is_causal"], kw["dropout_p"]) for kw in calls] == [(None, True, 0.1)] * 2


@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 1}, {"attention_dropout": "weights"}])
def test_training_forward_with_dropout_stays_causal(kw):
    m = model(0.2, **kw)
    idx = torch.randint(0, 97, (2, 20))
    changed = idx.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 97
    torch.manual_seed(5)
    a = m(idx)
    torch.manual_seed(5)  # the same masks
    b = m(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_dropping_almost_every_key_leaves_no_empty_softmax_row():
    m = model(0.95)
    for _ in range(5):
        assert m(torch.randint(0, 97, (4, 32))).isfinite().all()


def test_switched_off_dropout_draws_nothing_and_matches_eval():
    m = disable_dropout(model(0.2))  # as DPO's policy and reference
    idx = torch.randint(0, 97, (2, 16))
    state = torch.get_rng_state()
    train_logits = m(idx)
    assert torch.equal(torch.get_rng_state(), state)  # no mask was drawn
    torch.testing.assert_close(train_logits, m.eval()(idx))


def test_same_seed_same_gradients_and_different_seed_different():
    m = model(0.1)
    idx = torch.randint(0, 97, (2, 16))

    def grads(seed: int) -> list[torch.Tensor]:
        m.zero_grad()
        torch.manual_seed(seed)
        m(idx, idx).backward()
        return [p.grad.clone() for p in m.parameters()]

    a, b, c = grads(1), grads(1), grads(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.slow
def test_a_compiled_forward_draws_the_same_masks_as_an_eager_one():
    """draw_noise runs outside the compiled graph (one graph break), from the same generator."""
    m = model(0.1)
    idx = torch.randint(0, 97, (2, 16))

    def loss_and_grads(forward) -> tuple[torch.Tensor, list[torch.Tensor]]:
        m.zero_grad()
        torch.manual_seed(7)
        loss = forward(idx, idx)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in m.parameters()]

    eager_loss, eager_grads = loss_and_grads(m)
    compiled_loss, compiled_grads = loss_and_grads(torch.compile(m))
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
