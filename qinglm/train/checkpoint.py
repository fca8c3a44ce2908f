"""Checkpoints in a run directory: step checkpoints, the best weights, and finding/loading them safely.

RUN/checkpoints/step-00000200/ holds model.safetensors, trainer.pt (optimizer + RNG states) and
state.json, written last, with the size and sha256 of the other two: a directory whose files do not
match its state.json is incomplete or corrupt and is skipped. Every directory is written as
NAME.tmp-<pid> and renamed into place, so a reader never sees a half-written one under its real name.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from qinglm.errors import QingLMError
from qinglm.io import OwnedDir
from qinglm.run_dir import claim as claim_run

MODEL_FILE, TRAINER_FILE, STATE_FILE = "model.safetensors", "trainer.pt", "state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


# ---------------------------------------------------------------------------- small file helpers


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile wraps the module; its weights are the same


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _json_default(v: Any) -> Any:
    if hasattr(v, "item"):  # numpy / torch scalars from a loader state
        return v.item()
    if hasattr(v, "tolist"):
        return v.tolist()
    raise TypeError(f"cannot store {type(v).__name__} in state.json")


def _file_record(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def _write_state(directory: Path, state: dict[str, Any], files: list[str]) -> None:
    """Return nothing; write state.json (with the size/sha256 of `files`) last, so it marks the directory complete."""
    full = {**state, "files": {name: _file_record(directory / name) for name in files}}
    _fsync_write(directory / STATE_FILE, json.dumps(full, indent=2, default=_json_default).encode("utf-8"))


def _swap_into_place(tmp: Path, final: Path) -> None:
    """Return nothing; rename directory tmp to final; an existing final is moved aside first and deleted after.

    The caller owns final's name (its directory's manifest lists it), and so NAME.old-PID.
    """
    old = final.with_name(f"{final.name}.old-{os.getpid()}")
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _write_error(e: OSError, tmp: Path, what: str, run_dir: str | Path) -> QingLMError:
    """Return the user error for a failed checkpoint write, after deleting the half-written tmp directory."""
    shutil.rmtree(tmp, ignore_errors=True)
    return QingLMError(
        f"cannot write {what}: {e.strerror or e}; the previous checkpoints are kept - free disk space, "
        f"then continue with: qinglm train --out {run_dir} --resume"
    )


# ---------------------------------------------------------------------------- weights


def _storage_key(name: str, t: torch.Tensor) -> tuple:
    """Return what identifies t's memory: equal keys are one shared tensor under two names."""
    if t.numel() == 0:
        return (name,)  # empty tensors may all report data_ptr 0; never treat them as shared
    return (t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())


