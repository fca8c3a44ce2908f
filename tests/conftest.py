"""Fixtures shared by several test modules."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from qinglm.data.shards import prepare_shards
from qinglm.tokenizer import train_tokenizer

PHRASES = [
    "今天天气真不错",
    "我们一起去公园散步",
    "人工智能改变了世界",
    "中国经济持续发展",
    "春天来了花开了",
    "学习使人进步",
]


@pytest.fixture(scope="session")
def phrase_corpus(tmp_path_factory) -> tuple[Path, Path, int]:
    """Return (data_dir, tokenizer_dir, vocab_size) of a small repetitive corpus (read-only for tests)."""
    root = tmp_path_factory.mktemp("phrase-corpus")
    rng = random.Random(0)
    docs = ["，".join(rng.choice(PHRASES) for _ in range(4)) + "。" for _ in range(300)]
    tok = train_tokenizer(docs, 300, show_progress=False)
    tok.save(root / "tokenizer")
    prepare_shards({"train": docs[:270], "val": docs[270:]}, tok, root / "data", show_progress=False)
    return root / "data", root / "tokenizer", tok.vocab_size


# The tiny model of the tests: options given to tiny_model / tiny_run override these.
TINY = dict(d_model=32, n_layers=2, n_heads=4, max_seq_len=64)


@pytest.fixture(scope="session")
def tiny_model():
    """Return make(vocab_size, **options): a tiny random Transformer (seed 0, eval mode) of TINY + options."""
    import torch

    from qinglm.config import ModelConfig, resolve_model
    from qinglm.model.transformer import Transformer

    def make(vocab_size: int, **options):
        torch.manual_seed(0)
        return Transformer(resolve_model(ModelConfig(vocab_size=vocab_size, **{**TINY, **options}))).eval()

    return make


@pytest.fixture(scope="session")
def tiny_run(tiny_model):
    """Return make(path, tokenizer, **options): path, now a run directory of tiny_model(...) and tokenizer."""
    from qinglm.train.checkpoint import save_run

    def make(path: Path, tokenizer, **options) -> Path:
        save_run(path, tiny_model(tokenizer.vocab_size, **options), tokenizer)
        return path

    return make


@pytest.fixture(scope="session")
def perturbed_run(tiny_model):
    """Return make(path, tokenizer, vocab_size=None, **options): tiny_run, with the norm weights and biases
    moved off their init values (ones and zeros would hide a mistake in an exporter's weight layout)."""
    import torch

    from qinglm.train.checkpoint import save_run

    def make(path: Path, tokenizer, vocab_size: int | None = None, **options) -> Path:
        model = tiny_model(vocab_size or tokenizer.vocab_size, **options)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 1:
                    p.add_(torch.randn_like(p) * 0.2)
        save_run(path, model, tokenizer)
        return path

    return make


@pytest.fixture
def faulty_transformer():
    """Return make(factors): a Transformer class whose n-th training forward multiplies the loss by factors[n]."""
    from qinglm.model.transformer import Transformer

    def make(factors: dict[int, float]) -> type:
        class Faulty(Transformer):
            calls = 0  # training forwards so far, counted from 1

            def forward(self, idx, targets=None, **kw):
                out = super().forward(idx, targets, **kw)
                if targets is None or not self.training:
                    return out
                Faulty.calls += 1
                return out * factors.get(Faulty.calls, 1.0)

        return Faulty

    return make


# ---------------------------------------------------------------------------- post-training stages

CHAT = [
    {"role": "system", "content": "你是一个助手。"},
    {"role": "user", "content": "“画蛇添足”是什么意思？"},
    {"role": "assistant", "content": "比喻做了多余的事。"},
    {"role": "user", "content": "拼音呢？"},
    {"role": "assistant", "content": "huà shé tiān zú"},
]


@pytest.fixture(scope="session")
def chat_tok():
    """Return a tiny tokenizer trained on chat text and an idiom with its pinyin."""
    from qinglm.infer.chat import render_chat

    texts = [render_chat(CHAT), "今天天气很好。画蛇添足，多此一举。huà shé tiān zú"] * 30
    return train_tokenizer(texts, 400, show_progress=False)


@pytest.fixture(scope="session")
def pre_tools_tok():
    """Return a tokenizer laid out as before tools and thinking: the 6 control tokens only."""
    import tokenizers
    from tokenizers import trainers

    from qinglm.tokenizer import SPECIAL_TOKENS, Tokenizer, _byte_level_bpe

    backend = _byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    backend.train_from_iterator(["今天天气很好。"] * 20, trainer=trainer)
    return Tokenizer(backend)


@pytest.fixture(scope="session")
def tiny_base_run(tmp_path_factory, chat_tok) -> Path:
    """Return a run directory holding a tiny random model (d 32, 2 layers, context 64) and chat_tok,
    laid out as pretraining leaves it: the --base of post-training tests (read-only)."""
    import torch

    from qinglm.config import ModelConfig, resolve_model
    from qinglm.model.transformer import Transformer
    from qinglm.train.checkpoint import save_run

    run_dir = tmp_path_factory.mktemp("tiny-base") / "run"
    torch.manual_seed(0)
    cfg = resolve_model(
        ModelConfig(vocab_size=chat_tok.vocab_size, d_model=32, n_layers=2, n_heads=2, max_seq_len=64)
    )
    save_run(run_dir, Transformer(cfg), chat_tok)
    return run_dir


def run_and_maybe_kill(cmd: list[str], kill_step: int | None, delay: float) -> tuple[int, str, str]:
    """Return (exit status, output, last line before the kill) of cmd, killed `delay` s after it logs kill_step."""
    import os
    import re
    import signal
    import subprocess
    import threading
    import time

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    reached = threading.Event()

    def read() -> None:
        for line in p.stdout:
            lines.append(line)
            m = re.match(r"step ([\d,]+)/", line)
            if kill_step is not None and m and int(m.group(1).replace(",", "")) >= kill_step:
                reached.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    last = ""
    if kill_step is not None and reached.wait(timeout=240):
        time.sleep(delay)
        last = lines[-1].strip()
        p.send_signal(signal.SIGKILL)
    rc = p.wait(timeout=300)
    reader.join(timeout=10)
    return rc, "".join(lines), last


@pytest.fixture
def sigkill_resume():
    """Return check(cmd, reference_run, killed_run, steps, kills, seed): runs cmd (a `qinglm ... --resume
    --log-every 1` command writing killed_run) SIGKILLed `kills` times at random moments, then to its end,
    and asserts its final weights, optimizer state and per-step losses equal reference_run's (the same
    command run without interruption). Returns the kill descriptions."""
    import signal

    import torch
    from safetensors.torch import load_file

    from qinglm.train.checkpoint import latest_checkpoint, load_trainer_state
    from qinglm.train.metrics import read_metrics

    def check(cmd: list[str], ref: Path, run: Path, steps: int, kills: int, seed: int) -> list[str]:
        rng = random.Random(seed)  # random moments: a step to reach, then part of a step's time or more
        targets = sorted(rng.sample(range(3, steps - 3), kills)) + [None]
        done: list[str] = []
        for attempt, target in enumerate(targets):
            delay = rng.uniform(0.0, 0.1)
            rc, out, last = run_and_maybe_kill(cmd, target, delay)
            if attempt > 0:
                assert "resuming from" in out or "starting a fresh run" in out, out[-2000:]
            if target is not None and rc == 0 and f"stopped at step {steps}" in out:
                done.append(f"the run finished before the kill after step {target} landed")
                break  # tiny steps are fast: the run may end within the delay; it was resumed before
            if target is not None:
                assert rc == -signal.SIGKILL, out[-3000:]
                torn = sorted(p.name for p in (run / "checkpoints").glob("*.tmp-*"))
                done.append(f"killed {delay * 1000:.0f} ms after '{last[:30]}'; half-written dirs: {torn}")
        assert rc == 0 and f"stopped at step {steps}" in out, out[-3000:]
        a, b = latest_checkpoint(ref), latest_checkpoint(run)
        assert a.name == b.name == f"step-{steps:08d}"
        wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
        oa, ob = (load_trainer_state(d)["optimizer"]["state"] for d in (a, b))
        assert all(torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i])
        # the metrics of the killed run hold every step once, with the uninterrupted run's losses
        ra, rb = ([r for r in read_metrics(d) if r["kind"] == "train"] for d in (ref, run))
        assert [r["step"] for r in rb] == list(range(1, steps + 1))
        assert [r["loss"] for r in rb] == [r["loss"] for r in ra]
        return done

    return check


