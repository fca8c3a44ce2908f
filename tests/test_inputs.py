"""Hardened inputs: every bad input is one clear error line and exit status 2, or a counted skip.

Each case goes through the real command line (`python -m qinglm ...` in a subprocess) where that is
practical; the user-error cases are launched together (they are independent) to keep the module
fast. The library is used where a process cannot show the case: a full disk during checkpointing
(simulated) and a 50 MB single line (read, not trained on).
"""

from __future__ import annotations

import codecs
import dataclasses
import errno
import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from qinglm.data.builtin import builtin_documents
from qinglm.data.sources import MAX_DOC_CHARS, ReadStats, read_documents
from qinglm.errors import QingLMError

TINY = {
    "d_model": 32,
    "n_layers": 1,
    "n_heads": 2,
    "vocab_size": 300,
    "max_seq_len": 64,
}
TINY_TRAIN = {
    "seq_len": 32,
    "batch_size": 4,
    "max_steps": 4,
    "eval_every": 2,
    "save_every": 2,
    "log_every": 2,
    "eval_tokens": 512,
    "sample_tokens": 3,
    "device": "cpu",
    "dtype": "fp32",
    "compile": False,
    "num_threads": 1,
}
TINY_FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()] + [
    "--seq-len=32",
    "--max-steps=2",
    "--device=cpu",
    "--no-compile",
    "--num-threads=1",
]


def qinglm(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qinglm", *map(str, args)], capture_output=True, text=True, timeout=600
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, fragment: str) -> None:
    """The contract for a user mistake: status 2, no traceback, one stderr line 'qinglm: error: ...'."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("qinglm: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr
    assert fragment in errors[0], errors[0]


# ---------------------------------------------------------------------------- shared inputs


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return builtin_documents("pd1998")[:300]


@pytest.fixture(scope="module")
def files(tmp_path_factory, docs) -> dict[str, Path]:
    """Return every input file of the module, written once."""
    root = tmp_path_factory.mktemp("inputs")
    text = "\n".join(docs)
    out = {"utf8": root / "news.txt"}
    out["utf8"].write_text(text + "\n", encoding="utf-8")
    out["gbk"] = root / "gbk.txt"
    out["gbk"].write_bytes(text.encode("gb18030"))
    out["utf16"] = root / "utf16.txt"
    out["utf16"].write_bytes(codecs.BOM_UTF16_LE + text.encode("utf-16-le"))
    out["crlf"] = root / "crlf.txt"
    out["crlf"].write_bytes("\r\n".join(docs).encode("utf-8") + b"\r\n")
    out["empty"] = root / "empty.txt"
    out["empty"].write_bytes(b"")
    out["binary"] = root / "blob.txt"
    out["binary"].write_bytes(bytes(range(256)) * 64)
    out["no_text_dir"] = root / "images"
    out["no_text_dir"].mkdir()
    (out["no_text_dir"] / "photo.jpg").write_bytes(b"\xff\xd8\xff")
    out["mixed_jsonl"] = root / "mixed.jsonl"
    good = [json.dumps({"text": d}, ensure_ascii=False) for d in docs[:50]]
    out["mixed_jsonl"].write_text(
        "\n".join(good + ["{not json", '{"title": "无正文"}']) + "\n", encoding="utf-8"
    )
    out["bad_jsonl"] = root / "bad.jsonl"
    out["bad_jsonl"].write_text('{"text": "cut short\n[1, 2\n', encoding="utf-8")
    out["no_field_jsonl"] = root / "no_field.jsonl"
    out["no_field_jsonl"].write_text('{"content": "你好"}\n{"content": "世界"}\n', encoding="utf-8")
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    out["no_text_parquet"] = root / "numbers.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "score": [0.5, 0.1, 0.9]}), out["no_text_parquet"])
    out["two_string_parquet"] = root / "two.parquet"
    pq.write_table(pa.table({"title": ["甲", "乙"], "body": ["丙", "丁"]}), out["two_string_parquet"])
    out["small"] = root / "small.txt"
    out["small"].write_text("\n".join(docs[:20]) + "\n", encoding="utf-8")
    out["a_file"] = root / "plain-file"
    out["a_file"].write_text("I am a file, not a directory\n")
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory, files) -> Path:
    """Return a tiny run trained once for the module (4 steps, checkpoints at steps 2 and 4)."""
    from qinglm.pipeline import run_train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    train = {"data": [str(files["utf8"])], "out": str(out), **TINY_TRAIN}
    return run_train(dict(TINY), train, log=lambda _line: None)


def test_the_end_of_run_report_skips_a_sample_prompt_longer_than_the_context(run):
    """A run with a short context ends with its report, not with "prompt is N tokens" (exit 2)."""
    from qinglm.pipeline import report
    from qinglm.train.config import TrainConfig

    lines: list[str] = []
    cfg = TrainConfig(**{**TINY_TRAIN, "sample_prompts": ["你好", "长" * 200]})
    report(run, run / "data", cfg, {}, log=lines.append)
    assert any(line.startswith("  你好 → 你好") for line in lines), lines
    assert any("not sampled: " in line and "context is 64" in line for line in lines), lines


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory) -> Path:
    """Return a tokenizer with the run's vocabulary size trained on other text (idioms)."""
    from qinglm.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("other") / "tok"
    train_tokenizer(builtin_documents("idioms")[:300], 300, show_progress=False).save(out)
    return out


