"""The batched engine: prompts of different lengths, per-row settings, stop strings, cancelling."""

import pytest
import torch

from qinglm.config import ModelConfig, SamplingConfig
from qinglm.errors import QingLMError
from qinglm.infer.engine import Event, Generation, Request
from qinglm.infer.generate import complete, generate, generate_ids
from qinglm.infer.sampling import N_CONTROL_IDS
from qinglm.infer.text import TextDecoder
from qinglm.model.transformer import KVCache, Transformer
from qinglm.tokenizer import train_tokenizer

V, CTX, EOS = 97, 64, 3
FAMILIES = {
    "modern-gqa": dict(family="modern", n_kv_heads=2),  # RoPE gathered per row, grouped-query attention
    "classic": dict(family="classic"),  # sinusoidal positions
    "learned": dict(family="classic", pos_encoding="learned"),
}
PROMPTS = [[2, 17, 42, 5, 88, 23, 9, 61, 30], [2, 9], [2, 31, 64, 1, 77], [2, 50, 50, 50]]


def tiny(vocab: int = V, **kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, max_seq_len=CTX, dropout=0.0, **kw)
    return Transformer(cfg).eval()


def greedy(n: int, penalty: float = 1.0) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=n, temperature=0.0, repetition_penalty=penalty, stop_at_eos=False)


def naive_greedy(
    model: Transformer, prompt: list[int], n: int, penalty: float = 1.0, counted: list[bool] | None = None
) -> list[int]:
    """Recompute the whole sequence every step (no cache, no padding): the reference."""
    ids = list(prompt)
    counted = list(counted) if counted is not None else [True] * len(prompt)
    with torch.no_grad():
        for _ in range(n):
            if len(ids) > CTX:
                break
            logits = model(torch.tensor([ids]))[0, -1].clone()
            seen = {t for t, c in zip(ids, counted + [True] * (len(ids) - len(prompt))) if c}
            for t in seen - set(range(N_CONTROL_IDS)):  # control tokens are never penalised
                logits[t] = logits[t] / penalty if logits[t] > 0 else logits[t] * penalty
            ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


def run_rows(model, requests, **kw) -> tuple[list[list[int]], list[str], list[str | None]]:
    """Return each row's ids, text and finish reason after running the engine to the end."""
    ids, texts, reasons = [[] for _ in requests], [""] * len(requests), [None] * len(requests)
    for events in Generation(model, requests, **kw):
        for ev in events:
            assert reasons[ev.row] is None, "no event after a row's last one"
            ids[ev.row] += ev.ids
            texts[ev.row] += ev.text
            reasons[ev.row] = ev.finish_reason
    return ids, texts, reasons


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_cached_forward_equals_full_recompute(family):
    model = tiny(**FAMILIES[family])
    long, short = PROMPTS[0], PROMPTS[1]
    pad = torch.tensor([0, len(long) - len(short)])
    batch = torch.tensor([long, [0] * int(pad[1]) + short])
    with torch.no_grad():
        want_long, want_short = model(torch.tensor([long]))[0], model(torch.tensor([short]))[0]
        torch.testing.assert_close(model(batch, pad=pad)[1, -len(short) :], want_short)
        cache = KVCache(model.cfg, 2, 12)
        model(batch[:, :5], cache=cache, start=0, pad=pad)  # prefill in two chunks, then one token
        model(batch[:, 5:8], cache=cache, start=5, pad=pad)
        last = model(batch[:, 8:], cache=cache, start=8, pad=pad)
    torch.testing.assert_close(last[0, -1], want_long[-1])
    torch.testing.assert_close(last[1, -1], want_short[-1])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("penalty", [1.0, 2.0])
def test_batched_greedy_equals_one_at_a_time(family, penalty):
    model = tiny(**FAMILIES[family])
    batched = run_rows(model, [Request(p, greedy(8, penalty)) for p in PROMPTS])[0]
    for prompt, got in zip(PROMPTS, batched):
        alone = list(generate_ids(model, prompt, greedy(8, penalty), eos_id=EOS))
        assert got == alone == naive_greedy(model, prompt, 8, penalty)


def test_penalty_counts_only_the_prompt_tokens_marked_counted():
    model = tiny(**FAMILIES["modern-gqa"])
    liked = PROMPTS[0] + naive_greedy(model, PROMPTS[0], 6)  # tokens this model likes
    counted = [k < 3 for k in range(len(liked))]  # the penalty counts only the first three
    requests = [Request(liked, greedy(12, 3.0), counted=counted), Request(PROMPTS[1], greedy(12, 3.0))]
    got = run_rows(model, requests)[0]
    assert got[0] == naive_greedy(model, liked, 12, 3.0, counted)
    assert got[0] != naive_greedy(model, liked, 12, 3.0)  # the mask matters here
    assert got[1] == naive_greedy(model, PROMPTS[1], 12, 3.0)
    with pytest.raises(QingLMError, match="counted"):
        Generation(model, [Request(liked, counted=[True])])


