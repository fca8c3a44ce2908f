"""`--nproc N`: this process becomes a torchrun launcher of the same command, for every stage.

The launcher refuses more processes than the machine has GPUs (CUDA) or CPU cores, says what it
waits for, passes Ctrl-C / SIGTERM on to the training processes (which finish their step, save and
exit) and then exits 130 / 143. torchrun runs in a session of its own, so a terminal's Ctrl-C
reaches the launcher alone and torchrun's agent never sees a signal (it would print a traceback);
a second signal kills everything at once. If the launcher dies, torchrun's agent dies (a
parent-death signal), and each worker dies with the agent (qinglm.cli sets the same for workers),
so no process is left waiting for peers that will never come.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from qinglm.errors import Interrupted, QingLMError
from qinglm.killable import kill_on_parent_death

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def cpu_cores() -> int:
    """Return how many CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_nproc(nproc: int, device: str) -> str:
    """Return what the nproc processes will run on ("gloo on 2 of 4 CPU cores"), or raise QingLMError when
    the machine has fewer GPUs (CUDA) or CPU cores than processes: each process is a whole copy of the run."""
    from qinglm.device import resolve_device

    kind = resolve_device(device).type
    if kind == "cuda":
        import torch

        have, what, backend = torch.cuda.device_count(), "GPU", "NCCL"
    else:
        have, what, backend = cpu_cores(), "CPU core", "gloo"
    if nproc > have:
        raise QingLMError(
            f"--nproc {nproc} starts one training process per {what}, and this machine has {have}; use "
            f"--nproc {have} or fewer (or start torchrun yourself to oversubscribe it)"
        )
    return f"{backend} on {nproc} of {have} {what}{'s' if have > 1 else ''}"


def run_torchrun(cmd: list[str], nproc: int, where: str) -> None:
    """Return nothing after the torchrun command line cmd, which starts nproc processes on `where`
    (check_nproc), has finished; raise QingLMError if it failed, Interrupted after a signal."""
    print(
        f"launching {nproc} training processes under torchrun ({where}); each loads torch and joins the "
        "process group before rank 0 prints the run (slower on a busy machine)",
        flush=True,
    )
    # torchrun's own default is 1 thread per process (and a banner saying so): share the cores instead.
    env = {"OMP_NUM_THREADS": str(max(1, cpu_cores() // nproc)), **os.environ}
    received: list[int] = []  # the signals this process got, noted by a handler: none is lost mid-way
    main = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
    old = (
        {s: signal.signal(s, lambda signum, _: received.append(signum)) for s in STOP_SIGNALS} if main else {}
    )
    try:
        with subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=kill_on_parent_death()) as p:
            _supervise(p, received)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if received:
        raise Interrupted(received[0])
    if p.returncode != 0:
        raise QingLMError(
            f"the {nproc} training processes failed (torchrun exit status {p.returncode}); see above"
        )


def _supervise(p: subprocess.Popen, received: list[int]) -> None:
    """Return once torchrun (p) has exited, passing the first signal received on to its processes and
    killing them all at a second one."""
    passed_on = False
    while p.poll() is None:
        if len(received) > 1:  # a second signal: stop now, unsaved
            _kill(p.pid, signal.SIGKILL)  # the agent; its processes die with it
        elif received and not passed_on:
            print(
                "stopping: the training processes finish their step and save (again to kill them now)",
                file=sys.stderr,
                flush=True,
            )
            _signal_workers(p.pid, received[0])
            passed_on = True
        try:
            p.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            pass


def _signal_workers(agent: int, signum: int) -> None:
    """Return nothing after passing signum on to the training processes (the children of torchrun's agent).

    A process that has not yet reached `qinglm`'s main (it catches SIGTERM from there on) would die of
    the signal and torchrun would report a failed worker in pages; it gets two seconds to get there.
    If there are no processes yet, or one is still starting then, nothing can have been saved or
    trained: the agent and every process are killed instead. Without /proc the agent gets signum (it
    passes the signal on, and prints a traceback).
    """
    deadline = time.monotonic() + 2.0
    while (children := _children(agent)) and not all(map(_catches_sigterm, children)):
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if children is None:
        _kill(agent, signum)
    elif children and all(map(_catches_sigterm, children)):
        for pid in children:
            _kill(pid, signum)
    else:
        _kill(agent, signal.SIGKILL)  # first: a dying worker would make it report
        for pid in children:
            _kill(pid, signal.SIGKILL)


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _catches_sigterm(pid: int) -> bool:
    """Return True when process pid has a handler for SIGTERM (Linux /proc/PID/status, SigCgt)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next((line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), "0")
    return bool(int(caught, 16) >> (signal.SIGTERM - 1) & 1)


def _children(pid: int) -> list[int] | None:
    """Return the ids of pid's child processes, read from /proc (None where there is no /proc)."""
    found = []
    try:
        entries = list(os.scandir("/proc"))
    except OSError:
        return None
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # "pid (comm) state ppid ..."
            found.append(int(entry.name))
    return found