@pytest.fixture(scope="module")
def broken_runs(tmp_path_factory, run) -> dict[str, Path]:
    """Return copies of the run with a truncated, a foreign-format and another model's weights file."""
    import torch

    from qinglm.config import ModelConfig
    from qinglm.model.transformer import Transformer
    from qinglm.train.checkpoint import save_model_file

    root = tmp_path_factory.mktemp("broken")
    out = {}
    for name in ("truncated", "pickle", "other_vocab"):
        out[name] = root / name
        shutil.copytree(run, out[name], ignore=shutil.ignore_patterns("data"))
    weights = out["truncated"] / "best" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    torch.save({"weights": torch.zeros(3)}, out["pickle"] / "best" / "model.safetensors")
    other = Transformer(ModelConfig(**{**TINY, "vocab_size": 500}))
    save_model_file(other, out["other_vocab"] / "best" / "model.safetensors")
    return out


# ---------------------------------------------------------------------------- user errors on the command line


def error_cases(files: dict[str, Path], run: Path, broken: dict[str, Path], tok: Path, tmp: Path) -> dict:
    """Return case name -> (qinglm arguments, fragment the one error line must contain)."""
    out = tmp / "out"
    step2 = run / "checkpoints" / "step-00000002"
    cases = {
        "missing_path": (["tokenizer", "train", "--data", tmp / "missing.txt", "--out", out], "missing.txt"),
        "empty_file": (["tokenizer", "train", "--data", files["empty"], "--out", out], "is empty"),
        "directory_without_text_files": (
            ["tokenizer", "train", "--data", files["no_text_dir"], "--out", out],
            "contains no text files",
        ),
        "binary_file": (
            ["tokenizer", "train", "--data", files["binary"], "--out", out],
            "looks like a binary",
        ),
        "gbk_file_read_as_utf8": (
            ["tokenizer", "train", "--data", files["gbk"], "--encoding", "utf-8", "--out", out],
            "as utf-8: line 1 and 100% of the lines",
        ),
        "unknown_encoding": (
            ["tokenizer", "train", "--data", files["utf8"], "--encoding", "klingon", "--out", out],
            "unknown encoding 'klingon'",
        ),
        "jsonl_only_invalid_lines": (
            ["tokenizer", "train", "--data", files["bad_jsonl"], "--out", out],
            "line 1: invalid JSON",
        ),
        "jsonl_missing_text_field": (
            ["tokenizer", "train", "--data", files["no_field_jsonl"], "--out", out],
            "missing 'text' field",
        ),
        "parquet_without_text_column": (
            ["tokenizer", "train", "--data", files["no_text_parquet"], "--out", out],
            "no 'text' column and no string columns",
        ),
        "parquet_with_two_string_columns": (
            ["tokenizer", "train", "--data", files["two_string_parquet"], "--out", out],
            "pass --text-field with one of: title (string), body (string)",
        ),
        "vocab_smaller_than_special_tokens": (
            ["tokenizer", "train", "--data", files["utf8"], "--vocab-size", 5, "--out", out],
            "vocab size must be at least 262",
        ),
        "train_vocab_smaller_than_special_tokens": (
            # its own --out: the cases run a few at a time, and `tokenizer train` writes temp files in out
            ["train", "--data", files["utf8"], "--out", tmp / "out-train", *TINY_FLAGS, "--vocab-size", 5],
            "vocab size must be at least 262",
        ),
        "heads_do_not_divide_d_model": (
            ["train", "--data", files["utf8"], "--out", out, *TINY_FLAGS, "--d-model", 30, "--n-heads", 4],
            "d_model (30) must be divisible by n_heads (4)",
        ),
        "kv_heads_do_not_divide_heads": (
            ["train", "--data", files["utf8"], "--out", out, *TINY_FLAGS, "--n-heads", 4, "--n-kv-heads", 3],
            "n_heads (4) must be divisible by n_kv_heads (3)",
        ),
        "negative_layers": (
            ["train", "--data", files["utf8"], "--out", out, *TINY_FLAGS, "--n-layers", -1],
            "--n-layers must be 1 or more, got -1",
        ),
        "batch_larger_than_the_data": (
            ["train", "--data", run / "data", "--tokenizer", run / "tokenizer", "--out", tmp / "big_batch"]
            + [*TINY_FLAGS, "--batch-size", 5000],
            "batch larger than the data",
        ),
        "truncated_checkpoint": (
            ["generate", "--model", broken["truncated"], "--prompt", "中国"],
            "truncated or corrupt",
        ),
        "wrong_format_checkpoint": (
            ["generate", "--model", broken["pickle"], "--prompt", "中国"],
            "cannot read",
        ),
        "optimizer_file_given_as_weights": (
            ["generate", "--model_path", step2 / "trainer.pt", "--prompt", "中国"],
            "as safetensors weights",
        ),
        "weights_of_another_vocabulary": (
            ["generate", "--model", broken["other_vocab"], "--prompt", "中国"],
            "different model config or tokenizer",
        ),
        "generate_with_another_tokenizer": (
            ["generate", "--model", run, "--tokenizer_path", tok, "--prompt", "中国"],
            "is not the one",
        ),
        "resume_with_another_tokenizer": (
            ["train", "--out", run, "--resume", "--tokenizer", tok, "--max-steps", 6],
            "trained with another tokenizer",
        ),
        "unwritable_run_directory": (
            ["train", "--data", files["utf8"], "--out", files["a_file"] / "run", *TINY_FLAGS],
            "cannot write to run directory",
        ),
        "unwritable_tokenizer_directory": (
            [
                "tokenizer",
                "train",
                "--data",
                files["small"],
                "--vocab-size",
                300,
                "--out",
                files["a_file"] / "t",
            ],
            "cannot write the tokenizer",
        ),
        "unwritable_prepare_directory": (
            [
                "prepare",
                "--data",
                files["small"],
                "--tokenizer",
                run / "tokenizer",
                "--out",
                files["a_file"] / "d",
            ],
            "cannot write prepared data",
        ),
        "prompt_longer_than_the_context": (
            ["generate", "--model", run, "--prompt", "中国" * 200],
            "but the model's context is 64",
        ),
        "eval_text_missing": (["eval", "--model", run, "--data", tmp / "nope.txt"], "nope.txt"),
    }
    # each its own --out: the cases run a few at a time, and a command claims the --out it writes into
    return {
        name: ([out / name if a == out else a for a in args], hint) for name, (args, hint) in cases.items()
    }


