"""Load on `qinglm serve`: N concurrent streaming clients on loopback; TTFT, tokens/s, output correctness.

For each --batch-sizes value a server (ServeConfig.max_batch_size = that value) runs in this process on
127.0.0.1; --clients asyncio clients send different prompts at once to /v1/completions with
stream=true and greedy decoding. Every streamed output is checked against the same prompt generated
alone through the library (lm.generate), so mixed-up or corrupted streams are counted as wrong.

    python -m benchmarks.serve_load [--model RUN] [--clients 50] [--max-tokens 32] [--batch-sizes 1 16]
                                    [--spread 2]   (clients arrive evenly over 2 s) [--compile]

Old vs new engine: copy this benchmarks/ into the other checkout and run the same command from its root
(`python -m` puts the current directory first on sys.path, so PYTHONPATH alone does not switch trees; the
script only uses ServeConfig, create_app and LM, which every version has).

Without --model the model is a randomly initialised `tiny` preset (d_model 128, 2 layers, context 512)
with the cached 10k pd1998 tokenizer: serving speed does not depend on what the weights learned.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import httpx
import torch

import qinglm
from qinglm.api import LM
from qinglm.config import PRESETS, ModelConfig
from qinglm.model.transformer import Transformer
from qinglm.serve.app import create_app, serve_in_thread
from qinglm.serve.config import ServeConfig

SEEDS = ["今天天气", "人工智能", "中国经济", "春天来了", "北京", "学习", "新年", "我们"]


def load_model(run: str | None) -> LM:
    """Return the LM of run, or a random tiny-preset model with the benchmarks' 10k tokenizer."""
    if run:
        return qinglm.load(run, device="cpu")
    from benchmarks.common import qinglm_tokenizer

    tok, _ = qinglm_tokenizer(10_000)
    torch.manual_seed(0)
    return LM(Transformer(ModelConfig(**PRESETS["tiny"])), tok, device="cpu")


def prompts(n: int) -> list[str]:
    """Return n different short prompts."""
    return [f"{SEEDS[i % len(SEEDS)]}{i}" for i in range(n)]


async def one_client(
    client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, delay: float = 0.0
) -> dict:
    """Return {"text", "ttft", "tokens", "seconds"} of one streamed greedy completion sent after delay s."""
    await asyncio.sleep(delay)
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft, parts, tokens = None, [], 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for c in chunk["choices"]:
                if c["text"] and ttft is None:
                    ttft = time.perf_counter() - t0
                parts.append(c["text"])
    return {"text": "".join(parts), "ttft": ttft, "tokens": tokens, "seconds": time.perf_counter() - t0}


async def load(url: str, texts: list[str], max_tokens: int, spread: float = 0.0) -> tuple[list[dict], float]:
    """Return (one result per prompt, wall seconds) with the clients starting evenly over spread s."""
    limits = httpx.Limits(max_connections=len(texts) + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        delays = [spread * i / len(texts) for i in range(len(texts))]
        results = await asyncio.gather(
            *(one_client(client, url, p, max_tokens, d) for p, d in zip(texts, delays))
        )
        return list(results), time.perf_counter() - t0


def pct(xs: list[float], q: float) -> float:
    """Return the q-quantile (0..1) of xs, nearest rank."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="run directory (default: a random tiny-preset model)")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[1, 16], help="ServeConfig.max_batch_size values"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--spread", type=float, default=0.0, help="seconds over which the clients arrive")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="serve --compile: the step compiled for every shape before serving",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    lm = load_model(args.model)
    texts = prompts(args.clients)
    t0 = time.perf_counter()
    expected = [lm.generate(p, max_new_tokens=args.max_tokens, temperature=0) for p in texts]
    alone_s = time.perf_counter() - t0
    n_params = lm.model.param_counts()["total"]
    print(
        f"model: {args.model or 'random tiny preset'} ({n_params:,} parameters), torch threads {torch.get_num_threads()}"
    )
    print(
        f"{args.clients} clients, max_tokens {args.max_tokens}, greedy; one at a time in-process: {alone_s:.1f} s\n"
    )
    header = f"{'batch':>5} {'correct':>8} {'TTFT p50 s':>10} {'TTFT p95 s':>10} {'wall s':>7} {'tokens':>7} {'tokens/s':>9}"
    print(header)
    print("-" * len(header))
    for batch in args.batch_sizes:
        cfg = ServeConfig(max_tokens_cap=args.max_tokens, max_batch_size=batch, max_queue=args.clients + 8)
        if args.compile:
            cfg.compile = True
        t0 = time.perf_counter()
        with serve_in_thread(create_app(lm, cfg)) as url:
            if args.compile:
                print(f"      (started in {time.perf_counter() - t0:.0f} s, compiles included)", flush=True)
            results, wall = asyncio.run(load(url, texts, args.max_tokens, args.spread))
        correct = sum(r["text"] == e for r, e in zip(results, expected))
        ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
        tokens = sum(r["tokens"] for r in results)
        print(
            f"{batch:>5} {correct:>4}/{len(results):<3} {pct(ttfts, 0.5):>10.3f} {pct(ttfts, 0.95):>10.3f} "
            f"{wall:>7.2f} {tokens:>7} {tokens / wall:>9.1f}",
            flush=True,
        )
        bad = [i for i, (r, e) in enumerate(zip(results, expected)) if r["text"] != e]
        if bad:
            print(f"      wrong outputs for prompts {bad[:10]}: got {results[bad[0]]['text']!r:.60} "
                  f"expected {expected[bad[0]]!r:.60}")  # fmt: skip


if __name__ == "__main__":
    main()
