"""Speculative decoding by prompt lookup: drafts, the T-token step, and the same tokens as plain decoding."""

import dataclasses
import subprocess
import sys

import pytest
import torch

from qinglm.config import ModelConfig, SamplingConfig
from qinglm.errors import QingLMError
from qinglm.infer import slots, speculate
from qinglm.infer.engine import Engine, Generation, Request
from qinglm.infer.generate import generate_ids
from qinglm.infer.speculate import PromptLookup, SpecStats
from qinglm.infer.step import DecodeStep
from qinglm.model.transformer import KVCache, Transformer
from tests.test_step import CTX, OPTIONS, V, drive, tiny

PROMPTS = [[2, 17, 42, 5, 17, 42, 5, 17], [2, 9, 30, 9, 30], [2, 31, 64, 1, 31, 64, 1], [2, 50, 50, 50]]


def greedy(n: int, k: int, penalty: float = 1.0) -> SamplingConfig:
    return SamplingConfig(
        max_new_tokens=n, temperature=0.0, repetition_penalty=penalty, stop_at_eos=False, speculate=k
    )


def sampled(n: int, k: int, seed: int) -> SamplingConfig:
    return SamplingConfig(
        max_new_tokens=n, temperature=0.8, top_k=20, top_p=0.9, seed=seed, stop_at_eos=False, speculate=k
    )


@pytest.fixture
def many_rows(monkeypatch):
    """Verify drafts while up to 8 rows decode (by default only one does: speculate.MAX_ROWS)."""
    monkeypatch.setattr(speculate, "MAX_ROWS", 8)


def tokens(model, requests: list[Request]) -> tuple[list[list[int]], SpecStats]:
    """Return each request's tokens from one Generation, and what it speculated."""
    out = [[] for _ in requests]
    gen = Generation(model, requests)
    for events in gen:
        for ev in events:
            out[ev.row] += ev.ids
    return out, gen.engine.spec


def test_prompt_lookup_drafts_what_followed_the_latest_longest_match():
    look = PromptLookup([1, 2, 3, 9, 1, 2, 3, 4, 5, 7, 2, 3])
    assert look.propose(3) == [4, 5, 7]  # "2 3" (its latest earlier end, before the tail) then 4 5 7
    look.extend([4])
    assert look.propose(2) == [5, 7]  # "2 3 4" now
    assert PromptLookup([1, 2, 3]).propose(4) == []  # nothing occurred before
    assert PromptLookup([5, 6, 5, 6]).propose(5) == [5, 6, 5, 6, 5]  # a loop continues with its period
    assert PromptLookup([7, 7]).propose(3) == [7, 7, 7]
    assert PromptLookup([1, 2, 1, 2]).propose(0) == []


@pytest.mark.parametrize("option", ["modern", "gqa", "qk-norm", "gated", "learned"])
@pytest.mark.parametrize("traced", [False, True])
def test_t_tokens_a_row_give_the_logits_and_cache_of_one_at_a_time(option, traced):
    """The fast step with (rows, T) tokens, eager writes and the compiled engine's traced ones, and the
    model's own forward with T tokens a row: the logits and keys of T one-token steps."""
    model = tiny(**OPTIONS[option])
    step = DecodeStep.of(model)
    step.traced = traced
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (3, 20), generator=gen)
    start, T = torch.tensor([4, 9, 0]), 5
    caches = [KVCache(model.cfg, 4, CTX) for _ in range(3)]
    with torch.inference_mode():
        for p in range(20):  # every row's first 20 tokens, one a step, into the reference cache
            want_p = step(ids[:, p], torch.full((3,), p), caches[0], p + 1)
            if p == 0:
                want = torch.zeros(3, T, want_p.size(-1))
            for b in range(3):
                if start[b] <= p < start[b] + T:
                    want[b, p - start[b]] = want_p[b]
        for c in caches[1:]:  # the others: each row up to its start, then T tokens at once
            for p in range(int(start.max())):
                step(ids[:, p], torch.full((3,), p), c, p + 1)
            for b in range(3):  # what lies past a row's length must not count
                c.k[:, b, :, int(start[b]) :] = 7.0
                c.v[:, b, :, int(start[b]) :] = 7.0
        fed = torch.stack([ids[b, start[b] : start[b] + T] for b in range(3)])
        got = step(fed, start, caches[1], int(start.max()) + T).view(3, T, -1)
        own = model(fed, cache=caches[2], start=start, window=int(start.max()) + T)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert torch.allclose(own, want, atol=1e-5, rtol=0)
    for b in range(3):
        end = int(start[b]) + T
        assert torch.allclose(caches[1].k[:, b, :, :end], caches[0].k[:, b, :, :end], atol=1e-5)
        assert torch.allclose(caches[1].v[:, b, :, :end], caches[0].v[:, b, :, :end], atol=1e-5)


