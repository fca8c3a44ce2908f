"""Broken or hostile config, weights, checkpoint and tokenizer files through the real command line:
one error line and exit status 2 (or, for a resume, one warning line and the previous checkpoint)."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from test_cli import corpus  # noqa: F401  (a fixture)
from test_inputs import TINY, TINY_TRAIN, assert_one_line_error, qinglm, run_cases


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus) -> Path:  # noqa: F811  (corpus: test_cli's fixture)
    """Return a tiny run trained once (4 steps, checkpoints at steps 2 and 4)."""
    from qinglm.pipeline import run_train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    return run_train(dict(TINY), {"data": [str(corpus)], "out": str(out), **TINY_TRAIN}, log=lambda _: None)


def _copy(run: Path, root: Path, name: str, change: Callable[[Path], None]) -> Path:
    """Return a copy of the run (without its data) changed by change."""
    out = root / name
    shutil.copytree(run, out, ignore=shutil.ignore_patterns("data"))
    change(out)
    return out


def _model_field(key: str, value) -> Callable[[Path], None]:
    def change(run: Path) -> None:
        config = json.loads((run / "config.json").read_text())
        config["model"][key] = value
        (run / "config.json").write_text(json.dumps(config))

    return change


def _deep_config(run: Path) -> None:
    (run / "config.json").write_text("[" * 100_000 + "]" * 100_000)


def _nan_weights(run: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    path = run / "best" / "model.safetensors"
    weights = {k: torch.full_like(v, float("nan")) for k, v in load_file(path).items()}
    save_file(weights, path, metadata={"format": "pt"})


def _costly_regex(run: Path) -> None:
    """Give the run a pre-tokenizer regex that backtracks past Oniguruma's retry limit on 'xx...xc'."""
    path = run / "tokenizer" / "tokenizer.json"
    tok = json.loads(path.read_text(encoding="utf-8"))
    tok["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(x+x+)+y"
    path.write_text(json.dumps(tok), encoding="utf-8")


def _train(config: Path, tmp: Path) -> list:
    return ["train", "--config", config, "--data", "unused.txt", "--out", tmp / f"run-{config.stem}"]


def cases(run: Path, tmp: Path) -> dict[str, tuple[list, str]]:
    """Return case name -> (qinglm arguments, fragment the one error line must contain)."""

    def generate(name: str, change: Callable[[Path], None], prompt: str = "中国") -> list:
        return ["generate", "--model", _copy(run, tmp, name, change), "--prompt", prompt]

    def config_file(name: str, raw: bytes) -> Path:
        path = tmp / name
        path.write_bytes(raw)
        return path

    return {
        "d_model_text": (generate("d_model", _model_field("d_model", "128")), "d_model must be an integer"),
        "dropout_text": (generate("dropout", _model_field("dropout", "0.1")), "dropout must be a number"),
        "vocab_size_float": (
            generate("vocab_float", _model_field("vocab_size", 10000.0)),
            "vocab_size must be an integer, got 10000.0",
        ),
        "vocab_size_bool": (generate("vocab_bool", _model_field("vocab_size", True)), "must be an integer"),
        "config_nested_100000_deep": (generate("deep", _deep_config), "maximum recursion depth"),
        "vocab_size_10_12": (generate("huge_vocab", _model_field("vocab_size", 10**12)), "GiB"),
        "max_seq_len_10_10": (generate("huge_context", _model_field("max_seq_len", 10**10)), "GiB"),
        "train_max_seq_len_10_10": (
            ["train", "--data", "unused.txt", "--out", tmp / "huge", "--max-seq-len", 10**10, "--seq-len", 8],
            "max_seq_len 10,000,000,000",
        ),
        "yaml_lr_text": (
            _train(config_file("lr.yaml", b'train:\n  lr: "0.001"\n'), tmp),
            "lr must be a number, got the text '0.001'",
        ),
        "yaml_lr_exponent": (_train(config_file("e.yaml", b"lr: 1e-3\n"), tmp), "write 1.0e-3"),
        "yaml_d_model_list": (
            _train(config_file("dm.yaml", b"d_model: [1, 2]\n"), tmp),
            "d_model must be an integer, got [1, 2]",
        ),
        "yaml_prompts_not_a_list": (
            _train(config_file("p.yaml", b"sample_prompts: 3\n"), tmp),
            "sample_prompts must be a list of strings",
        ),
        "yaml_invalid_utf8": (_train(config_file("u.yaml", b"lr: \xff\xfe\n"), tmp), "is not UTF-8 text"),
        "yaml_model_section_a_list": (
            _train(config_file("m.yaml", b"model: [1, 2]\n"), tmp),
            "'model' section of a config file must be a mapping",
        ),
        "weights_all_nan": (generate("nan", _nan_weights), "non-finite values (NaN or inf)"),
        "pre_tokenizer_regex_retry_limit": (
            generate("regex", _costly_regex, prompt="x" * 60 + "c"),
            "retry-limit-in-match",
        ),
    }


CASES = [
    "d_model_text",
    "dropout_text",
    "vocab_size_float",
    "vocab_size_bool",
    "config_nested_100000_deep",
    "vocab_size_10_12",
    "max_seq_len_10_10",
    "train_max_seq_len_10_10",
    "yaml_lr_text",
    "yaml_lr_exponent",
    "yaml_d_model_list",
    "yaml_prompts_not_a_list",
    "yaml_invalid_utf8",
    "yaml_model_section_a_list",
    "weights_all_nan",
    "pre_tokenizer_regex_retry_limit",
]


@pytest.fixture(scope="module")
def results(tmp_path_factory, run) -> dict:
    """Return case name -> (finished process, expected fragment), the processes run a few at a time."""
    todo = cases(run, tmp_path_factory.mktemp("cases"))
    assert sorted(todo) == sorted(CASES)
    return run_cases(todo)


@pytest.mark.parametrize("case", CASES)
def test_bad_file_is_one_line_and_exit_2(results, case):
    proc, fragment = results[case]
    assert_one_line_error(proc, fragment)


def test_resume_skips_a_trainer_file_that_is_not_weights_only(run, tmp_path):
    """A trainer.pt holding an arbitrary pickle (its state.json updated to match) is never unpickled:
    --resume says so in one warning line and continues from the previous checkpoint."""
    out = _copy(run, tmp_path, "pickled", lambda _: None)
    newest = out / "checkpoints" / "step-00000004"
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Touch(str(marker)))
    (newest / "trainer.pt").write_bytes(payload)
    state = json.loads((newest / "state.json").read_text())
    state["files"]["trainer.pt"] = {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    (newest / "state.json").write_text(json.dumps(state))

    proc = qinglm("train", "--out", out, "--resume", "--max-steps", 6)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not marker.exists()
    warnings = [ln for ln in proc.stderr.splitlines() if "step-00000004" in ln]
    assert len(warnings) == 1, proc.stderr
    assert (
        warnings[0].startswith("qinglm: warning: skipping checkpoint") and "not a weights-only" in warnings[0]
    )
    assert "resuming from" in proc.stdout and "step-00000002 (step 2" in proc.stdout


class _Touch:
    """Unpickling this creates a file: what an unsafe torch.load would do with a hostile trainer.pt."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_failed_allocation_is_a_user_error_where_memory_is_unknown(monkeypatch):
    """Where the OS does not report its memory, the allocation itself fails and says so in one line."""
    import qinglm.memory
    from qinglm.config import ModelConfig
    from qinglm.errors import QingLMError
    from qinglm.model.transformer import Transformer

    monkeypatch.setattr(qinglm.memory, "_memory_bytes", lambda: None)
    cfg = ModelConfig(vocab_size=10**12, d_model=128, n_heads=2, n_layers=1, max_seq_len=64)  # 512 TB
    with pytest.raises(QingLMError, match="allocating it failed") as err:
        with qinglm.memory.allocating(cfg):
            Transformer(cfg)
    assert "\n" not in str(err.value) and "vocab_size 1,000,000,000,000" in str(err.value)
