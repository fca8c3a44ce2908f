"""The pieces of benchmarks/gpu.py that run inside one process: peaks, a training config, decoding, the table."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.gpu_scaling import scaling_line
from benchmarks.gpu_stages import stage_lines

# Dense bf16 tensor-core peaks from NVIDIA's datasheets (FLOP/s, no sparsity), by device-name fragment;
# the first fragment found in torch.cuda.get_device_name() wins.
DATASHEET_BF16 = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989.4e12),  # SXM
    ("H200", 989.4e12),
    ("GH200", 989.4e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362.05e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("RTX 4090", 165.2e12),
    ("RTX 3090", 71e12),
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, n: int, reps: int = 10) -> float:
    """Return the median bf16 FLOP/s of an n x n x n matmul on device (random data)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def env_info(device_name: str, quick: bool) -> dict:
    device = torch.device(device_name)
    info = {"torch": torch.__version__, "device": device_name}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        info |= {
            "gpu": name,
            "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
            "memory_gib": round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
            "datasheet_bf16_tflops": next((p / 1e12 for k, p in DATASHEET_BF16 if k in name), None),
        }
    info["measured_bf16_tflops"] = round(matmul_peak(device, 1024 if quick else 8192) / 1e12, 2)
    return info


def _batches(args: argparse.Namespace, vocab: int, batch: int, seq: int, device: torch.device):
    """Yield (x, y) batches: the main job's pd1998 tokens when there are any, else random tokens."""
    if args.data_run:
        from qinglm.data.loader import TrainBatches
        from qinglm.data.shards import TokenShards

        for x, y in TrainBatches(TokenShards(f"{args.data_run}/data", "train"), batch, seq, seed=0):
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    g = torch.Generator().manual_seed(0)
    while True:
        x = torch.randint(0, vocab, (batch, seq + 1), generator=g)
        yield x[:, :-1].to(device), x[:, 1:].to(device)


def _fill_batch(model, seq: int, device: torch.device, dtype: str) -> int:
    """Return the batch size that fills the card: an eager probe's memory per row, 70% of the total.

    Eager needs more memory than the compiled step, so the compiled step fits too.
    """
    from qinglm.device import autocast

    torch.cuda.reset_peak_memory_stats(device)
    base, probe = torch.cuda.memory_allocated(device), 4
    x = torch.zeros(probe, seq, dtype=torch.long, device=device)
    with autocast(device, dtype):
        model(x, x).backward()
    model.zero_grad(set_to_none=True)
    per_row = (torch.cuda.max_memory_allocated(device) - base) / probe
    # weights, grads and AdamW's two moments: 16 bytes a parameter in fp32
    room = 0.7 * torch.cuda.get_device_properties(device).total_memory - 16 * model.param_counts()["total"]
    b = 1
    while b * 2 <= min(room / per_row, 512 * 1024 // seq):  # a power of two, at most 512k tokens a step
        b *= 2
    return b


def child_throughput(args: argparse.Namespace, model_kw: dict, seq: int) -> dict:
    """Return tokens/s, MFU inputs, peak memory and losses of the engine's step on one config."""
    from qinglm.config import ModelConfig
    from qinglm.device import autocast, compiled
    from qinglm.model.transformer import Transformer
    from qinglm.train.config import TrainConfig
    from qinglm.train.fp8 import enable_fp8
    from qinglm.train.optim import build_optimizer

    device = torch.device(args.device)
    dtype = "bf16" if device.type == "cuda" or not args.quick else "fp32"
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**model_kw, dropout=0.0)).to(device)
    if args.fp8:
        enable_fp8(model, device, dtype)
    opt = build_optimizer(model, TrainConfig(lr=6e-4, warmup_steps=1), device)  # fused AdamW on CUDA
    fwd = compiled(model, device.type == "cuda" or not args.quick)

    def step(x, y) -> torch.Tensor:  # what the training loop does with grad_accum 1
        with autocast(device, dtype):
            loss = fwd(x, x if y is None else y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    if args.batch:
        batch = args.batch
    else:
        batch = _fill_batch(model, seq, device, dtype) if device.type == "cuda" and not args.quick else 4
    data = _batches(args, model.cfg.vocab_size, batch, seq, device)
    warm, steps = (2, 3) if args.quick else (4, args.steps)
    t0 = time.perf_counter()
    losses = [float(step(*next(data))) for _ in range(warm)]  # compilation happens here
    compile_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        x, y = next(data)
        sync(device)
        t = time.perf_counter()
        loss = step(x, y)
        sync(device)
        times.append(time.perf_counter() - t)
        losses.append(float(loss))
    step_s = statistics.median(times)
    tps = batch * seq / step_s
    flops = model.flops_per_token(seq)
    peak = matmul_peak(device, 1024 if args.quick else 8192)
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "params_m": round(model.param_counts()["total"] / 1e6, 1),
        "batch": batch,
        "seq": seq,
        "fp8": bool(args.fp8),
        "tokens_per_s": round(tps),
        "step_ms": round(1000 * step_s, 2),
        "compile_s": round(compile_s, 1),
        "mfu_measured_peak": round(tps * flops / peak, 4),
        "model_tflops": round(tps * flops / 1e12, 1),
        "peak_mem_gib": round(mem, 2) if mem is not None else None,
        "losses": [round(v, 4) for v in losses],
    }


