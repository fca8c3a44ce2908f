"""The Python API: ``lm = qinglm.load(run_dir)``, then ``lm.generate``, ``lm.stream``, ``lm.evaluate``."""

from __future__ import annotations

import dataclasses
import glob
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qinglm.config import ContextConfig, ModelConfig, SamplingConfig, from_dict, with_context
from qinglm.device import resolve_device
from qinglm.errors import QingLMError
from qinglm.evaluate import evaluate_documents
from qinglm.infer.chat import IM_END, fit_history, prompt_budget
from qinglm.infer.speculate import SpecStats
from qinglm.infer.text import encode_prompt
from qinglm.memory import allocating
from qinglm.model.transformer import Transformer
from qinglm.train.config import TrainConfig

if TYPE_CHECKING:
    from qinglm.tokenizer import Tokenizer


class LM:
    """A trained model with its tokenizer, ready to generate and evaluate."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        *,
        run_dir: str | Path | None = None,
        device: torch.device | str | None = None,
        val_fraction: float = TrainConfig.val_fraction,
        split_by: str = TrainConfig.split_by,
        draft: Transformer | None = None,
    ):
        self.val_fraction = val_fraction  # the split of built-in corpora the run held out (evaluate)
        self.split_by = split_by
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.config: ModelConfig = model.cfg
        self.run_dir = Path(run_dir) if run_dir is not None else None
        # What speculative decoding (sampling's `speculate`) drafted and had accepted, over every call; the
        # model that drafts (None: prompt lookup).
        self.speculation = SpecStats()
        self.draft = draft.to(self.device).eval() if draft is not None else None

    def __repr__(self) -> str:
        n = self.model.param_counts()["total"]
        return f"LM(run_dir={str(self.run_dir)!r}, params={n:,}, device={self.device})"

    def stream(
        self,
        prompt: str,
        sampling: SamplingConfig | None = None,
        *,
        stop: Sequence[str] = (),
        **overrides: Any,
    ) -> Iterator[str]:
        """Return an iterator of text pieces continuing prompt (temperature 0 = greedy).

        Sampling is `sampling` (default: SamplingConfig()) with the keyword overrides, named as its fields
        (max_new_tokens=50, temperature=0, ...). The text ends before the first of the stop strings.
        """
        cfg = _sampling(sampling, overrides)
        return self._stream_ids(encode_prompt(self.tokenizer, prompt), cfg, stop)

    def _stream_ids(
        self,
        prompt_ids: list[int],
        cfg: SamplingConfig,
        stop: Sequence[str],
        counted: Sequence[bool] | None = None,
    ) -> Iterator[str]:
        """Return the text pieces the engine produces for one request."""
        from qinglm.infer.engine import Generation, Request

        request = Request(prompt_ids, cfg, stop, counted)
        gen = Generation(  # checks the request now
            self.model, [request], tokenizer=self.tokenizer, device=self.device, draft=self.draft
        )

        def texts() -> Iterator[str]:
            yield from (ev.text for events in gen for ev in events if ev.text)
            self.speculation.add(gen.engine.spec)

        return texts()

    def generate(self, prompt: str, sampling: SamplingConfig | None = None, **overrides: Any) -> str:
        """Return the continuation of prompt, without the prompt; takes stream()'s arguments."""
        return "".join(self.stream(prompt, sampling, **overrides))

    def stream_chat(
        self,
        messages: list[dict[str, Any]],
        sampling: SamplingConfig | None = None,
        *,
        tools: list[dict[str, Any]] | None = None,
        thinking: bool | None = None,
        **overrides: Any,
    ) -> Iterator[str]:
        """Return an iterator of text pieces of the assistant's reply to messages (qinglm.chat_template).

        Sampling as in stream(). The reply stops at <|im_end|> or [EOS]. When the chat does not fit the
        context with room for the reply (up to max_new_tokens, at most half the context), the oldest
        non-system turns are dropped. tools (OpenAI function schemas) and thinking (the template's switch)
        go to the template; read the reply's thinking and tool calls with qinglm.chat_template.parse_reply.
        """
        cfg = _sampling(sampling, overrides)
        budget = prompt_budget(self.config.max_seq_len, cfg.max_new_tokens)
        _, prompt = fit_history(self.tokenizer, messages, budget, tools=tools, thinking=thinking)
        return self._stream_ids(prompt.ids, cfg, [IM_END], prompt.content)  # [EOS] ends it too

    def chat(
        self,
        messages: list[dict[str, Any]],
        sampling: SamplingConfig | None = None,
        *,
        tools: list[dict[str, Any]] | None = None,
        thinking: bool | None = None,
        **overrides: Any,
    ) -> str:
        """Return the assistant's reply to messages; takes stream_chat()'s arguments."""
        return "".join(self.stream_chat(messages, sampling, tools=tools, thinking=thinking, **overrides))

    def evaluate(
        self,
        source: str,
        *,
        batch_size: int = 16,
        seq_len: int | None = None,
        max_tokens: int | None = None,
        encoding: str | None = None,
    ) -> dict[str, float]:
        """Return {"loss", "ppl", "bpc", "tokens"} on source.

        source is a built-in corpus name (its "val" split, at the run's own val_fraction and split_by, so no
        document the run trained on is scored), a path, directory or glob
        that read_documents understands (read with encoding, default: detect), or else the text
        itself (one document, normalised like training data). seq_len defaults to min(512, the model's context).
        """
        from qinglm.data.builtin import builtin_documents, is_builtin
        from qinglm.data.sources import normalize_text, read_documents

        if is_builtin(source):
            docs = builtin_documents(source, "val", self.val_fraction, self.split_by)
        elif _looks_like_path(source):
            docs = read_documents(source, encoding=encoding)
        else:
            # The same normalisation read_documents (and so the training data) applies.
            docs = [normalize_text(source).strip()]
        return evaluate_documents(
            self.model,
            self.tokenizer,
            docs,
            batch_size=batch_size,
            seq_len=seq_len,
            max_tokens=max_tokens,
            device=self.device,
        )


