"""The SFT run: full fine-tuning or LoRA of a pretrained run, written as an ordinary run directory.

RUN2 gets config.json ({"model", "sft", "base"}), tokenizer/, metrics.jsonl and checkpoints/step-N/
(the full weights; after LoRA the merged ones), so qinglm.load, generate, eval and the exporter work
on it unchanged. A LoRA run also writes RUN2/adapter/ in PEFT's format.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qinglm import run_dir as run_dirs
from qinglm.errors import QingLMError
from qinglm.model.lora import merge_lora
from qinglm.sft.config import SFTConfig
from qinglm.sft.prep import assistant_loss, load_conversations, load_examples, resolve_sft, resolve_tuning  # noqa: F401


def _refuse_a_run(out: Path) -> None:
    """Return nothing; raise QingLMError if out already holds a run (a new run never replaces one)."""
    if run_dirs.holds_run(out):
        raise QingLMError(f"{out} already holds a run; choose another --out")


def run_sft(
    cfg: SFTConfig, log: Callable[[str], None] = print, flags: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Return the run's figures (losses before/after, time per epoch, trainable parameters, ...) after SFT
    on the training engine. flags: the command-line fields given (for a --nproc launch)."""
    from qinglm.sft.stage import SFTStage
    from qinglm.train.driver import run_stage_command

    cfg = resolve_sft(cfg, run_dirs.model_config(cfg.base).max_seq_len if cfg.base else 0)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    res = run_stage_command("sft", "sft", cfg, flags or {}, lambda: SFTStage(cfg, log), log)
    if not res:  # the torchrun launcher: its workers trained
        return res
    steps = res["step"]
    per_epoch = res.get("steps_per_epoch") or steps
    res.update(
        checkpoint=res["checkpoint"],
        steps=steps,
        train_s=res["elapsed_s"],
        # A finished epoch is timed directly; a shorter run extrapolates its step time to a whole epoch.
        time_per_epoch_s=res["elapsed_s"] * per_epoch / max(steps, 1),
        time_per_epoch_measured=steps >= per_epoch,
    )
    log(f"wrote {res['checkpoint']}" + (f" and {Path(cfg.out) / 'adapter'}" if cfg.lora else ""))
    return res


def merge_run(
    adapter: str | Path,
    out: str | Path,
    base: str | Path | None = None,
    device: str = "cpu",
    overwrite: bool = False,
) -> Path:
    """Return the run directory out after writing base + adapter merged into plain weights (out/best).

    adapter is a PEFT LoRA directory or an SFT run holding adapter/; base defaults to the adapter's
    base_model_name_or_path. out gets config.json, tokenizer/ and best/model.safetensors.
    """
    import qinglm
    from qinglm.model.lora import load_adapter, read_adapter_config
    from qinglm.train.checkpoint import save_run

    adapter = Path(adapter)
    if (adapter / "adapter").is_dir():
        adapter = adapter / "adapter"
    base = base or read_adapter_config(adapter).get("base_model_name_or_path")
    if not base:
        raise QingLMError(f"{adapter} does not name its base run; pass --base RUN")
    out = Path(out)
    _refuse_a_run(out)  # before the slow part
    lm = qinglm.load(base, device=device)
    model = merge_lora(load_adapter(lm.model, adapter))
    merged = {"merged_from": {"base": str(base), "adapter": str(adapter)}}
    return save_run(out, model, lm.tokenizer, merged, merged, kind="merge", overwrite=overwrite)
