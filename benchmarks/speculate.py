"""Speculative decoding (prompt lookup, or a draft model) against plain decoding, on a trained run and held-out prompts.

    python -m benchmarks.speculate RUN [--corpus pd1998] [--batches 1 8] [--speculate 0 2 4 8] [--threads 1]
        [--new-tokens 128] [--prompts 8] [--penalty 1.1] [--temperature 0] [--rounds 5] [--baseline OLD]
        [--draft SMALLER_RUN]

RUN is a trained run directory (the main job's: `qinglm train --preset tiny --data pd1998 reviews idioms`). The
prompts are the first 12 characters of --prompts of the corpus's held-out documents at the run's own split
(never text it trained on), a batch of them decoded together and the batches in turn, greedily (or with
--temperature T sampled with the default top-k / top-p and seed 0, which gives the same tokens with and without
drafts), --new-tokens each with EOS ignored (sampling's default repetition penalty unless --penalty), through
`Generation` with SamplingConfig.speculate = each --speculate value in turn, interleaved, --rounds rounds after a
warm-up round; with --baseline the engine of another checkout (benchmarks.decode.baseline_engine: d4549af is the
engine when issue 23 was filed) joins without speculation, and with --draft "draft K" contestants draft with that
smaller run (the same tokenizer) instead of by prompt lookup. Tokens/s = rows x new tokens / seconds of the whole
generation (prefill included); medians. Every contestant's tokens are checked against plain decoding's;
accepted / drafted are the last round's, over all its prompts (the same every round: greedy or seeded).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import qinglm
from benchmarks.decode import baseline_engine
from qinglm.config import SamplingConfig
from qinglm.data.builtin import builtin_documents
from qinglm.infer import engine
from qinglm.infer.speculate import SpecStats
from qinglm.infer.text import encode_prompt


def prompts_of(lm, corpus: str, n: int, chars: int = 12) -> list[list[int]]:
    """Return the token ids of n prompts: the first chars characters of the corpus's held-out documents."""
    docs = [d for d in builtin_documents(corpus, "val", lm.val_fraction, lm.split_by) if len(d) >= chars]
    if len(docs) < n:
        raise SystemExit(
            f"{corpus}'s held-out split has {len(docs)} documents of {chars}+ characters, not {n}"
        )
    step = len(docs) // n  # spread over the split, not its first article
    return [encode_prompt(lm.tokenizer, docs[i * step][:chars]) for i in range(n)]


def measure(lm, prompts, args, old) -> list[dict]:
    """Return one row per contestant: tokens/s median, acceptance, whether its tokens equal plain decoding's."""

    def cfg(k: int) -> SamplingConfig:
        return SamplingConfig(
            max_new_tokens=args.new_tokens,
            temperature=args.temperature,
            repetition_penalty=args.penalty,
            seed=0 if args.temperature > 0 else None,  # a seed: the same tokens with and without drafts
            stop_at_eos=False,
            speculate=k,
        )

    def run(module, k: int, draft=None):
        ids, spec = [], SpecStats()
        for b in range(0, len(prompts), args.batch):  # a Generation of `batch` prompts at a time
            chunk = prompts[b : b + args.batch]
            out = [[] for _ in chunk]
            reqs = [module.Request(p, cfg(k)) for p in chunk]
            gen = (
                module.Generation(lm.model, reqs, draft=draft) if draft else module.Generation(lm.model, reqs)
            )
            for events in gen:
                for ev in events:
                    out[ev.row] += ev.ids
            ids += out
            if module is engine:
                spec.add(gen.engine.spec)
        return ids, spec if module is engine else None

    contestants = {f"speculate {k}": (engine, k, None) for k in args.speculate}
    if lm.draft is not None:
        contestants.update({f"draft {k}": (engine, k, lm.draft) for k in args.speculate if k})
    if old is not None:
        contestants = {"old engine": (old, 0, None), **contestants}
    want = run(engine, 0)[0]
    times: dict[str, list[float]] = {name: [] for name in contestants}
    last: dict[str, tuple] = {}
    for r in range(args.rounds + 1):
        for name, (module, k, draft) in contestants.items():
            t0 = time.perf_counter()
            ids, spec = run(module, k, draft)
            dt = time.perf_counter() - t0
            if r:
                times[name].append(sum(map(len, ids)) / dt)
            last[name] = (ids == want, spec)
    return [
        {
            "contestant": name,
            "tok_s": statistics.median(times[name]),
            "same": last[name][0],
            "spec": last[name][1],
        }
        for name in contestants
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--corpus", default="pd1998")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--speculate", nargs="+", type=int, default=[0, 2, 4, 8])
    p.add_argument("--threads", nargs="+", type=int, default=[1])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompts", type=int, default=8, help="prompts a round, `batch` at a time")
    p.add_argument("--penalty", type=float, default=SamplingConfig.repetition_penalty)
    p.add_argument(
        "--temperature", type=float, default=0.0, help="> 0: sampled (top-k 50, top-p 0.95), seed 0"
    )
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--baseline", help="another checkout whose engine joins (no speculation)")
    p.add_argument("--draft", help="a smaller run of RUN's tokenizer: 'draft K' contestants draft with it")
    args = p.parse_args()
    if 0 not in args.speculate:
        args.speculate = [0, *args.speculate]
    lm = qinglm.load(args.run, device="cpu", draft=args.draft)
    old = baseline_engine(args.baseline) if args.baseline else None
    print(
        f"{args.run}: {args.corpus} held-out prompts, temperature {args.temperature:g}, penalty {args.penalty:g}, "
        f"{args.new_tokens} new tokens, medians of {args.rounds} rounds"
    )
    print("| batch | threads | contestant | tok/s | vs speculate 0 | accepted / drafted | same tokens |")
    print("|---:|---:|---|---:|---:|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in args.batches:
            args.batch = batch
            rows = measure(lm, prompts_of(lm, args.corpus, max(batch, args.prompts)), args, old)
            plain = next(r["tok_s"] for r in rows if r["contestant"] == "speculate 0")
            for r in rows:
                s = r["spec"]
                rate = (
                    f"{s.accepted:,} / {s.drafted:,} ({s.accepted / s.drafted:.0%})"
                    if s and s.drafted
                    else "-"
                )
                print(
                    f"| {batch} | {threads} | {r['contestant']} | {r['tok_s']:,.0f} | "
                    f"{r['tok_s'] / plain:.2f}x | {rate} | {r['same']} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
