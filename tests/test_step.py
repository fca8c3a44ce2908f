"""The fast decoding step: the model's own logits for every option it takes, the fallback, the threads."""

import pytest
import torch

from qinglm.config import ModelConfig, SamplingConfig
from qinglm.infer import slots
from qinglm.infer.engine import Engine, Request
from qinglm.infer.step import DecodeStep
from qinglm.model.lora import apply_lora, merge_lora
from qinglm.model.quantize import quantize
from qinglm.model.transformer import KVCache, Transformer

V, CTX = 97, 48
OPTIONS = {
    "modern": {},
    "gqa": dict(n_kv_heads=2),
    "mqa-bias": dict(n_kv_heads=1, bias=True),
    "qk-norm": dict(qk_norm=True, n_kv_heads=2),
    "gated": dict(gated_attention=True),
    "untied-yarn": dict(tie_embeddings=False, rope_scaling="yarn", rope_factor=2.0),
    "dynamic-ntk": dict(rope_scaling="dynamic", rope_factor=2.0, rope_original_max_position_embeddings=16),
    "classic": dict(family="classic"),
    "learned": dict(family="classic", pos_encoding="learned"),
}


def tiny(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=CTX, dropout=0.0, **kw)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # norms and biases away from 1 and 0, so a wrong one shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def reference(model, tokens, positions, cache, window):
    """The model's own forward for one token per row at its position (the engine's fallback)."""
    return model(tokens[:, None], cache=cache, start=positions, last_only=True, window=window)[:, -1]


def check_steps(model: Transformer, atol: float, dtype=torch.float32) -> None:
    """Decode 3 rows at different positions for 30 steps both ways; logits and caches must agree."""
    step = DecodeStep.of(model)
    assert step is not None
    caches = [KVCache(model.cfg, 4, CTX, dtype=dtype) for _ in range(2)]
    gen = torch.Generator().manual_seed(0)
    positions = torch.tensor([0, 5, 11])
    for i in range(30):
        tokens = torch.randint(0, V, (3,), generator=gen)
        window = int(positions.max()) + 1
        with torch.inference_mode():
            want = reference(model, tokens, positions, caches[0], window)
            got = step(tokens, positions, caches[1], window)
        assert got.shape == want.shape and got.dtype == want.dtype
        assert torch.allclose(got.float(), want.float(), atol=atol, rtol=0), f"step {i}"
        positions = positions + 1
    assert torch.allclose(caches[0].k.float(), caches[1].k.float(), atol=atol, rtol=1e-5)
    assert torch.allclose(caches[0].v.float(), caches[1].v.float(), atol=atol, rtol=1e-5)


@pytest.mark.parametrize("option", OPTIONS)
def test_fp32_logits_equal_the_model(option):
    check_steps(tiny(**OPTIONS[option]), atol=1e-5)


def test_bf16_and_int8_follow_the_model():
    check_steps(tiny(n_kv_heads=2).to(torch.bfloat16), atol=0.1, dtype=torch.bfloat16)
    check_steps(quantize(tiny(n_kv_heads=2, tie_embeddings=False, bias=True)), atol=1e-4)


@pytest.mark.parametrize("option", ["gqa", "qk-norm", "classic"])
def test_traced_writes_store_and_read_what_the_eager_views_do(option):
    """The compiled step writes cache.k/v with index_put_ (traced); eager it writes flat views: same cache, logits."""
    model = tiny(**OPTIONS[option])
    eager, traced = DecodeStep.of(model), DecodeStep.of(model)
    traced.traced = True
    caches = [KVCache(model.cfg, 4, CTX) for _ in range(2)]
    positions = torch.tensor([0, 7, 3])
    for i in range(12):
        tokens = torch.tensor([i % V, (5 * i) % V, (11 * i + 3) % V])
        window = int(positions.max()) + 1
        with torch.inference_mode():
            want = eager(tokens, positions, caches[0], window)
            got = traced(tokens, positions, caches[1], window)
        assert torch.equal(got, want), f"step {i}"
        positions = positions + 1
    assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)


