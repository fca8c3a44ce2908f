"""`qinglm tokenizer train` and `qinglm prepare`: a tokenizer and packed shards, as `qinglm train` makes them."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from qinglm.errors import QingLMError
from qinglm.train.config import TrainConfig


def register(sub: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], None]]:
    """Return the handlers of `tokenizer` and `prepare` after adding their parsers to sub."""
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
    f = TrainConfig.__dataclass_fields__["pre_tokenizer"]  # the same flag as `qinglm train`
    t.add_argument(
        "--pre-tokenizer", choices=f.metadata["choices"], default=f.default, help=f.metadata["help"]
    )
    t.add_argument("--out", required=True, help="directory for tokenizer.json")
    t.add_argument(
        "--overwrite", action="store_true", help="write into a non-empty --out that QingLM did not create"
    )

    p = sub.add_parser("prepare", help="tokenize text into packed train/val shards")
    _add_data_options(p)
    p.add_argument("--tokenizer", required=True, help="tokenizer directory")
    p.add_argument("--out", required=True, help="output directory for shards + index.json")
    p.add_argument(
        "--overwrite", action="store_true", help="write into a non-empty --out that QingLM did not create"
    )
    return {"tokenizer": cmd_tokenizer, "prepare": cmd_prepare}


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
        pre_tokenizer=getattr(args, "pre_tokenizer", TrainConfig.pre_tokenizer),
    )


def _print_as(staging: str, out: str, line: str) -> None:
    print(line.replace(staging, out), flush=True)


def cmd_tokenizer(args: argparse.Namespace) -> None:
    """Train in a child process that Ctrl-C kills at once (the Rust trainer ignores it), into a staging
    directory whose files are moved into --out only when training has succeeded."""
    import functools
    import os
    import shutil
    import signal

    from qinglm.io import OwnedDir, remove_stale_temps
    from qinglm.killable import run_killable
    from qinglm.pipeline import train_tokenizer_on
    from qinglm.tokenizer import TOKENIZER_FILE, TOKENIZER_NAMES

    out = Path(args.out)
    try:  # refuses a folder QingLM did not write; a failed training leaves no claim on it
        with OwnedDir.claiming(out, "tokenizer", TOKENIZER_NAMES, overwrite=args.overwrite):
            remove_stale_temps(out, ["tokenizer"])  # .tokenizer.tmp-PID of a killed run
            staging = out / f".tokenizer.tmp-{os.getpid()}"
            staging.mkdir(parents=True)  # parents: a concurrent failed run may have just removed out
            try:
                log = functools.partial(_print_as, str(staging), str(out))
                run_killable(train_tokenizer_on, args.data, args.vocab_size, staging, _data_cfg(args), log)
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})  # all files or none
                # tokenizer.json first, as Tokenizer.save
                for f in sorted(staging.iterdir(), key=lambda f: f.name != TOKENIZER_FILE):
                    os.replace(f, out / f.name)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    except OSError as e:
        raise QingLMError(f"cannot write the tokenizer to {out}: {e.strerror or e}") from None


def cmd_prepare(args: argparse.Namespace) -> None:
    from qinglm.data.mix import parse_mixture
    from qinglm.pipeline import prepare_data
    from qinglm.tokenizer import Tokenizer

    if parse_mixture(args.data):
        raise QingLMError("a weighted mixture is prepared by `qinglm train --data SOURCE:WEIGHT ...` itself")
    tokenizer = Tokenizer.load(args.tokenizer)
    prepare_data(args.data, tokenizer, Path(args.out), _data_cfg(args), overwrite=args.overwrite)
