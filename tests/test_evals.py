"""The evaluation suite: scoring, intervals, held-out splits, the CLI and the report card."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from qinglm import run_dir as run_dirs
from qinglm.cli import main
from qinglm.config import ModelConfig, to_dict
from qinglm.data.builtin import builtin_documents
from qinglm.data.shards import prepare_shards
from qinglm.errors import QingLMError
from qinglm.evals import run_tasks
from qinglm.evals.scoring import choose, encode_pair, loglikelihoods, score_ids
from qinglm.evals.stats import bootstrap_ratio_interval, rescale, summary_score, wilson_interval
from qinglm.evals.suite import _take, evaluate_tasks, score_choice
from qinglm.evals.tasks import TASKS
from qinglm.model.transformer import Transformer
from qinglm.tokenizer import train_tokenizer
from qinglm.train.config import TrainConfig

CHOICE_TASKS = [n for n, t in TASKS.items() if t.kind == "choice"]


@pytest.fixture(scope="module")
def tok():
    docs = builtin_documents("pd1998", "train")[:300] + builtin_documents("idioms", "train")[:300]
    return train_tokenizer(docs + builtin_documents("reviews", "train")[:100], 400, show_progress=False)


@pytest.fixture(scope="module")
def tiny(tok):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2, max_seq_len=128)
    return Transformer(cfg).eval()


class Fixed(nn.Module):
    """A model whose logits are given: uniform (all zero), or an oracle that knows one token sequence."""

    def __init__(self, vocab: int, max_seq_len: int, knows: list[int] | None = None):
        super().__init__()
        self.cfg = ModelConfig(vocab_size=vocab, max_seq_len=max_seq_len)
        self.dummy = nn.Parameter(torch.zeros(1))
        self.knows = knows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*x.shape, self.cfg.vocab_size)
        if self.knows is not None:
            for b in range(x.shape[0]):
                for t in range(min(x.shape[1], len(self.knows) - 1)):
                    if x[b, : t + 1].tolist() == self.knows[: t + 1]:
                        logits[b, t, self.knows[t + 1]] = 100.0
        return logits


def test_loglikelihood_equals_hand_computed(tiny, tok):
    pairs = [("今天天气", "真不错"), ("中国", "经济持续发展，人民生活"), ("成语", "一"), ("", "新华社北京")]
    got = loglikelihoods(tiny, tok, pairs)
    for (ctx, cont), ll in zip(pairs, got):
        whole = tok.encode(ctx + cont)
        n_cont = len(whole) - len(tok.encode(ctx))
        ids = torch.tensor([[tok.bos_id, *whole]])
        with torch.no_grad():
            logp = torch.log_softmax(tiny(ids[:, :-1]), dim=-1)[0]
        targets = ids[0, 1:]
        want = sum(float(logp[t, targets[t]]) for t in range(len(targets) - n_cont, len(targets)))
        assert ll == pytest.approx(want, abs=1e-5)
    # Small batches pad differently; the scores stay the same.
    ids = [encode_pair(tok, c, x) for c, x in pairs]
    small = [ll for ll, _ in score_ids(tiny, ids, tokens_per_batch=8)]
    assert small == pytest.approx(got, abs=1e-5)


def test_acc_and_acc_norm_pick_as_lm_eval():
    # lm-eval: acc = argmax(lls), acc_norm = argmax(lls / len(choice)) (characters)
    assert choose([-4.0, -5.0], ["ab", "abcd"]) == (0, 1)
    assert choose([-3.0, -3.0], ["a", "b"]) == (0, 0)  # ties go to the first, as numpy's argmax


@pytest.mark.parametrize("name", CHOICE_TASKS)
def test_oracle_scores_100_and_uniform_scores_random(name, tok):
    items = TASKS[name].build(0.02, "auto", tok)[::40][:12]
    for it in items:
        ctx, cont = encode_pair(tok, it.context, it.choices[it.gold])
        oracle = Fixed(tok.vocab_size, 4096, knows=ctx + cont)
        assert score_choice(oracle, tok, (it,)) == {"acc": 1.0, "acc_norm": 1.0, "n": 1}
    out = evaluate_tasks(Fixed(tok.vocab_size, 4096), tok, [name], limit=400)["tasks"][name]
    lo, hi = out["interval"]
    assert lo <= out["random"] <= hi and out["n"] > 300


class Biased(Fixed):
    """Favours every item's first choice (+5 on each of its tokens) and knows the right one (+2 more)."""

    def __init__(self, vocab: int, tok, items):
        super().__init__(vocab, 4096)
        self.boost: dict[tuple, dict[int, float]] = {}
        for it in items:
            for choice, add in ((it.choices[0], 5.0), (it.choices[it.gold], 2.0)):
                seq = sum(encode_pair(tok, it.context, choice), [])
                for t in range(1, len(seq)):
                    nxt = self.boost.setdefault(tuple(seq[:t]), {})
                    nxt[seq[t]] = nxt.get(seq[t], 0.0) + add

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*x.shape, self.cfg.vocab_size)
        for b, row in enumerate(x.tolist()):
            for t in range(len(row)):
                for nxt, add in self.boost.get(tuple(row[: t + 1]), {}).items():
                    logits[b, t, nxt] = add
        return logits


