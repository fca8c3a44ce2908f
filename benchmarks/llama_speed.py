"""Decoding speed of QingLM against llama.cpp on the same weights: batch 1, greedy, interleaved rounds.

    python -m benchmarks.llama_speed [RUN] [--presets tiny small] [--threads 1 2] [--tokens 128] [--rounds 5]

llama-cpp-python must be installed (see benchmarks/llama_cpp.py, whose model and export this reuses).
Without RUN each preset is a random model of that shape (benchmarks.llama_cpp.random_run) exported with
`qinglm export gguf --dtype f32`. Each round continues "中国经济稳步增长，" by --tokens tokens (greedy, no
repetition penalty, EOS ignored) with every contestant in turn, prefill included:
  QingLM fp32   the engine (qinglm.infer.engine.Generation: the fast decoding step, qinglm.infer.step)
  QingLM compiled  the same, compiled (inductor's C++ wrapper), one Engine kept across rounds (as the
                server keeps one); its compile time is the warm-up column, not in the tokens/s
  QingLM int8   the same on qinglm.model.quantize's int8 weights (and compiled)
  QingLM eager  fp32 through the model's own forward (a forward hook turns the fast step off)
  llama.cpp f32 Llama.generate on the f32 GGUF, n_threads (and n_threads_batch) as torch's
Tokens/s are medians over --rounds after a warm-up round. llama.cpp's q8_0 is not measured: the
installed llama-cpp-python 0.3.36 crashes (segfault) decoding the q8_0 file of `qinglm export gguf` (the tiny preset: it loads, then segfaults in generate).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import qinglm
from benchmarks.llama_cpp import random_run
from qinglm.config import SamplingConfig
from qinglm.export.gguf import export_gguf
from qinglm.infer.engine import Engine, Generation, Request
from qinglm.infer.text import encode_prompt
from qinglm.model.quantize import quantize

PROMPT = "中国经济稳步增长，"


def qinglm_decoder(model, ids: list[int], n: int, compile: bool = False) -> Callable[[], list[int]]:
    """Return a function that greedily continues ids by n tokens with the engine: a Generation per call,
    or compiled, one Engine kept for every call (as the server keeps one), so its graphs compile once."""
    cfg = SamplingConfig(max_new_tokens=n, temperature=0.0, repetition_penalty=1.0, stop_at_eos=False)
    engine = Engine(model, max_batch_size=1, compile=True) if compile else None

    def run() -> list[int]:
        out: list[int] = []
        if engine is None:
            for events in Generation(model, [Request(ids, cfg)]):
                for ev in events:
                    out += ev.ids
            return out
        engine.add(0, Request(ids, cfg))
        while engine.busy:
            for ev in engine.step():
                out += ev.ids
        return out

    return run


def llama_decoder(llm, ids: list[int], n: int) -> Callable[[], list[int]]:
    """Return a function that greedily continues ids by n tokens in llama.cpp."""

    def run() -> list[int]:
        llm.reset()
        out: list[int] = []
        for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
            out.append(int(token))
            if len(out) == n:
                break
        return out

    return run


def measure(run: Path, gguf: Path, threads: list[int], n: int, rounds: int) -> list[dict]:
    """Return one row of medians (tokens/s) per thread count for the model of run and its GGUF file."""
    from llama_cpp import Llama

    lm = qinglm.load(run, device="cpu")
    ids = encode_prompt(lm.tokenizer, PROMPT)
    int8 = quantize(qinglm.load(run, device="cpu").model)
    eager = qinglm.load(run, device="cpu").model
    eager.register_forward_hook(lambda module, args, out: out)  # hooks: the model's own forward
    rows = []
    for t in threads:
        torch.set_num_threads(t)
        llm = Llama(
            model_path=str(gguf), n_ctx=lm.config.max_seq_len, n_threads=t, n_threads_batch=t, verbose=False
        )
        contestants = {
            "QingLM fp32": qinglm_decoder(lm.model, ids, n),
            "QingLM compiled": qinglm_decoder(lm.model, ids, n, compile=True),
            "QingLM int8": qinglm_decoder(int8, ids, n),
            "QingLM int8 compiled": qinglm_decoder(int8, ids, n, compile=True),
            "QingLM eager": qinglm_decoder(eager, ids, n),
            "llama.cpp f32": llama_decoder(llm, ids, n),
        }
        tokens, warmup = {}, {}
        for name, fn in contestants.items():  # warm-up (the compiled ones compile here)
            t0 = time.perf_counter()
            tokens[name] = fn()
            warmup[name] = time.perf_counter() - t0
        speed: dict[str, list[float]] = {name: [] for name in contestants}
        for _ in range(rounds):
            for name, fn in contestants.items():
                t0 = time.perf_counter()
                got = fn()
                speed[name].append(len(got) / (time.perf_counter() - t0))
        row = {name: statistics.median(v) for name, v in speed.items()}
        row["threads"] = t
        row["same"] = all(
            tokens[name] == tokens["llama.cpp f32"] for name in ("QingLM fp32", "QingLM compiled")
        )
        row["warmup"] = warmup["QingLM compiled"]
        rows.append(row)
        del llm
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", nargs="?", help="run directory (default: a random model per preset)")
    p.add_argument("--presets", nargs="+", default=["tiny", "small"])
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    names = [
        "QingLM fp32",
        "QingLM compiled",
        "QingLM int8",
        "QingLM int8 compiled",
        "QingLM eager",
        "llama.cpp f32",
    ]
    ratios = ["QingLM fp32", "QingLM compiled", "QingLM int8", "QingLM int8 compiled"]
    print("| model | threads | " + " | ".join(f"{n} tok/s" for n in names)
          + " | " + " | ".join(f"{n.removeprefix('QingLM ')} / llama.cpp" for n in ratios)
          + " | compile warm-up s | greedy tokens equal |")  # fmt: skip
    print("|---|---:|" + "---:|" * (len(names) + len(ratios) + 1) + "---|")
    with tempfile.TemporaryDirectory() as tmp:
        for preset in [None] if args.run else args.presets:
            run = Path(args.run) if args.run else random_run(Path(tmp) / preset, preset=preset)
            gguf = export_gguf(run, Path(tmp) / f"{preset or 'run'}.gguf", dtype="f32")
            for row in measure(run, gguf, args.threads, args.tokens, args.rounds):
                llama = row["llama.cpp f32"]
                print(
                    f"| {preset or run.name} | {row['threads']} | "
                    + " | ".join(f"{row[n]:,.0f}" for n in names)
                    + " | "
                    + " | ".join(f"{row[n] / llama:.2f}x" for n in ratios)
                    + f" | {row['warmup']:.1f} | {row['same']} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
