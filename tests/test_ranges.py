"""Every number a user gives (a flag, a config file, a request) has one declared range: NaN, infinities
and values outside it are refused in one line naming the flag, before any work starts."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import get_args, get_type_hints

import numpy as np
import pytest
import torch

from qinglm.cli import main
from qinglm.config import ModelConfig, SamplingConfig
from qinglm.data.clean import CleanConfig
from qinglm.data.dedup import DedupConfig
from qinglm.data.verifiable import Example, Task
from qinglm.errors import QingLMError
from qinglm.io import not_a_file
from qinglm.memory import check_fits, kv_cache_bytes
from qinglm.post.config import DistillConfig, DPOConfig, GRPOConfig
from qinglm.serve.config import ServeConfig
from qinglm.serve.protocol import _sampling
from qinglm.sft.config import SFTConfig
from qinglm.train.config import TrainConfig
from qinglm.typecheck import interval, ranges

CONFIGS = [
    ModelConfig,
    SamplingConfig,
    TrainConfig,
    SFTConfig,
    DPOConfig,
    GRPOConfig,
    DistillConfig,
    ServeConfig,
    CleanConfig,
    DedupConfig,
]


def _number_fields(cls: type) -> list[tuple[str, type]]:
    hints, out = get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        base = next((a for a in get_args(tp) if a is not type(None)), tp)
        if base in (int, float):
            out.append((f.name, base))
    return out


def _outside(spec: str, kind: type) -> list[int | float]:
    """Return values just outside the interval spec, of the field's type."""
    low, high, with_low, with_high = interval(spec)
    out: list[int | float] = []
    step = 1 if kind is int else 1e-6
    if low != -math.inf:
        out.append(low - step if with_low else low)
    if high != math.inf:
        out.append(high + step if with_high else high)
    return [kind(v) for v in out]


CASES = [
    pytest.param(cls, name, value, id=f"{cls.__name__}.{name}={value}")
    for cls in CONFIGS
    for name, kind in _number_fields(cls)
    for value in [
        *(
            [math.nan, math.inf, -math.inf] if kind is float else []
        ),  # an int field cannot hold them: its type check refuses
        *_outside(ranges(cls).get(name, "(-inf, inf)"), kind),
    ]
]


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_number_field_of_every_config_declares_its_range_and_its_default_is_inside(cls):
    missing = [name for name, _ in _number_fields(cls) if name not in ranges(cls)]
    assert not missing, f"{cls.__name__}: no declared range for {missing}"
    cls()  # the defaults pass their own ranges


@pytest.mark.parametrize("cls,name,value", CASES)
def test_nan_infinity_and_values_outside_the_range_are_refused_naming_the_flag(cls, name, value):
    with pytest.raises(QingLMError) as e:
        cls(**{name: value})
    msg = str(e.value)
    assert msg.startswith(f"--{name.replace('_', '-')} must be ") and msg.endswith(f"got {value}")
    assert "\n" not in msg


def test_a_subclass_that_redeclares_a_field_keeps_its_range():
    # SFTConfig redeclares lr (default None) and warmup_steps: they keep OptimPart's ranges
    assert ranges(SFTConfig)["lr"] == ranges(TrainConfig)["lr"] == "(0, inf)"
    with pytest.raises(QingLMError, match="--warmup-steps must be 0 or more, got -5"):
        SFTConfig(warmup_steps=-5)