def test_sentiment_scores_how_a_model_ranks_reviews_however_it_favours_one_label(tok):
    """A model that always prefers the first label, yet likes the right one better on every review,
    scores 100 % (near the random 50 % with the raw argmax, where every trained model sat at 50 %)."""
    items = _take(TASKS["reviews-sentiment"].build(0.02, "auto", tok), 60)
    out = evaluate_tasks(Biased(tok.vocab_size, tok, items), tok, ["reviews-sentiment"], limit=60)
    r = out["tasks"]["reviews-sentiment"]
    assert (r["metric"], r["score"], r["n"]) == ("acc_calibrated", 1.0, 60), r
    assert max(r["acc"], r["acc_norm"]) < 0.6  # the raw argmax: near chance


def test_uniform_bpc_is_the_random_baseline(tok):
    out = evaluate_tasks(Fixed(tok.vocab_size, 64), tok, ["bpc-reviews"], limit=50)["tasks"]["bpc-reviews"]
    assert out["score"] == pytest.approx(out["random"], rel=1e-6)
    assert out["interval"][0] <= out["score"] <= out["interval"][1] and out["n"] == 50


def test_interval_and_summary_math():
    lo, hi = wilson_interval(8, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)  # Wilson score interval, z = 1.96
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0
    assert rescale(0.625, 0.25) == 0.5 and rescale(0.25, 0.25) == 0.0 and rescale(1.0, 0.5) == 1.0
    results = {
        "a": {"kind": "choice", "score": 0.625, "random": 0.25},
        "b": {"kind": "choice", "score": 0.5, "random": 0.5},
        "c": {"kind": "bpc", "score": 3.0, "random": 9.0},  # not an accuracy: left out of the summary
    }
    assert summary_score(results) == 0.25
    num, den = [1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 2.0, 2.0]
    lo, hi = bootstrap_ratio_interval(num, den)
    assert lo < sum(num) / sum(den) < hi and (lo, hi) == bootstrap_ratio_interval(num, den)


def test_no_task_asks_the_same_item_twice(tok):
    """The reviews corpus holds most reviews twice: as many items again, and intervals half as wide."""
    for name, task in TASKS.items():
        if task.kind != "chat":  # a verifiable task's own test checks its held-out split
            items = task.build(0.02, "auto", tok)
            keys = [it if isinstance(it, str) else (it.context, it.choices[it.gold]) for it in items]
            assert len(set(keys)) == len(keys), name


@pytest.mark.parametrize("val_fraction", [0.02, 0.05])
def test_task_items_never_occur_in_training(tok, val_fraction):
    split = (val_fraction, "auto")
    for corpus in ("pd1998", "reviews", "idioms"):
        train = set(builtin_documents(corpus, "train", *split))
        items = TASKS[f"bpc-{corpus}"].build(*split, tok)
        assert items and not train & set(items)
    for corpus in ("pd1998", "reviews"):
        train_text = "\n".join(builtin_documents(corpus, "train", *split))
        items = TASKS[f"{corpus}-cloze"].build(*split, tok)
        assert len(items) > 300 and not any(it.context + it.choices[it.gold] in train_text for it in items)
    reviews_train = {d[:60] for d in builtin_documents("reviews", "train", *split)}
    for it in TASKS["reviews-sentiment"].build(*split, tok):
        review = re.search(r"评论：([^\n]*)\n评价：$", it.context).group(1)
        assert review not in reviews_train
    from qinglm.data.idioms_sft import idioms_sft

    questions = "\n".join(chat[0]["content"] for chat in idioms_sft("train"))
    idioms_train = [d for d in builtin_documents("idioms", "train", *split)]
    for name in ("idiom-complete", "idiom-pinyin"):
        words = {it.context[:2] + it.choices[it.gold][:2] if name == "idiom-complete" else it.context[:4]
                 for it in TASKS[name].build(*split, tok)}  # fmt: skip
        assert len(words) > 500
        assert not any(f"“{w}”" in questions for w in words)
        assert not any(d.split("（", 1)[0] in words for d in idioms_train)


