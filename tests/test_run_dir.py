"""The run directory's contract: QingLM replaces only what it wrote, one writer at a time, kinds of runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli import TINY, assert_user_error, corpus, qinglm  # noqa: F401  (corpus is a fixture)

from qinglm import run_dir as run_dirs
from qinglm.config import ModelConfig, resolve_model
from qinglm.errors import QingLMError
from qinglm.io import MANIFEST, exclusive_lock
from qinglm.model.transformer import Transformer
from qinglm.train.checkpoint import inference_weights, save_checkpoint, save_run


def tree(root: Path) -> dict[str, bytes]:
    """Return every file under root with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def foreign_dir(root: Path) -> Path:
    """Return the issue's directory: names QingLM uses, none of them written by QingLM."""
    (root / "best").mkdir(parents=True)
    (root / "best" / "important.txt").write_text("keep me")
    (root / "best.old-7").mkdir()
    (root / "best.old-7" / "notes.md").write_text("mine too")
    (root / "data").mkdir()
    (root / "data" / "train_0003.bin").write_bytes(b"\x01\x02")
    (root / "config.json").write_text('{"my": "settings"}')
    return root


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ---------------------------------------------------------------------------- item 1: the overwrite guard


def test_train_out_into_a_directory_qinglm_did_not_write_is_refused_and_untouched(tmp_path, corpus):  # noqa: F811
    out = foreign_dir(tmp_path / "mine")
    before = tree(out)
    proc = qinglm("train", "--data", corpus, "--out", out, "--max-steps", 2, *TINY)
    assert_user_error(proc, "--overwrite")
    assert tree(out) == before and sorted(p.name for p in out.iterdir()) == [
        "best", "best.old-7", "config.json", "data"
    ]  # fmt: skip


def test_prepare_out_into_a_directory_holding_a_shard_name_is_refused_and_untouched(
    tmp_path, phrase_corpus, text
):
    _, tokenizer, _ = phrase_corpus
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "train_0009.bin").write_bytes(b"user bytes")
    proc = qinglm("prepare", "--data", text, "--tokenizer", tokenizer, "--out", out)
    assert_user_error(proc, "not written by QingLM")
    assert tree(out) == {"train_0009.bin": b"user bytes"}
    proc = qinglm("prepare", "--data", text, "--tokenizer", tokenizer, "--out", out, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert (out / "index.json").is_file()


def test_rotation_and_best_replace_only_what_qinglm_wrote(tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, max_seq_len=8))
    opt = torch.optim.AdamW(model.parameters())
    run = tmp_path / "run"
    save_checkpoint(run, 1, model, opt, {"step": 1}, keep=1)
    (run / "notes.txt").write_text("mine")  # a user's files inside a QingLM run
    (run / "checkpoints" / "step-00000000").mkdir()
    (run / "checkpoints" / "step-00000000" / "keep.txt").write_text("a copy I made")
    stale = run / "checkpoints" / f"step-00000001.tmp-{dead_pid()}"  # a killed writer's leftover
    stale.mkdir()
    for step in (2, 3):
        save_checkpoint(run, step, model, opt, {"step": step}, keep=1)
    names = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name != MANIFEST)
    assert names == ["step-00000000", "step-00000003"]  # rotated QingLM's own, kept the user's
    assert (run / "checkpoints" / "step-00000000" / "keep.txt").read_text() == "a copy I made"
    assert (run / "notes.txt").read_text() == "mine"
    pid = dead_pid()
    planted = {
        f"best.tmp-{pid}": False,
        f".config.json.tmp-{pid}-x1": False,
        f".notes.txt.tmp-{pid}-x1": True,
    }
    for name in planted:
        (run / name).mkdir()
    with run_dirs.writing(run):  # the next run removes its killed predecessor's temp files, no others
        pass
    assert {name: (run / name).exists() for name in planted} == planted
    (run / f"best.old-{pid}").mkdir()  # killed between save_best's renames: the only best weights
    with run_dirs.writing(run):
        pass
    assert (run / f"best.old-{pid}").is_dir()


def test_export_hf_into_another_models_folder_is_refused_and_a_re_export_works(tmp_path, phrase_corpus):
    from qinglm.export.hf import export_hf
    from qinglm.tokenizer import Tokenizer

    base = _base(tmp_path, Tokenizer.load(phrase_corpus[1]), 300)
    other = tmp_path / "other-model"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(QingLMError, match="--overwrite"):
        export_hf(base, other)
    assert tree(other) == {"config.json": b'{"model_type": "llama"}'}
    export_hf(base, tmp_path / "hf")
    export_hf(base, tmp_path / "hf")  # its own folder: replaced
    export_hf(base, other, overwrite=True)
    assert json.loads((other / "config.json").read_text())["vocab_size"] == 300


