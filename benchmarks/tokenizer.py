"""Tokenizer benchmark: chars/token on held-out pd1998 text and training time, QingLM's byte-level BPE
vs sentencepiece BPE at the same vocabulary size; plus `qinglm prepare` tokenization throughput.

    python -m benchmarks.tokenizer [--vocab 10000 30000] [--threads 2]

sentencepiece: model_type=bpe, byte_fallback=True, character_coverage=0.9995 (the usual Chinese
setting), default normalisation (nmt_nfkc) and dummy prefix. Both are trained on the pd1998 train
split and measured on its val split (chars/token = characters / tokens, higher = better).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import sentencepiece as spm

from qinglm.data.builtin import builtin_documents
from qinglm.data.shards import prepare_shards
from qinglm.tokenizer import chars_per_token, train_tokenizer


def sp_train(
    docs: list[str], vocab: int, tmp: Path, threads: int
) -> tuple[spm.SentencePieceProcessor, float]:
    corpus = tmp / "train.txt"
    corpus.write_text("\n".join(docs) + "\n", encoding="utf-8")
    t0 = time.perf_counter()
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp / f"sp{vocab}"),
        vocab_size=vocab,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.9995,
        max_sentence_length=1 << 16,
        num_threads=threads,
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_file=str(tmp / f"sp{vocab}.model")), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, nargs="+", default=[10_000, 30_000])
    ap.add_argument("--threads", type=int, default=2, help="sentencepiece trainer threads")
    args = ap.parse_args()
    train, val = builtin_documents("pd1998", "train"), builtin_documents("pd1998", "val")
    val_chars = sum(map(len, val))
    print(
        f"pd1998: {len(train):,} train docs ({sum(map(len, train)):,} chars), "
        f"{len(val):,} val docs ({val_chars:,} chars)\n"
    )
    rows, qtoks = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for vocab in args.vocab:
            t0 = time.perf_counter()
            tok = train_tokenizer(train, vocab, show_progress=False)
            q_s = time.perf_counter() - t0
            qtoks[vocab] = tok
            q_cpt = chars_per_token(tok, val)
            sp, sp_s = sp_train(train, vocab, Path(tmp), args.threads)
            sp_cpt = val_chars / sum(len(ids) for ids in sp.encode(val))
            rows.append((vocab, q_cpt, q_s, sp_cpt, sp_s))
        print(
            "| vocab | QingLM chars/token | QingLM train s | sentencepiece BPE chars/token | SP train s | ratio |"
        )
        print("|---:|---:|---:|---:|---:|---:|")
        for vocab, q_cpt, q_s, sp_cpt, sp_s in rows:
            print(
                f"| {vocab:,} | {q_cpt:.3f} | {q_s:.1f} | {sp_cpt:.3f} | {sp_s:.1f} | {q_cpt / sp_cpt:.3f} |"
            )
        print("\n| `prepare` (vocab) | MB/s of UTF-8 text | chars/s | seconds |")
        print("|---:|---:|---:|---:|")
        nbytes = sum(len(d.encode("utf-8")) for d in train + val)
        nchars = sum(map(len, train + val))
        for vocab, tok in qtoks.items():
            t0 = time.perf_counter()
            prepare_shards({"train": train, "val": val}, tok, Path(tmp) / f"data{vocab}", show_progress=False)
            s = time.perf_counter() - t0
            print(f"| {vocab:,} | {nbytes / s / 1e6:.2f} | {nchars / s:,.0f} | {s:.2f} |")


if __name__ == "__main__":
    main()