def _canonical_names(model: nn.Module) -> dict[str, str]:
    """Return state_dict name -> the first name holding the same tensor (itself unless it is an alias)."""
    first: dict[tuple, str] = {}
    return {name: first.setdefault(_storage_key(name, t), name) for name, t in model.state_dict().items()}


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return the state_dict with each shared tensor once (a tied head is stored as embed.weight only)."""
    model = _unwrap(model)
    sd = model.state_dict()
    return {
        name: sd[name].detach().cpu().contiguous()
        for name, canon in _canonical_names(model).items()
        if name == canon
    }


def save_model_file(model: nn.Module | dict[str, torch.Tensor], path: str | Path) -> None:
    """Return nothing; write model's weights (shared tensors once) to a safetensors file at path, fsynced.

    model may also be the tensors themselves, e.g. the gathered weights of a sharded (FSDP) model.
    """
    from safetensors.torch import save

    tensors = model if isinstance(model, dict) else model_tensors(model)
    _fsync_write(Path(path), save(tensors, metadata={"format": "pt"}))


def load_model_weights(model: nn.Module, path: str | Path) -> None:
    """Return nothing; load a safetensors file (or DIR/model.safetensors) into model.

    Raises QingLMError for a missing, truncated or foreign file, one of another config/tokenizer, or
    one holding NaN or inf.
    """
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_dir():
        p = p / MODEL_FILE
    if not p.is_file():
        raise QingLMError(f"no model weights at {p}; check the path or train first")
    try:
        loaded = load_file(p, device="cpu")
    except Exception as e:  # SafetensorError, OSError: a truncated, empty or foreign file
        raise QingLMError(
            f"cannot read {p} as safetensors weights ({str(e).splitlines()[0] if str(e) else e!r}); "
            "the file is truncated or corrupt - use another checkpoint"
        ) from None
    model = _unwrap(model)
    expected = model.state_dict()
    alias_of = _canonical_names(model)  # head.weight of a tied model takes embed.weight's value
    canonical = sorted(set(alias_of.values()))
    missing = sorted(set(canonical) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    if missing or unexpected:
        detail = f"missing {', '.join(missing[:3])}" if missing else f"unexpected {', '.join(unexpected[:3])}"
        raise QingLMError(
            f"{p} belongs to a different model config ({detail}); "
            "load it with the config.json of the run that wrote it"
        )
    for name in canonical:
        if tuple(loaded[name].shape) != tuple(expected[name].shape):
            raise QingLMError(
                f"{p} belongs to a different model config or tokenizer: {name} is "
                f"{tuple(loaded[name].shape)} in the file but {tuple(expected[name].shape)} in this model"
            )
    broken = [
        name for name in canonical if loaded[name].is_floating_point() and not loaded[name].isfinite().all()
    ]
    if broken:
        raise QingLMError(
            f"{p} holds non-finite values (NaN or inf) in {', '.join(broken[:3])}; the run diverged or "
            "the file is damaged - use an earlier checkpoint"
        )
    model.load_state_dict({name: loaded[alias_of[name]] for name in expected}, strict=True)


# ---------------------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    """Return the torch (CPU and CUDA), python and numpy RNG states in a weights_only-loadable form."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Return nothing; restore the RNG states returned by rng_state()."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------- step checkpoints


