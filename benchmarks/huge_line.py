"""One huge line in SFT/DPO data: the reader's peak RSS and time, the huge row skipped and counted.

    python -m benchmarks.huge_line [--mb 90]

Writes a DPO file of 3 normal pairs, one pair whose "chosen" holds MB/3 million 中 (the issue's 90 MB
line by default), and 3 more; reads it in a fresh process (qinglm.post.dpo_data.read_dpo_jsonl) and
prints what was kept and skipped, the peak RSS (VmHWM) and the wall time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Peak RSS is this process's VmHWM: ru_maxrss keeps the parent's RSS at fork across exec (Linux), so a
# reader started from a 1 GB pytest process would report 1 GB.
READ = """
import json, resource, sys
from qinglm.post.dpo_data import read_dpo_jsonl
from qinglm.sft.data import read_sft_jsonl
items, report = {"dpo": read_dpo_jsonl, "sft": read_sft_jsonl}[sys.argv[1]](sys.argv[2])
try:
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) // 1024
except OSError:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
print(json.dumps([len(items), report.skipped, peak]))
"""


def huge_line_file(path: Path, normal: dict, huge: dict, field: str, chars: int) -> Path:
    """Write 3 normal rows, one row whose `field` holds `chars` times 中 (written in pieces), 3 more."""
    head, tail = json.dumps(huge, ensure_ascii=False).split(f'"{field}": ""')
    row = json.dumps(normal, ensure_ascii=False) + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(row * 3 + head + f'"{field}": "')
        for _ in range(chars // (1 << 20)):
            f.write("中" * (1 << 20))
        f.write('"' + tail + "\n" + row * 3)
    return path


def read_in_process(reader: str, path: Path) -> tuple[int, dict, int]:
    """Return (rows kept, skipped reasons, peak RSS in MB) of reading path in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-c", READ, reader, str(path)], capture_output=True, text=True, check=True
    ).stdout
    kept, skipped, peak_mb = json.loads(out)
    return kept, skipped, peak_mb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=90, help="size of the huge line in MB (3 bytes per 中)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pair = {"prompt": "p", "chosen": "a", "rejected": "b"}
        path = huge_line_file(
            Path(tmp) / "dpo.jsonl", pair, {**pair, "chosen": ""}, "chosen", (args.mb << 20) // 3
        )
        t = time.perf_counter()
        kept, skipped, peak = read_in_process("dpo", path)
        print(
            f"{path.stat().st_size >> 20} MB file: kept {kept}, skipped {skipped}, peak RSS {peak} MB, "
            f"{time.perf_counter() - t:.1f} s"
        )


if __name__ == "__main__":
    main()