def test_train_out_into_an_imported_run_is_refused(tmp_path, phrase_corpus, text):
    from qinglm.tokenizer import Tokenizer

    base = _base(tmp_path, Tokenizer.load(phrase_corpus[1]), 300)
    before = tree(base)
    proc = qinglm("train", "--data", text, "--out", base, "--max-steps", 1, *TINY)
    assert_user_error(proc, "holds a run of kind 'import'")
    assert tree(base) == before


def test_overwrite_lets_a_run_write_into_a_foreign_directory_and_keeps_other_files(tmp_path):
    out = foreign_dir(tmp_path / "mine")
    (out / "notes.txt").write_text("unrelated")
    with pytest.raises(QingLMError, match="not written by QingLM"):
        run_dirs.claim(out)
    run_dirs.claim(out, overwrite=True)
    run_dirs.claim(out)  # from now on it is a QingLM run
    assert (out / "notes.txt").read_text() == "unrelated"


def test_a_run_written_before_manifests_is_recognised(tmp_path, phrase_corpus):
    _, tokenizer, _ = phrase_corpus
    run = tmp_path / "old"
    (run / "tokenizer").mkdir(parents=True)
    for f in Path(tokenizer).iterdir():
        (run / "tokenizer" / f.name).write_bytes(f.read_bytes())
    (run / "config.json").write_text(json.dumps({"model": {"d_model": 16}, "train": {}}))
    owned = run_dirs.claim(run)
    assert owned.owns("config.json") and owned.owns("tokenizer")
    assert run_dirs.read_config(run)["kind"] == "pretrain"  # inferred: old runs have no kind


# ---------------------------------------------------------------------------- item 2: one writer at a time

HOLDER = """
import sys, time
from qinglm import run_dir
with run_dir.writing(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_run_on_a_locked_directory_fails_naming_the_holder_and_sigkill_frees_it(tmp_path, corpus):  # noqa: F811
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True, env=os.environ.copy()
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = qinglm("train", "--data", corpus, "--out", out, "--max-steps", 2, *TINY)
        assert_user_error(proc, f"in use by pid {holder.pid}")
        assert not (out / "metrics.jsonl").exists() and not (out / "tokenizer").exists()
        with pytest.raises(QingLMError, match=f"pid {holder.pid}"):
            with exclusive_lock(out):
                pass
    finally:
        holder.kill()  # SIGKILL: no clean-up code runs
        holder.wait()
    with exclusive_lock(out):  # the OS released the lock with the process
        pass


# ---------------------------------------------------------------------------- item 8: --init-from any run


def _base(tmp_path: Path, tok, vocab_size: int) -> Path:
    torch.manual_seed(0)
    cfg = resolve_model(ModelConfig(vocab_size=vocab_size, d_model=32, n_layers=1, n_heads=2, max_seq_len=64))
    return save_run(tmp_path / f"base-{vocab_size}", Transformer(cfg), tok)


def _init_from(base: Path, text: Path, out: Path) -> subprocess.CompletedProcess:
    return qinglm(
        "train", "--data", text, "--init-from", base, "--out", out, "--max-steps", 1, "--seq-len", 32,
        "--batch-size", 2, "--device", "cpu", "--no-compile", "--sample-tokens", 2, "--warmup-steps", 1,
    )  # fmt: skip


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "t.txt"
    path.write_text(
        "".join(f"今天天气真不错，我们一起去公园散步{i}。\n" for i in range(300)), encoding="utf-8"
    )
    return path


def test_init_from_a_base_with_a_padded_vocabulary(tmp_path, phrase_corpus, text):
    from qinglm.tokenizer import Tokenizer

    tok = Tokenizer.load(phrase_corpus[1])
    base = _base(tmp_path, tok, tok.vocab_size + 20)
    proc = _init_from(base, text, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    cfg = run_dirs.read_config(tmp_path / "out")
    assert cfg["kind"] == "pretrain" and cfg["model"]["vocab_size"] == tok.vocab_size + 20


def test_init_from_a_run_written_by_qinglm_sft(tmp_path, phrase_corpus, text):
    from qinglm.sft.config import SFTConfig
    from qinglm.sft.train import run_sft
    from qinglm.tokenizer import Tokenizer

    tok = Tokenizer.load(phrase_corpus[1])
    base = _base(tmp_path, tok, tok.vocab_size)
    chat = tmp_path / "chat.jsonl"
    line = {"conversations": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "好的"}]}
    chat.write_text("\n".join([json.dumps(line, ensure_ascii=False)] * 10), encoding="utf-8")
    sft = tmp_path / "sft"
    cfg = SFTConfig(base=str(base), data=str(chat), out=str(sft), max_steps=1, batch_size=2, device="cpu")
    run_sft(cfg, log=lambda s: None)
    assert run_dirs.read_config(sft)["kind"] == "sft" and "train" not in run_dirs.read_config(sft)
    proc = _init_from(sft, text, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert f"starting from the weights of {sft}" in proc.stdout
    assert inference_weights(tmp_path / "out").is_file()


# ---------------------------------------------------------------------------- item 23: killed writers' temp files

SLOW_WRITE = """
import contextlib, sys, time
import qinglm.data.shards as shards
import qinglm.io as io
from qinglm.cli import main