def test_torchao_quantized_weights_run_through_f_linear():
    """A Linear whose weight is a tensor subclass (torchao's int8 weight-only) cannot be transposed for addmm:
    the step calls F.linear on it, as the model's forward does (it raised NotImplementedError before)."""
    ao = pytest.importorskip("torchao.quantization")
    model = tiny(n_kv_heads=2)
    ao.quantize_(model, ao.Int8WeightOnlyConfig())
    assert type(model.blocks[0].attn.out.weight.data) is not torch.Tensor
    check_steps(model, atol=1e-4)


def test_merged_lora_takes_the_fast_step_and_unmerged_falls_back():
    model = tiny()
    apply_lora(model, rank=4)
    assert DecodeStep.of(model) is None  # adapters on their own: the model's forward
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    check_steps(merge_lora(model), atol=1e-5)


def test_what_it_cannot_run_falls_back():
    assert DecodeStep.of(tiny(n_experts=4, experts_per_token=2)) is None  # MoE
    model = tiny()
    handle = model.blocks[1].mlp.register_forward_hook(lambda m, i, o: o * 2)
    assert DecodeStep.of(model) is None
    handle.remove()

    class Custom(Transformer):
        pass

    assert DecodeStep.of(Custom(model.cfg)) is None
    step = DecodeStep.of(model)
    assert step is not None and not step.hooked()
    handle = model.register_forward_pre_hook(lambda m, args: None)  # added later: seen at the next step
    assert step.hooked()
    handle.remove()


@pytest.mark.parametrize("change", ["in place", "load_state_dict", "new storage"])
def test_weights_changed_after_the_step_was_bound_are_read(change):
    """On a CPU the step reads fp32 weights from (in, out) copies: a change to the weights in place (an optimizer
    step without fused=True, load_state_dict) or to their storage reaches the next step's logits."""
    model = tiny(n_kv_heads=2, bias=True)
    step = DecodeStep.of(model)
    assert step.layout.items  # the copies exist: without a refresh the logits below would be the old model's
    other = tiny(n_kv_heads=2, bias=True)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-0.7).add_(0.01)
        if change == "in place":
            for p, q in zip(model.parameters(), other.parameters()):
                p.copy_(q)
        elif change == "load_state_dict":
            model.load_state_dict(other.state_dict())
        else:
            for p, q in zip(model.parameters(), other.parameters()):
                p.data = q.detach().clone()
    tokens, positions = torch.tensor([5, 9]), torch.tensor([0, 0])
    with torch.inference_mode():
        want = reference(other, tokens, positions, KVCache(other.cfg, 2, CTX), 1)
        got = step(tokens, positions, KVCache(model.cfg, 2, CTX), 1)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


def test_threads_are_one_inside_and_the_callers_after():
    model = tiny()
    step = DecodeStep.of(model)
    inside, norm = [], step.norm
    step.norm = lambda x: (inside.append(torch.get_num_threads()), norm(x))[1]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with torch.inference_mode():
            step(torch.tensor([5]), torch.tensor([0]), KVCache(model.cfg, 1, CTX), 1)
        assert inside == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_large_matmuls_get_the_callers_threads_back(monkeypatch):
    from qinglm.infer import step as step_module

    model = tiny()
    step = DecodeStep.of(model)
    monkeypatch.setattr(step_module, "SHARED_MACS", 256 * 32)  # the MLP's up projection: only it is large
    seen, mm, addmm = [], torch.mm, torch.addmm  # fp32 on a CPU: x @ the weight's (in, out) copy
    monkeypatch.setattr(
        torch, "mm", lambda x, w: (seen.append((w.size(1), torch.get_num_threads())), mm(x, w))[1]
    )
    monkeypatch.setattr(
        torch, "addmm", lambda a, x, w: (seen.append((w.size(1), torch.get_num_threads())), addmm(a, x, w))[1]
    )
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with torch.inference_mode():
            step(torch.tensor([5]), torch.tensor([0]), KVCache(model.cfg, 1, CTX), 1)
        assert (256, 2) in seen and all(n == 1 for rows, n in seen if rows != 256)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def greedy(n):
    return SamplingConfig(max_new_tokens=n, temperature=0.0, repetition_penalty=1.3, stop_at_eos=False)


