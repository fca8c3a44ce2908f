"""Atomic file writes, and what QingLM may replace: a manifest of the names it wrote, a directory lock.

A killed process never leaves a half-written file under its real name; its hidden temp files carry its
pid, so a later run can prove they are leftovers and remove them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from qinglm.errors import QingLMError


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; done once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Yield a temp file next to path (text mode: UTF-8, '\\n' newlines); it replaces path on success."""
    path = Path(path)
    # .NAME.tmp-PID-random: the pid lets a later run prove a leftover is a dead writer's (stale_temps)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{temp_path(path).name}-")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        text = "b" not in mode
        with os.fdopen(fd, mode, **({"encoding": "utf-8", "newline": "\n"} if text else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write text (UTF-8) to path atomically."""
    with atomic_open(path) as f:
        f.write(text)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write obj as indented UTF-8 JSON to path atomically."""
    write_text_atomic(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def not_a_file(path: str | os.PathLike) -> str | None:
    """Return why path cannot be read as a regular file ("no such file or directory", "a directory, not a
    file", "a character device, not a regular file", ...), or None when it is one (links followed)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a broken symbolic link" if os.path.islink(path) else "no such file or directory"
    except OSError as e:  # permission denied on a parent, a name too long, ...
        return f"not readable ({e.strerror or e})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory, not a file"
    kinds = {stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device", stat.S_ISFIFO: "a pipe"}
    kind = next((name for test, name in kinds.items() if test(mode)), "a socket")
    return f"{kind}, not a regular file"


def read_json(path: str | os.PathLike, missing: str) -> Any:
    """Return the parsed JSON file at path; a missing file raises QingLMError(missing), a broken one says so."""
    path = Path(path)
    if not path.is_file():
        raise QingLMError(missing)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError; RecursionError: too deep
        raise QingLMError(f"cannot parse {path}: {e}") from None


# ---------------------------------------------------------------------------- what QingLM wrote where

MANIFEST = ".qinglm-manifest.json"
LOCK_FILE = ".qinglm.lock"
# NAME.tmp-PID / NAME.old-PID (directories) and .NAME.tmp-PID[-random] (files) written by process PID
_TEMP = re.compile(r"^(?:\.(?P<file>.+)|(?P<dir>[^.].*))\.(?P<what>tmp|old)-(?P<pid>\d+)(?:-\w+)?$")


def temp_path(path: Path) -> Path:
    """Return the hidden temp name a file is written under before it replaces path: .NAME.tmp-PID."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a leftover of an earlier process that had our pid; we write no such file now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def stale_temps(directory: Path, names: Iterable[str] | None = None) -> list[Path]:
    """Return the temp files/dirs in directory left by dead QingLM processes (optionally only of names).

    Their naming pattern and a writer pid that no longer runs prove they are leftovers of ours. A
    NAME.old-PID whose NAME is missing is kept: it is the last complete version (see save_best).
    """
    if not directory.is_dir():
        return []
    wanted = None if names is None else set(names)
    found = []
    for p in directory.iterdir():
        m = _TEMP.match(p.name)
        if not m or _pid_alive(int(m["pid"])):
            continue
        target = m["file"] if m["file"] is not None else m["dir"]
        if m["what"] == "old" and not (directory / target).exists():
            continue
        if wanted is None or target in wanted:
            found.append(p)
    return found


def remove_path(p: Path) -> None:
    """Return nothing; delete the file or directory tree p (if it exists)."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def remove_stale_temps(directory: Path, names: Iterable[str] | None = None) -> None:
    """Return nothing; delete what stale_temps(directory, names) finds."""
    for p in stale_temps(directory, names):
        remove_path(p)


class OwnedDir:
    """A directory QingLM writes into, with .qinglm-manifest.json listing the entries it may replace or delete.

    kind says what the directory is ("run", "data", "checkpoints"). Names not in the manifest are the
    user's and are never touched.
    """

    def __init__(self, path: Path, kind: str, names: Iterable[str]):
        self.path, self.kind, self.names = path, kind, set(names)
        # What a claim that wrote the manifest found: the folders it created (leaf first) and the entries
        # already there. None when the manifest was there before (release_unused then keeps it).
        self._claimed: tuple[list[Path], set[str]] | None = None

    @classmethod
    def read(cls, path: str | os.PathLike) -> OwnedDir | None:
        """Return the directory's manifest, or None if QingLM never claimed it."""
        path = Path(path)
        try:
            m = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
            return cls(path, str(m["kind"]), [str(n) for n in m["names"]])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @classmethod
    def claim(
        cls,
        path: str | os.PathLike,
        kind: str,
        names: Iterable[str] = (),
        overwrite: bool = False,
        legacy: Callable[[Path], list[str] | None] | None = None,
    ) -> OwnedDir:
        """Return the directory path (created if needed) as QingLM's, owning `names` besides what it owned.

        A non-empty directory without a manifest is refused in one line unless legacy(path) recognises
        it as written by an older QingLM (returning the names it wrote), its parent's manifest owns it,
        or overwrite is set (then its entries count as QingLM's). Raises OSError if path is unwritable.
        """
        path = Path(path)
        created = [p for p in (path, *path.parents) if not p.exists()]
        path.mkdir(parents=True, exist_ok=True)
        owned = cls.read(path)
        if owned is None:
            # a concurrent first claim's manifest temp file and lock are no one's files yet
            existing = sorted(p.name for p in path.iterdir() if not _claims_own(p.name))
            parent = cls.read(path.parent)
            adopted = legacy(path) if legacy and existing else None
            if existing and adopted is None and (overwrite or (parent and path.name in parent.names)):
                adopted = existing
            if existing and adopted is None:
                shown = ", ".join(existing[:3]) + (", ..." if len(existing) > 3 else "")
                raise QingLMError(
                    f"{path} is not empty ({shown}) and was not written by QingLM; choose an empty or new "
                    "directory, or pass --overwrite to let QingLM replace files there"
                )
            owned = cls(path, kind, adopted or [])
            owned.add(*names, force=True)
            owned._claimed = (created, set(existing))
        elif owned.kind != kind:
            raise QingLMError(f"{path} is a QingLM {owned.kind} directory, not a {kind} directory")
        owned.add(*names)
        return owned

    @classmethod
    @contextlib.contextmanager
    def claiming(
        cls, path: str | os.PathLike, kind: str, names: Iterable[str] = (), **claim: Any
    ) -> Iterator[OwnedDir]:
        """Yield OwnedDir.claim(path, kind, names, **claim); if the block fails, release_unused() undoes it."""
        owned = cls.claim(path, kind, names, **claim)
        try:
            yield owned
        except BaseException:
            owned.release_unused()
            raise

    def release_unused(self) -> bool:
        """Return whether this claim was undone: a command that fails (or is refused) before writing a
        file leaves no manifest and none of the folders it created.

        Only a manifest this claim wrote goes, and only while the directory holds nothing new besides it
        and the lock; undoing a claim only ever gives names back to the user.
        """
        if self._claimed is None:
            return False
        created, before = self._claimed
        try:
            now = {p.name for p in self.path.iterdir()} - {MANIFEST, LOCK_FILE}
        except OSError:
            return False
        if now != before:
            return False
        (self.path / MANIFEST).unlink(missing_ok=True)
        self._claimed, self.names = None, set()
        _remove_empty(created)
        return True

    def add(self, *names: str, force: bool = False) -> None:
        """Return nothing; record names as written by QingLM (before writing them)."""
        if force or not set(names) <= self.names:
            self.names.update(names)
            write_json_atomic(self.path / MANIFEST, {"kind": self.kind, "names": sorted(self.names)})

    def owns(self, name: str) -> bool:
        return name in self.names

    def delete(self, name: str) -> bool:
        """Return whether name was QingLM's and is now deleted; never touch a name the manifest lacks."""
        if name not in self.names:
            return False
        remove_path(self.path / name)
        self.names.discard(name)
        self.add(force=True)
        return True

    def remove_leftovers(self) -> None:
        """Return nothing; delete temp files/dirs of owned names whose writing process is dead."""
        remove_stale_temps(self.path, self.names)


def _claims_own(name: str) -> bool:
    """Return whether name is what a claim itself writes: the lock, or the manifest's temp file."""
    return name == LOCK_FILE or name.startswith(f".{MANIFEST}.tmp-")


def _remove_empty(folders: list[Path]) -> None:
    """Return nothing; remove the folders (leaf first) while they are empty: the ones a claim created."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (or gone): the rest are its parents
            return


def claim_file(path: str | os.PathLike, overwrite: bool | None = None) -> Path:
    """Return path once QingLM may write that one file: it is new, its folder's manifest lists it, or
    overwrite is set. The folder's manifest, if it has one, records the name before it is written.

    overwrite None: the command has no --overwrite, so the message asks to move the file away.
    """
    path = Path(path)
    owned = OwnedDir.read(path.parent)
    if (path.exists() or path.is_symlink()) and not overwrite and not (owned and owned.owns(path.name)):
        what = "move it away first" if overwrite is None else "choose another name, or pass --overwrite"
        raise QingLMError(f"{path} exists and was not written by QingLM; {what}")
    if owned:
        owned.add(path.name)
    return path


@contextlib.contextmanager
def exclusive_lock(directory: str | os.PathLike, command: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock on directory (a lock file inside it) until the block ends or the process dies.

    The OS drops the lock with the process, so a killed run never leaves a stale lock. A second holder
    gets a QingLMError naming the first (pid, host, command).
    """
    path = Path(directory) / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise QingLMError(
                f"{directory} is in use by {holder}; wait for it to finish or choose another directory"
            ) from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)  # the holder we waited for deleted this lock file: lock the new one
    command = command or " ".join(["qinglm", *sys.argv[1:]])[:200]
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} ({command})\n".encode())
        yield
    finally:
        path.unlink(missing_ok=True)  # while still locked: a waiting process then retries on a new file
        os.close(fd)
