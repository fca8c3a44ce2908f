"""Running a stage as a command: the run directory's lock, --resume from its saved config, --nproc N
(the process becomes a torchrun launcher of the same command: qinglm.train.launch), and the exit status
of a run that a signal stopped."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qinglm import run_dir as run_dirs
from qinglm.config import from_dict
from qinglm.errors import Interrupted, QingLMError
from qinglm.train.launch import check_nproc, run_torchrun


def cli_flags(flags: dict[str, Any]) -> list[str]:
    """Return command-line flags that give these config fields (None = not given)."""
    out: list[str] = []
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + name.replace("_", "-"))
        elif isinstance(value, list):
            out += [flag, *map(str, value)]
        else:
            out += [flag, str(value)]
    return out


def launch_torchrun(
    command: str, nproc: int, flags: dict[str, Any], config_file: str | None = None, device: str = "auto"
) -> None:
    """Return nothing after `torchrun --standalone --nproc_per_node N -m qinglm COMMAND ...` (these flags
    minus --nproc) has finished on device; refuse more processes than GPUs or CPU cores, raise QingLMError
    if it failed and Interrupted after Ctrl-C or SIGTERM (see qinglm.train.launch)."""
    where = check_nproc(nproc, device)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["-m", "qinglm", command, *cli_flags({k: v for k, v in flags.items() if k != "nproc"})]
    if config_file:
        cmd += ["--config", config_file]
    run_torchrun(cmd, nproc, where)


def stage_config(cls: type, kind: str, flags: dict[str, Any]) -> Any:
    """Return the config of a stage command: the flags given, or with --resume of an existing run, the
    run's saved config with the flags given on top (so `--out RUN --resume` alone continues it)."""
    out = flags.get("out")
    if flags.get("resume") and out and (Path(out) / run_dirs.CONFIG).is_file():
        saved = run_dirs.read_config(out)
        if saved["kind"] != kind or not isinstance(saved.get(kind), dict):
            raise QingLMError(f"{out} is a {saved['kind']} run, not a {kind} run; choose another --out")
        return from_dict(cls, {**saved[kind], **flags}, f"{kind} config")
    return cls(**flags)


def resolved_flags(cfg: Any, flags: dict[str, Any]) -> dict[str, Any]:
    """Return flags plus every field the resolved cfg holds off its default (a default out, seq_len or lr
    filled in): the processes launched under torchrun then run the launcher's config exactly."""
    out = dict(flags)
    for f in dataclasses.fields(cfg):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if f.name not in out and getattr(cfg, f.name) != default:
            out[f.name] = getattr(cfg, f.name)
    return out


def run_stage_command(
    command: str,
    kind: str,
    cfg: Any,
    flags: dict[str, Any],
    make_stage: Callable[[], Any],
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Return the engine's result after running make_stage() with cfg (resolved) in cfg.out, holding the
    run's lock; with --nproc N (outside torchrun) launch N processes of the same command instead, given
    the flags and what resolving filled in (resolved_flags), and return {}."""
    from qinglm.train.loop import train_stage
    from qinglm.train.support import check_supported

    check_supported(kind, cfg)  # before any process starts
    run_dir = Path(cfg.out)
    if not cfg.resume and run_dirs.holds_run(run_dir):  # a new run never replaces one
        raise QingLMError(
            f"{run_dir} already holds a run; pass --resume to continue it or choose another --out"
        )
    with contextlib.ExitStack() as held:
        held.enter_context(run_dirs.writing(run_dir, cfg.overwrite, kind))
        if cfg.nproc and "RANK" not in os.environ:
            launch_torchrun(
                command, cfg.nproc, {**resolved_flags(cfg, flags), "out": str(run_dir)}, device=cfg.device
            )
            return {}
        result = train_stage(make_stage(), cfg, run_dir, log=log)
        if os.environ.get("RANK", "0") == "0":
            write_report(cfg, run_dir, result, log)
        raise_if_interrupted(result)
        return result


def raise_if_interrupted(result: dict[str, Any]) -> None:
    """Return nothing after a run that was not stopped by a signal; else raise Interrupted (the run has
    saved), so the command exits 130 after Ctrl-C and 143 after SIGTERM, not 0 like a finished run.

    A torchrun worker returns: it exits 0 for torchrun, and the launcher that passed the signal on
    exits with the signal's status (launch_torchrun).
    """
    if result.get("stop_reason") == "interrupted" and "RANK" not in os.environ:
        raise Interrupted(result.get("stop_signal") or signal.SIGINT)


def write_report(cfg: Any, run_dir: Path, result: dict[str, Any], log: Callable[[str], None]) -> None:
    """Return nothing after writing RUN/report.md for a run that reached its end, unless --no-report.

    Only the process that calls it writes (rank 0's job); a run interrupted or killed writes none. A
    report that cannot be written costs one line, not the finished run.
    """
    if not cfg.report or result.get("stop_reason") in (None, "interrupted"):
        return
    from qinglm.evals.report import write_end_report

    try:
        log(f"wrote {write_end_report(run_dir, cfg.device)}")
    except QingLMError as e:
        log(f"no report: {e}")


def stage_command(
    sub: Any,
    name: str,
    cls: type,
    runner: str,
    help: str,
    description: str,
    aliases: dict[str, list[str]] | None = None,
) -> dict[str, Callable[[Any], None]]:
    """Return {name: handler} after adding `qinglm NAME` to the subparsers sub: one flag per field of the
    stage's config class cls; the handler resolves --resume (stage_config) and calls runner, a
    "module:function" imported only when the command runs (the command line builds without torch)."""
    import importlib

    from qinglm.config import add_dataclass_args, given

    p = sub.add_parser(name, help=help, description=description)
    add_dataclass_args(p, cls, aliases)

    def handler(args: Any) -> None:
        module, _, function = runner.partition(":")
        flags = given(args, cls)
        getattr(importlib.import_module(module), function)(stage_config(cls, name, flags), flags=flags)

    return {name: handler}
