"""The end-to-end job behind `qinglm train`: text → tokenizer → packed shards → pretraining → report.

Each stage is also its own subcommand (`qinglm tokenizer train`, `qinglm prepare`); this module
only strings them together and keeps the run directory self-contained, so that
`qinglm train --out RUN --resume` needs nothing but RUN.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from qinglm import run_dir as run_dirs
from qinglm.config import ModelConfig, from_dict, load_config_file, preset_model, resolve_model, to_dict
from qinglm.errors import QingLMError
from qinglm.train.config import DEFAULT_MAX_EPOCHS, TrainConfig, check_train, split_sections
from qinglm.train.driver import launch_torchrun, raise_if_interrupted, write_report
from qinglm.train.support import check_supported

DEFAULT_MAX_TIME = 8.0  # minutes: the README's main job fits in 15 minutes on 2 CPU cores
# ... or DEFAULT_MAX_EPOCHS passes (qinglm.train.config), whichever comes first (a GPU gets there in a minute)


# ---------------------------------------------------------------------------- documents


def iter_documents(specs: list[str], split: str, cfg: TrainConfig, stats: Any = None) -> Iterator[str]:
    """Yield the documents of one split ("train" | "val" | "all") of built-in corpora and/or files."""
    from qinglm.data.corpus import labelled_documents

    for label, doc in labelled_documents(specs, cfg, stats):
        if split in ("all", label):
            yield doc


def is_prepared(path: str | Path) -> bool:
    return (Path(path) / "index.json").is_file()


def data_name(specs: list[str]) -> str:
    first = Path(specs[0]).stem or "data"
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in first)[:40]


# ---------------------------------------------------------------------------- stages


def train_tokenizer_on(
    specs: list[str], vocab_size: int, out_dir: Path, cfg: TrainConfig, log: Callable[[str], None] = print
):
    """Train a byte-level BPE tokenizer on an even sample of the train split (cfg.tokenizer_sample_bytes),
    save it, print chars/token on val; return it."""
    from qinglm.data.mix import source_specs
    from qinglm.data.sample import SampleStats, corpus_bytes, sample_documents
    from qinglm.data.sources import ReadStats
    from qinglm.tokenizer import chars_per_token, train_tokenizer

    t0 = time.time()
    specs = source_specs(specs)  # a mixture's tokenizer learns from all its sources, unweighted
    stats, sample = ReadStats(), SampleStats()
    docs = iter_documents(specs, "train", cfg, stats)
    tok = train_tokenizer(
        sample_documents(docs, corpus_bytes(specs), cfg.tokenizer_sample_bytes, sample),
        vocab_size,
        split=cfg.pre_tokenizer,
    )
    if stats.files:
        log(stats.summary())
    log(sample.summary())
    tok.save(out_dir)
    val = list(_take(iter_documents(specs, "val", cfg), 2000))
    cpt = chars_per_token(tok, val) if val else float("nan")
    log(
        f"tokenizer: vocab {tok.vocab_size:,}, {cpt:.3f} characters/token on held-out text, "
        f"trained in {time.time() - t0:.1f}s -> {out_dir}"
    )
    return tok


def prepare_data(
    specs: list[str],
    tokenizer,
    out_dir: Path,
    cfg: TrainConfig,
    log: Callable[[str], None] = print,
    overwrite: bool = False,
) -> dict:
    """Tokenize the train and val splits into packed shards under out_dir, streaming (bounded memory,
    reading overlapped with tokenizing on every core); return the index.

    out_dir may hold only earlier prepared data (or anything, with overwrite): see prepare_stream.
    A mixture's sources each get their own train split (data/mix.py) and share the val split.
    """
    from qinglm.data.corpus import describe_split, labelled_documents
    from qinglm.data.mix import parse_mixture
    from qinglm.data.shards import prepare_stream
    from qinglm.data.sources import ReadStats

    t0 = time.time()
    stats = ReadStats()
    mix = parse_mixture(specs)
    groups = [([s], name) for s, name in zip(mix.sources, mix.splits)] if mix else [(specs, "train")]
    labelled = (  # one pass: each document goes to its split
        (name if split == "train" else split, doc)
        for group, name in groups
        for split, doc in labelled_documents(group, cfg, stats)
    )
    trains = [name for _, name in groups]
    index = prepare_stream(labelled, [*trains, "val"], tokenizer, out_dir, overwrite=overwrite)
    if stats.files:
        log(stats.summary())
    sp = index["splits"]
    n_docs, n_tokens = (sum(sp[t][key] for t in trains) for key in ("documents", "tokens"))
    log(
        f"prepared {n_docs:,} train / {sp['val']['documents']:,} val documents, "
        f"{n_tokens:,} / {sp['val']['tokens']:,} tokens in {time.time() - t0:.1f}s -> {out_dir} "
        f"({describe_split(mix.sources if mix else specs, cfg)})"
    )
    return index


def _take(it, n):
    for i, x in enumerate(it):
        if i >= n:
            return
        yield x


# ---------------------------------------------------------------------------- configs


def build_configs(
    model_flags: dict[str, Any],
    train_flags: dict[str, Any],
    config_file: str | None = None,
    cls: type = TrainConfig,
    log: Callable[[str], None] = print,
) -> tuple[ModelConfig, TrainConfig]:
    """Merge defaults ← preset ← --budget's choice ← config file ← flags into (ModelConfig, TrainConfig or a
    subclass)."""
    file_model, file_train = split_sections(load_config_file(config_file)) if config_file else ({}, {})
    train = from_dict(cls, {**file_train, **train_flags}, "train config")
    planned: dict[str, Any] = {}
    if getattr(train, "budget", None):
        from qinglm.train.budget_run import budget_fields

        planned, planned_train = budget_fields(
            train, {*file_train, *train_flags, *file_model, *model_flags}, log
        )
        train = from_dict(cls, {**planned_train, **file_train, **train_flags}, "train config")
    model = from_dict(
        ModelConfig, {**preset_model(train.preset), **planned, **file_model, **model_flags}, "model config"
    )
    if train.max_steps is None and train.max_time is None and train.num_epochs is None:
        train.max_time, train.num_epochs = DEFAULT_MAX_TIME, DEFAULT_MAX_EPOCHS
    return model, train


# job -> (command, config.json section); the kind of run each writes is the job
JOBS: dict[str, tuple[str, str]] = {"pretrain": ("train", "train"), "distill": ("distill", "distill")}


def _job_config(job: str) -> type:
    if job == "distill":
        from qinglm.post.config import DistillConfig

        return DistillConfig
    return TrainConfig


def read_run_config(run_dir: Path, job: str = "pretrain") -> tuple[ModelConfig, TrainConfig]:
    """Return the configs of a pretraining (or distillation) run, the run `--resume` continues."""
    section = JOBS[job][1]
    d = run_dirs.read_config(run_dir)
    if d["kind"] != job or not isinstance(d.get(section), dict):
        raise QingLMError(f"{run_dir} is a {d['kind']} run, not a {job} run; choose another --out")
    return from_dict(ModelConfig, d["model"], "model config"), from_dict(
        _job_config(job), d[section], f"{section} config"
    )


def default_out(train: TrainConfig) -> str:
    return os.path.join("runs", f"{time.strftime('%Y%m%d-%H%M%S')}-{train.preset}-{data_name(train.data)}")


# ---------------------------------------------------------------------------- the job


def run_train(
    model_flags: dict[str, Any],
    train_flags: dict[str, Any],
    config_file: str | None = None,
    log: Callable[[str], None] = print,
    job: str = "pretrain",
) -> Path:
    """Run the whole pretraining (or distillation) job and print the report; return the run directory."""
    with contextlib.ExitStack() as held:  # the run directory's lock, once taken
        return _run_train(model_flags, train_flags, config_file, log, held, job)


def _run_train(
    model_flags: dict[str, Any],
    train_flags: dict[str, Any],
    config_file: str | None,
    log: Callable[[str], None],
    held: contextlib.ExitStack,
    job: str = "pretrain",
) -> Path:
    command, section = JOBS[job]
    out = train_flags.get("out")
    resuming = bool(train_flags.get("resume") and out and (Path(out) / "config.json").is_file())
    if resuming:
        run_dir = Path(out)
        model_cfg, train_cfg = read_run_config(run_dir, job)
        changed = [k for k in model_flags if model_flags[k] != getattr(model_cfg, k)]
        if changed:
            raise QingLMError(f"cannot change model field(s) {', '.join(changed)} when resuming {run_dir}")
        train_cfg = dataclasses.replace(train_cfg, **{k: v for k, v in train_flags.items()})
    else:
        model_cfg, train_cfg = build_configs(model_flags, train_flags, config_file, _job_config(job), log)
        if job == "distill":
            from qinglm.post.distill import check_teacher

            train_cfg.tokenizer = str(check_teacher(train_cfg))
        if train_cfg.init_from:
            model_cfg, train_cfg = _from_base(model_cfg, train_cfg, model_flags)
        run_dir = Path(train_cfg.out or default_out(train_cfg))
        train_cfg.out = str(run_dir)
    check_train(train_cfg, resolve_model(model_cfg))  # fail before any slow work
    check_supported(job, train_cfg)  # and before any process starts
    if train_cfg.fp8:
        check_fp8(train_cfg)
    from qinglm.memory import check_fits, logits_bytes

    rows, tokens = train_cfg.batch_size, train_cfg.seq_len
    batch = f"a micro-batch of --batch-size {rows:,} x --seq-len {tokens:,} tokens"
    check_fits(model_cfg, logits_bytes(resolve_model(model_cfg), rows, tokens), batch)  # fails now, not later
    # Refuses a directory QingLM did not write (unless --overwrite) and one another process writes to.
    held.enter_context(run_dirs.writing(run_dir, train_cfg.overwrite, job))
    if train_cfg.nproc and "RANK" not in os.environ:  # --nproc N: this process becomes the launcher
        launch_torchrun(
            command,
            train_cfg.nproc,
            {**model_flags, **train_flags, "out": str(run_dir)},
            config_file,
            device=train_cfg.device,
        )
        return run_dir

    from qinglm.data.mix import mixture_record
    from qinglm.device import resolve_device
    from qinglm.train import distributed
    from qinglm.train.loop import train_stage

    dist = distributed.init(resolve_device(train_cfg.device), train_cfg.parallel)
    with distributed.group(dist):
        if not dist.is_main:
            log = _quiet
            distributed.barrier(dist)  # rank 0 trains the tokenizer and prepares the data meanwhile
        if resuming:
            log(f"resuming {run_dir}")
        model_cfg, data_dir = _prepare_run(model_cfg, train_cfg, run_dir, log)
        if dist.is_main:
            record = {"model": to_dict(model_cfg), section: to_dict(train_cfg), "data_dir": str(data_dir)}
            if job == "distill":
                record["teacher"] = train_cfg.teacher
            run_dirs.write_config(run_dir, job, {**record, **mixture_record(train_cfg.data, data_dir)})
            distributed.barrier(dist)
        result = train_stage(_stage(job, model_cfg, train_cfg, data_dir), train_cfg, run_dir, log=log)
    raise_if_interrupted(result)  # saved; no held-out report: leave quickly
    if dist.is_main and result["stop_reason"] != "interrupted":
        report(run_dir, data_dir, train_cfg, result, log)
        write_report(train_cfg, run_dir, result, log)
    return run_dir


def _stage(job: str, model_cfg: ModelConfig, train_cfg: TrainConfig, data_dir: Path) -> Any:
    """Return the engine stage of the job."""
    if job == "distill":
        from qinglm.post.distill import DistillStage

        return DistillStage(model_cfg, train_cfg, data_dir)
    from qinglm.train.pretrain import PretrainStage

    return PretrainStage(model_cfg, train_cfg, data_dir)


def check_fp8(cfg: TrainConfig) -> None:
    """Return nothing if --fp8 can run on the chosen device and dtype; else raise QingLMError in one line."""
    from qinglm.device import resolve_device, resolve_dtype
    from qinglm.train.fp8 import fp8_refusal

    device = resolve_device(cfg.device)
    why = fp8_refusal(device, resolve_dtype(cfg.dtype, device))
    if why:
        raise QingLMError(why)


def _from_base(
    model_cfg: ModelConfig, train_cfg: TrainConfig, model_flags: dict[str, Any]
) -> tuple[ModelConfig, TrainConfig]:
    """Return the configs of a run that starts from --init-from's weights: its model and tokenizer."""
    from qinglm.config import CONTEXT_FIELDS, with_context

    base = Path(train_cfg.init_from)
    base_model = run_dirs.model_config(base)  # a run of any kind: pretrained, fine-tuned, imported
    changed = [k for k, v in model_flags.items() if v is not None and v != getattr(base_model, k)]
    weights = [k for k in changed if k not in CONTEXT_FIELDS]
    if weights:
        raise QingLMError(f"--init-from {base} fixes the model; drop the model flag(s) {', '.join(weights)}")
    if changed:  # --rope-scaling / --max-seq-len: continued pretraining at another context
        flags = {k: model_flags[k] for k in changed}
        context = max(flags.pop("max_seq_len", 0), train_cfg.seq_len, base_model.max_seq_len)
        base_model = with_context(base_model, context, **flags)
    if train_cfg.tokenizer is None:
        train_cfg.tokenizer = str(base / "tokenizer")
    train_cfg.init_from = str(base)
    return base_model, train_cfg