@contextlib.contextmanager
def slow(path, mode="w"):
    with io.atomic_open(path, mode) as f:
        f.write(b"x" if "b" in mode else "x")
        f.flush()
        print("writing", flush=True)
        time.sleep(120)
        yield f

shards.atomic_open = slow
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_during_prepare_leaves_no_temp_file(tmp_path, phrase_corpus, text):
    out = tmp_path / "prepared"
    cmd = [
        sys.executable,
        "-c",
        SLOW_WRITE,
        "prepare",
        "--data",
        str(text),
        "--tokenizer",
        str(phrase_corpus[1]),
    ]
    p = subprocess.Popen([*cmd, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    assert [f for f in os.listdir(out) if ".tmp-" in f]  # the temp file exists while writing
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0 and "Traceback" not in err, err
    assert not out.exists()  # nothing was finished: the folder it made goes with its claim


SLOW_GGUF = """
import sys, time
import gguf
from qinglm.cli import main

real = gguf.GGUFWriter.write_tensors_to_file

def slow(self, *args, **kwargs):
    real(self, *args, **kwargs)
    print("writing", flush=True)
    time.sleep(120)

gguf.GGUFWriter.write_tensors_to_file = slow
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_during_export_gguf_leaves_no_temp_file(tmp_path, phrase_corpus):
    from qinglm.tokenizer import Tokenizer

    base = _base(tmp_path, Tokenizer.load(phrase_corpus[1]), 300)
    out = tmp_path / "exports"
    cmd = [sys.executable, "-c", SLOW_GGUF, "export", "gguf", str(base), str(out / "m.gguf")]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    assert [f for f in os.listdir(out) if f.startswith(".m.gguf.tmp-")]
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0 and "Traceback" not in err, err
    assert os.listdir(out) == []


def test_the_next_export_removes_a_dead_writers_temp_file_and_nothing_else(tmp_path, phrase_corpus):
    from qinglm.export.gguf import export_gguf
    from qinglm.tokenizer import Tokenizer

    tok = Tokenizer.load(phrase_corpus[1])
    base = _base(tmp_path, tok, tok.vocab_size)
    out = tmp_path / "exports"
    out.mkdir()
    pid = dead_pid()
    planted = {
        f".m.gguf.tmp-{pid}": False,  # this export's name, a dead writer: removed
        f".m.gguf.tmp-{os.getppid()}": True,  # a live process's: kept
        f".other.gguf.tmp-{pid}": True,  # another file's
        ".m.gguf.tmp-abc": True,  # no pid: nothing proves it is ours
        "m.gguf.tmp": True,
    }
    for name in planted:
        (out / name).write_bytes(b"partial")
    export_gguf(base, out / "m.gguf")
    assert {name: (out / name).exists() for name in planted} == planted


def test_the_next_prepare_removes_a_dead_writers_temp_file_and_nothing_else(tmp_path, phrase_corpus):
    from qinglm.data.shards import prepare_shards
    from qinglm.tokenizer import Tokenizer

    tok = Tokenizer.load(phrase_corpus[1])
    out = tmp_path / "prepared"
    docs = ["今天天气真不错"] * 20
    prepare_shards({"train": docs}, tok, out, show_progress=False)
    pid = dead_pid()
    planted = {
        f".train_0000.bin.tmp-{pid}-k3x_9q": False,
        f".notes.txt.tmp-{pid}-k3x_9q": True,  # not a name QingLM wrote here
        ".train_0000.bin.k3x_9q.tmp": True,  # the old pattern carries no pid
    }
    for name in planted:
        (out / name).write_bytes(b"partial")
    prepare_shards({"train": docs}, tok, out, show_progress=False)
    assert {name: (out / name).exists() for name in planted} == planted
