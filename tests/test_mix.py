"""Training on a weighted mixture of sources: the --data syntax, shares by weight, exact resume, the record."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from test_inputs import TINY, TINY_TRAIN, assert_one_line_error, qinglm
from test_train import assert_same_run, configs, quiet

from qinglm.data.mix import MixedBatches, parse_mixture
from qinglm.data.shards import TokenShards, prepare_shards
from qinglm.errors import QingLMError
from qinglm.tokenizer import BOS_ID, EOS_ID, Tokenizer, train_tokenizer
from qinglm.train import train

LETTERS, DIGITS = "abcdefghij", "0123456789"


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory) -> tuple[Path, int, set[int]]:
    """Return (prepared dir with splits train-mix0 (letters), train-mix1 (digits), val; vocab; digit ids)."""
    root = tmp_path_factory.mktemp("mix")
    rng = random.Random(0)
    letters = ["".join(rng.choice(LETTERS) for _ in range(60)) for _ in range(200)]
    digits = ["".join(rng.choice(DIGITS) for _ in range(60)) for _ in range(60)]  # the smaller one
    tok = train_tokenizer(letters + digits, 300, show_progress=False)
    tok.save(root / "tokenizer")
    splits = {"train-mix0": letters[:180], "train-mix1": digits[:50], "val": letters[180:] + digits[50:]}
    prepare_shards(splits, tok, root / "data", show_progress=False)
    digit_ids = {i for d in digits for i in tok.encode(d)}
    assert digit_ids.isdisjoint(i for d in letters for i in tok.encode(d))
    return root / "data", tok.vocab_size, digit_ids


def sources(data: Path) -> list[TokenShards]:
    return [TokenShards(data, "train-mix0"), TokenShards(data, "train-mix1")]


def test_mixture_syntax(tmp_path):
    mix = parse_mixture(["pd1998:7", "reviews.jsonl:3"])
    assert mix.sources == ["pd1998", "reviews.jsonl"] and mix.weights == pytest.approx([0.7, 0.3])
    assert mix.splits == ["train-mix0", "train-mix1"]
    assert parse_mixture(["pd1998", "a.txt"]) is None
    odd = tmp_path / "notes:0.5"  # an existing path is a path, whatever its name
    odd.write_text("x")
    assert parse_mixture([str(odd)]) is None
    assert parse_mixture(["C:/corpus.txt"]) is None  # not a number after the colon: no weight
    for bad, why in [
        (["pd1998:0.7", "a.txt"], "weighted and unweighted"),
        (["pd1998:0"], "positive"),
        (["pd1998:-1"], "positive"),
        (["pd1998:0.5", "pd1998:0.5"], "twice"),
    ]:
        with pytest.raises(QingLMError, match=why):
            parse_mixture(bad)


def test_each_source_share_of_trained_tokens_matches_its_weight(two_sources):
    data, _, digit_ids = two_sources
    for weights in ([0.7, 0.3], [0.25, 0.75]):
        b = MixedBatches(sources(data), weights, 4, 16, seed=3, grad_accum=2)
        digit_tokens = total = 0
        for _ in range(40 * 2):  # 40 steps
            x, y = next(b)
            for row in y.numpy():
                text = [t for t in row.tolist() if t not in (BOS_ID, EOS_ID)]
                is_digit = sum(t in digit_ids for t in text) > len(text) / 2
                digit_tokens += len(row) * is_digit
                total += len(row)
        assert abs(digit_tokens / total - weights[1]) < 0.02, (weights, digit_tokens / total)
        assert b.state_dict()["mixture_taken"][1] * 16 == digit_tokens  # what the report prints


def test_small_source_repeats_in_a_new_order_and_ranks_split_each_step(two_sources):
    data, _, _ = two_sources
    one = MixedBatches(sources(data), [0.2, 0.8], 2, 16, seed=1, grad_accum=4)
    ranks = [
        MixedBatches(sources(data), [0.2, 0.8], 2, 16, seed=1, rank=r, world_size=2, grad_accum=2)
        for r in (0, 1)
    ]
    for _ in range(60):  # 60 steps x 8 rows x 0.8: the digits' ~190 windows pass twice
        whole = torch.cat([next(one)[0] for _ in range(4)])
        split = torch.cat([next(ranks[r])[0] for m in range(2) for r in (0, 1)])
        assert torch.equal(whole, split)  # the same rows, in the same order: ranks agree, disjoint
    assert one.taken[1] > one.n_windows[1]  # the smaller source started a second pass ...
    first, second = one._order(1, 0), one._order(1, 1)
    assert sorted(first) == sorted(second) and not np.array_equal(first, second)  # ... in a new order


def test_loader_resumes_exactly_from_its_state(two_sources):
    data, _, _ = two_sources
    a = MixedBatches(sources(data), [0.6, 0.4], 4, 16, seed=5, grad_accum=2)
    for _ in range(14):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))  # it travels in state.json
    b = MixedBatches(sources(data), [0.6, 0.4], 2, 16, seed=0, world_size=1, grad_accum=4)  # same global
    b.load_state_dict(state)
    for _ in range(12):
        xa = torch.cat([next(a)[0] for _ in range(2)])
        xb = torch.cat([next(b)[0] for _ in range(4)])
        assert torch.equal(xa, xb)
    with pytest.raises(QingLMError, match="weights changed"):
        MixedBatches(sources(data), [0.5, 0.5], 4, 16, grad_accum=2).load_state_dict(state)


def test_killed_and_resumed_mixture_run_is_bit_identical(two_sources, tmp_path):
    data, vocab, _ = two_sources
    mix = {"data": ["letters:0.7", "digits:0.3"], "min_lr_ratio": 1.0}
    m, t = configs(vocab, **mix)
    ra = train(m, t, tmp_path / "a", data, log=quiet)
    m, t8 = configs(vocab, max_steps=8, **mix)
    assert train(m, t8, tmp_path / "b", data, log=quiet)["step"] == 8
    m, t12 = configs(vocab, resume=True, **mix)
    rb = train(m, t12, tmp_path / "b", data, log=quiet)
    assert ra["step"] == rb["step"] == 12
    assert_same_run(tmp_path / "a", tmp_path / "b")


def test_train_command_prepares_each_source_records_the_mixture_and_reports_shares(tmp_path):
    from qinglm.pipeline import run_train

    rng = random.Random(1)
    a, b = tmp_path / "letters.txt", tmp_path / "digits.txt"
    a.write_text("\n".join("".join(rng.choice(LETTERS) for _ in range(80)) for _ in range(300)))
    b.write_text("\n".join("".join(rng.choice(DIGITS) for _ in range(80)) for _ in range(100)))
    lines: list[str] = []
    flags = {**TINY_TRAIN, "data": [f"{a}:3", f"{b}:1"], "out": str(tmp_path / "run"), "max_steps": 40}
    flags.update(eval_every=40, save_every=40, log_every=40)
    run = run_train(dict(TINY), flags, log=lines.append)
    record = json.loads((run / "config.json").read_text())
    assert record["train"]["data"] == [f"{a}:3", f"{b}:1"]
    assert [(m["source"], m["weight"], m["split"]) for m in record["mixture"]] == [
        (str(a), 0.75, "train-mix0"),
        (str(b), 0.25, "train-mix1"),
    ]
    assert all(m["tokens"] > 0 for m in record["mixture"])
    tok = Tokenizer.load(run / "tokenizer")
    assert np.asarray(TokenShards(run / "data", "train-mix1").shards[0][:50]).max() < tok.vocab_size
    shares = [line for line in lines if "tokens trained" in line]
    assert len(shares) == 2 and "75.0% (weight 75.0%)" in shares[0], shares


def test_mixture_mistakes_are_one_line_errors(two_sources, tmp_path):
    data, _, _ = two_sources
    tok = data.parent / "tokenizer"
    proc = qinglm(
        "prepare", "--data", "pd1998:0.7", "reviews:0.3", "--tokenizer", tok, "--out", tmp_path / "p"
    )
    assert_one_line_error(proc, "prepared by `qinglm train")
    proc = qinglm("train", "--data", "pd1998:0.7", "reviews", "--out", tmp_path / "r")
    assert_one_line_error(proc, "weighted and unweighted")
