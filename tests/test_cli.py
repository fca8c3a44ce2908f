"""The command line end to end: the whole path on real text, and every user mistake as one clear line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qinglm.data.builtin import builtin_documents

TINY = [
    "--d-model",
    "32",
    "--n-layers",
    "1",
    "--n-heads",
    "2",
    "--vocab-size",
    "400",
    "--seq-len",
    "32",
    "--max-seq-len",
    "64",
    "--batch-size",
    "4",
    "--eval-every",
    "4",
    "--save-every",
    "4",
    "--log-every",
    "2",
    "--sample-tokens",
    "5",
    "--device",
    "cpu",
    "--no-compile",
]


def qinglm(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qinglm", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


def assert_user_error(proc: subprocess.CompletedProcess, fragment: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("qinglm")]
    assert len(lines) == 1 and proc.stderr.strip().endswith(lines[0]), proc.stderr
    assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "news.txt"
    path.write_text("\n".join(builtin_documents("pd1998")[:400]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("runs") / "tiny"
    proc = qinglm("train", "--data", corpus, "--out", out, "--max-steps", 6, *TINY)
    assert proc.returncode == 0, proc.stderr
    assert "held-out" in proc.stdout and "bits/char" in proc.stdout
    # the held-out line says which split: 400 lines are too few for one held-out block of 100
    assert "; 2% held out: files by document): loss" in proc.stdout
    return out


def test_run_directory_is_self_contained(run):
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["d_model"] == 32 and cfg["model"]["pos_encoding"] == "rope"  # resolved, not None
    assert cfg["train"]["max_steps"] == 6
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    assert (run / "best" / "model.safetensors").is_file()
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in lines if "loss" in m]
    val = [m for m in lines if "val_loss" in m]
    assert {"step", "loss", "lr", "tokens_per_s"} <= set(train[0])
    assert {"val_loss", "val_ppl", "val_bpc"} <= set(val[0])


def test_resume_continues_from_the_last_checkpoint(run):
    proc = qinglm("train", "--out", run, "--resume", "--max-steps", 8)
    assert proc.returncode == 0, proc.stderr
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 8 and steps.count(2) == 1  # continued, not restarted


def test_generate_and_eval(run, corpus, tmp_path):
    proc = qinglm(
        "generate", "--model", run, "--prompt", "今天天气真不错", "--max-new-tokens", 8, "--temperature", 0
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("今天天气真不错")
    streamed = qinglm(
        "generate",
        "--model_path",
        run,
        "--prompt",
        "今天天气真不错",
        "--max_length",
        8,
        "--temperature",
        0,
        "--stream",
    )
    assert streamed.stdout == proc.stdout  # streaming prints the same text as greedy generation
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("中国经济\n人工智能的未来\n", encoding="utf-8")
    many = qinglm("generate", "--model", run, "--prompts-file", prompts, "--max-new-tokens", 4, "--seed", 1)
    assert many.returncode == 0 and len(many.stdout.strip().splitlines()) >= 2
    ev = qinglm("eval", "--model", run, "--data", corpus, "--json")
    assert ev.returncode == 0, ev.stderr
    metrics = json.loads(ev.stdout)
    assert set(metrics) == {"loss", "ppl", "bpc"} and metrics["bpc"] > 0


def test_prompt_longer_than_context_is_a_user_error(run):
    assert_user_error(qinglm("generate", "--model", run, "--prompt", "中国" * 200), "context")


def test_bad_inputs_are_one_line_errors(tmp_path, corpus):
    out = tmp_path / "r"
    assert_user_error(qinglm("train", "--data", tmp_path / "missing.txt", "--out", out, *TINY), "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_user_error(qinglm("train", "--data", empty, "--out", out, *TINY), "empty")
    binary = tmp_path / "blob.txt"
    binary.write_bytes(bytes(range(256)) * 40)
    assert_user_error(qinglm("train", "--data", binary, "--out", out, *TINY), "binary")
    nodir = tmp_path / "nothing"
    nodir.mkdir()
    assert_user_error(qinglm("train", "--data", nodir, "--out", out, *TINY), "no text files")
    assert_user_error(
        qinglm("train", "--data", corpus, "--out", out, *TINY, "--d-model", "30", "--n-heads", "4"),
        "divisible",
    )
    assert_user_error(
        qinglm("train", "--data", corpus, "--out", out, *TINY, "--seq-len", "128"), "max_seq_len"
    )
    bad_cfg = tmp_path / "cfg.yaml"
    bad_cfg.write_text("d_model: [unclosed\n")
    assert_user_error(qinglm("train", "--config", bad_cfg, "--out", out), "cannot parse")
    bad_cfg.write_text("no_such_field: 3\n")
    assert_user_error(qinglm("train", "--config", bad_cfg, "--out", out), "no_such_field")
    assert_user_error(qinglm("generate", "--model", tmp_path / "norun", "--prompt", "x"), "norun")
    assert_user_error(qinglm("eval", "--model", tmp_path / "norun", "--data", corpus), "norun")
    assert_user_error(
        qinglm("eval", "--model", tmp_path / "norun", "--data", tmp_path / "nope.txt"), "nope.txt"
    )
    assert_user_error(qinglm("train", "--bogus-flag"), "unrecognized")


def test_gbk_file_and_bad_jsonl_lines(tmp_path, corpus):
    docs = corpus.read_text(encoding="utf-8").splitlines()[:150]
    gbk = tmp_path / "gbk.txt"
    gbk.write_bytes("\n".join(docs).encode("gb18030"))
    proc = qinglm("train", "--data", gbk, "--out", tmp_path / "g", "--max-steps", 2, *TINY)
    assert proc.returncode == 0, proc.stderr
    jsonl = tmp_path / "pretrain.jsonl"
    lines = [json.dumps({"text": d}, ensure_ascii=False) for d in docs] + ["{not json", '{"title": "x"}']
    jsonl.write_text("\n".join(lines), encoding="utf-8")
    proc = qinglm("train", "--data", jsonl, "--out", tmp_path / "j", "--max-steps", 2, *TINY)
    assert proc.returncode == 0, proc.stderr
    assert "invalid JSON: 1" in proc.stdout and "missing 'text' field: 1" in proc.stdout


def test_data_list_and_export(tmp_path):
    proc = qinglm("data", "list")
    assert proc.returncode == 0 and all(n in proc.stdout for n in ("pd1998", "reviews", "idioms"))
    out = tmp_path / "idioms.txt"
    proc = qinglm("data", "export", "idioms", out, "--split", "val")
    assert proc.returncode == 0, proc.stderr
    n = len(out.read_text(encoding="utf-8").splitlines())
    # ~3% held-out idioms plus the entries naming one (longer idioms, variant spellings): about 2,200
    assert 0 < n < 3000 and f"{n:,} documents" in proc.stdout


def test_tokenizer_and_prepare_subcommands(tmp_path, corpus):
    tok = tmp_path / "tok"
    proc = qinglm("tokenizer", "train", "--data", corpus, "--vocab-size", 500, "--out", tok)
    assert proc.returncode == 0, proc.stderr
    assert "characters/token" in proc.stdout
    data = tmp_path / "shards"
    proc = qinglm("prepare", "--data", corpus, "--tokenizer", tok, "--out", data)
    assert proc.returncode == 0, proc.stderr
    index = json.loads((data / "index.json").read_text())
    assert index["splits"]["train"]["tokens"] > 0
    # --split-by block: the 400 lines in blocks of 20, one in ten held out (blocks 4 and 14)
    blocks = tmp_path / "blocks"
    proc = qinglm(
        "prepare", "--data", corpus, "--tokenizer", tok, "--out", blocks, "--split-by", "block",
        "--split-block", 20, "--val-fraction", 0.1,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "val documents" in proc.stdout and "files by blocks of 20 documents" in proc.stdout
    assert json.loads((blocks / "index.json").read_text())["splits"]["val"]["documents"] == 40
    # a prepared directory trains directly, with its tokenizer
    proc = qinglm(
        "train",
        "--data",
        data,
        "--tokenizer",
        tok,
        "--out",
        tmp_path / "p",
        "--max-steps",
        2,
        *[a for a in TINY if a not in ("--vocab-size", "400")],
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_training_on_real_text_beats_the_unigram_baseline(tmp_path):
    """The model learns: held-out loss on People's Daily falls clearly below a unigram model's."""
    from qinglm.data.shards import TokenShards
    from qinglm.evaluate import unigram_baseline

    out = tmp_path / "pd"
    proc = qinglm(
        "train",
        "--data",
        "pd1998",
        "--out",
        out,
        "--vocab-size",
        2000,
        "--d-model",
        64,
        "--n-heads",
        2,
        "--n-layers",
        2,
        "--seq-len",
        64,
        "--batch-size",
        16,
        "--lr",
        "3e-3",
        "--dropout",
        "0",
        "--max-steps",
        400,
        "--eval-every",
        400,
        "--save-every",
        400,
        "--device",
        "cpu",
        "--sample-tokens",
        10,
        "--num-threads",
        1,
        "--no-compile",
    )
    assert proc.returncode == 0, proc.stderr
    val = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if "val_loss" in ln]
    unigram = unigram_baseline(TokenShards(out / "data", "train"), TokenShards(out / "data", "val"), 2000)
    assert val[-1]["val_loss"] < unigram - 0.5, (val[-1], unigram)


@pytest.mark.parametrize(
    "path", sorted(Path(__file__).parent.parent.glob("configs/*.yaml")), ids=lambda p: p.name
)
def test_shipped_config_files_are_valid(path):
    from qinglm.config import resolve_model
    from qinglm.pipeline import build_configs
    from qinglm.train.config import check_train

    model, train = build_configs({}, {}, str(path))
    check_train(train, resolve_model(model))


def test_init_from_continues_pretraining_from_another_runs_weights(run, corpus, tmp_path):
    from safetensors.torch import load_file

    from qinglm.train.checkpoint import inference_weights

    base = load_file(inference_weights(run))
    out = tmp_path / "continued"
    flags = ["--seq-len", 32, "--batch-size", 4, "--device", "cpu", "--no-compile", "--sample-tokens", 2]
    proc = qinglm("train", "--data", corpus, "--init-from", run, "--out", out, "--max-steps", 1,
                  "--lr", "1e-12", "--warmup-steps", 1, *flags)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"starting from the weights of {run}" in proc.stdout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"] == json.loads((run / "config.json").read_text())["model"]
    after = load_file(inference_weights(out))
    assert base.keys() == after.keys()
    assert all(torch.allclose(base[k], after[k], atol=1e-6) for k in base)  # lr ~0: the base's weights
    bad = qinglm(
        "train", "--data", corpus, "--init-from", run, "--out", tmp_path / "x", "--d-model", 64, *flags
    )
    assert_user_error(bad, "--init-from")


def test_the_cli_lets_idle_openmp_threads_sleep_unless_told_otherwise(monkeypatch, capsys):
    from qinglm.cli import main, yield_idle_openmp_threads

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert main([]) == 0  # before any command imports torch, whose OpenMP reads it once
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    for chosen in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "300000"}):
        env = dict(chosen)
        yield_idle_openmp_threads(env)
        assert env == chosen