def _sampling(sampling: SamplingConfig | None, overrides: dict[str, Any]) -> SamplingConfig:
    """Return sampling (default: SamplingConfig()) with overrides, each named as one of its fields."""
    names = [f.name for f in dataclasses.fields(SamplingConfig)]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise TypeError(
            f"unknown sampling option(s) {', '.join(unknown)}; the options are {', '.join(names)}"
        )
    return dataclasses.replace(sampling or SamplingConfig(), **overrides)


def _looks_like_path(s: str) -> bool:
    # Long or multi-line strings are text; asking the OS about them can raise "name too long".
    if "\n" in s or len(s) > 1024:
        return False
    try:
        if Path(s).expanduser().exists():
            return True
    except OSError:
        return False
    return glob.has_magic(s) and bool(glob.glob(s))


def _find_run_dir(path: Path) -> tuple[Path, Path | None]:
    """Return (run directory, weights path or None) for a run directory or a weights path inside one."""
    if not path.exists():
        raise QingLMError(f"run directory not found: {path}; pass the --out directory of a training run")
    if path.is_dir() and (path / "config.json").is_file():
        return path, None
    # e.g. RUN/best/model.safetensors, RUN/best or RUN/checkpoints/step-N/model.safetensors: the run
    # is the nearest parent with config.json
    for parent in list(path.parents)[:3]:
        if (parent / "config.json").is_file():
            return parent, path
    raise QingLMError(f"{path} has no config.json; is it a QingLM run directory?")