TINY_TASK = '''
from qinglm.post.tasks import Example, Task

def letters():
    """Replies are rewarded for the share of their characters that are Latin letters (like pinyin)."""
    asks = ["拼音呢？", "“画蛇添足”是什么意思？", "你好", "今天天气很好。"]
    examples = {
        "train": [Example([{"role": "user", "content": a}], "") for a in asks],
        "heldout": [Example([{"role": "user", "content": "画蛇添足？"}], "")],
    }

    def reward(prompt, completion, reference):
        return sum(c.isascii() and c.isalpha() for c in completion) / max(1, len(completion))

    return Task("letters", examples.__getitem__, reward, pass_reward=0.5)
'''


@pytest.fixture
def tiny_task(tmp_path, monkeypatch):
    """Return the MODULE:FUNCTION of a tiny plug-in task; the current directory is where it lives."""
    (tmp_path / "grpo_tiny_task.py").write_text(TINY_TASK, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)  # subprocesses find the module in their current directory
    return "grpo_tiny_task:letters"


class PlantedScheduler:
    """Stands in for the server's model: every job's reply is the next planted text; the prompts are kept."""

    planted: list[str] = []
    prompts: list[list[int]] = []

    def __init__(self, lm, **kw):
        self.stats, self.in_flight = {}, 0

    def start(self):
        pass

    def stop(self):
        pass

    def submit(self, req):
        class Job:
            prompt_tokens, completion_tokens = len(req.prompt_ids), 1
            events = asyncio.Queue()

            def cancel(self):
                pass

        job = Job()
        job.req = req
        PlantedScheduler.prompts.append(req.prompt_ids)
        text = PlantedScheduler.planted.pop(0)
        for k in range(0, len(text), 5):  # streamed in small pieces, as the engine sends them
            job.events.put_nowait(("text", text[k : k + 5]))
        job.events.put_nowait(("done", "stop"))
        return job


@pytest.fixture
def planted_scheduler(monkeypatch):
    """Return PlantedScheduler, put in place of the server's Scheduler: set its .planted replies, then create_app."""
    from qinglm.serve import app as serve_app

    monkeypatch.setattr(serve_app, "Scheduler", PlantedScheduler)
    PlantedScheduler.planted, PlantedScheduler.prompts = [], []
    return PlantedScheduler