CASES = [
    "missing_path",
    "empty_file",
    "directory_without_text_files",
    "binary_file",
    "gbk_file_read_as_utf8",
    "unknown_encoding",
    "jsonl_only_invalid_lines",
    "jsonl_missing_text_field",
    "parquet_without_text_column",
    "parquet_with_two_string_columns",
    "vocab_smaller_than_special_tokens",
    "train_vocab_smaller_than_special_tokens",
    "heads_do_not_divide_d_model",
    "kv_heads_do_not_divide_heads",
    "negative_layers",
    "batch_larger_than_the_data",
    "truncated_checkpoint",
    "wrong_format_checkpoint",
    "optimizer_file_given_as_weights",
    "weights_of_another_vocabulary",
    "generate_with_another_tokenizer",
    "resume_with_another_tokenizer",
    "unwritable_run_directory",
    "unwritable_tokenizer_directory",
    "unwritable_prepare_directory",
    "prompt_longer_than_the_context",
    "eval_text_missing",
]


@pytest.fixture(scope="module")
def cli_errors(tmp_path_factory, files, run, broken_runs, other_tokenizer) -> dict:
    """Return case name -> (finished process, expected fragment), the processes run a few at a time."""
    cases = error_cases(files, run, broken_runs, other_tokenizer, tmp_path_factory.mktemp("cli"))
    assert sorted(cases) == sorted(CASES)
    return run_cases(cases)


