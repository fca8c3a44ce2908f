"""The static-cache decode engine: exact against full recomputation, rows joining and leaving, budgets."""

import threading

import pytest
import torch

from qinglm.config import ModelConfig, SamplingConfig
from qinglm.errors import QingLMError
from qinglm.infer import slots as slots_module
from qinglm.infer.engine import Engine, Request
from qinglm.infer.generate import generate_ids
from qinglm.model.lora import apply_lora, merge_lora
from qinglm.model.quantize import quantize
from qinglm.model.transformer import KVCache, Transformer

V, CTX = 97, 64
FAMILIES = {
    "modern-gqa": dict(family="modern", n_kv_heads=2),
    "classic": dict(family="classic"),
    "learned": dict(family="classic", pos_encoding="learned"),
    "moe": dict(family="modern", n_experts=4, experts_per_token=2, moe_every=1),
    "qk-norm-gated": dict(family="modern", qk_norm=True, gated_attention=True),
    "lora-merged": dict(family="modern"),
    "int8": dict(family="modern"),
}
PROMPTS = [[2, 17, 42, 5, 88, 23, 9, 61, 30], [2, 9], [2, 31, 64, 1, 77], [2, 50, 50, 50]]


def model_of(name: str) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=CTX, dropout=0.0)
    for k, v in FAMILIES[name].items():
        setattr(cfg, k, v)
    model = Transformer(cfg).eval()
    if name == "lora-merged":
        apply_lora(model, rank=4)
        for p in model.parameters():  # LoRA's B starts at zero: make the update count
            if p.requires_grad:
                p.data.normal_(0, 0.05)
        merge_lora(model)
    if name == "int8":
        quantize(model, "int8")
    return model.eval()


def greedy(n: int, penalty: float = 1.0) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=n, temperature=0.0, repetition_penalty=penalty, stop_at_eos=False)


def sampled(n: int, seed: int) -> SamplingConfig:
    return SamplingConfig(
        max_new_tokens=n, temperature=1.0, top_k=20, top_p=0.9, seed=seed, stop_at_eos=False
    )


def naive_greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("name", FAMILIES)
def test_static_cache_logits_equal_full_recompute_for_every_family(name):
    model = model_of(name)
    lengths = [9, 2, 5]
    seqs = [PROMPTS[0], PROMPTS[1], PROMPTS[2]]
    with torch.no_grad():
        cache = KVCache(model.cfg, 4, 32)
        for b, s in enumerate(seqs):  # each row's prompt sits at positions 0.. of its own row
            one = KVCache(model.cfg, 1, 32)
            model(torch.tensor([s]), cache=one)
            cache.k[:, b], cache.v[:, b] = one.k[:, 0], one.v[:, 0]
        nxt = torch.tensor([11, 12, 13])
        got = model(nxt[:, None], cache=cache, start=torch.tensor(lengths), last_only=True, window=16)[:, -1]
        for b, s in enumerate(seqs):
            want = model(torch.tensor([s + [int(nxt[b])]]))[0, -1]
            tol = 2e-2 if name == "int8" else 1e-5  # int8: bf16 activations in the kernel
            torch.testing.assert_close(got[b], want, atol=tol, rtol=tol)


@pytest.mark.parametrize("name", [n for n in FAMILIES if n != "int8"])
def test_engine_greedy_equals_full_recompute_for_every_family(name):
    model = model_of(name)
    engine = Engine(model, max_batch_size=4)
    for i, p in enumerate(PROMPTS):
        engine.add(i, Request(p, greedy(12)))
    ids = {i: [] for i in range(len(PROMPTS))}
    while engine.busy:
        for ev in engine.step():
            ids[ev.row] += ev.ids
    assert [ids[i] for i in range(len(PROMPTS))] == [naive_greedy(model, p, 12) for p in PROMPTS]


def test_int8_greedy_on_the_engine_equals_int8_alone():
    model = model_of("int8")
    alone = [list(generate_ids(model, p, greedy(10), eos_id=None)) for p in PROMPTS]
    together = list(zip(*generate_ids(model, PROMPTS, greedy(10), eos_id=None)))
    assert [list(r) for r in together] == alone


def run_with_traffic(model, key_req, chunk=4):
    """Decode key_req while other requests join, get cancelled and finish around it; return its ids."""
    engine = Engine(model, max_batch_size=4, prefill_chunk=chunk)
    engine.add("me", key_req)
    got, step = [], 0
    long_prompt = [2] + list(range(10, 40))  # prefilled in chunks while "me" decodes
    while engine.busy:
        if step == 2:
            engine.add("long", Request(long_prompt, sampled(6, 3)))
            engine.add("short", Request(PROMPTS[1], greedy(3)))
        if step == 4:
            engine.add("gone", Request(PROMPTS[3], sampled(20, 4)))
        if step == 6:
            engine.cancel("gone")
        for ev in engine.step():
            if ev.row == "me":
                got += ev.ids
        step += 1
    return got


