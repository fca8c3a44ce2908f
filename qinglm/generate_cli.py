"""`qinglm generate` and `qinglm eval`: a trained model from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from qinglm.config import (
    ContextConfig,
    SamplingConfig,
    add_dataclass_args,
    add_generation_args,
    given,
    sampling_args,
)
from qinglm.errors import QingLMError
from qinglm.evals.cli import add_eval_options

GEN_ALIASES = {"max_new_tokens": ["--max_length", "--max-length"]}


def register(sub: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], None]]:
    """Return the handlers of `generate` and `eval` after adding their parsers to sub."""
    p = sub.add_parser("generate", help="continue a prompt with a trained model")
    p.add_argument(
        "--model", "--model_path", dest="model", required=True, help="run directory (or a file in it)"
    )
    p.add_argument(
        "--tokenizer_path", "--tokenizer-path", dest="tokenizer_path", help="tokenizer directory override"
    )
    p.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    p.add_argument("--prompts-file", help="a UTF-8 file with one prompt per line")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument(
        "--batch-size", type=int, default=8, help="prompts decoded together (prompts of any lengths)"
    )
    p.add_argument(
        "--stop", action="append", default=[], help="stop string: the text ends before it (repeatable)"
    )
    p.add_argument("--device", default="auto")
    add_generation_args(p, GEN_ALIASES)

    p = sub.add_parser(
        "eval", help="held-out loss, perplexity and bits per character; task suite (--tasks), lm-eval"
    )
    p.add_argument("--model", "--model_path", dest="model", required=True, help="run directory")
    p.add_argument("--data", help="built-in corpus name (its val split), file, directory or glob")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--seq-len", type=int, default=None, help="evaluation window (default: the model's context)"
    )
    p.add_argument("--encoding", default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--device", default="auto")
    add_eval_options(p)
    add_dataclass_args(p, ContextConfig)
    return {"generate": cmd_generate, "eval": cmd_eval}


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise QingLMError(f"prompts file not found: {path}")
        from qinglm.data.encoding import LONE_SURROGATE, whole_lines
        from qinglm.data.sources import MAX_LINE_CHARS

        # read as the data tools read: encoding detected, a line too long to hold comes as None
        lines = [ln for _, ln in whole_lines(path, None, MAX_LINE_CHARS)]
        bad = [ln is None or LONE_SURROGATE.search(ln) is not None for ln in lines]
        prompts += [ln.strip() for ln, b in zip(lines, bad) if not b and ln.strip()]
        if any(bad):
            print(
                f"skipped {sum(bad)} line(s) of {path}: longer than {MAX_LINE_CHARS:,} characters or "
                "undecodable",
                file=sys.stderr,
            )
    if not prompts:
        raise QingLMError("give a prompt with --prompt TEXT or --prompts-file FILE")
    return prompts


def cmd_generate(args: argparse.Namespace) -> None:
    import qinglm
    from qinglm.infer.generate import complete

    prompts = _prompts(args)
    lm = qinglm.load(
        args.model,
        device=args.device,
        tokenizer=args.tokenizer_path,
        quantize=args.quantize,
        context=ContextConfig(**given(args, ContextConfig)),
        draft=args.draft,
    )
    sampling = sampling_args(args)
    if args.stream:
        for prompt in prompts:
            print(prompt, end="", flush=True)
            for piece in lm.stream(prompt, **sampling, stop=args.stop):
                print(piece, end="", flush=True)
            print()
    else:
        # One line per prompt, in order, each printed as soon as its batch is done.
        completions = complete(
            lm.model,
            lm.tokenizer,
            prompts,
            SamplingConfig(**sampling),
            batch_size=args.batch_size,
            stop=args.stop,
            device=lm.device,
            speculation=lm.speculation,
            draft=lm.draft,
        )
        for prompt, text in zip(prompts, completions):
            print(prompt + text, flush=True)
    if sampling.get("speculate"):
        print(lm.speculation.line(), file=sys.stderr)


def cmd_eval(args: argparse.Namespace) -> None:
    import qinglm
    from qinglm.data.builtin import is_builtin
    from qinglm.data.sources import expand_paths

    if args.tasks or args.lm_eval:
        from qinglm.evals.cli import run_eval

        run_eval(args)
        if not args.data:
            return
    elif not args.data:
        raise QingLMError("give --data CORPUS_OR_FILE, --tasks NAME[,NAME...]|all or --lm-eval TASKS")
    if not is_builtin(args.data):
        expand_paths(args.data)  # on the command line --data is a corpus or a path: a missing one is an error
    lm = qinglm.load(args.model, device=args.device, context=ContextConfig(**given(args, ContextConfig)))
    m = lm.evaluate(args.data, batch_size=args.batch_size, seq_len=args.seq_len, encoding=args.encoding)
    if args.json:
        print(json.dumps({k: m[k] for k in ("loss", "ppl", "bpc")}))
    else:
        print(
            f"loss {m['loss']:.4f}  perplexity {m['ppl']:.2f}  bits/char {m['bpc']:.4f}  "
            f"({m['tokens']:,} tokens)"
        )
