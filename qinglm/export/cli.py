"""`qinglm export hf|gguf` and `qinglm import hf`: the command line of qinglm.export."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from qinglm.export.gguf import DTYPES as GGUF_DTYPES  # imports no torch: --help stays fast


def register(sub: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], None]]:
    """Return the handlers of `export` and `import` after adding their parsers to sub."""
    p = sub.add_parser(
        "export",
        help="export a run to transformers (hf) or llama.cpp (gguf)",
        description="Write a trained run in a format other tools load. A model the target cannot reproduce "
        "exactly (gated attention, the sigmoid router; for GGUF also the classic family and shared experts) "
        "is refused with the reason.",
    )
    actions = p.add_subparsers(dest="export_action", metavar="FORMAT", required=True)
    hf = actions.add_parser(
        "hf",
        help="a transformers model folder (Llama, Qwen3, Mixtral, Qwen2-MoE, Qwen3-MoE or GPT-2)",
        description="Write config.json, model.safetensors, generation_config.json and the tokenizer "
        "(with the chat template) so that AutoModelForCausalLM and AutoTokenizer load OUT_DIR.",
    )
    hf.add_argument("run", metavar="RUN", help="run directory (or a weights file inside one)")
    hf.add_argument("out", metavar="OUT_DIR", help="folder to write")
    hf.add_argument(
        "--overwrite", action="store_true", help="write into a non-empty OUT_DIR that QingLM did not create"
    )
    g = actions.add_parser(
        "gguf",
        help="one GGUF file for llama.cpp, Ollama, LM Studio",
        description="Write the model, tokenizer and chat template as one GGUF file (llama, qwen3 or "
        "qwen3moe architecture).",
    )
    g.add_argument("run", metavar="RUN", help="run directory (or a weights file inside one)")
    g.add_argument("out", metavar="OUT.gguf", help="file to write")
    g.add_argument(
        "--dtype", default="f16", choices=GGUF_DTYPES, help="matrix precision (norms stay f32; default f16)"
    )
    g.add_argument("--overwrite", action="store_true", help="replace an OUT.gguf QingLM did not write")

    p = sub.add_parser("import", help="make a run directory from another format")
    actions = p.add_subparsers(dest="import_action", metavar="FORMAT", required=True)
    i = actions.add_parser(
        "hf",
        help="from a transformers model folder (Llama layout or GPT-2)",
        description="Make a QingLM run directory from a transformers folder (Llama, Qwen3, Mixtral, "
        "Qwen2-MoE, Qwen3-MoE, or GPT-2 with exact GELU; safetensors weights and a byte-level BPE tokenizer "
        "in QingLM's special-token layout), to generate, evaluate or fine-tune.",
    )
    i.add_argument("src", metavar="DIR", help="transformers model folder")
    i.add_argument("out", metavar="OUT_RUN", help="run directory to create")
    i.add_argument(
        "--overwrite", action="store_true", help="write into a non-empty OUT_RUN that QingLM did not create"
    )
    return {"export": cmd_export, "import": cmd_import}


def cmd_export(args: argparse.Namespace) -> None:
    if args.export_action == "hf":
        from qinglm.export.hf import export_hf

        out = export_hf(args.run, args.out, overwrite=args.overwrite)
        print(f"wrote a transformers model to {out}")
    else:
        from qinglm.export.gguf import export_gguf

        out = export_gguf(args.run, args.out, dtype=args.dtype, overwrite=args.overwrite)
        print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.dtype})")


def cmd_import(args: argparse.Namespace) -> None:
    from qinglm.export.hf import import_hf

    out = import_hf(args.src, args.out, overwrite=args.overwrite)
    print(
        f"wrote run directory {out}; use it like a trained run: qinglm sft --base {out} ..., "
        f"or continue pretraining with qinglm train --init-from {out} ..."
    )
