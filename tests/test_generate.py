"""Sampling, the cached decoding loop, and streaming text without half characters."""

import pytest
import torch

from qinglm.config import ModelConfig, SamplingConfig
from qinglm.errors import QingLMError
from qinglm.infer.generate import generate, generate_ids, stream
from qinglm.infer.sampling import (
    GREEDY_CHUNKED,
    N_CONTROL_IDS,
    RowSettings,
    SeenTokens,
    apply_repetition_penalty,
    sample_next,
    sample_rows,
)
from qinglm.infer.sampling import greedy as greedy_ids
from qinglm.infer.text import encode_prompt, stream_text
from qinglm.model.transformer import Transformer
from qinglm.tokenizer import train_tokenizer

V, CTX, EOS = 97, 64, 3


def tiny(family: str = "modern", **kw) -> Transformer:
    torch.manual_seed(0)
    kw.setdefault("dropout", 0.0)
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=CTX, family=family, **kw)
    return Transformer(cfg).eval()


def greedy(n: int, penalty: float = 1.0, **kw) -> SamplingConfig:
    return SamplingConfig(
        max_new_tokens=n, temperature=0.0, repetition_penalty=penalty, stop_at_eos=False, **kw
    )


def naive_greedy(model: Transformer, prompt: list[int], n: int, penalty: float = 1.0) -> list[int]:
    """Recompute the whole sequence every step and penalise token by token: the reference."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0, -1].clone()
            for t in set(ids) - set(range(N_CONTROL_IDS)):  # control tokens are never penalised
                logits[t] = logits[t] / penalty if logits[t] > 0 else logits[t] * penalty
            ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


PROMPT = [2, 17, 42, 5, 88, 23]


def test_repetition_penalty_lowers_repeated_tokens_of_either_sign():
    c = N_CONTROL_IDS  # ids below are control tokens; the penalty leaves them alone (tested below)
    logits = torch.tensor([[1.0] * c + [2.0, -1.0, 0.5, -0.3, 1.0, 0.0]] * 2)
    prev = torch.tensor([[c, c + 1, c + 1], [c + 4] * 3])  # row 0: a positive and a negative logit, repeated
    out = apply_repetition_penalty(logits, prev, 1.5)
    p_before, p_after = logits.softmax(-1), out.softmax(-1)
    assert p_after[0, c] < p_before[0, c] and p_after[0, c + 1] < p_before[0, c + 1]
    assert p_after[1, c + 4] < p_before[1, c + 4]
    # Penalised once, however often seen.
    torch.testing.assert_close(out[0, c : c + 2], torch.tensor([2.0 / 1.5, -1.0 * 1.5]))
    torch.testing.assert_close(out[1, c + 4], torch.tensor(1.0 / 1.5))
    untouched = [c + 2, c + 3, c + 4, c + 5]
    torch.testing.assert_close(out[0, untouched], logits[0, untouched])  # others keep their logits and order
    assert torch.equal(apply_repetition_penalty(logits, prev, 1.0), logits)
    # Positions not counted (a chat template's structure) are not penalised.
    counted = torch.tensor([[True, False, False], [False] * 3])
    out = apply_repetition_penalty(logits, prev, 1.5, counted)
    assert out[0, c] < logits[0, c] and torch.equal(out[0, c + 1 :], logits[0, c + 1 :])
    assert torch.equal(out[1], logits[1])


def test_repetition_penalty_never_lowers_control_tokens():
    logits = torch.randn(2, 20)
    # Row 1 has [EOS] (3) and <|im_end|> (5) in its history, as a chat does.
    prev = torch.tensor([list(range(N_CONTROL_IDS)) + [7], [3, 5, 5, 4, 0, 2, 8]])
    out = apply_repetition_penalty(logits, prev, 2.0)
    assert torch.equal(out[:, :N_CONTROL_IDS], logits[:, :N_CONTROL_IDS])
    assert out[0, 7] < logits[0, 7] and out[1, 8] < logits[1, 8]


def test_seen_tokens_penalise_as_the_dense_penalty_does():
    """The engine's sparse record: the same logits as apply_repetition_penalty on each row's history, with
    tokens held twice, control ids, a record replaced by a shorter one and a row moved into another's slot."""
    gen = torch.Generator().manual_seed(0)
    seen = SeenTokens(3, 12, N_CONTROL_IDS, torch.device("cpu"))
    histories = [[9, 9, 40, 3, 61], list(range(8, 20)), [2, 33, 70, 71, 72, 73, 74, 75]]
    for i, h in enumerate(histories):
        seen.set(i, torch.tensor(h))
    seen.set(1, torch.tensor([50, 51]))  # shorter than before: the old ids beyond it must not count
    histories[1] = [50, 51]
    seen.append(torch.tensor([40, 7, 5]))  # 40 again for row 0, a control id (5) for row 2
    histories = [h + [t] for h, t in zip(histories, [40, 7, 5])]
    seen.move(2, 0)  # row 2 leaves slot 2 for slot 0
    histories[0] = histories[2]
    for n, penalty in ((2, [2.0, 1.5]), (1, [3.0])):
        logits = torch.randn(n, V, generator=gen)
        want = torch.cat(
            [
                apply_repetition_penalty(logits[k : k + 1], torch.tensor([histories[k]]), penalty[k])
                for k in range(n)
            ]
        )
        assert torch.equal(seen.penalise(logits.clone(), torch.tensor(penalty)), want)
    assert seen.of(0) == {33, 70, 71, 72, 73, 74, 75} and seen.of(1) == {50, 51, 7}


