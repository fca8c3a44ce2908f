"""Stages on the one engine: SFT tokens/s against pretraining's at the same shapes, and distillation
against training the same student from scratch.

    python -m benchmarks.stages [--steps 60] [--threads 1] [--teacher-minutes 4] [--student-steps 300]
                                [--teacher RUN --skip-throughput]

1. throughput: pretraining (pd1998 shards) and SFT (idioms-sft, packed rows) of the tiny preset, batch
   --batch-size x --seq-len, the same compile/dtype defaults, alternating for --rounds rounds; tokens/s is
   the median of the logged intervals after the first (compile and warm-up) of each run.
2. distillation: a teacher (the tiny preset, --teacher-minutes of pretraining on pd1998, or --teacher RUN and
   its prepared data) and a student of d_model 64, 2 layers; the student trained --student-steps steps from scratch, distilled (alpha 0.5, T 2), and from
   scratch again for the distilled run's wall-clock; held-out BPC on the whole pd1998 val split.
Every run is a subprocess-free call of the library in this process, one after another.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from benchmarks import common
from qinglm.pipeline import run_train
from qinglm.train.metrics import read_metrics

QUIET = dict(sample_prompts=["中国"], sample_tokens=2)


def _tok_s(run: Path) -> float:
    rows = [r["tokens_per_s"] for r in read_metrics(run) if r["kind"] == "train"][1:]
    return statistics.median(rows)


def throughput(work: Path, args: argparse.Namespace, base: Path) -> dict:
    from qinglm.sft.config import SFTConfig
    from qinglm.sft.train import run_sft

    shape = dict(batch_size=args.batch_size, seq_len=args.seq_len, num_threads=args.threads, log_every=5)
    pre, sft = [], []
    for i in range(args.rounds):
        out = work / f"pre-{i}"
        flags = dict(data=[str(common.data_dir(10_000))], tokenizer=str(base / "tokenizer"), out=str(out))
        run_train(
            {}, {**flags, **shape, **QUIET, "max_steps": args.steps, "eval_every": 10**6}, log=lambda _: None
        )
        pre.append(_tok_s(out))
        out = work / f"sft-{i}"
        cfg = SFTConfig(
            base=str(base), out=str(out), max_steps=args.steps, eval_pinyin=0, eval_examples=50, **shape
        )
        run_sft(cfg, log=lambda _: None)
        sft.append(_tok_s(out))
        print(f"round {i}: pretrain {pre[-1]:,.0f} tok/s, SFT {sft[-1]:,.0f} tok/s", flush=True)
    p, s = statistics.median(pre), statistics.median(sft)
    return {"pretrain_tok_s": p, "sft_tok_s": s, "sft_over_pretrain": s / p}


def _bpc(run: Path, data: Path) -> float:
    import qinglm
    from qinglm.data.shards import TokenShards
    from qinglm.evaluate import evaluate_shards

    lm = qinglm.load(run, device="cpu")
    return evaluate_shards(lm.model, TokenShards(data, "val"), batch_size=16, seq_len=128)["bpc"]


def distillation(work: Path, args: argparse.Namespace, teacher: Path, data: Path) -> dict:
    """Return the student's held-out BPC from scratch and distilled at equal steps, and from scratch at the
    distilled run's wall-clock."""
    student = dict(d_model=64, n_layers=2, n_heads=2, max_seq_len=512)
    base = dict(
        data=[str(data)], tokenizer=str(teacher / "tokenizer"), batch_size=16, seq_len=128,
        num_threads=args.threads, eval_every=10**6, log_every=25, warmup_steps=30, **QUIET,
    )  # fmt: skip
    steps = {"max_steps": args.student_steps}
    run_train(student, {**base, "out": str(work / "scratch"), **steps}, log=lambda _: None)
    kd = {**base, "out": str(work / "distilled"), **steps, "teacher": str(teacher)}
    kd.pop("tokenizer")
    run_train(student, kd, log=lambda _: None, job="distill")
    elapsed = [r for r in read_metrics(work / "distilled") if r["kind"] == "train"][-1]["elapsed_s"]
    run_train(
        student, {**base, "out": str(work / "scratch-time"), "max_time": elapsed / 60}, log=lambda _: None
    )
    res = {}
    for name in ("scratch", "distilled", "scratch-time"):
        last = [r for r in read_metrics(work / name) if r["kind"] == "train"][-1]
        res[name] = {"steps": last["step"], "seconds": last["elapsed_s"], "val_bpc": _bpc(work / name, data)}
        print(name, json.dumps(res[name]), flush=True)
    res["teacher_val_bpc"] = _bpc(teacher, data)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--teacher-minutes", type=float, default=4.0)
    ap.add_argument("--student-steps", type=int, default=300)
    ap.add_argument("--teacher", default=None, help="a trained run to distil from (its data/ and tokenizer)")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="qinglm-stages-"))
    if args.teacher:
        teacher = Path(args.teacher)
        data = teacher / "data"
    else:
        teacher, data = work / "teacher", common.data_dir(10_000)
        common.qinglm_tokenizer(10_000)[0].save(work / "tok")
        flags = dict(data=[str(data)], tokenizer=str(work / "tok"), out=str(teacher))
        quick = {"max_time": args.teacher_minutes, "num_threads": args.threads}
        run_train({}, {**flags, **QUIET, **quick}, log=lambda _: None)
    out = {} if args.skip_throughput else {"throughput": throughput(work, args, teacher)}
    out["distillation"] = distillation(work, args, teacher, data)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
