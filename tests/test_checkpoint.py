"""Checkpoints: atomic step dirs, pruning, corruption detection, tied weights, best/, the metrics file."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from qinglm.config import ModelConfig
from qinglm.errors import QingLMError
from qinglm.io import MANIFEST
from qinglm.model.transformer import Transformer
from qinglm.train.checkpoint import (
    checkpoint_dirs,
    inference_weights,
    latest_checkpoint,
    load_model_weights,
    load_trainer_state,
    rng_state,
    save_best,
    save_checkpoint,
    set_rng_state,
)
from qinglm.train.metrics import MetricsLogger, read_metrics


def tiny(seed: int = 0, vocab: int = 300, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, **kw))


def names(directory) -> list[str]:
    """Return the sorted names in directory, without QingLM's manifest of them."""
    return sorted(p.name for p in directory.iterdir() if p.name != MANIFEST)


def save_steps(run, steps, keep=10):
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for s in steps:
        save_checkpoint(run, s, model, opt, {"step": s, "tokens_seen": 0}, keep=keep)
    return model


def test_save_leaves_no_temp_dirs_and_keeps_the_newest(tmp_path):
    save_steps(tmp_path, [100, 200, 300], keep=2)
    assert names(tmp_path / "checkpoints") == ["step-00000200", "step-00000300"]
    state = json.loads((tmp_path / "checkpoints" / "step-00000300" / "state.json").read_text())
    assert state["step"] == 300 and set(state["files"]) == {"model.safetensors", "trainer.pt"}
    assert (
        state["files"]["model.safetensors"]["bytes"] > 0 and len(state["files"]["trainer.pt"]["sha256"]) == 64
    )


def test_truncated_newest_checkpoint_is_skipped_with_a_warning(tmp_path):
    save_steps(tmp_path, [1, 2])
    newest = tmp_path / "checkpoints" / "step-00000002" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:-100])
    with pytest.warns(UserWarning, match="step 2"):
        assert latest_checkpoint(tmp_path).name == "step-00000001"
    # a flipped byte of the same size is caught by the sha256
    trainer = tmp_path / "checkpoints" / "step-00000001" / "trainer.pt"
    data = bytearray(trainer.read_bytes())
    data[len(data) // 2] ^= 0xFF
    trainer.write_bytes(bytes(data))
    with pytest.warns(UserWarning) as caught:
        assert latest_checkpoint(tmp_path) is None
    assert any("step 1" in str(w.message) and "sha256" in str(w.message) for w in caught)


def test_directory_without_state_json_is_incomplete(tmp_path):
    save_steps(tmp_path, [1, 2])
    (tmp_path / "checkpoints" / "step-00000002" / "state.json").unlink()
    with pytest.warns(UserWarning):
        assert latest_checkpoint(tmp_path).name == "step-00000001"
    assert [s for s, _ in checkpoint_dirs(tmp_path)] == [1, 2]


def test_resaving_a_step_replaces_it(tmp_path):
    save_steps(tmp_path, [5, 5])
    assert names(tmp_path / "checkpoints") == ["step-00000005"]
    assert latest_checkpoint(tmp_path).name == "step-00000005"


@pytest.mark.parametrize("tie", [True, False])
def test_weights_round_trip_and_a_tied_head_is_stored_once(tmp_path, tie):
    model = tiny(tie_embeddings=tie)
    save_checkpoint(tmp_path, 1, model, torch.optim.AdamW(model.parameters()), {}, keep=1)
    stored = load_file(tmp_path / "checkpoints" / "step-00000001" / "model.safetensors")
    assert ("head.weight" in stored) is not tie and "embed.weight" in stored
    fresh = tiny(seed=1, tie_embeddings=tie)
    load_model_weights(fresh, tmp_path / "checkpoints" / "step-00000001")
    for (n, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), n
    if tie:
        assert fresh.head.weight is fresh.embed.weight  # still one tensor after loading


def test_load_model_weights_refuses_garbage_truncation_and_other_configs(tmp_path):
    model = tiny()
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all" * 10)
    with pytest.raises(QingLMError, match="truncated or corrupt"):
        load_model_weights(model, garbage)
    with pytest.raises(QingLMError, match="no model weights"):
        load_model_weights(model, tmp_path / "missing.safetensors")
    save_best(tmp_path / "run", model, {"step": 1})
    best = tmp_path / "run" / "best" / "model.safetensors"
    with pytest.raises(QingLMError, match="different model config or tokenizer"):
        load_model_weights(tiny(vocab=400), best)
    with pytest.raises(QingLMError, match="different model config"):
        load_model_weights(tiny(tie_embeddings=False), best)  # no head.weight in the file
    best.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    with pytest.raises(QingLMError, match="truncated or corrupt"):
        load_model_weights(model, best)


def test_save_best_replaces_atomically_and_inference_weights_prefers_it(tmp_path):
    with pytest.raises(QingLMError, match="train first"):
        inference_weights(tmp_path)
    save_steps(tmp_path, [3])
    assert inference_weights(tmp_path) == tmp_path / "checkpoints" / "step-00000003" / "model.safetensors"
    save_best(tmp_path, tiny(seed=1), {"step": 1, "val_loss": 3.0})
    save_best(tmp_path, tiny(seed=2), {"step": 2, "val_loss": 2.0})
    assert names(tmp_path) == ["best", "checkpoints"]
    assert json.loads((tmp_path / "best" / "state.json").read_text())["step"] == 2
    assert inference_weights(tmp_path) == tmp_path / "best" / "model.safetensors"
    # a crash between the two renames leaves only best.old-PID: it is still used
    (tmp_path / "best").rename(tmp_path / "best.old-123")
    assert inference_weights(tmp_path) == tmp_path / "best.old-123" / "model.safetensors"
    save_best(tmp_path, tiny(seed=3), {"step": 3})
    assert names(tmp_path) == ["best", "checkpoints"]


def test_trainer_state_restores_optimizer_and_every_rng(tmp_path):
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)).backward()
    opt.step()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    ckpt = save_checkpoint(tmp_path, 1, model, opt, {}, keep=1)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    trainer = load_trainer_state(ckpt)  # weights_only=True: nothing but tensors and plain containers
    set_rng_state(trainer["rng"])
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])
    opt2 = torch.optim.AdamW(tiny().parameters(), lr=1e-3)
    opt2.load_state_dict(trainer["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert set(rng_state()) >= {"torch", "python", "numpy"}


def test_metrics_log_appends_lines_and_resume_drops_later_steps(tmp_path):
    m = MetricsLogger(tmp_path)
    for s in (10, 20, 30):
        m.log("train", step=s, loss=float(s), lr=1e-3)
    m.log("val", step=20, val_loss=float("nan"))
    m.close()
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"kind": "train", "step": 40, "lo')  # a line cut short by a crash
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [10, 20, 30, 20] and records[-1]["val_loss"] is None
    m = MetricsLogger(tmp_path)
    m.truncate_after(20)
    m.log("train", step=30, loss=1.0, lr=1e-3)
    m.close()
    assert [(r["kind"], r["step"]) for r in read_metrics(tmp_path)] == [
        ("train", 10),
        ("train", 20),
        ("val", 20),
        ("train", 30),
    ]
    assert not list(tmp_path.glob("*.tmp-*"))
