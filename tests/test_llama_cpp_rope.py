"""benchmarks/llama_cpp_rope.py: llama.cpp agrees with QingLM past the original length (linear and YaRN)."""

import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

from benchmarks.llama_cpp_rope import check, long_prompts  # noqa: E402


def test_prompts_are_long_held_out_text():
    prompts = long_prompts(100, count=2)
    assert len(prompts) == 2 and all(90 <= len(p) <= 100 for p in prompts) and prompts[0] != prompts[1]


@pytest.mark.parametrize("kind", ["linear", "yarn"])
def test_llama_cpp_matches_past_the_original_length(tmp_path, kind, capsys):
    assert check(kind, tmp_path, length=32, factor=4, n_tokens=16)
    lines = capsys.readouterr().out.splitlines()[1:]
    assert len(lines) == 3 and all("16/16 tokens equal" in line for line in lines)
    # every prompt runs past the 32 positions the model was "trained" at
    assert all(int(line.split(" ids,")[0].split()[-1]) > 32 for line in lines)