@pytest.mark.parametrize("cfg", [greedy(16, penalty=1.3), sampled(16, seed=5)], ids=["greedy", "sampled"])
def test_a_row_decodes_the_same_alone_or_while_others_join_and_leave(cfg):
    model = model_of("modern-gqa")
    alone = list(generate_ids(model, PROMPTS[0], cfg, eos_id=None))
    assert run_with_traffic(model, Request(PROMPTS[0], cfg)) == alone
    assert run_with_traffic(model, Request(PROMPTS[0], cfg), chunk=64) == alone


def test_kv_budget_queues_rows_and_refuses_what_never_fits():
    model = model_of("modern-gqa")
    engine = Engine(model, max_batch_size=4, kv_tokens=32)
    with pytest.raises(QingLMError, match="KV-cache"):
        engine.add("big", Request(PROMPTS[0], greedy(40)))  # needs 48 positions > 32
    for i, p in enumerate(PROMPTS):
        engine.add(i, Request(p, greedy(8)))
    ids, peak = {i: [] for i in range(len(PROMPTS))}, 0
    while engine.busy:
        for ev in engine.step():
            ids[ev.row] += ev.ids
        peak = max(peak, engine.slots.rows * engine.slots.positions)
    assert peak <= 32  # the cache never held more than the budget: rows took turns
    assert [ids[i] for i in range(len(PROMPTS))] == [naive_greedy(model, p, 8) for p in PROMPTS]


def test_compiled_step_recompiles_a_bounded_number_of_times(monkeypatch):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps the counts of earlier tests' compiles
    monkeypatch.setattr(slots_module, "COMPILE_OPTIONS", {"backend": "eager", "dynamic": False})
    model = model_of("modern-gqa")
    counts = []
    engine = Engine(model, max_batch_size=8, compile=True)  # one engine (a server's) sees every batch size
    for n_rows in (1, 2, 3, 5, 7, 8, 6, 4):
        for i in range(n_rows):
            engine.add(i, Request([2] + list(range(10, 10 + 3 * i + n_rows)), greedy(5 + 4 * i)))
        while engine.busy:
            engine.step()
        counts.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    # rows bucket to 1, 2, 4, 8 and the window is 64 (the whole context): 4 graphs however many calls
    assert engine.slots.n_graphs == 4
    assert counts[2] > counts[0] and counts[-1] == 4
    torch._dynamo.reset()


def test_warm_up_compiles_every_shape_so_no_request_waits_for_a_compile(monkeypatch):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    monkeypatch.setattr(slots_module, "COMPILE_OPTIONS", {"backend": "eager", "dynamic": False})
    model = model_of("modern-gqa")
    engine = Engine(model, max_batch_size=8, compile=True)
    assert engine.warm_up() == engine.slots.n_graphs == 4
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 4
    for i in range(7):
        engine.add(i, Request([2] + list(range(10, 13 + 2 * i)), greedy(3 + 3 * i)))
    out = {}
    while engine.busy:
        for ev in engine.step():
            out.setdefault(ev.row, []).extend(ev.ids)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 4  # nothing compiled while serving
    assert out[3] == naive_greedy(model, [2] + list(range(10, 19)), 12)  # the warm-up's writes did no harm
    assert Engine(model).warm_up() == 0  # eager: nothing to compile
    torch._dynamo.reset()


def test_the_server_worker_warms_its_compiled_engine_up_before_serving(monkeypatch):
    from types import SimpleNamespace

    from qinglm.serve.scheduler import Scheduler

    calls = []
    monkeypatch.setattr(Engine, "warm_up", lambda self: calls.append(threading.current_thread().name) or 3)
    lm = SimpleNamespace(model=model_of("modern-gqa"), tokenizer=None, device=torch.device("cpu"))
    for compile in (False, True):
        scheduler = Scheduler(lm, compile=compile)
        scheduler.start()  # returns once the worker is ready
        scheduler.stop()
    assert calls == ["qinglm-serve-worker"]  # compiled only, in the thread that decodes


def test_a_group_of_identical_prompts_is_prefilled_once_and_long_prompts_in_chunks():
    model = model_of("modern-gqa")
    shapes = []
    model.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    engine = Engine(model, max_batch_size=8, prefill_chunk=8)
    for g in range(4):  # a GRPO group: one prompt, four seeds
        engine.add(g, Request(PROMPTS[0], sampled(6, seed=g)))
    engine.add("other", Request(PROMPTS[2], greedy(6)))
    out = {}
    while engine.busy:
        for ev in engine.step():
            out.setdefault(ev.row, []).extend(ev.ids)
        if len(shapes) == 2:  # rows are decoding now: a long prompt joins and is prefilled 8 at a time
            engine.add("long", Request([2] + list(range(10, 40)), greedy(3)))
    assert shapes[0] == (2, 9)  # two distinct prompts, one forward, no copy of the group's prompt
    assert (1, 8) in shapes and max(s[1] for s in shapes[1:]) == 8
    assert len({tuple(out[g]) for g in range(4)}) > 1  # the group's rows still sample apart
    assert out["other"] == naive_greedy(model, PROMPTS[2], 6)
    assert out["long"] == naive_greedy(model, [2] + list(range(10, 40)), 3)
