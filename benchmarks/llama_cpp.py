"""Run a `qinglm export gguf` file in llama.cpp (llama-cpp-python) and compare with QingLM itself.

    # builds llama.cpp from source: 8.5 min on 2 CPU cores with the library alone
    CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF \
      -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 pip install llama-cpp-python
    python -m benchmarks.llama_cpp [RUN] [--dtype f32|f16|q8_0] [--tokens 32]

Without RUN a small random model (GQA, untied head) is written to a temporary run directory; with
--qk-norm, --moe or --bias it has QK-norm (qwen3 / qwen3moe in GGUF), 4 experts top-2 (Mixtral-style
llama) or biases.
For each prompt it prints whether llama.cpp's tokenizer gives QingLM's ids ([BOS] + tokens), the largest
logit difference over the prompt, and whether greedy decoding gives the same --tokens tokens. Exits 1
on any mismatch. Kept out of the test suite because of the build time. Decoding speed against llama.cpp:
benchmarks/llama_speed.py.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import qinglm
from qinglm.config import PRESETS, ModelConfig, SamplingConfig, resolve_model
from qinglm.export.gguf import export_gguf
from qinglm.infer.generate import generate_ids
from qinglm.infer.text import encode_prompt
from qinglm.model.transformer import Transformer
from qinglm.train.checkpoint import save_run

PROMPTS = ["今天天气真不错", "人工智能的未来", "中国经济稳步增长，", "Hello, world 2024"]


def random_run(
    directory: Path,
    qk_norm: bool = False,
    moe: bool = False,
    bias: bool = False,
    preset: str | None = None,
    **fields,
) -> Path:
    """Return a run directory with a random model (d_model 128, or a preset's shape and vocabulary) and
    a tokenizer trained on the builtin corpus (the vocabulary past its tokens is padding); `fields` are
    further ModelConfig fields (RoPE scaling, max_seq_len, ...)."""
    from qinglm.data.builtin import builtin_documents
    from qinglm.tokenizer import train_tokenizer

    docs = builtin_documents("pd1998", "train")[:3000]
    tok = train_tokenizer(docs, 2000, show_progress=False)
    extra = dict(n_experts=4, experts_per_token=2) if moe else {}
    shape = dict(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, tie_embeddings=False)
    shape = dict(PRESETS[preset]) if preset else shape
    shape["vocab_size"] = max(shape.get("vocab_size", 0), tok.vocab_size)
    shape.update(fields)
    cfg = resolve_model(
        ModelConfig(
            **shape,
            qk_norm=qk_norm,
            bias=bias,
            init_std=0.1,  # larger weights than training's init: decisive logits, fewer near-ties
            **extra,
        )
    )
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
    return save_run(directory, model, tok)


def compare(run: Path, gguf_path: Path, n_tokens: int, prompts: list[str] = PROMPTS) -> bool:
    """Return True when llama.cpp matches QingLM on every prompt; print one line per prompt."""
    from llama_cpp import Llama

    lm = qinglm.load(run, device="cpu")
    llm = Llama(model_path=str(gguf_path), n_ctx=lm.config.max_seq_len, logits_all=True, verbose=False)
    ok = True
    for prompt in prompts:
        ids = encode_prompt(lm.tokenizer, prompt)
        same_ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False) == ids
        llm.reset()
        llm.eval(ids)
        theirs = np.asarray(llm.scores[: len(ids)])
        with torch.no_grad():
            ours = lm.model(torch.tensor([ids]))[0].numpy()
        diff = float(np.abs(theirs[:, : ours.shape[1]] - ours).max())
        cfg = SamplingConfig(
            max_new_tokens=n_tokens, temperature=0, repetition_penalty=1.0, stop_at_eos=False
        )
        want = list(generate_ids(lm.model, ids, cfg, eos_id=None))
        llm.reset()
        got = []
        for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
            got.append(int(token))
            if len(got) == len(want):
                break
        n_same = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(want))
        ok &= same_ids and got == want
        print(
            f"{prompt[:17]!r:28} {len(ids):4} ids, tokenizer {'same' if same_ids else 'DIFFERENT'}  "
            f"max |logit diff| {diff:.2e}  "
            f"greedy: {n_same}/{len(want)} tokens equal"
        )
    return ok


def have_llama_cpp() -> bool:
    """Return whether llama-cpp-python imports; say where to get it when it does not."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python is not installed: see the top of benchmarks/llama_cpp.py")
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", help="run directory (default: a small random model)")
    parser.add_argument("--dtype", default="f32", choices=["f32", "f16", "q8_0"])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--qk-norm", action="store_true", help="random model with QK-norm (qwen3)")
    parser.add_argument("--moe", action="store_true", help="random model with 4 experts, top-2")
    parser.add_argument("--bias", action="store_true", help="random model with biases (llama)")
    args = parser.parse_args(argv)
    if not have_llama_cpp():
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else random_run(Path(tmp) / "run", args.qk_norm, args.moe, args.bias)
        path = export_gguf(run, Path(tmp) / "model.gguf", dtype=args.dtype)
        print(f"{path.name}: {path.stat().st_size / 2**20:.1f} MiB, {args.dtype}, run {run}")
        ok = compare(run, path, args.tokens)
    print("llama.cpp matches QingLM" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
