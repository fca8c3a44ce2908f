"""`qinglm` command line: argparse subcommands that call the library.

A user mistake (QingLMError) becomes one line on stderr and exit status 2; bugs stay tracebacks. A command
stopped by Ctrl-C or SIGTERM (after saving or cleaning up) exits with 130 or 143.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, MutableMapping
from pathlib import Path

from qinglm import experiment_cli, generate_cli, plan_cli, plot_cli, prepare_cli, sweep_cli, train_cli
from qinglm.data import commands as data_cli
from qinglm.errors import Interrupted, QingLMError, exit_status
from qinglm.evals import cli as evals_cli
from qinglm.export import cli as export_cli
from qinglm.killable import die_with_parent
from qinglm.post import dpo_cli, grpo_cli
from qinglm.serve import cli as serve_cli
from qinglm.sft import cli as sft_cli

# Every command, in --help order. Each module has `register(sub) -> {name: handler}`: it adds its parsers
# to `sub` (importing nothing heavy) and returns the handlers, which take the parsed argparse.Namespace.
COMMAND_MODULES = (
    train_cli,  # train, distill
    generate_cli,  # generate, eval
    prepare_cli,  # tokenizer, prepare
    data_cli,  # data
    experiment_cli,  # experiment
    serve_cli,  # serve
    plot_cli,  # plot
    sweep_cli,  # sweep
    sft_cli,  # sft, lora, chat
    dpo_cli,  # dpo
    grpo_cli,  # grpo
    export_cli,  # export, import
    evals_cli,  # report
    plan_cli,  # plan
)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one line, like every other user error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """Return the `qinglm` argument parser with every command."""
    return _parser_and_handlers()[0]


def _parser_and_handlers() -> tuple[argparse.ArgumentParser, dict[str, Callable[[argparse.Namespace], None]]]:
    from qinglm import __version__

    parser = _Parser(prog="qinglm", description="QingLM: train Chinese language models from scratch.")
    parser.add_argument("--version", action="version", version=f"qinglm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    handlers: dict[str, Callable[[argparse.Namespace], None]] = {}
    for module in COMMAND_MODULES:
        handlers.update(module.register(sub))
    return parser, handlers


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Return a warning as one line on stderr, like the errors."""
    own = Path(filename).resolve().is_relative_to(Path(__file__).resolve().parent)
    return f"qinglm: warning: {message}\n" if own else f"warning: {category.__name__}: {message}\n"


def _terminate(signum: int, frame: object) -> None:
    raise Interrupted(signum)  # SIGTERM cleans up like Ctrl-C: temp files are deleted, locks released


def yield_idle_openmp_threads(environ: MutableMapping[str, str] = os.environ) -> None:
    """Return nothing after asking torch's OpenMP threads to sleep, not spin, while they wait for work
    (OMP_WAIT_POLICY=PASSIVE), unless the user set a wait policy (OMP_WAIT_POLICY or GOMP_SPINCOUNT).

    A spinning thread keeps its core busy: on a machine shared with other work, the thread that has
    the next piece of work waits for a core the spinners hold. Measured on 2 cores (benchmarks/busy.py):
    1.5-3x the tokens/s of spinning beside about ten other jobs, the same speed on a quiet machine, the
    same weights bit for bit. OpenMP reads it once, when torch loads, so this runs before any command
    imports torch.
    """
    if "OMP_WAIT_POLICY" not in environ and "GOMP_SPINCOUNT" not in environ:
        environ["OMP_WAIT_POLICY"] = "PASSIVE"


def main(argv: list[str] | None = None) -> int:
    yield_idle_openmp_threads()
    parser, handlers = _parser_and_handlers()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    warnings.formatwarning = _one_line_warning
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)  # training and the server install their own handlers
    worker = "TORCHELASTIC_RUN_ID" in os.environ  # a process that torchrun started
    if worker:  # its agent waits for it, and nothing else would: never outlive the agent
        die_with_parent(os.getppid())
    try:
        handlers[args.command](args)
    except QingLMError as e:
        print(f"qinglm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # 130 after Ctrl-C, 143 after SIGTERM
        if worker:  # stopped while starting up: exit 0 like a worker that stopped at a step and saved, or
            return 0  # torchrun reports a failed worker in pages; the `--nproc` launcher says it and exits 130/143
        print("qinglm: interrupted", file=sys.stderr)
        return exit_status(e)
    except BrokenPipeError:
        return 0
    return 0