def test_rows_finish_at_their_own_limits_and_the_rest_go_on():
    model = tiny(**FAMILIES["modern-gqa"])
    near_full = [2] + list(range(10, 68))  # 59 tokens: 6 positions left in a 64-token context
    prompts, limits = [PROMPTS[1], near_full, PROMPTS[2], PROMPTS[0]], [3, 30, 20, 1]
    ids, _, reasons = run_rows(model, [Request(p, greedy(n)) for p, n in zip(prompts, limits)])
    assert [len(r) for r in ids] == [3, CTX - len(near_full) + 1, 20, 1]
    assert reasons == ["length"] * 4
    for prompt, n, got in zip(prompts, limits, ids):
        assert got == naive_greedy(model, prompt, n)  # dropping finished rows keeps the others right


def test_per_row_sampling_settings_and_seeds():
    model = tiny()

    def sampled(seed, top_k=None):
        return SamplingConfig(
            max_new_tokens=15, temperature=1.0, top_k=top_k, top_p=None, seed=seed, stop_at_eos=False
        )

    alone = [list(generate_ids(model, PROMPTS[2], sampled(s), eos_id=EOS)) for s in (7, 8)]
    reqs = [
        Request(PROMPTS[0], greedy(15)),
        Request(PROMPTS[2], sampled(7)),
        Request(PROMPTS[1], sampled(1, top_k=1)),  # top-k 1 is greedy at any temperature
        Request(PROMPTS[2], sampled(8)),
        Request(PROMPTS[3], greedy(5, penalty=3.0)),
    ]
    ids = run_rows(model, reqs)[0]
    assert ids[0] == naive_greedy(model, PROMPTS[0], 15)
    assert ids[1] == alone[0] and ids[3] == alone[1]  # a seed gives the same draws alone or in a batch
    assert ids[1] != ids[3]
    assert ids[2] == naive_greedy(model, PROMPTS[1], 15)
    assert ids[4] == naive_greedy(model, PROMPTS[3], 5, penalty=3.0)
    assert run_rows(model, reqs)[0] == ids  # and the whole batch is reproducible


def test_eos_ends_only_its_row():
    model = tiny()
    calls = []

    def eos_for_row0_on_third_call(module, inputs, out):
        calls.append(out.size(0))
        out = out.clone()
        out[..., EOS] = -1e4
        if len(calls) == 3:
            out[0, ..., EOS] = 1e4
        return out

    model.head.register_forward_hook(eos_for_row0_on_third_call)
    reqs = [Request(PROMPTS[0], SamplingConfig(max_new_tokens=6, seed=0)) for _ in range(2)]
    ids, _, reasons = run_rows(model, reqs, eos_id=EOS)
    assert [len(r) for r in ids] == [2, 6] and reasons == ["stop", "length"]
    # The identical prompts are prefilled once (one row), both rows decode, and the finished row leaves
    # the batch: later steps run one row.
    assert calls == [1, 2, 2, 1, 1, 1]


def test_cancel_a_row():
    model = tiny()
    gen = Generation(model, [Request(p, greedy(10)) for p in PROMPTS[:3]])
    ids, reasons = [[], [], []], [None] * 3
    for step, events in enumerate(gen):
        for ev in events:
            ids[ev.row] += ev.ids
            reasons[ev.row] = ev.finish_reason
        if step == 1:
            gen.cancel(1)
    assert reasons == ["length", "cancelled", "length"]
    assert len(ids[1]) == 2 and ids[2] == naive_greedy(model, PROMPTS[2], 10)


def test_a_row_with_no_new_tokens_finishes_at_once():
    model = tiny()
    ids, _, reasons = run_rows(model, [Request(PROMPTS[0], greedy(0)), Request(PROMPTS[1], greedy(3))])
    assert ids == [[], naive_greedy(model, PROMPTS[1], 3)] and reasons == ["length", "length"]
    assert list(Generation(model, [Request(PROMPTS[0], greedy(0))])) == [[Event(0, [], "", "length")]]


def test_bad_requests_are_user_errors():
    model = tiny()
    with pytest.raises(QingLMError, match="prompt is 65 tokens"):
        Generation(model, [Request(PROMPTS[0], greedy(3)), Request([2] * 65, greedy(3))])
    with pytest.raises(QingLMError, match="empty"):
        Generation(model, [Request([], greedy(3))])
    with pytest.raises(QingLMError, match="tokenizer"):
        Generation(model, [Request(PROMPTS[0], greedy(3), stop=["x"])])
    with pytest.raises(QingLMError, match=r"--top-p must be in \(0, 1\]"):
        Generation(model, [Request(PROMPTS[0], SamplingConfig(top_p=2.0))])


