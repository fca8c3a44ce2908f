"""Every reader of user data bounds a line as the data tools do: a huge line is skipped and counted,
never held whole."""

from __future__ import annotations

import pytest

from benchmarks.huge_line import huge_line_file, read_in_process
from qinglm.data.sources import MAX_LINE_CHARS


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
    kept, skipped, peak_mb = read_in_process(reader, data)
    assert kept == 6
    assert skipped == {f"line longer than {MAX_LINE_CHARS:,} characters": 1}
    assert peak_mb < 1024, f"peak RSS {peak_mb} MB reading a {data.stat().st_size >> 20} MB file"


def test_generate_skips_a_prompt_line_too_long_to_hold(tmp_path, capsys):
    from qinglm.generate_cli import _prompts

    path = tmp_path / "prompts.txt"
    path.write_text("你好\n" + "中" * (MAX_LINE_CHARS + 10) + "\n再见\n", encoding="utf-8")

    class Args:
        prompt, prompts_file = None, str(path)

    assert _prompts(Args) == ["你好", "再见"]
    assert "skipped 1 line(s)" in capsys.readouterr().err
