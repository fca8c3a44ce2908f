"""Longer context than trained: RoPE scaling without training, and after a short continued pretraining.

Pretrains the tiny preset at L tokens on pd1998 train (`qinglm train`, --steps), then measures at 1x, 2x, 4x
and 8x L, for no scaling (positions simply go further), linear, dynamic NTK and YaRN (`--context N
--rope-scaling KIND`, factor N/L), and for the run continued at 4L with YaRN for --long-steps steps
(`qinglm train --init-from BASE --seq-len 4L --rope-scaling yarn`, same tokens per step):

  bpc      bits per character of the pd1998 val split (blocks of whole articles held out, their paragraphs
           concatenated in order), cut into windows of N tokens: every token is predicted once
  passkey  a 5-digit key said twice at a random depth of N tokens of filler, asked for at the end:
           exact = all key tokens are the greedy choice; gain = bits the needle saves on the key
           (its NLL without the needle minus with it), averaged over --trials keys

    python -m benchmarks.long_context [--quick] [--length 128] [--steps 1200] [--long-steps 300]

BPC and passkey figures do not depend on the machine's load; the budget is in steps, not minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import common

MULTIPLES = (1, 2, 4, 8)
KINDS = ("none", "linear", "dynamic", "yarn")
FILLER = "草是绿的。天是蓝的。太阳是黄的。我们走了又回来。"
NEEDLE = "通行密码是{key}。记住它，通行密码是{key}。"
QUERY = "通行密码是"


def train_run(out: Path, model: dict, train: dict) -> Path:
    """Return the run directory of `qinglm train` with these flags (reused when it is already there)."""
    from qinglm.errors import QingLMError
    from qinglm.pipeline import run_train
    from qinglm.train.checkpoint import inference_weights

    try:
        inference_weights(out)
        return out
    except QingLMError:  # not trained yet
        pass
    t0 = time.perf_counter()
    run_train(model, {**train, "out": str(out), "overwrite": True}, log=lambda _: None)
    print(f"trained {out.name} in {time.perf_counter() - t0:.0f} s (shared machine)", flush=True)
    return out


def load(run: Path, context: int | None = None, kind: str | None = None):
    import qinglm
    from qinglm.config import ContextConfig

    return qinglm.load(run, device="cpu", context=ContextConfig(context=context, rope_scaling=kind))


def bpc(lm, n: int, data: Path, L: int) -> dict[str, float]:
    """Return {"bpc": bits per character of lm over the whole val split in windows of n tokens, "tail": the
    same over the tokens at positions L.. of each window only (NaN for n <= L), whose characters are
    estimated at the split's mean characters per token}."""
    from qinglm.data.loader import eval_batches
    from qinglm.data.shards import TokenShards
    from qinglm.model.transformer import IGNORE_INDEX

    val = TokenShards(data, "val")
    bits = tail_bits = 0.0
    tokens = tail_tokens = 0
    with torch.inference_mode():
        for x, y in eval_batches(val, max(1, 4096 // n), n):
            logits = lm.model(x).float()
            nll = F.cross_entropy(logits.transpose(1, 2), y, ignore_index=IGNORE_INDEX, reduction="none")
            bits, tail_bits = bits + nll.sum().item(), tail_bits + nll[:, L:].sum().item()
            tokens += int((y != IGNORE_INDEX).sum())
            tail_tokens += int((y[:, L:] != IGNORE_INDEX).sum())
    chars_per_token = val.n_characters / tokens
    tail = tail_bits / math.log(2) / (tail_tokens * chars_per_token) if tail_tokens else math.nan
    return {"bpc": bits / math.log(2) / val.n_characters, "tail": tail}


def passkey_prompt(tok, n: int, key: str, depth: float, needle: bool) -> tuple[list[int], int]:
    """Return (ids of n tokens ending with the key, index of the key's first token)."""
    filler, query, key_ids = tok.encode(FILLER), tok.encode(QUERY), tok.encode(key)
    middle = tok.encode(NEEDLE.format(key=key)) if needle else []
    room = n - 1 - len(middle) - len(query) - len(key_ids)
    if room < 8:
        raise ValueError(f"{n} tokens hold no filler around the needle")
    hay = (filler * (room // len(filler) + 1))[:room]
    cut = int(depth * room)
    ids = [tok.bos_id, *hay[:cut], *middle, *hay[cut:], *query, *key_ids]
    return ids, len(ids) - len(key_ids)


def passkey(lm, n: int, trials: int) -> dict[str, float]:
    """Return {"exact": share of keys greedy decoding reproduces, "gain": mean bits the needle saves}
    (NaN when n tokens cannot hold the needle and some filler)."""
    rng, exact, gain = random.Random(n), 0, 0.0
    try:
        passkey_prompt(lm.tokenizer, n, "12345", 0.5, True)
    except ValueError:
        return {"exact": math.nan, "gain": math.nan}
    for _ in range(trials):
        key, depth = str(rng.randrange(10_000, 100_000)), rng.uniform(0.1, 0.9)
        nll = {}
        for needle in (True, False):
            ids, at = passkey_prompt(lm.tokenizer, n, key, depth, needle)
            x = torch.tensor([ids])
            with torch.inference_mode():
                logits = lm.model(x[:, :-1])[0, at - 1 :].float()  # predicting the key's tokens
            target = x[0, at:]
            nll[needle] = F.cross_entropy(logits, target, reduction="sum").item() / math.log(2)
            if needle:
                exact += bool((logits.argmax(-1) == target).all())
        gain += nll[False] - nll[True]
    return {"exact": exact / trials, "gain": gain / trials}


def measure(lm, n: int, data: Path, L: int, trials: int) -> dict[str, float]:
    return {**bpc(lm, n, data, L), **passkey(lm, n, trials)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="L 64, 400 + 100 steps, 8 passkey trials")
    ap.add_argument("--length", type=int, default=128, help="trained length L in tokens")
    ap.add_argument("--steps", type=int, default=1200, help="pretraining steps at L")
    ap.add_argument("--long-steps", type=int, default=300, help="continued pretraining steps at 4L (YaRN)")
    ap.add_argument("--batch-size", type=int, default=16, help="rows per step at L (4L: a quarter)")
    ap.add_argument("--trials", type=int, default=20, help="passkeys per length and method")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.quick:
        args.length, args.steps, args.long_steps, args.trials = 64, 400, 100, 8
    torch.set_num_threads(args.threads)
    L = args.length
    data = common.data_dir(10_000)
    tok_dir = common.CACHE / "tok-10000-auto"
    common.qinglm_tokenizer(10_000)
    train = dict(
        data=[str(data)], tokenizer=str(tok_dir), preset="tiny", dtype="fp32", compile=False,
        num_threads=args.threads, eval_every=10**9, save_every=10**9, log_every=10**9, sample_prompts=[],
    )  # fmt: skip
    root = common.CACHE / f"long-context-L{L}-s{args.steps}"
    base = train_run(
        root / "base",
        {"max_seq_len": L},
        {**train, "seq_len": L, "batch_size": args.batch_size, "max_steps": args.steps},
    )
    long_train = {**train, "seq_len": 4 * L, "batch_size": max(1, args.batch_size // 4)}
    long_train.update(max_steps=args.long_steps, init_from=str(base), lr=1e-3, warmup_steps=10)
    tuned = train_run(root / f"yarn4x-{args.long_steps}", {"rope_scaling": "yarn"}, long_train)

    rows: dict[str, dict[int, dict[str, float]]] = {}
    for kind in KINDS:
        rows[kind] = {m: measure(load(base, m * L, kind), m * L, data, L, args.trials) for m in MULTIPLES}
        print(f"{kind}: " + ", ".join(f"{m}x {r['bpc']:.4f}" for m, r in rows[kind].items()), flush=True)
    # the continued run at its own setting (YaRN factor 4, 4L positions), and asked for 8L
    rows["yarn+4x train"] = {
        m: measure(load(tuned) if m <= 4 else load(tuned, m * L), m * L, data, L, args.trials)
        for m in MULTIPLES
    }
    print(f"\nL = {L} tokens; tiny preset pretrained {args.steps} steps x {args.batch_size} x {L} tokens; "
          f"continued {args.long_steps} steps x {long_train['batch_size']} x {4 * L} tokens with YaRN\n")  # fmt: skip
    head = " | ".join(f"{m}x ({m * L})" for m in MULTIPLES)
    print(f"| bits/char (val) | {head} | 4x / 1x |\n|---|" + "---|" * (len(MULTIPLES) + 1))
    for name, r in rows.items():
        cells = " | ".join(f"{r[m]['bpc']:.4f}" for m in MULTIPLES)
        print(f"| {name} | {cells} | {r[4]['bpc'] / rows['none'][1]['bpc']:.3f} |")
    print(f"\n| bits/char of the tokens past L | {head} |\n|---|" + "---|" * len(MULTIPLES))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join("-" if m == 1 else f"{r[m]['tail']:.4f}" for m in MULTIPLES) + " |")
    print(f"\n| passkey: exact / gain bits | {head} |\n|---|" + "---|" * len(MULTIPLES))
    for name, r in rows.items():
        print(
            f"| {name} | "
            + " | ".join(f"{r[m]['exact']:.2f} / {r[m]['gain']:+.1f}" for m in MULTIPLES)
            + " |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"length": L, "args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