def load(
    run_dir: str | Path,
    device: str = "auto",
    tokenizer: str | Path | None = None,
    quantize: str = "none",
    context: ContextConfig | None = None,
    draft: str | Path | None = None,
) -> LM:
    """Return the LM saved in run_dir, in eval mode on device.

    run_dir holds config.json, tokenizer/ and weights (best/model.safetensors, else the latest
    checkpoint); it may also be a weights file inside a run directory. tokenizer overrides the
    run's tokenizer directory. quantize="int8" stores the linear layers' weights as int8 for
    faster CPU inference, "bf16" every weight as bfloat16 (qinglm.model.quantize; inference only). context runs the model at another
    length, RoPE-scaled to reach past the trained one (qinglm.config.with_context). draft is a smaller run
    with the same tokenizer that drafts for speculative decoding (sampling's `speculate`; LM.draft).
    """
    from qinglm.run_dir import read_config
    from qinglm.tokenizer import Tokenizer
    from qinglm.train.checkpoint import inference_weights, load_model_weights

    run, weights = _find_run_dir(Path(run_dir).expanduser())
    config = read_config(run)  # a run of any kind: pretrained, fine-tuned, imported, merged
    tok_dir = Path(tokenizer).expanduser() if tokenizer is not None else run / "tokenizer"
    if tokenizer is None and not (tok_dir / "tokenizer.json").is_file():
        raise QingLMError(f"{run} has no tokenizer/tokenizer.json; the run directory is incomplete")
    tok = Tokenizer.load(tok_dir)
    own = run / "tokenizer"
    if tokenizer is not None and (own / "tokenizer.json").is_file():
        if Tokenizer.load(own).fingerprint() != tok.fingerprint():
            raise QingLMError(
                f"the tokenizer in {tok_dir} is not the one {run} was trained with ({own}); "
                "drop --tokenizer-path or pass that tokenizer"
            )
    model_cfg = from_dict(ModelConfig, config["model"], where=f"model config in {run / 'config.json'}")
    if context is not None:
        model_cfg = with_context(model_cfg, **dataclasses.asdict(context))
    if tok.vocab_size > model_cfg.vocab_size:
        raise QingLMError(
            f"the tokenizer in {tok_dir} has {tok.vocab_size} tokens but the model only "
            f"{model_cfg.vocab_size}; use the tokenizer the model was trained with"
        )
    if weights is None:
        weights = inference_weights(run)  # raises QingLMError when the run has no weights yet
    dev = resolve_device(device)
    with allocating(model_cfg):
        model = Transformer(model_cfg)
    load_model_weights(model, weights)
    if quantize != "none":
        from qinglm.model.quantize import quantize as quantize_model

        model = quantize_model(model.to(dev), quantize)
    drafter = None
    if draft is not None:
        other = load(draft, device=device, quantize=quantize)
        if other.tokenizer.fingerprint() != tok.fingerprint():
            raise QingLMError(
                f"the draft model {draft} was trained with another tokenizer than {run}; "
                "draft with a run of the same tokenizer (a `qinglm distill` student of it)"
            )
        drafter = other.model
    val_fraction, split_by = _held_out(config)
    return LM(
        model, tok, run_dir=run, device=dev, val_fraction=val_fraction, split_by=split_by, draft=drafter
    )


def _held_out(config: dict[str, Any], hops: int = 4) -> tuple[float, str]:
    """Return (val_fraction, split_by) the run's pretraining held out: its own, else its SFT base's,
    else the defaults. A run saved before split_by existed held out single documents ("document").

    A `qinglm sft` run saves its base run's path as "base"; its base's split is what it must not be
    scored on (the base trained on the rest).
    """
    train = config.get("train")
    value = train.get("val_fraction") if isinstance(train, dict) else None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 < value < 1.0:
        split_by = train.get("split_by", "document")
        return float(value), split_by if isinstance(split_by, str) else TrainConfig.split_by
    base = config.get("base")
    if isinstance(base, str) and hops > 0:
        try:
            base_config = json.loads((Path(base) / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            base_config = None
        if isinstance(base_config, dict):
            return _held_out(base_config, hops - 1)
    return TrainConfig.val_fraction, TrainConfig.split_by