def test_the_range_shows_in_the_flag_help(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "(range [0, 1))" in " ".join(capsys.readouterr().out.split())  # --beta2


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["train", "--lr", "nan"], "--lr must be positive, got nan"),
        (["train", "--beta2", "2"], "--beta2 must be in [0, 1), got 2.0"),
        (["train", "--min-lr-ratio", "nan", "--max-steps", "2"], "--min-lr-ratio must be in [0, 1], got nan"),
        (["train", "--warmup-steps", "-5"], "--warmup-steps must be 0 or more, got -5"),
        (["sft", "--lr", "nan"], "--lr must be positive, got nan"),
        (["dpo", "--beta", "inf"], "--beta must be positive, got inf"),
        (["grpo", "--temperature", "nan"], "--temperature must be positive, got nan"),
        (["grpo", "--kl-coef", "nan"], "--kl-coef must be 0 or more, got nan"),
        (["grpo", "--group-size", "1000000000"], "--group-size must be in [2, 65536], got 1000000000"),
        (["distill", "--temperature", "nan"], "--temperature must be positive, got nan"),
        (["data", "dedup", "x", "--out", "y", "--num-perm", "1000000000"], "--num-perm must be in [2, 1024]"),
        (["data", "clean", "x", "--out", "y", "--min-cjk", "nan"], "--min-cjk must be in [0, 1], got nan"),
    ],
)
def test_the_probes_bad_numbers_exit_2_with_one_line(argv, msg, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written, but if it were, not in the repository
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("qinglm: error: ") and msg in err
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------- sizes and memory


def test_a_micro_batch_larger_than_memory_is_refused_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--data", "pd1998", "--batch-size", "100000000", "--max-steps", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        "a micro-batch of --batch-size 100,000,000 x --seq-len 256 tokens" in err and "make it smaller" in err
    )
    assert err.count("\n") == 1 and os.listdir(tmp_path) == []


def test_grpo_rollouts_larger_than_memory_are_refused_before_the_task_loads(tiny_base_run, tmp_path, capsys):
    argv = ["grpo", "--base", str(tiny_base_run), "--out", str(tmp_path / "o"), "--task", "nosuch:task"]
    assert main([*argv, "--batch-size", "100000", "--group-size", "65536"]) == 2
    err = capsys.readouterr().err
    assert "the rollouts of --batch-size 100,000 x --group-size 65,536 replies of --max-new-tokens 32" in err
    assert "make it smaller" in err and not (tmp_path / "o").exists()


def test_kv_cache_bytes_count_keys_and_values_of_every_layer():
    cfg = ModelConfig()
    rows = 2 * 65536  # --batch-size 2 x --group-size 65536
    assert kv_cache_bytes(cfg, rows, 32) == 2 * cfg.n_layers * rows * cfg.n_heads * 32 * cfg.head_dim * 2
    with pytest.raises(QingLMError, match="the rollouts \\(with the model\\) needs at least .* GiB"):
        check_fits(cfg, kv_cache_bytes(cfg, rows, 1 << 20), "the rollouts")


def test_a_decode_whose_kv_cache_cannot_fit_is_refused_before_allocating(monkeypatch):
    import qinglm.infer.engine as engine
    import qinglm.infer.slots as slots
    from qinglm.model.transformer import Transformer

    model = Transformer(ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=2, max_seq_len=64))
    sampling = SamplingConfig(max_new_tokens=8, temperature=0.0)
    monkeypatch.setattr(slots, "memory_bytes", lambda: 2000)  # a machine of 2000 bytes: the prompt fits
    # 10 positions a row, allocated as 16 (the static cache grows in powers of two)
    with pytest.raises(QingLMError, match="decoding 2 rows of up to 16 tokens at once needs at least"):
        next(iter(engine.Generation(model, [engine.Request([2, 5, 6], sampling)] * 2)))


def test_a_tokenizer_sample_that_cannot_fit_is_refused_before_training():
    from qinglm.data.sample import sample_documents

    with pytest.raises(QingLMError, match="a tokenizer sample of 1,000,000,000,000,000 bytes"):
        sample_documents(iter(["文"]), 10**18, 10**15)
    assert list(sample_documents(iter(["文"]), 3, 10**15)) == ["文"]  # a small corpus is fed whole


# ---------------------------------------------------------------------------- the server's numbers