def test_run_tasks_gives_flat_scores(tiny, tok):
    out = run_tasks(tiny, tok, ["idiom-complete", "bpc-idioms"], device="cpu", limit=20)
    assert set(out) == {"task/idiom-complete", "task/bpc-idioms", "task/summary"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tasks", "nope"], "unknown task 'nope'"),
        (["--tasks", "all", "--limit", "0"], "--limit must be a positive"),
        (["--tasks", "chat-pinyin"], "chat-pinyin asks a chat model"),
        ([], "give --data"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "config.json").write_text("{}")
    assert main(["eval", "--model", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert main(["eval", "--model", str(tmp_path / "missing"), "--tasks", "all"]) == 2
    err = capsys.readouterr().err
    assert "not a QingLM run directory" in err and err.count("\n") == 1
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def _tiny_run(root: Path, seed: int, steps: int) -> Path:
    from qinglm.train import train

    rng = random.Random(seed)
    docs = [rng.choice(builtin_documents("pd1998", "train")[:500]) for _ in range(200)]
    tok = train_tokenizer(docs, 300, show_progress=False)
    run = root / f"run{seed}"
    run_dirs.claim(run)
    tok.save(run / "tokenizer")
    prepare_shards({"train": docs[:180], "val": docs[180:]}, tok, root / f"data{seed}", show_progress=False)
    model = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2, max_seq_len=64)
    cfg = TrainConfig(
        max_steps=steps, batch_size=4, seq_len=32, eval_every=2, log_every=1, save_every=100,
        sample_prompts=["中国经济"], sample_tokens=4, device="cpu", dtype="fp32", compile=False, num_threads=1,
    )  # fmt: skip
    train(model, cfg, run, root / f"data{seed}", log=lambda _line: None)
    run_dirs.write_config(run, "pretrain", {"model": to_dict(model), "train": to_dict(cfg)})
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-runs")
    return [_tiny_run(root, 0, 4), _tiny_run(root, 1, 2)]


def test_eval_tasks_writes_results_and_report_holds_every_section(runs, capsys):
    from qinglm.evals.report import SECTIONS

    run_a, run_b = runs
    assert main(["eval", "--model", str(run_a), "--tasks", "idiom-complete,bpc-pd1998", "--limit", "20"]) == 0
    table = capsys.readouterr().out
    assert "idiom-complete" in table and "summary" in table
    assert main(["eval", "--model", str(run_a), "--tasks", "pd1998-cloze", "--limit", "20"]) == 0
    results = json.loads((run_a / "eval_results.json").read_text(encoding="utf-8"))
    assert set(results["tasks"]) == {"idiom-complete", "bpc-pd1998", "pd1998-cloze"}  # merged
    assert results["summary"] == pytest.approx(summary_score(results["tasks"]))
    assert main(["report", str(run_a), str(run_b), "--tasks", "idiom-pinyin", "--limit", "10"]) == 0
    for run in runs:
        text = (run / "report.md").read_text(encoding="utf-8")
        for section in SECTIONS:
            assert f"## {section}\n" in text, section
        assert "## Side by side" in text and "中国经济" in text
        for png in ("curves.png", "tasks.png"):
            assert (run / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "idiom-pinyin" in (run_b / "report.md").read_text(encoding="utf-8")  # evaluated for the report


def test_a_file_qinglm_did_not_write_is_not_replaced(runs):
    from qinglm.evals.suite import write_run_file
    from qinglm.io import OwnedDir

    run = runs[1]
    assert not OwnedDir.read(run).owns("notes.md")
    (run / "notes.md").write_text("mine")
    with pytest.raises(QingLMError, match="not written by QingLM"):
        write_run_file(run, "notes.md", "x")
    assert (run / "notes.md").read_text() == "mine"


LOCAL_TASK = """task: qinglm_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


@pytest.mark.slow
def test_lm_eval_on_a_local_task_matches_our_scoring(runs, tmp_path, monkeypatch, capsys):
    pytest.importorskip(
        "lm_eval", reason="lm-evaluation-harness is not installed (pip install 'qinglm[lm-eval]')"
    )
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import qinglm
    from qinglm.export.hf import export_hf

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    docs = [
        {"context": "中国经济", "choices": ["持续发展", "春天来了", "学习进步"], "gold": 0},
        {"context": "今天天气", "choices": ["真不错", "经济发展"], "gold": 0},
        {"context": "人工智能", "choices": ["改变了世界", "花开了"], "gold": 1},
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "local.yaml").write_text(LOCAL_TASK.format(data=data), encoding="utf-8")
    run = runs[0]
    argv = [
        "eval",
        "--model",
        str(run),
        "--lm-eval",
        "qinglm_local",
        "--lm-eval-include",
        str(tmp_path / "tasks"),
    ]
    assert main(argv) == 0
    assert "acc_norm" in capsys.readouterr().out
    results = json.loads((run / "eval_results.json").read_text(encoding="utf-8"))
    assert set(results["lm_eval"]["qinglm_local"]) >= {"acc,none", "acc_norm,none"}
    assert main([*argv[:4], "no_such_task", *argv[5:]]) == 2
    assert "unknown lm-eval task" in capsys.readouterr().err
    # lm-eval's own log-likelihoods of the exported model are ours.
    folder = export_hf(run, tmp_path / "hf")
    out = simple_evaluate(
        model="hf",
        model_args={"pretrained": str(folder), "dtype": "float32", "add_bos_token": True},
        tasks=["qinglm_local"],
        task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
        log_samples=True,
        device="cpu",
    )
    lm = qinglm.load(run, device="cpu")
    for sample in out["samples"]["qinglm_local"]:
        doc = sample["doc"]
        theirs = [resp[0][0] for resp in sample["resps"]]
        ours = loglikelihoods(lm.model, lm.tokenizer, [(doc["context"], c) for c in doc["choices"]])
        assert ours == pytest.approx(theirs, abs=1e-4)


class CharTokenizer:
    """One token per character, ids by first appearance: a unigram over it knows character frequencies."""

    bos_id, eos_id = 1, 2

    def __init__(self, texts: list[str]):
        self.ids = {c: i + 3 for i, c in enumerate(dict.fromkeys("".join(texts)))}
        self.vocab_size = len(self.ids) + 3

    def encode(self, text: str) -> list[int]:
        return [self.ids.get(c, 0) for c in text]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def fingerprint(self) -> str:
        return f"chars-{self.vocab_size}"


@pytest.mark.parametrize("corpus", ["pd1998", "reviews"])
def test_a_model_that_knows_only_character_frequencies_scores_random_on_cloze(corpus):
    """Distractors are as often more as less frequent than the true character (a band clipped at the
    most frequent characters made frequency alone score above chance)."""
    train = builtin_documents(corpus, "train")
    chars = CharTokenizer(train + builtin_documents(corpus, "val"))
    counts = torch.ones(chars.vocab_size)
    for ids in chars.encode_batch(train):
        counts += torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=chars.vocab_size)
    unigram = Fixed(chars.vocab_size, 4096)
    unigram.forward = lambda x: counts.log().expand(*x.shape, -1)
    out = evaluate_tasks(unigram, chars, [f"{corpus}-cloze"])["tasks"][f"{corpus}-cloze"]
    assert out["interval"][0] <= out["random"] <= out["interval"][1] and out["n"] > 300


def test_chat_tasks_need_a_chat_run():
    from qinglm.evals.tasks import resolve

    chat = {"chat-pinyin", "chat-arithmetic"}
    assert not chat & {t.name for t in resolve("all", "pretrain")}
    assert not chat & {t.name for t in resolve("all")}  # kind unknown: only when named
    assert chat <= {t.name for t in resolve("all", "sft")} and [t.name for t in resolve("chat-pinyin")]
    with pytest.raises(QingLMError, match="chat-arithmetic asks a chat model; this is a pretrain run"):
        resolve("bpc-idioms,chat-arithmetic", "pretrain")


@pytest.mark.parametrize("name", ["chat-pinyin", "chat-arithmetic"])
def test_chat_tasks_pass_an_oracle_and_nothing_from_uniform_logits(name, tok, monkeypatch):
    from qinglm.data.verifiable import TASKS as VERIFIABLE
    from qinglm.evals import chat

    uniform = Transformer(ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2)).eval()
    with torch.no_grad():
        for p in uniform.parameters():
            p.zero_()  # every logit 0: the greedy reply is whatever token 0 decodes to
    out = evaluate_tasks(uniform, tok, [name], limit=12, kind="sft")
    r = out["tasks"][name]
    assert (r["kind"], r["score"], r["random"], r["n"]) == ("chat", 0.0, 0.0, 12)
    assert r["interval"][0] == pytest.approx(0.0, abs=1e-12) and 0 < r["interval"][1] < 0.3
    assert out["summary"] == 0.0
    task = TASKS[name]
    answers = {
        ex.messages[-1]["content"]: ex.reference for ex in VERIFIABLE[task.verifier]().split("heldout")
    }

    def oracle(model, tokenizer, chats, max_new_tokens):
        return [answers[c[-1]["content"]] for c in chats]

    monkeypatch.setattr(chat, "greedy_replies", oracle)
    r = evaluate_tasks(uniform, tok, [name], kind="sft")["tasks"][name]
    assert r["score"] == 1.0 and r["n"] == 100 and list(r["details"].values()) == [1.0]  # CHAT_ITEMS


def test_train_and_sft_write_a_report_at_the_end_unless_told_not_to(tmp_path, tiny_base_run):
    from test_cli import TINY
    from test_sft import _jsonl, _tiny_sft

    from qinglm.evals.report import SECTIONS
    from qinglm.sft.train import run_sft

    text = tmp_path / "news.txt"
    text.write_text("\n".join(builtin_documents("pd1998", "train")[:200]), encoding="utf-8")
    flags = [
        "--data",
        str(text),
        "--max-steps",
        "4",
        *TINY,
        "--eval-tasks",
        "idiom-complete",
        "--eval-task-limit",
        "8",
    ]
    assert main(["train", "--out", str(tmp_path / "pre"), *flags]) == 0
    md = (tmp_path / "pre" / "report.md").read_text(encoding="utf-8")
    assert all(f"## {section}\n" in md for section in SECTIONS)
    assert "(step 4, `--eval-tasks`)" in md and "| idiom-complete |" in md  # the scores the run holds
    assert not (tmp_path / "pre" / "eval_results.json").exists()  # nothing evaluated at the end
    assert (tmp_path / "pre" / "report" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["train", "--out", str(tmp_path / "quiet"), *flags, "--no-report"]) == 0
    assert (tmp_path / "quiet" / "best").is_dir() and not (tmp_path / "quiet" / "report.md").exists()

    data = _jsonl(tmp_path / "chat.jsonl")
    run_sft(_tiny_sft(tiny_base_run, data, tmp_path / "sft", 1, max_steps=4), log=lambda s: None)
    md = (tmp_path / "sft" / "report.md").read_text(encoding="utf-8")
    assert all(f"## {section}\n" in md for section in (*SECTIONS, "Post-training"))
    assert f"Before: the base run {tiny_base_run}" in md and "| held-out val loss |" in md
    assert f"qinglm eval --model {tmp_path / 'sft'} --tasks all" in md  # how to add task scores
    run_sft(_tiny_sft(tiny_base_run, data, tmp_path / "sft2", 1, max_steps=2, report=False), log=print)
    assert not (tmp_path / "sft2" / "report.md").exists()


def test_the_default_install_draws_the_report_plots():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    base = [d.split(">")[0].split("=")[0].strip() for d in pyproject["project"]["dependencies"]]
    assert "matplotlib" in base  # not an extra: `bash scripts/setup.sh` alone gives a report with plots


def test_without_matplotlib_the_report_has_no_plots_and_says_so(runs, monkeypatch):
    import sys

    from qinglm.evals.report import write_end_report

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    md = write_end_report(runs[1], "cpu").read_text(encoding="utf-8")
    assert "matplotlib is not installed: no plots" in md and "![" not in md and "## Samples\n" in md


def test_the_task_plot_takes_a_score_of_zero(tmp_path):
    """A pass rate of 0 has a Wilson interval whose low end is a rounding error above it."""
    from qinglm.evals.report import _plot_tasks

    r = {"kind": "chat", "score": 0.0, "interval": list(wilson_interval(0, 100)), "random": 0.0}
    assert r["interval"][0] > 0.0  # 2.8e-17: matplotlib refuses the negative error bar it made
    assert _plot_tasks({"tasks": {"chat-pinyin": r}}, tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
