"""Inference: decode tokens/s of QingLM's engine vs a no-cache loop vs transformers, int8/bf16 vs fp32.

`python -m benchmarks.inference [--presets tiny small] [--batches 1 8] [--new-tokens 64] [--rounds 3]`

Every contestant greedily continues the same B random prompts of --prompt-len tokens by --new-tokens
tokens (EOS ignored). Decode tokens/s = B * (new tokens - 1) / seconds after the first new token (so
prefill is apart: "first token ms"), the median over --rounds rounds in which the contestants take
turns (the fair way on a shared machine).

  qinglm fp32 / bf16 / int8   qinglm.infer.engine.Generation (KV cache); bf16 = weights cast to bf16,
                              int8 = qinglm.model.quantize (int8 weights, bf16 activations)
  no-cache loop               the same fp32 model, the whole sequence recomputed every step
  transformers                LlamaForCausalLM.generate (KV cache, greedy) on the same weights,
                              exported with qinglm.export.hf; "same tokens" checks it agrees

Then the BPC change of int8 (and bf16) on pd1998 val for a trained tiny model: --run RUN, else a
tiny model trained for --train-minutes (cached in .cache/benchmarks/inference-tiny).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from benchmarks import common
from qinglm.config import PRESETS, ModelConfig, SamplingConfig
from qinglm.infer.engine import Generation, Request
from qinglm.model.quantize import quantize
from qinglm.model.transformer import Transformer


def make_model(preset: str, max_len: int) -> Transformer:
    """Return a randomly initialised model of the preset (speed does not depend on the weights)."""
    torch.manual_seed(0)
    return Transformer(ModelConfig(**PRESETS[preset], max_seq_len=max_len)).eval()


def to_transformers(model: Transformer):
    """Return a transformers LlamaForCausalLM with the model's weights (checked to give the same logits)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from qinglm.export.hf import qinglm_to_hf
    from qinglm.export.hf_config import hf_config

    d = hf_config(model.cfg)
    config = AutoConfig.for_model(d.pop("model_type"), **d)
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    tensors = {
        k: v for k, v in model.state_dict().items() if not (model.cfg.tie_embeddings and k == "head.weight")
    }
    missing, unexpected = hf.load_state_dict(qinglm_to_hf(tensors, model.cfg), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf.tie_weights()
    ids = torch.randint(3, model.cfg.vocab_size, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-4, rtol=1e-4)
    return hf


# Each run returns (new tokens per row, perf_counter() when the first new tokens existed): decoding is
# what follows the first token, so prefill is timed apart as the time to the first token.


def qinglm_run(
    model: Transformer, prompts: torch.Tensor, n: int, compile: bool = False, speculate: int = 0
) -> tuple[list[list[int]], float]:
    cfg = SamplingConfig(
        max_new_tokens=n, temperature=0.0, repetition_penalty=1.0, stop_at_eos=False, speculate=speculate
    )
    out, first = [[] for _ in range(len(prompts))], 0.0
    for events in Generation(model, [Request(p, cfg) for p in prompts.tolist()], compile=compile):
        first = first or time.perf_counter()
        for ev in events:
            out[ev.row] += ev.ids
    return out, first


def no_cache_run(model: Transformer, prompts: torch.Tensor, n: int) -> tuple[list[list[int]], float]:
    ids, first = prompts, 0.0
    with torch.inference_mode():
        for _ in range(n):
            ids = torch.cat([ids, model(ids, last_only=True)[:, -1].argmax(-1, keepdim=True)], dim=1)
            first = first or time.perf_counter()
    return ids[:, prompts.size(1) :].tolist(), first


class _FirstToken:
    """A transformers streamer that notes when the first new tokens arrive (the first put is the prompt)."""

    def __init__(self):
        self.puts, self.first = 0, 0.0

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def hf_run(hf, prompts: torch.Tensor, n: int) -> tuple[list[list[int]], float]:
    streamer = _FirstToken()
    with torch.inference_mode():
        out = hf.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
            streamer=streamer,
        )
    return out[:, prompts.size(1) :].tolist(), streamer.first