# ---------------------------------------------------------------------------- text

LINES = [
    "今天天气真不错，我们一起去公园散步吧。",
    "人工智能的未来充满了希望和挑战🚀",
    "中国经济稳步增长，市场信心持续恢复📈",
    "春天来了，花儿都开了🌸",
]
RARE = "龘𠀀🦄é中国经济🚀"  # characters the tokenizer never saw: several byte tokens each


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([f"{LINES[i % len(LINES)]}第{i}行" for i in range(200)], 400, show_progress=False)


def scripted(tok, text: str) -> Transformer:
    """Return a model that emits the tokens of text one per step (the same in every row), then EOS."""
    script = tok.encode(text) + [tok.eos_id]
    model = tiny(tok.vocab_size)
    steps = []

    def force(module, inputs, out):
        out = torch.full_like(out, -1e4)
        out[..., script[min(len(steps), len(script) - 1)]] = 1e4
        steps.append(1)
        return out

    model.head.register_forward_hook(force)
    return model


def stream_rows(model, tok, prompts, stop=()):
    """Return (pieces per row, finish reason per row) of the engine with the tokenizer."""
    pieces, reasons = [[] for _ in prompts], [None] * len(prompts)
    cfg = SamplingConfig(max_new_tokens=40, seed=0)
    for events in Generation(model, [Request(tok.encode(p), cfg, stop) for p in prompts], tokenizer=tok):
        for ev in events:
            pieces[ev.row] += [ev.text] if ev.text else []
            reasons[ev.row] = ev.finish_reason
    return pieces, reasons


def test_streaming_never_emits_half_a_character(tok):
    text = RARE + "今天天气真不错"
    model = scripted(tok, text)
    pieces, reasons = stream_rows(model, tok, ["春天", "人工智能的未来充满了"])
    assert reasons == ["stop", "stop"]  # EOS
    for row in pieces:
        assert len(row) > 1 and all("\ufffd" not in p for p in row)
        assert "".join(row) == text


@pytest.mark.parametrize(
    "stop, want, reason",
    [
        (["一起"], "今天天气真不错，我们", "stop"),
        (["不存在", "，我"], "今天天气真不错", "stop"),
        (["我们两"], "今天天气真不错，我们一起去公园。", "stop"),  # a partial match is released later
    ],
)
def test_stop_strings_cut_the_text(tok, stop, want, reason):
    model = scripted(tok, "今天天气真不错，我们一起去公园。")
    pieces, reasons = stream_rows(model, tok, ["春天"], stop)
    assert "".join(pieces[0]) == want and reasons == [reason]


def test_text_decoder_holds_back_a_possible_stop_string(tok):
    decoder = TextDecoder(tok, stop=["ab"])
    emitted = "".join(decoder.feed(t)[0] for t in tok.encode("xyza"))
    assert emitted == "xyz" and decoder.finish() == "a"  # "a" could begin "ab" until the text ends


def test_complete_keeps_the_order_of_prompts(tok):
    model = tiny(tok.vocab_size)
    prompts = ["春天来了", "今天", "人工智能的未来充满了希望", "中国", "花儿"]
    cfg = greedy(8)
    want = [generate(model, tok, p, cfg) for p in prompts]
    assert list(complete(model, tok, prompts, cfg, batch_size=2)) == want


@pytest.mark.parametrize("layout", ["tools", "pre-tools"])
def test_penalty_never_counts_the_tokenizers_control_ids(layout, chat_tok, pre_tools_tok):
    # Ids 6..11 are <think> ... </tool_response> in a tokenizer that has them (a second <tool_call> in
    # one reply must not be penalised) but ordinary text in an older one (penalised like any text).
    from qinglm.infer.engine import Engine
    from qinglm.infer.sampling import apply_repetition_penalty

    tok = chat_tok if layout == "tools" else pre_tools_tok
    assert tok.n_control_ids == (12 if layout == "tools" else 6)
    engine = Engine(tiny(tok.vocab_size), tokenizer=tok, max_batch_size=2)
    engine.add(0, Request(prompt_ids=[2, 7, 9, 20], sampling=greedy(3, penalty=2.0)))
    engine.step()  # prefill and first token: the row's record of what the penalty counts is set
    assert engine.seen.of(0) == ({7, 9, 20} if layout == "pre-tools" else {20}) | {engine.active[0].last}
    logits = torch.full((1, tok.vocab_size), 2.0)
    out = apply_repetition_penalty(logits, torch.tensor([[7, 20]]), 2.0, n_control=tok.n_control_ids)
    assert out[0, 20] == 1.0 and out[0, 7] == (1.0 if layout == "pre-tools" else 2.0)
