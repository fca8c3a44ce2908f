"""`qinglm experiment init`: one run per initialisation on the same data and budget, a PNG and a table."""

import json
from pathlib import Path

from test_cli import TINY, corpus, qinglm  # noqa: F401  (corpus is a fixture)


def test_experiment_init_trains_each_init_and_writes_png_and_table(corpus, tmp_path):  # noqa: F811
    out = tmp_path / "exp"
    proc = qinglm(
        "experiment", "init", "--inits", "default", "small", "--data", corpus, "--out", out,
        "--max-steps", 4, "--eval-every", 2, "--log-every", 2, *TINY,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    table = (out / "results.md").read_text()
    assert "| default |" in table and "| small |" in table and "| gpt2 |" not in table
    png = out / "init_comparison.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    configs = [json.loads((out / f"init-{n}" / "config.json").read_text()) for n in ("default", "small")]
    assert [c["model"]["init"] for c in configs] == ["default", "small"]
    # the second run reused the first run's tokenizer and shards: only the init differs
    assert configs[1]["data_dir"] == str(out / "init-default" / "data")
    a, b = ({k: v for k, v in c["model"].items() if k != "init"} for c in configs)
    assert a == b
    assert Path(configs[1]["train"]["tokenizer"]) == out / "init-default" / "tokenizer"


def test_experiment_init_on_a_prepared_data_directory_reuses_it_for_every_run(phrase_corpus, tmp_path):
    data, tokenizer, _ = phrase_corpus
    out = tmp_path / "exp"
    proc = qinglm(
        "experiment", "init", "--inits", "default", "small", "gpt2", "--data", data, "--tokenizer", tokenizer,
        "--out", out, "--max-steps", 2, "--eval-every", 2, "--log-every", 1, *TINY,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    configs = [
        json.loads((out / f"init-{n}" / "config.json").read_text()) for n in ("default", "small", "gpt2")
    ]
    assert [c["data_dir"] for c in configs] == [str(data)] * 3
    assert not (out / "init-default" / "data").exists()  # nothing was prepared again