@pytest.mark.parametrize("option", ["gqa", "qk-norm", "classic"])
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_tokens_are_plain_decodings(option, penalty, monkeypatch, many_rows):
    model = tiny(**OPTIONS[option])
    want, _ = tokens(model, [Request(p, greedy(30 - 5 * i, 0, penalty)) for i, p in enumerate(PROMPTS)])
    got, spec = tokens(model, [Request(p, greedy(30 - 5 * i, 4, penalty)) for i, p in enumerate(PROMPTS)])
    assert got == want and [len(t) for t in got] == [30, 25, 20, 15]
    assert 0 < spec.accepted <= spec.drafted and spec.steps > 0
    monkeypatch.setattr(slots.DecodeStep, "of", classmethod(lambda cls, m: None))  # the model's own forward
    assert (
        tokens(model, [Request(p, greedy(30 - 5 * i, 4, penalty)) for i, p in enumerate(PROMPTS)])[0] == want
    )


def test_seeded_sampling_gives_the_same_tokens_with_and_without_drafts(many_rows):
    """One uniform number a token, drawn as plain decoding draws it: the same tokens for a seed."""
    model = tiny(**OPTIONS["gqa"])
    with torch.no_grad():
        model.head.weight.mul_(4.0)  # peaked: drafts get accepted now and then
    plain, _ = tokens(model, [Request(p, sampled(40, 0, 7 + i)) for i, p in enumerate(PROMPTS)])
    spec_out, spec = tokens(model, [Request(p, sampled(40, 6, 7 + i)) for i, p in enumerate(PROMPTS)])
    assert spec_out == plain and spec.accepted > 0


def test_rows_that_speculate_join_and_leave_among_rows_that_do_not(many_rows):
    model = tiny(**OPTIONS["gqa"])
    requests = [
        Request(PROMPTS[0], greedy(24, 5, 1.3)),
        Request(PROMPTS[1], sampled(12, 0, 1)),
        Request(PROMPTS[2], greedy(30, 3)),
        Request(PROMPTS[3], sampled(9, 4, 2)),
    ]
    arrivals = {0: [(0, requests[0]), (1, requests[1])], 3: [(2, requests[2])], 7: [(3, requests[3])]}
    engine = Engine(model, max_batch_size=8, eos_id=None)
    together = drive(engine, arrivals)
    assert engine.spec.accepted > 0
    for key, req in enumerate(requests):
        plain = dataclasses.replace(req, sampling=dataclasses.replace(req.sampling, speculate=0))
        assert together[key] == drive(Engine(model, max_batch_size=8, eos_id=None), {0: [(key, plain)]})[key]


def test_drafts_stop_at_max_new_tokens_and_the_context():
    model = tiny(**OPTIONS["gqa"])
    long = [2] + [17, 42, 5] * 13  # 40 tokens of a context of 48
    want, _ = tokens(model, [Request(long, greedy(20, 0))])
    got, _ = tokens(model, [Request(long, greedy(20, 8))])
    assert got == want and len(got[0]) == CTX - len(long) + 1  # the context ends it, as plain decoding
    got, _ = tokens(model, [Request(PROMPTS[0], greedy(3, 8))])
    assert len(got[0]) == 3


def test_only_a_row_decoding_alone_drafts():
    model = tiny(**OPTIONS["gqa"])
    requests = [Request(PROMPTS[0], greedy(30, 4)), Request(PROMPTS[1], greedy(10, 4))]
    _, spec = tokens(model, requests)
    assert 0 < spec.steps <= 30 - 10  # none while both decode; the long row drafts after the short one ends
    _, spec = tokens(model, requests[1:] * 2)
    assert spec.steps == 0


def test_generate_ids_yields_every_token_of_a_speculative_step():
    model = tiny(**OPTIONS["gqa"])
    plain = list(generate_ids(model, PROMPTS[0], greedy(25, 0), eos_id=None))
    assert list(generate_ids(model, PROMPTS[0], greedy(25, 6), eos_id=None)) == plain and len(plain) == 25


def test_speculate_is_bounded():
    with pytest.raises(QingLMError, match="speculate"):
        SamplingConfig(speculate=17)
    with pytest.raises(QingLMError, match="speculate"):
        SamplingConfig(speculate=-1)


def test_stats_line():
    assert "no draft" in SpecStats().line()
    line = SpecStats(steps=4, drafted=16, accepted=12).line()
    assert "12 of 16" in line and "75.0%" in line and "4.00 tokens" in line