def decode_speed(device_name: str, quick: bool) -> dict:
    """Return decode tokens/s at batch 1 and 32 for QingLM's engine (eager and compiled: CUDA graphs) and
    transformers generate (bf16)."""
    from benchmarks.inference import hf_run, make_model, qinglm_run, to_transformers
    from qinglm.config import ModelConfig
    from qinglm.model.transformer import Transformer

    device = torch.device(device_name)
    if quick:  # the code path of the compiled step without minutes of C++ compiling
        from qinglm.infer import slots

        slots.COMPILE_OPTIONS = {"backend": "eager", "dynamic": False}
    n, plen = (8, 8) if quick else (128, 32)
    if quick:
        model = make_model("tiny", plen + n + 8)
    else:
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=50_304, d_model=768, n_heads=12, n_layers=12, max_seq_len=plen + n + 8)
        model = Transformer(cfg).eval()
    hf = to_transformers(model)  # checked on the CPU in fp32: same logits
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, hf = model.to(device, dt), hf.to(device, dt)
    out = {"model": "gpt2-124m" if not quick else "tiny", "dtype": str(dt).split(".")[-1], "new_tokens": n}
    for batch in (1, 4) if quick else (1, 32):
        g = torch.Generator().manual_seed(batch)
        prompts = torch.randint(3, model.cfg.vocab_size, (batch, plen), generator=g).to(device)
        runs = {
            "qinglm": lambda p: qinglm_run(model, p, n),
            "qinglm_compiled": lambda p: qinglm_run(model, p, n, compile=True),
            "transformers": lambda p: hf_run(hf, p, n),
        }
        if batch == 1:  # prompt lookup, 8 a step: what verifying 9 tokens costs here (a random model loops)
            runs["speculate"] = lambda p: qinglm_run(model, p, n, speculate=8)
        tokens = {k: run(prompts)[0] for k, run in runs.items()}  # warm-up
        decode = {k: [] for k in runs}
        for _ in range(2 if quick else 3):
            for k, run in runs.items():
                sync(device)
                first = run(prompts)[1]
                sync(device)
                decode[k].append(time.perf_counter() - first)
        tps = {k: batch * (n - 1) / statistics.median(v) for k, v in decode.items()}
        out[f"b{batch}"] = {
            "qinglm_tok_s": round(tps["qinglm"]),
            "qinglm_compiled_tok_s": round(tps["qinglm_compiled"]),  # CUDA graphs of the static-cache step
            "compiled_same_tokens": tokens["qinglm_compiled"] == tokens["qinglm"],
            "transformers_tok_s": round(tps["transformers"]),
            "ratio": round(tps["qinglm"] / tps["transformers"], 2),
            "same_greedy_tokens": tokens["qinglm"] == tokens["transformers"],
        }
        if "speculate" in tps:
            out[f"b{batch}"]["speculate8_tok_s"] = round(tps["speculate"])
            out[f"b{batch}"]["speculate8_same_tokens"] = tokens["speculate"] == tokens["qinglm"]
    return out


