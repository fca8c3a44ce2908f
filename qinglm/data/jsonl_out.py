"""Write a stream of documents as JSONL shards plus a report, all or nothing: what `data clean` and
`data dedup` produce.

Shards are written under hidden temp names (.NAME.tmp-PID) and renamed into place only when the whole
stream has been read; the report is written last and marks the directory complete. A failed or
interrupted run leaves no shard under a real name (a killed one leaves temp files that the next run in
that directory removes); only files in the directory's QingLM manifest are ever replaced or deleted.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

from qinglm.data.sources import REPORT_SUFFIX
from qinglm.errors import QingLMError
from qinglm.io import LOCK_FILE, OwnedDir, exclusive_lock, temp_path, write_json_atomic

KIND = "corpus"


def write_jsonl_shards(
    docs: Iterable[str],
    out_dir: str | os.PathLike,
    prefix: str,
    report: Callable[[], dict],
    *,
    shard_bytes: int = 256 << 20,
    overwrite: bool = False,
) -> list[str]:
    """Return the shard names after writing docs as PREFIX_0000.jsonl, ... ({"text": ...} per line) and
    report() as PREFIX_report.json into out_dir; at most about shard_bytes per shard."""
    if shard_bytes < 1:
        raise QingLMError(f"the shard size must be positive, got {shard_bytes}")
    out = Path(out_dir)
    report_name = prefix + REPORT_SUFFIX  # left out when the directory is read as input
    shard_name = re.compile(rf"^{re.escape(prefix)}_\d{{4}}\.jsonl$")
    temps: list[tuple[Path, Path]] = []  # (temp, final)
    try:
        with (
            OwnedDir.claiming(out, KIND, [report_name, LOCK_FILE], overwrite=overwrite) as owned,
            exclusive_lock(out),
        ):
            owned.remove_leftovers()
            (out / report_name).unlink(missing_ok=True)  # the directory is incomplete until it is back
            f, size = None, 0
            try:
                for doc in docs:
                    if f is None or size >= shard_bytes:
                        if f is not None:
                            _close(f)
                        final = out / f"{prefix}_{len(temps):04d}.jsonl"
                        owned.add(final.name)  # before writing: a later run may then replace it
                        temps.append((temp_path(final), final))
                        f, size = open(temps[-1][0], "w", encoding="utf-8", newline="\n"), 0
                    line = json.dumps({"text": doc}, ensure_ascii=False) + "\n"
                    f.write(line)
                    size += len(line.encode("utf-8"))
            finally:
                if f is not None:
                    _close(f)
            for temp, final in temps:
                os.replace(temp, final)
            names = [final.name for _, final in temps]
            for name in sorted(owned.names):  # shards of an earlier, larger run (only QingLM's)
                if shard_name.match(name) and name not in names:
                    owned.delete(name)
            write_json_atomic(out / report_name, {**report(), "shards": names})
            return names
    except OSError as e:  # unwritable directory, full disk
        raise QingLMError(f"cannot write to {out}: {e.strerror or e}") from None
    finally:
        for temp, _ in temps:
            temp.unlink(missing_ok=True)


def _close(f) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()


def drop_table(rows: list[tuple[str, int]], total: int) -> str:
    """Return a text table of (name, documents dropped) with each one's share of `total`."""
    width = max([len(name) for name, _ in rows] + [6])
    lines = [f"{'filter':<{width}} {'dropped':>10} {'share':>7}"]
    for name, n in rows:
        lines.append(f"{name:<{width}} {n:>10,} {100 * n / max(total, 1):>6.2f}%")
    return "\n".join(lines)
