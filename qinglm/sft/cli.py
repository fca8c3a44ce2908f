"""`qinglm sft`, `qinglm lora merge` and `qinglm chat`: register(sub) adds them to the qinglm command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from qinglm.chat_repl import ChatConfig
from qinglm.config import ContextConfig, add_dataclass_args, add_generation_args, given, sampling_args
from qinglm.sft.config import SFTConfig
from qinglm.train.driver import stage_command

SFT_ALIASES = {"num_epochs": ["--epochs"], "lr": ["--learning_rate", "--learning-rate"]}


def register(sub: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], None]]:
    """Return {command: handler} after adding the sft, lora and chat parsers to sub."""
    handlers = stage_command(
        sub,
        "sft",
        SFTConfig,
        "qinglm.sft.train:run_sft",
        help="supervised fine-tuning (full or --lora) of a pretrained run on chat data",
        description="Fine-tune a pretrained run on chat data with the loss on assistant tokens only, "
        "and write a new run directory (config.json, tokenizer/, checkpoints/) that load/generate/eval "
        "use unchanged. --data idioms-sft uses the built-in idiom questions and reports held-out figures.",
        aliases=SFT_ALIASES,
    )

    p = sub.add_parser("lora", help="LoRA adapter tools")
    lsub = p.add_subparsers(dest="lora_command", metavar="ACTION", required=True)
    m = lsub.add_parser("merge", help="fold a LoRA adapter into the base weights, as a new run directory")
    m.add_argument("--adapter", required=True, help="adapter directory (PEFT format) or an SFT --lora run")
    m.add_argument("--base", help="base run directory (default: the one named in adapter_config.json)")
    m.add_argument("--out", required=True, help="run directory to write")
    m.add_argument(
        "--overwrite", action="store_true", help="write into a non-empty --out that QingLM did not create"
    )
    m.add_argument("--device", default="cpu")

    p = sub.add_parser("chat", help="chat with a fine-tuned model in the terminal (/reset, /exit)")
    p.add_argument("--model", "--model_path", dest="model", required=True, help="run directory")
    p.add_argument("--system", help="system prompt, kept at the start of every turn")
    p.add_argument("--device", default="auto")
    add_generation_args(p, skip={"stop_at_eos"})
    add_dataclass_args(p, ChatConfig)
    return {**handlers, "lora": cmd_lora, "chat": cmd_chat}


def cmd_lora(args: argparse.Namespace) -> None:
    from qinglm.sft.train import merge_run

    out = merge_run(args.adapter, args.out, base=args.base, device=args.device, overwrite=args.overwrite)
    print(f"merged {args.adapter} into {out}")


def cmd_chat(args: argparse.Namespace) -> None:
    import qinglm
    from qinglm.chat_repl import chat_loop

    chat = ChatConfig(**given(args, ChatConfig))  # bad flags fail before the model loads
    context = ContextConfig(**given(args, ContextConfig))
    lm = qinglm.load(
        args.model, device=args.device, context=context, quantize=args.quantize, draft=args.draft
    )
    sampling = sampling_args(args)
    chat_loop(lm, system=args.system, sampling=sampling, chat=chat)
    if sampling.get("speculate"):
        print(lm.speculation.line(), file=sys.stderr)