def _quiet(_line: str) -> None:
    pass


def _prepare_run(
    model_cfg: ModelConfig, train_cfg: TrainConfig, run_dir: Path, log: Callable[[str], None]
) -> tuple[ModelConfig, Path]:
    """Return (the resolved model config, the prepared data directory) after making sure the run has
    its tokenizer and data (training / preparing them now if needed)."""
    from qinglm.tokenizer import Tokenizer

    # tokenizer: given, already in the run, or trained now on the data
    tok_dir = run_dir / "tokenizer"
    if train_cfg.tokenizer:
        tokenizer = Tokenizer.load(train_cfg.tokenizer)
        if not (tok_dir / "tokenizer.json").is_file():
            tokenizer.save(tok_dir)
        elif Tokenizer.load(tok_dir).fingerprint() != tokenizer.fingerprint():
            raise QingLMError(f"{run_dir} was trained with another tokenizer ({tok_dir}); drop --tokenizer")
    elif (tok_dir / "tokenizer.json").is_file():
        tokenizer = Tokenizer.load(tok_dir)
    elif len(train_cfg.data) == 1 and is_prepared(train_cfg.data[0]):
        raise QingLMError("prepared data needs the tokenizer it was made with: pass --tokenizer DIR")
    else:
        tokenizer = train_tokenizer_on(train_cfg.data, model_cfg.vocab_size, tok_dir, train_cfg, log)
    if not train_cfg.init_from:
        model_cfg.vocab_size = tokenizer.vocab_size
    elif tokenizer.vocab_size > model_cfg.vocab_size:  # a base may pad its vocabulary, never lack ids
        raise QingLMError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the --init-from model only "
            f"{model_cfg.vocab_size}; use the base run's tokenizer"
        )

    # data: a prepared directory, or prepared now into the run
    if len(train_cfg.data) == 1 and is_prepared(train_cfg.data[0]):
        data_dir = Path(train_cfg.data[0])
    else:
        data_dir = run_dir / "data"
        if not is_prepared(data_dir):
            prepare_data(train_cfg.data, tokenizer, data_dir, train_cfg, log)

    model_cfg = resolve_model(model_cfg)
    check_train(train_cfg, model_cfg)
    return model_cfg, data_dir


