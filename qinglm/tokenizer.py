"""Byte-level BPE tokenizer: training, encoding, saving in a form transformers can load.

The backend is the Rust `tokenizers` library. Text is first split with the Qwen2 regex (so BPE
never merges across a letter/digit/punctuation boundary, and digits stay single), then mapped to
bytes, so every Unicode string round-trips exactly and nothing is ever unknown. [UNK] keeps its id
only so the layout matches Andy-LLM (PAD, UNK, BOS, EOS) plus two chat tokens reserved for SFT, then
(tokenizers trained since tools came) six for thinking and tool calls at ids 6-11 (qinglm.chat_template).

Text is always encoded as text: "[EOS]" or "<|im_end|>" typed by a user or found in a corpus gives
ordinary byte tokens, never a control id (the backend's `encode_special_tokens`). Control tokens are
inserted by id (`encode_prompt`, `qinglm.infer.chat.encode_chat`, the shard writer). The flag is not part of
tokenizer.json, so transformers still matches the control tokens in text, as its chat template needs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from qinglm.chat_template import CHAT_TEMPLATE, TOOL_TOKENS
from qinglm.errors import QingLMError
from qinglm.io import write_text_atomic

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "<|im_start|>", "<|im_end|>"]
PAD_ID, UNK_ID, BOS_ID, EOS_ID, IM_START_ID, IM_END_ID = range(6)
# Tokenizers trained since tools and thinking came also hold TOOL_TOKENS (<think> ... </tool_response>)
# at these ids; older ones lack them and work for every chat that needs none (qinglm.chat_template).
TOOL_TOKEN_IDS = range(len(SPECIAL_TOKENS), len(SPECIAL_TOKENS) + len(TOOL_TOKENS))
ALL_CONTROL_TOKENS = SPECIAL_TOKENS + TOOL_TOKENS

MIN_VOCAB_SIZE = len(ALL_CONTROL_TOKENS) + 256  # every byte must have a token, or round trip breaks

# Qwen2's pre-tokenizer split. Measured on held-out People's Daily 1998 text it gives more
# characters per token than the GPT-2 split or a one-token-per-CJK-character split
# (builtin pd1998 val: 1.85 vs 1.78 vs 1.01 chars/token at vocab 30k; 1.56 vs 1.52 vs 1.01 at 10k).
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# "chars": every Chinese character, letter run, digit, punctuation run and whitespace run is its own
# piece, so BPE never merges across characters and pinyin syllables ("ài xī yǔ máo") stay whole and
# the same at every position. Fewer characters per token (held-out idioms: 1.0 vs 1.5 chars/token)
# but a character keeps one embedding: held-out idiom pinyin after one SFT epoch went 31% -> 51% of
# syllables right (benchmarks/post_training_notes.md).
CHARS_PATTERN = r"\p{Han}|(?:(?!\p{Han})\p{L})+|\p{N}|[^\s\p{L}\p{N}]+|\s+"
PRE_TOKENIZERS = {"qwen2": QWEN2_PATTERN, "chars": CHARS_PATTERN}

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_NAMES = (TOKENIZER_FILE, CONFIG_FILE, "chat_template.jinja")  # what Tokenizer.save writes
_HF_NO_MAX_LENGTH = int(1e30)  # what transformers itself writes when a tokenizer has no length limit


def _panics_as_user_errors(method: Callable) -> Callable:
    """Return method with a panic of the Rust backend raised as QingLMError.

    A tokenizer.json whose pre-tokenizer regex backtracks too much makes Oniguruma give up
    ("retry-limit-in-match over") and the backend panic; pyo3's PanicException is a BaseException.
    """

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except BaseException as e:
            if type(e).__name__ != "PanicException":
                raise
            why = str(e).strip().splitlines()[0][:200] if str(e).strip() else "a panic"
            raise QingLMError(
                f"the tokenizer failed on this text ({why}); its pre-tokenizer regex is too costly - "
                "use another tokenizer"
            ) from None

    return wrapper


class Tokenizer:
    """Wraps tokenizers.Tokenizer; what the rest of QingLM uses."""

    pad_id = PAD_ID
    unk_id = UNK_ID
    bos_id = BOS_ID
    eos_id = EOS_ID
    im_start_id = IM_START_ID
    im_end_id = IM_END_ID

    def __init__(self, backend: tokenizers.Tokenizer):
        # Must be *special* added tokens, not just vocab entries: only those are skipped by
        # decode(skip_special_tokens=True) and matched whole by transformers' chat template.
        added = backend.get_added_tokens_decoder()
        for want_id, token in enumerate(SPECIAL_TOKENS):
            got = added.get(want_id)
            if got is None or got.content != token or not got.special:
                raise QingLMError(
                    f"tokenizer lacks special token {token!r} at id {want_id} (the QingLM layout); "
                    "train a new one with `qinglm tokenizer`"
                )
        self.has_tool_tokens = all(
            (got := added.get(i)) is not None and got.content == token and got.special
            for i, token in zip(TOOL_TOKEN_IDS, TOOL_TOKENS)
        )
        backend.encode_special_tokens = True  # "[EOS]" in text is text; control ids come only by id
        self._backend = backend
        # encode_batch_fast skips offset tracking (faster); older tokenizers only have encode_batch.
        self._encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """Return the wrapped `tokenizers.Tokenizer`."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Return the number of token ids, special tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @_panics_as_user_errors
    def encode(self, text: str) -> list[int]:
        """Return the token ids of `text` as text: never a control id, whatever the text holds."""
        return self._backend.encode(text, add_special_tokens=False).ids

    @_panics_as_user_errors
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Return the token ids of each text (tokenized in parallel by the Rust backend)."""
        return [e.ids for e in self._encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Return the text of `ids`; exact inverse of encode when skip_special_tokens is False."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def control_id(self, token: str) -> int:
        """Return the id of a control token; raise QingLMError for a tool token this tokenizer lacks."""
        if token in SPECIAL_TOKENS:
            return SPECIAL_TOKENS.index(token)
        if token not in TOOL_TOKENS:
            raise ValueError(f"{token!r} is not a QingLM control token")
        if not self.has_tool_tokens:
            raise QingLMError(
                "this tokenizer has no tool-call or thinking tokens (it predates them); use tools and "
                "thinking with a tokenizer trained by this version of `qinglm tokenizer`"
            )
        return TOOL_TOKEN_IDS[TOOL_TOKENS.index(token)]

    @property
    def n_control_ids(self) -> int:
        """Return how many ids from 0 are control tokens: 12 with the tool and thinking tokens, else 6.

        In a tokenizer that predates them, ids 6-11 are ordinary text (the repetition penalty counts them).
        """
        return len(ALL_CONTROL_TOKENS) if self.has_tool_tokens else len(SPECIAL_TOKENS)

    def token_to_id(self, token: str) -> int | None:
        """Return the id of one vocabulary token, or None if it is not in the vocabulary."""
        return self._backend.token_to_id(token)

    @property
    def pre_tokenizer(self) -> str:
        """Return the PRE_TOKENIZERS name of this tokenizer's split ("custom" for any other)."""
        pre = json.loads(self._backend.to_str()).get("pre_tokenizer") or {}
        patterns = [p.get("pattern", {}).get("Regex") for p in pre.get("pretokenizers", [pre])]
        return next((name for name, pattern in PRE_TOKENIZERS.items() if pattern in patterns), "custom")

    def fingerprint(self) -> str:
        """Return 16 hex chars of the sha256 of the tokenizer's JSON: equal iff the tokenizers are."""
        return hashlib.sha256(self._backend.to_str().encode("utf-8")).hexdigest()[:16]

    def save(
        self,
        directory: str | os.PathLike,
        *,
        model_max_length: int | None = None,
        chat_template: str | None = CHAT_TEMPLATE,
    ) -> None:
        """Return nothing; write tokenizer.json, tokenizer_config.json and chat_template.jinja.

        The files load in transformers (PreTrainedTokenizerFast / AutoTokenizer); the chat template is
        QingLM's ChatML (`qinglm.infer.chat`) unless another is given, or None for none.
        """
        directory = Path(directory)
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": SPECIAL_TOKENS[BOS_ID],
            "eos_token": SPECIAL_TOKENS[EOS_ID],
            "pad_token": SPECIAL_TOKENS[PAD_ID],
            "unk_token": SPECIAL_TOKENS[UNK_ID],
            "additional_special_tokens": (ALL_CONTROL_TOKENS if self.has_tool_tokens else SPECIAL_TOKENS)[
                IM_START_ID:
            ],
            "model_max_length": model_max_length if model_max_length is not None else _HF_NO_MAX_LENGTH,
            # transformers would otherwise "clean up" spaces before punctuation and break round trip.
            "clean_up_tokenization_spaces": False,
            "add_bos_token": False,
            "add_eos_token": False,
        }
        if chat_template is not None:
            config["chat_template"] = chat_template
        # tokenizer.json first: a config next to a stale tokenizer.json would be the worse half-state.
        try:  # an unwritable directory or a full disk is the user's to fix
            directory.mkdir(parents=True, exist_ok=True)
            write_text_atomic(directory / TOKENIZER_FILE, self._backend.to_str(pretty=True))
            write_text_atomic(
                directory / CONFIG_FILE, json.dumps(config, ensure_ascii=False, indent=2) + "\n"
            )
            if chat_template is not None:
                write_text_atomic(directory / TOKENIZER_NAMES[2], chat_template)
        except OSError as e:
            raise QingLMError(f"cannot write the tokenizer to {directory}: {e.strerror or e}") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Return the tokenizer in `path` (a directory holding tokenizer.json, or the file itself)."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise QingLMError(f"no tokenizer at {file}; train one with `qinglm tokenizer` or fix the path")
        try:
            backend = tokenizers.Tokenizer.from_str(file.read_text(encoding="utf-8"))
        except Exception as e:  # the Rust side raises a bare Exception for any parse error
            raise QingLMError(f"{file} is not a valid tokenizer.json ({e}); train the tokenizer again") from e
        return cls(backend)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint()})"