def _compiled(b: dict) -> str:
    """Return ' (compiled N, same tokens T[, --speculate 8 N, same tokens T])' for a decode result that has the
    compiled step (newer runs)."""
    if "qinglm_compiled_tok_s" not in b:
        return ""
    spec = ""
    if "speculate8_tok_s" in b:
        spec = f", --speculate 8 {b['speculate8_tok_s']:,}, same tokens {b['speculate8_same_tokens']}"
    return f" (compiled {b['qinglm_compiled_tok_s']:,}, same tokens {b['compiled_same_tokens']}{spec})"


def table(r: dict) -> str:
    """Return the markdown table (and a few lines around it) of a finished or partial check."""
    e, s = r.get("env", {}), r.get("sections", {})
    peak_ds = e.get("datasheet_bf16_tflops")
    lines = [
        f"device: {e.get('gpu', e.get('device'))} (capability {e.get('capability', '-')}, "
        f"{e.get('memory_gib', '-')} GiB) | torch {e.get('torch')} | CUDA {e.get('cuda', '-')}",
        f"bf16 matmul peak measured {e.get('measured_bf16_tflops')} TFLOP/s | datasheet {peak_ds or '-'} TFLOP/s",
        "",
        "| config | params | batch x seq | tokens/s | MFU (measured peak) | MFU (datasheet) | peak mem GiB | compile s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = {k: v for k, v in s.get("throughput", {}).items() if k != "seconds"}
    if "tokens_per_s" in s.get("fp8", {}):
        rows[f"{next(iter(rows), '')} + fp8"] = s["fp8"]  # the first row is the largest config
    for name, t in rows.items():
        if not isinstance(t, dict) or "tokens_per_s" not in t:
            lines.append(f"| {name} | {t} |")
            continue
        ds = f"{t['model_tflops'] / peak_ds:.1%}" if peak_ds else "-"
        lines.append(
            f"| {name} | {t['params_m']}M | {t['batch']} x {t['seq']} | {t['tokens_per_s']:,} | "
            f"{t['mfu_measured_peak']:.1%} | {ds} | {t['peak_mem_gib'] or '-'} | {t['compile_s']} |"
        )
    f = s.get("fp8", {})
    if "speedup_vs_bf16" in f:
        lines.append(
            f"\nfp8 vs bf16: {f['speedup_vs_bf16']:.2f}x tokens/s; mean loss of the last 10 steps "
            f"{f['loss_last10_fp8']:.4f} vs {f['loss_last10_bf16']:.4f} (bf16 step-to-step std "
            f"{f['loss_noise_bf16_std']:.4f})"
        )
    elif f:
        lines.append(f"\nfp8: {f.get('refused') or f.get('error') or f.get('skipped')}")
    lines.append("")
    for name in ("main_job", "cuda_tests", "distributed", "decode"):
        lines.append(f"- {name}: {_short(name, s.get(name))}")
    lines += stage_lines(s.get("stages"))
    lines.append(scaling_line(s.get("scaling")))
    lines.append(f"\n(total {r.get('total_s', '-')} s)")
    return "\n".join(lines)


def _short(name: str, v: dict | None) -> str:
    if not v:
        return "not run"
    if "error" in v or isinstance(v.get("skipped"), str):
        return str(v.get("error") or v.get("skipped"))[:300]
    if name == "main_job":
        return f"wall {v['wall_s']} s, held-out {v['held_out_bpc']} bits/char"
    if name == "cuda_tests":
        return v["summary"] + ("; " + "; ".join(v["failures"]) if v.get("failures") else "")
    if name == "distributed":
        return "; ".join(f"{k}: {d}" for k, d in v.items() if k != "seconds")
    keys = [k for k in v if k.startswith("b")]
    return f"{v['model']} {v['dtype']}, {v['new_tokens']} new tokens: " + "; ".join(
        f"batch {k[1:]}: QingLM {v[k]['qinglm_tok_s']:,}{_compiled(v[k])} vs transformers "
        f"{v[k]['transformers_tok_s']:,} tok/s ({v[k]['ratio']}x, same tokens {v[k]['same_greedy_tokens']})"
        for k in keys
    )