@pytest.mark.parametrize(
    "body,msg",
    [
        ({"temperature": math.nan}, "'temperature' must be in [0, 100], got nan"),
        ({"temperature": -math.inf}, "'temperature' must be in [0, 100], got -inf"),
        ({"temperature": 0.001}, "'temperature' must be 0 (greedy) or in [0.01, 100], got 0.001"),
        ({"top_p": 0}, "'top_p' must be in (0, 1], got 0"),
        ({"top_p": 1.5}, "'top_p' must be in (0, 1], got 1.5"),
        ({"top_p": math.nan}, "'top_p' must be in (0, 1], got nan"),
        ({"repetition_penalty": 10**400}, "'repetition_penalty' must be in [0.01, 100], got 1000"),
        ({"seed": 2**64}, "'seed' must be in [-9223372036854775808, 18446744073709551615]"),
    ],
)
def test_the_server_names_nan_and_infinities_as_they_are_and_each_range_once(body, msg):
    with pytest.raises(QingLMError) as e:
        _sampling(body, ServeConfig())
    assert str(e.value).startswith(msg)


# ---------------------------------------------------------------------------- GRPO rewards


def _task(verify, examples=lambda split: [Example([{"role": "user", "content": "1+1"}], "2")]):
    return Task("mine", examples, verify)


@pytest.mark.parametrize(
    "value", [np.float32(0.5), np.float64(0.5), torch.tensor(0.5), np.array(0.5), 1, True, 0.5]
)
def test_a_reward_of_any_real_number_type_is_accepted(value):
    ex = _task(None).split("train")[0]
    assert _task(lambda p, c, r: value).reward(ex, "2") == float(value)


@pytest.mark.parametrize("value", [math.nan, 1.5, -0.1, "1", None, torch.tensor([0.5, 0.5]), np.array([0.5])])
def test_a_reward_that_is_not_a_number_in_0_1_is_refused(value):
    ex = _task(None).split("train")[0]
    with pytest.raises(QingLMError, match="verifier .* must return a number in \\[0, 1\\]"):
        _task(lambda p, c, r: value).reward(ex, "2")


def _boom(prompt, completion, reference):
    raise ZeroDivisionError("division by zero\nin the user's code")


def test_a_verifier_or_examples_function_that_raises_is_one_line_naming_it():
    ex = _task(None).split("train")[0]
    with pytest.raises(QingLMError) as e:
        _task(_boom).reward(ex, "2")
    assert str(e.value) == (
        f"task mine's verifier {__name__}._boom raised ZeroDivisionError: division by zero in the user's code"
    )

    def heldout_fails(split):
        if split == "heldout":
            raise KeyError("heldout")
        return [ex]

    task = _task(_boom, heldout_fails)
    assert task.split("train") == [ex]
    with pytest.raises(QingLMError, match="examples function .*heldout_fails raised KeyError"):
        task.split("heldout")


# ---------------------------------------------------------------------------- inputs and languages


def test_an_input_that_is_not_a_regular_file_says_what_it_is(tmp_path):
    (tmp_path / "f.jsonl").write_text("{}\n")
    os.symlink(tmp_path / "gone", tmp_path / "link")
    assert not_a_file(tmp_path / "f.jsonl") is None
    assert not_a_file(tmp_path) == "a directory, not a file"
    assert not_a_file("/dev/zero") == "a character device, not a regular file"
    assert not_a_file(tmp_path / "missing") == "no such file or directory"
    assert not_a_file(tmp_path / "link") == "a broken symbolic link"


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["dpo", "--base", "B", "--data", "DIR"], "DPO data file DIR: a directory, not a file"),
        (["dpo", "--base", "B", "--data", "/dev/zero"], "/dev/zero: a character device, not a regular file"),
        (["data", "clean", "/dev/zero", "--out", "o"], "/dev/zero: a character device, not a regular file"),
    ],
)
def test_data_that_is_a_directory_or_a_device_is_named_as_such(
    argv, msg, tiny_base_run, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "DIR").mkdir()
    argv = [str(tiny_base_run) if a == "B" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1


def test_clean_refuses_a_language_py3langid_does_not_know(tmp_path, capsys):
    pytest.importorskip("py3langid")
    src = tmp_path / "in.txt"
    src.write_text("今天天气很好，我们去公园散步吧。\n", encoding="utf-8")
    assert main(["data", "clean", str(src), "--out", str(tmp_path / "o"), "--langid", "--lang", "xx"]) == 2
    err = capsys.readouterr().err
    assert "--lang 'xx' is not a language py3langid knows; choose one of" in err and " zh" in err
    assert not (tmp_path / "o").exists()