def run_cases(cases: dict[str, tuple[list, str]]) -> dict:
    """Return case name -> (finished process, expected fragment) for name -> (arguments, fragment)."""
    with ThreadPoolExecutor(max_workers=3) as pool:
        procs = dict(zip(cases, pool.map(lambda args: qinglm(*args), [a for a, _ in cases.values()])))
    return {name: (procs[name], cases[name][1]) for name in cases}


@pytest.mark.parametrize("case", CASES)
def test_user_error_is_one_line_and_exit_2(cli_errors, case):
    proc, fragment = cli_errors[case]
    assert_one_line_error(proc, fragment)


def test_the_failed_resume_left_the_run_untouched(cli_errors, run):
    from qinglm.train.checkpoint import latest_checkpoint

    assert cli_errors["resume_with_another_tokenizer"][0].returncode == 2
    assert latest_checkpoint(run).name == "step-00000004"


# ---------------------------------------------------------------------------- inputs that are read, not refused


def test_gbk_utf16_crlf_and_bad_jsonl_lines_are_read_and_counted(files, docs, run, tmp_path):
    """GBK/GB18030, UTF-16 with BOM and CRLF files give the same documents as UTF-8; bad JSONL lines
    are skipped and counted by reason in the printed summary."""
    for name in ("gbk", "utf16", "crlf"):
        assert list(read_documents(files[name])) == list(read_documents(files["utf8"])), name
    out = tmp_path / "data"
    proc = qinglm(
        "prepare",
        "--data",
        files["gbk"],
        files["utf16"],
        files["crlf"],
        files["mixed_jsonl"],
        "--tokenizer",
        run / "tokenizer",
        "--out",
        out,
    )
    assert proc.returncode == 0, proc.stderr
    assert "skipped 2 (invalid JSON: 1, missing 'text' field: 1)" in proc.stdout
    index = json.loads((out / "index.json").read_text())
    n_docs = index["splits"]["train"]["documents"] + index["splits"]["val"]["documents"]
    assert n_docs == 3 * len(docs) + 50


def test_a_50_mb_single_line_is_split_into_bounded_documents(tmp_path, docs):
    text = "".join(docs)
    line = text * (50_000_000 // len(text.encode("utf-8")) + 1)
    raw = line.encode("utf-8")[:50_000_000].decode("utf-8", errors="ignore").encode("utf-8")
    path = tmp_path / "one_line.txt"
    path.write_bytes(raw)
    stats = ReadStats()
    pieces = list(read_documents(path, stats=stats))
    assert len(pieces) > 100 and max(map(len, pieces)) <= MAX_DOC_CHARS
    assert "".join(pieces) == raw.decode("utf-8")  # nothing lost, nothing added
    assert sum(p.endswith("。") for p in pieces) > 0.9 * len(pieces)  # cut at sentence ends
    assert "split 1 document longer than 100,000 characters" in stats.summary()


# ---------------------------------------------------------------------------- a full disk while checkpointing


def test_full_disk_during_checkpointing_keeps_the_previous_checkpoint(run, tmp_path, monkeypatch):
    import qinglm.train.checkpoint as checkpoint
    from qinglm.io import MANIFEST
    from qinglm.pipeline import read_run_config
    from qinglm.train import train
    from qinglm.train.checkpoint import latest_checkpoint

    model_cfg, train_cfg = read_run_config(run)
    real_save = checkpoint.save_model_file

    def disk_full_at_step_4(model, path):
        if "step-00000004" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(model, path)

    monkeypatch.setattr(checkpoint, "save_model_file", disk_full_at_step_4)
    out = tmp_path / "run"
    with pytest.raises(QingLMError) as err:
        train(model_cfg, train_cfg, out, run / "data", log=lambda _line: None)
    message = str(err.value)
    assert "\n" not in message and "No space left on device" in message
    assert f"qinglm train --out {out} --resume" in message
    assert latest_checkpoint(out).name == "step-00000002"  # the previous checkpoint survives, complete
    names = [p.name for p in (out / "checkpoints").iterdir() if p.name != MANIFEST]
    assert names == ["step-00000002"]  # no half-written dir

    monkeypatch.setattr(checkpoint, "save_model_file", real_save)  # space freed: resume goes on
    resumed = train(model_cfg, dataclasses.replace(train_cfg, resume=True), out, run / "data", log=print)
    assert resumed["step"] == 4 and latest_checkpoint(out).name == "step-00000004"