@pytest.mark.parametrize("rows,vocab", [(32, 10_000), (9, 30_001), (64, 4_099)])
def test_chunked_greedy_takes_the_first_of_equal_maxima_as_argmax(rows, vocab):
    g = torch.Generator().manual_seed(rows)
    logits = torch.randn(rows, vocab, generator=g)
    assert rows * vocab >= GREEDY_CHUNKED  # the two-pass path, not max(dim)
    assert torch.equal(greedy_ids(logits), logits.argmax(-1))
    ties = torch.randint(0, 3, (rows, vocab), generator=g).float()  # many equal maxima in many chunks
    assert torch.equal(greedy_ids(ties), ties.argmax(-1))
    ties[::2, -1] = 5.0  # the maximum alone in a short last chunk
    assert torch.equal(greedy_ids(ties), ties.argmax(-1))


@pytest.mark.parametrize("family", ["modern", "classic"])
@pytest.mark.parametrize("penalty", [1.0, 3.0])
def test_cached_greedy_equals_full_recomputation(family, penalty):
    model = tiny(family)
    prompt = PROMPT + naive_greedy(model, PROMPT, 6)  # tokens the model likes: penalising the prompt matters
    got = list(generate_ids(model, prompt, greedy(20, penalty), eos_id=EOS))
    assert got == naive_greedy(model, prompt, 20, penalty)


def test_stops_when_the_context_is_full():
    model = tiny()
    prompt = [2] + list(range(10, 69))  # 60 tokens of a 64-token context
    got = list(generate_ids(model, prompt, greedy(20), eos_id=EOS))
    # positions 60..63 fit, and the token predicted after a full context is still emitted
    assert got == naive_greedy(model, prompt, CTX - len(prompt) + 1)


def test_top_k_one_and_tiny_top_p_equal_greedy():
    model = tiny()
    want = list(generate_ids(model, PROMPT, greedy(15), eos_id=EOS))
    for kw in (dict(top_k=1, top_p=None), dict(top_k=None, top_p=1e-6)):
        cfg = SamplingConfig(
            max_new_tokens=15, temperature=1.5, repetition_penalty=1.0, stop_at_eos=False, seed=123, **kw
        )
        assert list(generate_ids(model, PROMPT, cfg, eos_id=EOS)) == want


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    cfg = SamplingConfig(temperature=1.0, top_k=None, top_p=0.8, repetition_penalty=1.0)
    g = torch.Generator().manual_seed(0)
    drawn = {int(sample_next(logits, cfg, g)) for _ in range(300)}
    assert drawn == {0, 1}  # 0.5 + 0.3 reaches 0.8, so 2 and 3 are never drawn


