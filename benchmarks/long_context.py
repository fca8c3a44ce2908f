"""Longer context than trained: RoPE scaling without training, and after a short continued pretraining.

Pretrains the tiny preset at L tokens on pd1998 train (`qinglm train`, --steps), then measures at 1x, 2x, 4x,
8x and 16x L, for no scaling (positions simply go further), linear, dynamic NTK and YaRN (`--context N
--rope-scaling KIND`, factor N/L), and for the run continued at 4L with YaRN for --long-steps steps
(`qinglm train --init-from BASE --seq-len 4L --rope-scaling yarn`, same tokens per step):

  bpc      bits per character of the pd1998 val split (blocks of whole articles held out, their paragraphs
           concatenated in order), cut into windows of N tokens: every token is predicted once
  passkey  the built-in passkey corpus's format (qinglm.data.passkey): a held-out 5-digit key said twice at a
           random depth of N tokens of pd1998 val text, asked for at the end: exact = all key tokens are the
           greedy choice; gain = bits the needle saves on the key (its NLL without the needle minus with
           it), averaged over --trials keys

--passkey-share S mixes passkey documents (training keys only, pd1998 train filler, lengths up to the stage's
sequence length) into both trainings, S of the training characters; 0 trains on news alone.

    python -m benchmarks.long_context [--quick] [--length 128] [--steps 1200] [--long-steps 300] \
        [--passkey-share 0.5]

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

MULTIPLES = (1, 2, 4, 8, 16)
KINDS = ("none", "linear", "dynamic", "yarn")


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


def passkey_prompt(tok, n: int, key: str, depth: float, filler: str) -> tuple[list[int], list[int], int]:
    """Return (ids of at most n tokens ending with the key, the same without the needle, index of the key's
    first token): as much of `filler` as fits, the needle at `depth`, the question, the key."""
    from qinglm.data.passkey import passkey_text

    def ids(chars: int, needle: bool) -> list[int]:
        return [tok.bos_id, *tok.encode(passkey_text(filler[:chars].strip(), key, depth, needle) + key)]

    lo, hi = 0, min(len(filler), 4 * n)  # the longest filler whose prompt fits: a bisection on characters
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(ids(mid, True)) <= n else (lo, mid - 1)
    with_needle = ids(lo, True)
    if len(with_needle) > n or lo < 8:
        raise ValueError(f"{n} tokens hold no filler around the needle")
    return with_needle, ids(lo, False), len(with_needle) - len(tok.encode(key))


def passkey_prompts(tok, n: int, trials: int) -> list[tuple[list[int], list[int], int]] | None:
    """Return `trials` passkey prompts of n tokens with held-out keys in pd1998 val text (None: too short)."""
    from qinglm.data.builtin import filler_text
    from qinglm.data.passkey import keys

    rng, text, pool = random.Random(n), filler_text("val"), keys("val")
    prompts = []
    for _ in range(trials):
        key, depth, start = rng.choice(pool), rng.uniform(0.1, 0.9), rng.randrange(len(text) - 4 * n)
        try:
            prompts.append(passkey_prompt(tok, n, key, depth, text[start:]))
        except ValueError:
            return None
    return prompts


def passkey(lm, prompts) -> dict[str, float]:
    """Return {"exact": share of keys greedy decoding reproduces, "gain": mean bits the needle saves}
    (NaN without prompts)."""
    if not prompts:
        return {"exact": math.nan, "gain": math.nan}
    exact, gain = 0, 0.0
    for with_needle, without, at in prompts:
        nll = {}
        for needle, ids in ((True, with_needle), (False, without)):
            x, start = torch.tensor([ids]), len(ids) - (len(with_needle) - at)
            with torch.inference_mode():
                logits = lm.model(x[:, :-1])[0, start - 1 :].float()  # predicting the key's tokens
            target = x[0, start:]
            nll[needle] = F.cross_entropy(logits, target, reduction="sum").item() / math.log(2)
            if needle:
                exact += bool((logits.argmax(-1) == target).all())
        gain += nll[False] - nll[True]
    return {"exact": exact / len(prompts), "gain": gain / len(prompts)}


def measure(lm, n: int, data: Path, L: int, prompts) -> dict[str, float]:
    return {**bpc(lm, n, data, L), **passkey(lm, prompts)}


def passkey_data(share: float, max_tokens: int, vocab_size: int, min_tokens: int = 0) -> Path:
    """Return a prepared data directory: pd1998 train plus passkey documents (training keys) making `share`
    of the training characters, whose filler is min_tokens to 0.9 * max_tokens tokens long; pd1998 val as val."""
    from qinglm.data.builtin import builtin_documents, filler_text
    from qinglm.data.passkey import passkey_documents
    from qinglm.data.shards import TokenShards, prepare_shards

    base = common.data_dir(vocab_size)
    out = (
        common.CACHE
        / f"data-{vocab_size}-passkey{share:g}-{max_tokens}{f'-min{min_tokens}' if min_tokens else ''}"
    )
    if (out / "index.json").is_file():
        return out
    val = TokenShards(base, "val")
    chars_per_token = val.n_characters / sum(len(s) for s in val.shards)
    news = builtin_documents("pd1998", "train")
    max_chars = int(0.9 * max_tokens * chars_per_token) - 40  # room for the needle and the question
    min_chars = max(16, int(min_tokens * chars_per_token))
    n = round(share / (1 - share) * sum(map(len, news)) / ((min_chars + max_chars) / 2 + 40))
    keys = passkey_documents("train", n, filler_text("train"), min_chars, max_chars)
    every = max(1, len(news) // max(1, n))  # spread evenly: the loader shuffles windows, not documents
    train, used = [], 0
    for i, doc in enumerate(news):
        train.append(doc)
        if i % every == 0 and used < n:
            train.append(keys[used])
            used += 1
    train += keys[used:]
    tok, _ = common.qinglm_tokenizer(vocab_size)
    prepare_shards({"train": train, "val": builtin_documents("pd1998", "val")}, tok, out, show_progress=False)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="L 64, 400 + 100 steps, 8 passkey trials")
    ap.add_argument("--length", type=int, default=128, help="trained length L in tokens")
    ap.add_argument("--steps", type=int, default=1200, help="pretraining steps at L")
    ap.add_argument("--long-steps", type=int, default=300, help="continued pretraining steps at 4L (YaRN)")
    ap.add_argument("--batch-size", type=int, default=16, help="rows per step at L (4L: a quarter)")
    ap.add_argument("--trials", type=int, default=20, help="passkeys per length and method")
    ap.add_argument("--passkey-share", type=float, default=0.0, help="share of passkey documents in training")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--d-model", type=int, default=None, help="the tiny preset's width unless given")
    ap.add_argument("--n-layers", type=int, default=None, help="the tiny preset's depth unless given")
    ap.add_argument("--n-heads", type=int, default=None, help="the tiny preset's heads unless given")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.quick:
        args.length, args.steps, args.long_steps, args.trials = 64, 400, 100, 8
    torch.set_num_threads(args.threads)
    L = args.length
    data = common.data_dir(10_000)
    tok_dir = common.CACHE / "tok-10000-auto"
    common.qinglm_tokenizer(10_000)
    if not 0 <= args.passkey_share < 1:
        ap.error("--passkey-share must be in [0, 1)")
    share = args.passkey_share
    train = dict(
        data=[str(passkey_data(share, L, 10_000) if share else data)], tokenizer=str(tok_dir), preset="tiny", dtype="fp32", compile=False,
        num_threads=args.threads, eval_every=10**9, save_every=10**9, log_every=10**9, sample_prompts=[],
    )  # fmt: skip
    shape = {k: v for k in ("d_model", "n_layers", "n_heads") if (v := getattr(args, k)) is not None}
    root = common.CACHE / (
        f"long-context-L{L}-s{args.steps}"
        + (f"-passkey{share:g}" if share else "")
        + "".join(f"-{k}{v}" for k, v in shape.items())
    )
    base = train_run(
        root / "base",
        {"max_seq_len": L, **shape},
        {**train, "seq_len": L, "batch_size": args.batch_size, "max_steps": args.steps},
    )
    long_train = {**train, "seq_len": 4 * L, "batch_size": max(1, args.batch_size // 4)}
    long_train.update(max_steps=args.long_steps, init_from=str(base), lr=1e-3, warmup_steps=10)
    if share:
        # documents longer than any the base saw: needles L..4L tokens from the question
        long_train["data"] = [str(passkey_data(share, 4 * L, 10_000, min_tokens=L))]
    tuned_dir = f"yarn4x-{args.long_steps}" + (f"-min{L}" if share else "")
    tuned = train_run(root / tuned_dir, {"rope_scaling": "yarn"}, long_train)

    tok = load(base).tokenizer
    prompts = {m: passkey_prompts(tok, m * L, args.trials) for m in MULTIPLES}
    rows: dict[str, dict[int, dict[str, float]]] = {}
    for kind in KINDS:
        rows[kind] = {m: measure(load(base, m * L, kind), m * L, data, L, prompts[m]) for m in MULTIPLES}
        print(f"{kind}: " + ", ".join(f"{m}x {r['bpc']:.4f}" for m, r in rows[kind].items()), flush=True)
    # the continued run at its own setting (YaRN factor 4, 4L positions), and asked for 8L
    rows["yarn+4x train"] = {
        m: measure(load(tuned) if m <= 4 else load(tuned, m * L), m * L, data, L, prompts[m])
        for m in MULTIPLES
    }
    print(f"\nL = {L} tokens; passkey share {share:g}; tiny preset{' ' + str(shape) if shape else ''} pretrained {args.steps} steps x {args.batch_size} x {L} tokens; "
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