def test_generate_cli_prints_the_same_text_and_the_acceptance_rate(tmp_path, tiny_run):
    from qinglm.tokenizer import train_tokenizer

    tok = train_tokenizer(["今天天气真不错，我们一起去公园散步吧。"] * 50, 300, show_progress=False)
    run = tiny_run(tmp_path / "run", tok)
    base = [sys.executable, "-m", "qinglm", "generate", "--model", str(run), "--prompt", "今天天气真不错，"]
    base += ["--temperature", "0", "--max-new-tokens", "40", "--no-stop-at-eos"]
    plain = subprocess.run(base, capture_output=True, text=True, check=True)
    spec = subprocess.run([*base, "--speculate", "4"], capture_output=True, text=True, check=True)
    assert spec.stdout == plain.stdout
    assert "speculative decoding:" in spec.stderr and "speculative" not in plain.stderr
    drafted = subprocess.run([*base, "--draft", str(run)], capture_output=True, text=True, check=True)
    assert drafted.stdout == plain.stdout and "(100.0%)" in drafted.stderr  # its own drafts, 4 a step


def test_stop_strings_and_text_are_plain_decodings(tiny_model):
    """Text, stop strings and finish reasons of a speculating row: the plain row's, cut at the same place."""
    from qinglm.tokenizer import train_tokenizer

    tok = train_tokenizer(["今天天气真不错，我们一起去公园散步吧。"] * 50, 300, show_progress=False)
    model = tiny_model(tok.vocab_size)
    prompt = tok.encode("今天天气真不错，")

    def text(k: int, stop=()) -> tuple[str, str, SpecStats]:
        gen = Generation(model, [Request(prompt, greedy(40, k), stop)], tokenizer=tok)
        pieces, reason = [], None
        for events in gen:
            for ev in events:
                pieces.append(ev.text)
                reason = ev.finish_reason or reason
        return "".join(pieces), reason, gen.engine.spec

    plain, reason, _ = text(0)
    assert text(8)[:2] == (plain, reason) and text(8)[2].accepted > 0
    stop = plain[len(plain) // 2 : len(plain) // 2 + 2]  # a stop string inside what a draft would carry on
    cut, reason, _ = text(0, [stop])
    assert reason == "stop" and len(cut) < len(plain)
    assert text(8, [stop])[:2] == (cut, "stop")


def small_draft(ctx: int = CTX):
    """A smaller random model of the same vocabulary (another seed, 1 layer, 16 wide)."""
    torch.manual_seed(5)
    cfg = ModelConfig(vocab_size=V, d_model=16, n_layers=1, n_heads=2, max_seq_len=ctx, dropout=0.0)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_a_draft_model_gives_the_plain_tokens(penalty):
    model = tiny(**OPTIONS["gqa"])
    requests = [Request(p, greedy(30, 0, penalty)) for p in PROMPTS[:2]]
    want = [tokens(model, [r])[0][0] for r in requests]
    for draft in (model, small_draft(), small_draft(ctx=12)):  # itself, another, one of a short context
        for req, w in zip(requests, want):
            req = dataclasses.replace(req, sampling=dataclasses.replace(req.sampling, speculate=4))
            gen = Generation(model, [req], draft=draft)
            assert [t for events in gen for ev in events for t in ev.ids] == w
            spec = gen.engine.spec
            if draft is model:  # its own drafts: every one accepted
                assert spec.drafted > 0 and spec.accepted == spec.drafted
    sampled_req = Request(PROMPTS[0], sampled(30, 0, 4))
    plain = tokens(model, [sampled_req])[0]
    spec_req = Request(PROMPTS[0], sampled(30, 4, 4))
    assert [
        t for events in Generation(model, [spec_req], draft=small_draft()) for ev in events for t in ev.ids
    ] == plain[0]


def test_a_draft_rows_cache_holds_what_a_fresh_one_computes():
    """After drafts partly accepted, the keys/values kept give the drafts a row drafting from scratch gives."""
    from qinglm.infer.speculate import DraftModel, DraftRow

    draft = DraftModel(small_draft(), tiny(**OPTIONS["gqa"]))
    row = DraftRow(draft, PROMPTS[0], penalty=1.3)
    for accept in (2, 0, 3, 1):
        proposal = row.propose(4)
        row.extend(proposal[:accept] + [(proposal[accept] + 1) % V])  # accepted, then another token
        assert row.valid == len(row.ids) - 1  # every token kept but the last, which was never fed
        assert row.propose(3) == DraftRow(draft, row.ids, penalty=1.3).propose(3)


def test_a_draft_of_another_vocabulary_is_refused(tiny_run, tmp_path):
    from qinglm.infer.speculate import DraftModel
    from qinglm.tokenizer import train_tokenizer

    cfg = ModelConfig(vocab_size=V + 1, d_model=16, n_layers=1, n_heads=2, max_seq_len=CTX, dropout=0.0)
    with pytest.raises(QingLMError, match="vocabulary"):
        DraftModel(Transformer(cfg), tiny())
    a = tiny_run(tmp_path / "a", train_tokenizer(["今天天气真不错。"] * 50, 300, show_progress=False))
    b = tiny_run(tmp_path / "b", train_tokenizer(["我们一起去公园散步吧。"] * 50, 300, show_progress=False))
    import qinglm

    with pytest.raises(QingLMError, match="another tokenizer"):
        qinglm.load(a, device="cpu", draft=b)