def report(
    run_dir: Path, data_dir: Path, cfg: TrainConfig, result: dict, log: Callable[[str], None] = print
) -> None:
    """Print held-out loss / perplexity / BPC on the whole val split and a few generations."""
    import qinglm
    from qinglm.config import SamplingConfig
    from qinglm.data.mix import mixture_lines, parse_mixture, train_shards
    from qinglm.data.shards import TokenShards
    from qinglm.evaluate import evaluate_shards, unigram_baseline

    lm = qinglm.load(run_dir, device=cfg.device)
    val, trains = TokenShards(data_dir, "val"), train_shards(data_dir, cfg.data)
    m = evaluate_shards(lm.model, val, batch_size=cfg.batch_size, seq_len=cfg.seq_len, device=lm.device)
    every = types.SimpleNamespace(shards=[s for t in trains for s in t.shards])  # all sources
    unigram = unigram_baseline(every, val, lm.config.vocab_size)
    if len(cfg.data) == 1 and is_prepared(cfg.data[0]):
        split = f"the val split prepared in {cfg.data[0]}"
    else:
        from qinglm.data.corpus import describe_split

        split = describe_split(mix.sources if (mix := parse_mixture(cfg.data)) else cfg.data, cfg)
    log("")
    if (mix := parse_mixture(cfg.data)) and result.get("checkpoint"):
        from qinglm.train.checkpoint import read_state

        taken = read_state(result["checkpoint"])["loader"]["mixture_taken"]
        for line in mixture_lines(mix, taken, cfg.seq_len):
            log(line)
    log(
        f"held-out ({val.n_tokens:,} tokens; {split}): loss {m['loss']:.4f}  perplexity {m['ppl']:.2f}  "
        f"bits/char {m['bpc']:.4f}   (unigram baseline loss {unigram:.4f})"
    )
    sampling = SamplingConfig(
        max_new_tokens=cfg.sample_tokens,
        temperature=0.8,
        top_k=50,
        top_p=0.95,
        repetition_penalty=1.1,
        seed=cfg.seed,
    )
    for prompt in cfg.sample_prompts:
        n = len(lm.tokenizer.encode(prompt)) + 1  # + [BOS]
        if n > lm.model.cfg.max_seq_len:  # a short-context run still ends with its report, not an error
            log(f"  {prompt} → (not sampled: {n} tokens, the model's context is {lm.model.cfg.max_seq_len})")
            continue
        text = lm.generate(prompt, **{k: v for k, v in to_dict(sampling).items() if k != "stop_at_eos"})
        log(f"  {prompt} → {prompt}{text}")
    log(f"\nrun directory: {run_dir}   (generate: qinglm generate --model {run_dir} --prompt 你好)")
