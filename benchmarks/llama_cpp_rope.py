"""llama.cpp past the original length: a model with linear and YaRN RoPE scaling, exported and compared.

A small random model (benchmarks.llama_cpp.random_run) is given RoPE scaling by --factor over an original
length of --length positions (max_seq_len = factor x length; "none", the reference, has no scaling and
its full length as its own), exported with `qinglm export gguf` (f32: the
GGUF carries llama.cpp's rope.scaling keys) and run in llama.cpp (llama-cpp-python) on prompts of pd1998
val text longer than the original length: per prompt, whether llama.cpp's tokenizer gives QingLM's ids,
the largest logit difference over the prompt, and whether greedy decoding gives the same --tokens tokens
(decoded further past the original length). Exits 1 on any mismatch.

    python -m benchmarks.llama_cpp_rope [--length 64] [--factor 4] [--tokens 32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from benchmarks.llama_cpp import compare, have_llama_cpp, random_run
from qinglm.export.gguf import export_gguf

# what llama.cpp computes (it has no dynamic NTK); "none" is the reference: no scaling, trained at the full length
KINDS = ("none", "linear", "yarn")


def long_prompts(n_chars: int, count: int = 3) -> list[str]:
    """Return `count` prompts of `n_chars` characters of pd1998 val text, one after another."""
    from qinglm.data.builtin import filler_text

    text = filler_text("val")
    return [text[i * n_chars : (i + 1) * n_chars].strip() for i in range(count)]


def check(kind: str, directory: Path, length: int = 64, factor: int = 4, n_tokens: int = 32) -> bool:
    """Return True when llama.cpp matches QingLM past `length` positions for RoPE scaling `kind`."""
    scaled = dict(rope_original_max_position_embeddings=length) if kind != "none" else {}
    run = random_run(directory / kind, rope_scaling=kind, max_seq_len=factor * length, **scaled)
    path = export_gguf(run, directory / f"{kind}.gguf", dtype="f32")
    # about one token per character here: prompts of ~3x the original length, then n_tokens more decoded
    room = factor * length - n_tokens
    print(f"{kind}, factor {factor}, original length {length}, context {factor * length}:")
    return compare(run, path, n_tokens, prompts=long_prompts(min(3 * length, room)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=64, help="original (trained) length in positions")
    parser.add_argument("--factor", type=int, default=4, help="RoPE scaling factor")
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens compared")
    args = parser.parse_args(argv)
    if not have_llama_cpp():
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        ok = all([check(kind, Path(tmp), args.length, args.factor, args.tokens) for kind in KINDS])
    print("llama.cpp matches QingLM past the original length" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