def sampled(n, seed):
    return SamplingConfig(
        max_new_tokens=n, temperature=0.9, top_k=20, top_p=0.9, seed=seed, stop_at_eos=False
    )


def run(model, arrivals: dict[int, list[tuple[int, Request]]], **engine) -> dict[int, list[int]]:
    """Run a new Engine where arrivals[step] requests join at that step; return each key's tokens."""
    return drive(Engine(model, **{"max_batch_size": 8, "eos_id": None, **engine}), arrivals)


def drive(engine: Engine, arrivals: dict[int, list[tuple[int, Request]]]) -> dict[int, list[int]]:
    """Run engine where arrivals[step] requests join at that step; return each key's tokens."""
    out: dict[int, list[int]] = {}
    step = 0
    while engine.busy or any(s >= step for s in arrivals):
        for key, req in arrivals.get(step, []):
            engine.add(key, req)
        for ev in engine.step():
            out.setdefault(ev.row, []).extend(ev.ids)
        step += 1
    return out


@pytest.mark.parametrize("option", ["gqa", "classic"])
def test_a_row_decodes_the_same_alone_and_among_rows_that_join_and_leave(option, monkeypatch):
    model = tiny(**OPTIONS[option])
    prompts = [[2, 17, 42, 5, 88, 23, 9], [2, 9], [2, 31, 64, 1, 77, 12, 13, 14, 15, 16], [2, 50, 50]]
    requests = [
        Request(prompts[0], greedy(20)),
        Request(prompts[1], sampled(6, 1)),
        Request(prompts[2], sampled(25, 2)),
        Request(prompts[3], greedy(3)),
    ]
    together = run(
        model, {0: [(0, requests[0]), (1, requests[1])], 4: [(2, requests[2])], 9: [(3, requests[3])]}
    )
    for key, req in enumerate(requests):
        assert together[key] == run(model, {0: [(key, req)]})[key]
    # The model's own forward (the fallback) gives the same tokens.
    monkeypatch.setattr(slots.DecodeStep, "of", classmethod(lambda cls, m: None))
    assert (
        run(model, {0: [(0, requests[0]), (1, requests[1])], 4: [(2, requests[2])], 9: [(3, requests[3])]})
        == together
    )


def test_the_compiled_cpu_step_decodes_the_eager_tokens():
    """inductor (C++ wrapper, few guards) on the fast step: the eager step's tokens, rows joining and leaving;
    two compiled engines of different models in one process each keep their own graphs."""
    torch._dynamo.reset()
    models = [tiny(**OPTIONS["gqa"]), tiny(**OPTIONS["modern"])]
    with torch.no_grad():
        models[1].head.weight.mul_(-1.5)  # other weights, and other cache shapes (4 KV heads, not 2)
    requests = [
        Request([2, 17, 42, 5, 88], greedy(12)),
        Request([2, 9], sampled(20, 1)),
        Request([2, 50], greedy(6)),
    ]
    arrivals = {0: [(0, requests[0])], 3: [(1, requests[1]), (2, requests[2])]}  # 2 rows: the third waits
    engines = [Engine(m, max_batch_size=2, eos_id=None, compile=True) for m in models]
    assert all(e.slots.fast is not None and e.slots.compile for e in engines)
    for _ in range(2):  # the engines take turns: neither runs the other's graphs
        for model, engine in zip(models, engines):
            assert drive(engine, arrivals) == run(model, arrivals, max_batch_size=2)
    with torch.no_grad():  # trained in place: the compiled step reads the weights' refreshed copies
        models[0].head.weight.mul_(-1.0)
        models[0].blocks[0].mlp.up.weight.mul_(1.7)
    assert drive(engines[0], arrivals) == run(models[0], arrivals, max_batch_size=2)
    torch._dynamo.reset()