def speed(args: argparse.Namespace) -> None:
    n = args.new_tokens
    print(f"threads {torch.get_num_threads()} | prompt {args.prompt_len} tokens | {n} new tokens, greedy")
    print(
        f"medians of {args.rounds} rounds | decode tokens/s = batch x {n - 1} / seconds after the first "
        "new token | first token = prefill + first step, ms\n"
    )
    print(
        "| model | batch | contestant | decode tokens/s | vs transformers | vs qinglm fp32 | first token ms |"
    )
    print("|---|---:|---|---:|---:|---:|---:|")
    for preset in args.presets:
        fp32 = make_model(preset, args.prompt_len + n + 8)
        hf = to_transformers(fp32)
        contestants = {
            "qinglm fp32": lambda p, m=fp32: qinglm_run(m, p, n),
            "qinglm bf16": lambda p, m=copy.deepcopy(fp32).to(torch.bfloat16): qinglm_run(m, p, n),
            "qinglm int8": lambda p, m=quantize(copy.deepcopy(fp32)): qinglm_run(m, p, n),
            "no-cache loop fp32": lambda p, m=fp32: no_cache_run(m, p, n),
            "transformers fp32": lambda p, m=hf: hf_run(m, p, n),
        }
        for batch in args.batches:
            g = torch.Generator().manual_seed(batch)
            prompts = torch.randint(3, fp32.cfg.vocab_size, (batch, args.prompt_len), generator=g)
            decode: dict[str, list[float]] = {k: [] for k in contestants}
            ttft: dict[str, list[float]] = {k: [] for k in contestants}
            outputs = {k: run(prompts)[0] for k, run in contestants.items()}  # warm-up, and the tokens
            for _ in range(args.rounds):
                for k, run in contestants.items():
                    t0 = time.perf_counter()
                    first = run(prompts)[1]
                    decode[k].append(time.perf_counter() - first)
                    ttft[k].append(first - t0)
            tps = {k: batch * (n - 1) / statistics.median(v) for k, v in decode.items()}
            for k, v in tps.items():
                print(
                    f"| {preset} | {batch} | {k} | {v:,.0f} | {v / tps['transformers fp32']:.2f}x "
                    f"| {v / tps['qinglm fp32']:.2f}x | {1000 * statistics.median(ttft[k]):.1f} |",
                    flush=True,
                )
            same = {k: outputs[k] == outputs["qinglm fp32"] for k in outputs}
            print(f"<!-- {preset} b{batch}: greedy tokens equal to qinglm fp32: {same} -->", flush=True)


def trained_run(args: argparse.Namespace) -> str:
    """Return a trained tiny run directory: --run, or one trained now (cached)."""
    if args.run:
        return args.run
    out = common.CACHE / "inference-tiny"
    if not (out / "best" / "model.safetensors").is_file():
        from qinglm.pipeline import run_train

        common.qinglm_tokenizer(10_000)
        train = {
            "data": [str(common.data_dir(10_000))],
            "tokenizer": str(common.CACHE / "tok-10000"),
            "preset": "tiny",
            "max_time": args.train_minutes,
            "out": str(out),
        }
        run_train({}, train, log=lambda _line: None)
    return str(out)


def quality(args: argparse.Namespace) -> None:
    import qinglm

    run = trained_run(args)
    lm = qinglm.load(run, device="cpu")
    fp32 = lm.model
    variants = {
        "fp32": fp32,
        "bf16": copy.deepcopy(fp32).to(torch.bfloat16),
        "int8": quantize(copy.deepcopy(fp32)),
    }
    print(f"\nBPC on the pd1998 val split (at most {args.bpc_tokens:,} tokens) of {run}\n")
    print("| weights | val BPC | change vs fp32 | tokens |")
    print("|---|---:|---:|---:|")
    base = None
    for name, model in variants.items():
        lm.model = model
        m = lm.evaluate("pd1998", max_tokens=args.bpc_tokens, batch_size=8)
        base = m["bpc"] if base is None else base
        print(f"| {name} | {m['bpc']:.4f} | {m['bpc'] - base:+.4f} | {m['tokens']:,} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=list(PRESETS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--run", help="trained run directory for the BPC table (default: train a tiny one)")
    ap.add_argument("--train-minutes", type=float, default=3.0)
    ap.add_argument("--bpc-tokens", type=int, default=100_000)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-bpc", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.skip_speed:
        speed(args)
    if not args.skip_bpc:
        quality(args)


if __name__ == "__main__":
    main()
