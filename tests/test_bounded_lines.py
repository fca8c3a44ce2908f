"""Every reader of user data bounds a line as the data tools do: a huge line is skipped and counted,
never held whole."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qinglm.data.sources import MAX_LINE_CHARS

READ = """
import resource, sys
from qinglm.post.dpo_data import read_dpo_jsonl
from qinglm.sft.data import read_sft_jsonl
items, report = {"dpo": read_dpo_jsonl, "sft": read_sft_jsonl}[sys.argv[1]](sys.argv[2])
print(len(items), dict(report.skipped), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
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


@pytest.mark.parametrize(
    "reader, normal, huge, field, chars",
    [
        # the DPO file: a 90 MB line took 10 GB and more than two minutes
        ("dpo", {"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "", "rejected": "b"},
         "chosen", 30 << 20),
        ("sft", {"instruction": "问", "output": "答"}, {"instruction": "问", "output": ""}, "output",
         MAX_LINE_CHARS + (1 << 20)),
    ],
)  # fmt: skip
def test_a_huge_line_is_skipped_and_counted_in_bounded_memory(tmp_path, reader, normal, huge, field, chars):
    data = huge_line_file(tmp_path / "data.jsonl", normal, huge, field, chars)
    out = subprocess.run(
        [sys.executable, "-c", READ, reader, str(data)], capture_output=True, text=True, check=True
    ).stdout.split(maxsplit=1)
    kept, rest = int(out[0]), out[1]
    skipped, peak_mb = rest.rsplit(maxsplit=1)
    assert kept == 6
    assert eval(skipped) == {f"line longer than {MAX_LINE_CHARS:,} characters": 1}
    assert int(peak_mb) < 1024, f"peak RSS {peak_mb} MB reading a {data.stat().st_size >> 20} MB file"


def test_generate_skips_a_prompt_line_too_long_to_hold(tmp_path, capsys):
    from qinglm.generate_cli import _prompts

    path = tmp_path / "prompts.txt"
    path.write_text("你好\n" + "中" * (MAX_LINE_CHARS + 10) + "\n再见\n", encoding="utf-8")

    class Args:
        prompt, prompts_file = None, str(path)

    assert _prompts(Args) == ["你好", "再见"]
    assert "skipped 1 line(s)" in capsys.readouterr().err