def test_seed_makes_sampling_reproducible():
    model = tiny()

    def run(seed):
        cfg = SamplingConfig(
            max_new_tokens=20, temperature=1.0, top_k=None, top_p=None, seed=seed, stop_at_eos=False
        )
        return list(generate_ids(model, PROMPT, cfg, eos_id=EOS))

    assert run(7) == run(7)
    assert run(7) != run(8)  # 20 draws from ~97 near-uniform tokens: equal only by astronomic chance


def test_stops_at_eos_without_emitting_it():
    model = tiny()
    calls = []

    def eos_from_third_call(module, inputs, out):
        calls.append(1)
        out = out.clone()
        out[..., EOS] = 1e4 if len(calls) >= 3 else -1e4
        return out

    model.head.register_forward_hook(eos_from_third_call)
    got = list(generate_ids(model, PROMPT, SamplingConfig(max_new_tokens=10, seed=0), eos_id=EOS))
    assert len(got) == 2 and EOS not in got and len(calls) == 3  # no forward pass after EOS
    calls.clear()
    cfg = SamplingConfig(max_new_tokens=10, seed=0, stop_at_eos=False)
    got = list(generate_ids(model, PROMPT, cfg, eos_id=EOS))
    assert len(got) == 10 and got[2:] == [EOS] * 8


def test_prompt_longer_than_context_is_a_user_error():
    with pytest.raises(QingLMError, match="prompt is 65 tokens but the model's context is 64"):
        generate_ids(tiny(), [2] * 65, greedy(5), eos_id=EOS)
    with pytest.raises(QingLMError, match="temperature"):
        generate_ids(tiny(), PROMPT, SamplingConfig(temperature=-1.0), eos_id=EOS)


def test_batch_rows_match_single_prompts_and_training_mode_is_restored():
    model = tiny(dropout=0.5).train()  # dropout would make greedy decoding random if left on
    other = [2, 9, 9, 31, 64, 1, 40, 12, 77]  # longer than PROMPT: the shorter row is left-padded
    batch = list(generate_ids(model, [PROMPT, other], greedy(8, penalty=2.0), eos_id=EOS))
    assert model.training
    model.eval()
    assert [row[0] for row in batch] == naive_greedy(model, PROMPT, 8, penalty=2.0)
    assert [row[1] for row in batch] == naive_greedy(model, other, 8, penalty=2.0)


# ---------------------------------------------------------------------------- text

LINES = [
    "今天天气真不错，我们一起去公园散步吧。",
    "人工智能的未来充满了希望和挑战🚀",
    "中国经济稳步增长，市场信心持续恢复📈",
    "春天来了，花儿都开了🌸",
    "他说：“学习使人进步。”",
]
CORPUS = [f"{LINES[i % len(LINES)]}第{i}行" for i in range(200)]
RARE = "龘𠀀🦄é中国经济🚀"  # characters the tokenizer never saw: each is several byte tokens


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, 400, show_progress=False)


def test_stream_text_never_splits_a_character(tok):
    ids = tok.encode(RARE + "今天天气真不错")
    assert any(tok.decode(ids[:i]).endswith("\ufffd") for i in range(1, len(ids)))  # the case is exercised
    pieces = list(stream_text(iter(ids), tok))
    assert len(pieces) > 1 and all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids) == RARE + "今天天气真不错"


def test_stream_text_flushes_an_unfinished_character(tok):
    ids = tok.encode("中🦄")
    ids = ids[:-1]  # the unicorn loses its last byte
    pieces = list(stream_text(ids, tok))
    assert "".join(pieces) == tok.decode(ids) and pieces[-1].endswith("\ufffd")


