"""`qinglm` command line: argparse subcommands that call the library.

A user mistake (QingLMError) becomes one line on stderr and exit status 2; bugs stay tracebacks.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import warnings
from pathlib import Path

from qinglm.config import ModelConfig, SamplingConfig, TrainConfig, add_dataclass_args, given
from qinglm.data.commands import add_parsers as add_corpus_parsers
from qinglm.errors import QingLMError
from qinglm.evals.commands import add_eval_options

# Flag names of the seed projects (Andy-LLM, LightweightLM, Zer02LLM), accepted as aliases.
TRAIN_ALIASES = {
    "preset": ["--model_size", "--model-size"],
    "lr": ["--learning_rate", "--learning-rate"],
    "seq_len": ["--max_length", "--max-length"],
    "num_epochs": ["--epochs"],
    "grad_accum": ["--gradient_accumulation_steps"],
}
GEN_ALIASES = {"max_new_tokens": ["--max_length", "--max-length"]}


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one line, like every other user error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data", nargs="+", required=True, help="built-in corpus name, file(s), directory or glob"
    )
    p.add_argument("--val-fraction", type=float, default=0.02, help="fraction of documents held out")
    p.add_argument("--encoding", default=None, help="text encoding (default: detect)")
    p.add_argument(
        "--nfkc",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="normalise full-width Latin letters and digits",
    )
    p.add_argument("--text-field", default="text", help="JSONL/Parquet field holding the text")
    for name in ("split_by", "split_block"):  # the same flags as `qinglm train`
        f = TrainConfig.__dataclass_fields__[name]
        kind = dict(choices=f.metadata["choices"]) if "choices" in f.metadata else dict(type=int)
        p.add_argument("--" + name.replace("_", "-"), default=f.default, help=f.metadata["help"], **kind)


def _data_cfg(args: argparse.Namespace) -> TrainConfig:
    sample = getattr(args, "sample_bytes", None)
    return TrainConfig(
        data=args.data,
        val_fraction=args.val_fraction,
        split_by=args.split_by,
        split_block=args.split_block,
        encoding=args.encoding,
        nfkc=args.nfkc,
        text_field=args.text_field,
        **({"tokenizer_sample_bytes": sample} if sample is not None else {}),
    )


def build_parser() -> argparse.ArgumentParser:
    from qinglm import __version__

    parser = _Parser(prog="qinglm", description="QingLM: train Chinese language models from scratch.")
    parser.add_argument("--version", action="version", version=f"qinglm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser(
        "train",
        help="pretrain a model (no flags: the built-in quick-start job)",
        description="Train a tokenizer if needed, prepare the data, pretrain, then report "
        "held-out loss / perplexity / bits per character and sample text.",
    )
    p.add_argument("--config", help="YAML or JSON config file; flags override it")
    add_dataclass_args(p, TrainConfig, TRAIN_ALIASES)
    add_dataclass_args(p, ModelConfig)

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
    p.add_argument(
        "--quantize",
        choices=["none", "int8"],
        default="none",
        help="int8: int8 weights for faster CPU inference",
    )
    p.add_argument("--device", default="auto")
    add_dataclass_args(p, SamplingConfig, GEN_ALIASES)

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

    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tok_command", metavar="ACTION", required=True)
    t = tsub.add_parser("train", help="train a byte-level BPE tokenizer")
    _add_data_options(t)
    t.add_argument("--vocab-size", type=int, default=10_000)
    t.add_argument(
        "--sample-bytes",
        type=int,
        default=None,
        help="train on an even, reproducible sample of about this many bytes of the corpus (default "
        f"{TrainConfig.tokenizer_sample_bytes:,}: the trainer needs about 80 bytes of memory per byte "
        "of Chinese text)",
    )
    t.add_argument("--out", required=True, help="directory for tokenizer.json")

    p = sub.add_parser("prepare", help="tokenize text into packed train/val shards")
    _add_data_options(p)
    p.add_argument("--tokenizer", required=True, help="tokenizer directory")
    p.add_argument("--out", required=True, help="output directory for shards + index.json")
    p.add_argument(
        "--overwrite", action="store_true", help="write into a non-empty --out that QingLM did not create"
    )

    p = sub.add_parser("data", help="built-in corpora; download, clean and deduplicate corpora")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    dsub.add_parser("list", help="list the built-in corpora with their sizes")
    e = dsub.add_parser("export", help="write a built-in corpus as text, one document per line")
    e.add_argument("name")
    e.add_argument("out")
    e.add_argument("--split", default="all", choices=["all", "train", "val"])
    add_corpus_parsers(dsub)

    for module in _command_modules():
        COMMANDS.update(module.register(sub))
    return parser


# Further subcommands live beside the code they drive. Each module has
# `register(sub) -> {name: handler}`: it adds its parsers to `sub` (importing nothing heavy) and returns
# the handlers, which take the parsed argparse.Namespace.
COMMAND_MODULES: tuple[str, ...] = (
    "qinglm.experiment",
    "qinglm.serve.cli",
    "qinglm.plot",
    "qinglm.sweep",
    "qinglm.sft.cli",
    "qinglm.export.cli",
    "qinglm.evals.commands",
)


def _command_modules():
    import importlib

    return [importlib.import_module(name) for name in COMMAND_MODULES]


# ---------------------------------------------------------------------------- commands


def cmd_train(args: argparse.Namespace) -> None:
    from qinglm.pipeline import run_train

    run_train(given(args, ModelConfig), given(args, TrainConfig), args.config)


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise QingLMError(f"prompts file not found: {path}")
        try:
            prompts += [ln.strip() for ln in path.read_text(encoding="utf-8-sig").splitlines() if ln.strip()]
        except UnicodeDecodeError:
            raise QingLMError(f"{path} is not UTF-8 text") from None
    if not prompts:
        raise QingLMError("give a prompt with --prompt TEXT or --prompts-file FILE")
    return prompts


def cmd_generate(args: argparse.Namespace) -> None:
    import qinglm
    from qinglm.engine import complete

    prompts = _prompts(args)
    lm = qinglm.load(args.model, device=args.device, tokenizer=args.tokenizer_path, quantize=args.quantize)
    sampling = {**given(args, SamplingConfig)}
    if args.stream:
        for prompt in prompts:
            print(prompt, end="", flush=True)
            for piece in lm.stream(prompt, **sampling, stop=args.stop):
                print(piece, end="", flush=True)
            print()
        return
    # One line per prompt, in order, each printed as soon as its batch is done.
    completions = complete(
        lm.model,
        lm.tokenizer,
        prompts,
        SamplingConfig(**sampling),
        batch_size=args.batch_size,
        stop=args.stop,
        device=lm.device,
    )
    for prompt, text in zip(prompts, completions):
        print(prompt + text, flush=True)


def cmd_eval(args: argparse.Namespace) -> None:
    import qinglm
    from qinglm.data.builtin import is_builtin
    from qinglm.data.sources import expand_paths

    if args.tasks or args.lm_eval:
        from qinglm.evals.commands import run_eval

        run_eval(args)
        if not args.data:
            return
    elif not args.data:
        raise QingLMError("give --data CORPUS_OR_FILE, --tasks NAME[,NAME...]|all or --lm-eval TASKS")
    if not is_builtin(args.data):
        expand_paths(args.data)  # on the command line --data is a corpus or a path: a missing one is an error
    lm = qinglm.load(args.model, device=args.device)
    m = lm.evaluate(args.data, batch_size=args.batch_size, seq_len=args.seq_len, encoding=args.encoding)
    if args.json:
        print(json.dumps({k: m[k] for k in ("loss", "ppl", "bpc")}))
    else:
        print(
            f"loss {m['loss']:.4f}  perplexity {m['ppl']:.2f}  bits/char {m['bpc']:.4f}  "
            f"({m['tokens']:,} tokens)"
        )


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def _print_as(staging: str, out: str, line: str) -> None:
    print(line.replace(staging, out), flush=True)


def cmd_tokenizer(args: argparse.Namespace) -> None:
    """Train in a child process that Ctrl-C kills at once (the Rust trainer ignores it), into a staging
    directory whose files are moved into --out only when training has succeeded."""
    import functools
    import os
    import shutil
    import signal

    from qinglm.killable import run_killable
    from qinglm.pipeline import train_tokenizer_on

    out = Path(args.out)
    created = not out.exists()
    for old in out.glob(".tokenizer.tmp-*") if out.is_dir() else []:  # left by a killed run
        pid = old.name.rpartition("-")[2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    staging = out / f".tokenizer.tmp-{os.getpid()}"
    try:
        staging.mkdir(parents=True)
    except OSError as e:
        raise QingLMError(f"cannot write the tokenizer to {out}: {e.strerror or e}") from None
    try:
        log = functools.partial(_print_as, str(staging), str(out))
        run_killable(train_tokenizer_on, args.data, args.vocab_size, staging, _data_cfg(args), log)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})  # all files or none
        for f in sorted(staging.iterdir(), key=lambda f: f.name != "tokenizer.json"):  # as Tokenizer.save
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(out.iterdir()):
            out.rmdir()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def cmd_prepare(args: argparse.Namespace) -> None:
    from qinglm.data.mix import parse_mixture
    from qinglm.pipeline import prepare_data
    from qinglm.tokenizer import Tokenizer

    if parse_mixture(args.data):
        raise QingLMError("a weighted mixture is prepared by `qinglm train --data SOURCE:WEIGHT ...` itself")
    tokenizer = Tokenizer.load(args.tokenizer)
    prepare_data(args.data, tokenizer, Path(args.out), _data_cfg(args), overwrite=args.overwrite)


def cmd_data(args: argparse.Namespace) -> None:
    from qinglm.data.builtin import BUILTINS, builtin_info, export_builtin

    if args.data_command in ("clean", "dedup", "download"):
        from qinglm.data.commands import run

        run(args)
    elif args.data_command == "list":
        print(f"{'name':<8} {'documents':>10} {'characters':>12}  source")
        for name in BUILTINS:
            info = builtin_info(name)
            print(f"{name:<8} {info['documents']:>10,} {info['characters']:>12,}  {info['source']}")
            print(f"{'':<8} {info['description']}")
    else:
        n = export_builtin(args.name, args.out, split=args.split)
        print(f"wrote {n:,} documents to {args.out}")


COMMANDS = {
    "train": cmd_train,
    "generate": cmd_generate,
    "eval": cmd_eval,
    "tokenizer": cmd_tokenizer,
    "prepare": cmd_prepare,
    "data": cmd_data,
}


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Return a warning as one line on stderr, like the errors."""
    own = Path(filename).resolve().is_relative_to(Path(__file__).resolve().parent)
    return f"qinglm: warning: {message}\n" if own else f"warning: {category.__name__}: {message}\n"


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C: temp files are deleted, locks released


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    warnings.formatwarning = _one_line_warning
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)  # training and the server install their own handlers
    try:
        COMMANDS[args.command](args)
    except QingLMError as e:
        print(f"qinglm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qinglm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0