def checkpoint_dirs(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Return (step, path) of every RUN/checkpoints/step-* directory, oldest first (complete or not)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module | dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | dict[str, Any],
    state: dict[str, Any],
    keep: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Return RUN/checkpoints/step-NNNNNNNN after writing weights, trainer.pt and state.json there.

    trainer.pt holds the optimizer state, the current RNG states and `extra` (e.g. a GradScaler's
    state). Only the newest `keep` (at least 1) step checkpoints are kept. model and optimizer may be
    given as their weights and state dict (what a sharded run gathers).
    """
    claim_run(run_dir)  # refuses a directory that is not QingLM's
    final = Path(run_dir) / "checkpoints" / f"step-{step:08d}"
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    try:
        root = OwnedDir.claim(final.parent, "checkpoints", [final.name])
        root.remove_leftovers()  # NAME.tmp-PID / NAME.old-PID of a killed writer
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_model_file(model, tmp / MODEL_FILE)
        optim_state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
        torch.save({"optimizer": optim_state, "rng": rng_state(), **(extra or {})}, tmp / TRAINER_FILE)
        _write_state(tmp, {**state, "step": step}, [MODEL_FILE, TRAINER_FILE])
        _swap_into_place(tmp, final)
    except OSError as e:  # a full disk, a quota, a vanished mount: earlier checkpoints are untouched
        raise _write_error(e, tmp, f"checkpoint {final}", run_dir) from None
    for _, old in checkpoint_dirs(run_dir)[: -max(1, keep)]:
        root.delete(old.name)  # only step directories QingLM wrote
    return final


def verify_checkpoint(directory: str | Path) -> dict[str, Any]:
    """Return the state.json of a checkpoint directory whose files match it; raise ValueError saying why not."""
    d = Path(directory)
    try:
        state = json.loads((d / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"no readable {STATE_FILE} ({e.__class__.__name__})") from None
    files = state.get("files")
    if not isinstance(files, dict) or not files:
        raise ValueError(f"{STATE_FILE} lists no files")
    for name, want in files.items():
        p = d / name
        if not p.is_file():
            raise ValueError(f"{name} is missing")
        if p.stat().st_size != want.get("bytes"):
            raise ValueError(
                f"{name} has {p.stat().st_size} bytes, expected {want.get('bytes')} (truncated?)"
            )
        if _file_record(p)["sha256"] != want.get("sha256"):
            raise ValueError(f"{name} does not match its sha256 (corrupt)")
    return state


def latest_checkpoint(run_dir: str | Path, check: Callable[[Path], Any] = verify_checkpoint) -> Path | None:
    """Return the highest-step checkpoint directory that passes check (raising ValueError when it does not),
    warning about and skipping the ones that fail; or None."""
    for step, d in reversed(checkpoint_dirs(run_dir)):
        try:
            check(d)
        except ValueError as e:
            warnings.warn(f"skipping checkpoint {d} (step {step}): {e}", stacklevel=2)
            continue
        return d
    return None


def read_state(directory: str | Path) -> dict[str, Any]:
    """Return the state.json of a checkpoint (or best) directory."""
    return json.loads((Path(directory) / STATE_FILE).read_text(encoding="utf-8"))


def load_trainer_state(directory: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Return trainer.pt of a checkpoint directory (optimizer, rng, extras), loaded with weights_only=True.

    Raises ValueError when it is not a weights-only checkpoint: it is never unpickled.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about the pickle protocol of foreign files
            trainer = torch.load(Path(directory) / TRAINER_FILE, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError):  # RuntimeError: a damaged zip archive
        raise ValueError(
            f"{TRAINER_FILE} is not a weights-only checkpoint; refusing to unpickle it"
        ) from None
    if not isinstance(trainer, dict) or not {"optimizer", "rng"} <= set(trainer):
        raise ValueError(f"{TRAINER_FILE} does not hold an optimizer and RNG state")
    return trainer


# ---------------------------------------------------------------------------- best weights and inference


def save_best(run_dir: str | Path, model: nn.Module | dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
    """Return RUN/best after replacing it with model's weights and state.json.

    Written as best.tmp-PID, then the old best is renamed to best.old-PID, the new one into place,
    and the old one deleted. A crash between the two renames leaves no `best` but a complete
    best.old-PID, which inference_weights() falls back to; the next save_best cleans it up.
    """
    run_dir = Path(run_dir)
    owned = claim_run(run_dir)
    owned.remove_leftovers()  # best.tmp-PID of a killed writer (best.old-PID stays while best is missing)
    final = run_dir / "best"
    tmp = run_dir / f"best.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_model_file(model, tmp / MODEL_FILE)
        _write_state(tmp, state, [MODEL_FILE])
        _swap_into_place(tmp, final)
    except OSError as e:
        raise _write_error(e, tmp, f"best weights {final}", run_dir) from None
    owned.remove_leftovers()  # now a killed writer's best.old-PID too
    return final


def inference_weights(run_dir: str | Path) -> Path:
    """Return the weights file to generate with: RUN/best, else the latest complete checkpoint's."""
    run_dir = Path(run_dir)
    best = run_dir / "best" / MODEL_FILE
    if best.is_file():
        return best
    old = sorted(run_dir.glob(f"best.old-*/{MODEL_FILE}"))
    if old:
        return old[-1]
    latest = latest_checkpoint(run_dir)
    if latest is not None:
        return latest / MODEL_FILE
    raise QingLMError(f"no weights in {run_dir}; train first (qinglm train --out {run_dir})")


def save_run(
    run_dir: str | Path,
    model: nn.Module,
    tokenizer: Any,
    extra_config: dict[str, Any] | None = None,
    state: dict[str, Any] | None = None,
    chat_template: str | None = None,
    kind: str = "import",
    overwrite: bool = False,
) -> Path:
    """Return run_dir after writing a run directory without training: what qinglm.load reads.

    tokenizer/ (with chat_template, default QingLM's), config.json ({"kind": kind, "model": model.cfg,
    **extra_config}) and best/ (the weights + state). Used by import, LoRA merging and tests.
    """
    from qinglm.config import to_dict
    from qinglm.run_dir import holds_run, write_config, writing
    from qinglm.tokenizer import CHAT_TEMPLATE

    run_dir = Path(run_dir)
    if holds_run(run_dir):
        raise QingLMError(f"{run_dir} already holds a run; write to a new directory")
    with writing(run_dir, overwrite):
        tokenizer.save(
            run_dir / "tokenizer",
            model_max_length=model.cfg.max_seq_len,
            chat_template=chat_template or CHAT_TEMPLATE,
        )
        write_config(run_dir, kind, {"model": to_dict(model.cfg), **(extra_config or {})})
        save_best(run_dir, model, state or {"step": 0})
    return run_dir