def _byte_level_bpe(split: str = "qwen2") -> tokenizers.Tokenizer:
    """Return an untrained byte-level BPE tokenizer with the PRE_TOKENIZERS split and no normalizer."""
    if split not in PRE_TOKENIZERS:
        raise QingLMError(f"unknown pre-tokenizer {split!r}; choose one of {', '.join(PRE_TOKENIZERS)}")
    backend = tokenizers.Tokenizer(models.BPE())
    # No normalizer: NFKC etc. would turn full-width punctuation half-width and break round trip.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRE_TOKENIZERS[split]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    show_progress: bool = True,
    split: str = "qwen2",
) -> Tokenizer:
    """Return a byte-level BPE tokenizer of at most `vocab_size` tokens trained on `texts`.

    split: the pre-tokenizer, a key of PRE_TOKENIZERS.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise QingLMError(
            f"vocab size must be at least {MIN_VOCAB_SIZE} ({len(ALL_CONTROL_TOKENS)} control tokens + 256 bytes), "
            f"got {vocab_size}"
        )
    length = len(texts) if isinstance(texts, Sequence) else None
    n_chars = 0

    def counted() -> Iterator[str]:
        nonlocal n_chars
        for text in texts:
            n_chars += len(text)
            yield text

    backend = _byte_level_bpe(split)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=show_progress,
        special_tokens=ALL_CONTROL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(counted(), trainer=trainer, length=length)
    if n_chars == 0:
        raise QingLMError("no text to train the tokenizer on; check the corpus path and split")
    return Tokenizer(backend)


def chars_per_token(tokenizer: Tokenizer, texts: Iterable[str], batch: int = 1024) -> float:
    """Return the mean number of characters per token over `texts` (higher = better compression)."""
    n_chars = n_tokens = 0
    chunk: list[str] = []
    for text in texts:
        chunk.append(text)
        if len(chunk) == batch:
            n_chars += sum(map(len, chunk))
            n_tokens += sum(map(len, tokenizer.encode_batch(chunk)))
            chunk = []
    if chunk:
        n_chars += sum(map(len, chunk))
        n_tokens += sum(map(len, tokenizer.encode_batch(chunk)))
    if n_tokens == 0:
        raise QingLMError("no text to measure chars/token on")
    return n_chars / n_tokens