def test_generate_and_stream_give_the_same_text(tok):
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(
            vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, max_seq_len=CTX, dropout=0.0
        )
    ).eval()
    cfg = SamplingConfig(
        max_new_tokens=30, temperature=1.0, top_k=None, top_p=None, seed=3, stop_at_eos=False
    )
    text = generate(model, tok, "今天", cfg)
    pieces = list(stream(model, tok, "今天", cfg))
    assert isinstance(text, str) and text == "".join(pieces)
    ids = list(generate_ids(model, [tok.bos_id] + tok.encode("今天"), cfg, eos_id=tok.eos_id))
    assert len(ids) == 30 and text == tok.decode(ids)  # random bytes too: chunking never changes the text


@pytest.mark.parametrize("family", ["modern", "classic"])
def test_batch_of_prompts_of_different_lengths(family):
    model = tiny(family, n_kv_heads=2) if family == "modern" else tiny(family)
    prompts = [PROMPT, [2, 9], [2, 31, 64, 1]]
    steps = list(generate_ids(model, prompts, greedy(7, penalty=2.0), eos_id=EOS))
    assert len(steps) == 7
    for i, prompt in enumerate(prompts):
        assert [s[i] for s in steps] == naive_greedy(model, prompt, 7, penalty=2.0)


def test_prompts_are_normalised_like_training_text(tok):
    from qinglm.data.sources import normalize_text
    from qinglm.infer.chat import encode_chat

    wide, narrow = "ＧＤＰ增长８％，Ａｂｃ　１２３", "GDP增长8%，Abc 123"
    assert normalize_text(wide) == narrow  # what `prepare` does to training text
    assert encode_prompt(tok, wide) == encode_prompt(tok, narrow) == [tok.bos_id, *tok.encode(narrow)]
    chat = [{"role": "user", "content": wide}]
    assert encode_chat(tok, chat, True) == encode_chat(tok, [{"role": "user", "content": narrow}], True)


def test_sampling_settings_are_checked_when_made():
    for bad in ("max_new_tokens", -1), ("temperature", -1.0), ("top_p", 2.0), ("repetition_penalty", 0.0):
        with pytest.raises(QingLMError, match="--" + bad[0].replace("_", "-")):
            SamplingConfig(**dict([bad]))


def test_whole_softmax_rows_draw_exactly_their_probabilities_without_a_sort():
    # Rows with neither top-k nor top-p (GRPO's rollouts) take the inverse CDF in vocabulary order:
    # evenly spaced numbers must land on each token in proportion to its probability, whatever the order.
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    n = 1000
    uniform = (torch.arange(n) + 0.5) / n
    logits = probs.log().expand(n, 4).clone()
    plain = RowSettings.of([SamplingConfig(temperature=1.0, top_k=None, top_p=None)] * n, logits.device)
    got = torch.bincount(sample_rows(logits, plain, uniform), minlength=4)
    assert got.tolist() == [50, 500, 150, 300]
    # A row's draw is its own: the same number gives the same token alone and beside filtered rows.
    mixed = [
        SamplingConfig(temperature=1.0, top_k=None, top_p=None),
        SamplingConfig(temperature=1.0, top_k=2),
    ]
    both = sample_rows(logits[:2], RowSettings.of(mixed, logits.device), uniform[[700, 700]])
    alone = sample_rows(logits[:1], RowSettings.of(mixed[:1], logits.device), uniform[[700]])
    assert both[0] == alone[0] and both[1] in (1, 3)  # top-k 2 keeps the two likeliest
    # A number at the very top never picks a token of probability 0 at the end of the vocabulary.
    masked = torch.tensor([[0.0, 0.0, float("-inf")]])
    assert sample_rows(masked, RowSettings.of(mixed[:1], masked.device), torch.tensor([1.0 - 1e-9])) == 1
