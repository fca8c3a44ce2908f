"""Packed token shards: tokenize a corpus once into flat binary files, read them back as memmaps.

Layout of a prepared directory:
    index.json              written last; its presence means the set is complete
    train_0000.bin, ...     raw little-endian uint16 (uint32 if vocab > 65536) token ids
    val_0000.bin, ...
Every document becomes [BOS] + ids + [EOS] in one packed stream per split; a document may straddle
two shards. `characters` in the index counts len(doc) + 1 per document (the +1 is the separator,
predicted as EOS), so loss can be reported as bits per character, independent of the tokenizer.
"""

from __future__ import annotations

import json
import os
import queue
import re
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
from tqdm import tqdm

from qinglm.errors import QingLMError
from qinglm.io import LOCK_FILE, OwnedDir, atomic_open, exclusive_lock, write_text_atomic
from qinglm.tokenizer import BOS_ID, EOS_ID, Tokenizer

INDEX_FILE = "index.json"
FORMAT = 1
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_SHARD_NAME = re.compile(r"^(?P<split>[A-Za-z0-9_-]+)_\d{4}\.bin$")
_PREPARE_HINT = "run `qinglm prepare` first"
T = TypeVar("T")


def _dtype_for(vocab_size: int) -> np.dtype:
    """Return the smallest little-endian unsigned dtype that holds every token id."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


class _ShardWriter:
    """Accumulates one split's token stream and flushes it as shards of at most `shard_tokens`."""

    def __init__(self, out_dir: OwnedDir, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        # Start small and grow: a 100M-token buffer for a 1 MB corpus would waste 200 MB.
        self.buf = np.empty(min(shard_tokens, 1 << 20), dtype=dtype)
        self.fill = 0
        self.shards: list[dict] = []

    def add(self, tokens: np.ndarray) -> None:
        """Return nothing; append tokens, writing out every shard that fills up."""
        while len(tokens):
            room = self.shard_tokens - self.fill
            take = tokens[:room]
            if self.fill + len(take) > len(self.buf):
                new_cap = min(self.shard_tokens, max(2 * len(self.buf), self.fill + len(take)))
                grown = np.empty(new_cap, dtype=self.dtype)
                grown[: self.fill] = self.buf[: self.fill]
                self.buf = grown
            self.buf[self.fill : self.fill + len(take)] = take
            self.fill += len(take)
            tokens = tokens[len(take) :]
            if self.fill == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        """Return nothing; write the buffered tokens (if any) as the next shard file."""
        if self.fill == 0:
            return
        name = f"{self.split}_{len(self.shards):04d}.bin"
        data = self.buf[: self.fill]
        self.out_dir.add(name)  # before writing: a later preparation may then replace or delete it
        with atomic_open(self.out_dir.path / name, "wb") as f:
            data.tofile(f)
        self.shards.append({"file": name, "tokens": int(self.fill)})
        self.fill = 0


def _batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Return an iterator over lists of up to `size` consecutive items."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _read_ahead(items: Iterable[T], size: int, depth: int = 4) -> Iterator[list[T]]:
    """Yield lists of up to `size` items, read by a background thread at most `depth` lists ahead.

    Reading and parsing the corpus (Python) then overlaps tokenizing (Rust, all cores, GIL released);
    the queue bounds the memory. An error in the reader is raised here, in the caller's thread.
    """
    done, stop = object(), threading.Event()
    q: queue.Queue = queue.Queue(maxsize=depth)

    def put(x: object) -> None:
        while not stop.is_set():
            try:
                return q.put(x, timeout=0.1)
            except queue.Full:
                pass

    def produce() -> None:
        try:
            for batch in _batches(items, size):
                put(batch)
                if stop.is_set():
                    return
            put(done)
        except BaseException as e:  # handed to the consumer, which raises it
            put(e)

    thread = threading.Thread(target=produce, name="qinglm-read-ahead", daemon=True)
    thread.start()
    try:
        while (batch := q.get()) is not done:
            if isinstance(batch, BaseException):
                raise batch
            yield batch
    finally:
        stop.set()


def prepare_stream(
    docs: Iterable[tuple[str, str]],
    splits: Sequence[str],
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike,
    *,
    shard_tokens: int = 100_000_000,
    batch_docs: int = 1024,
    show_progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Return the index dict after tokenizing a stream of (split, document) pairs into packed shards.

    One pass over the corpus, whatever the number of splits; memory stays bounded by the shard
    buffers and a few batches, however large the corpus. out_dir is new, empty, or a prepared
    directory; any other non-empty one needs overwrite. Only the files QingLM wrote there (its
    manifest) are replaced or deleted.
    """
    if shard_tokens < 1:
        raise QingLMError(f"shard_tokens must be positive, got {shard_tokens}")
    if batch_docs < 1:
        raise QingLMError(f"batch_docs must be positive, got {batch_docs}")
    if not splits:
        raise QingLMError("no splits to prepare; give at least a 'train' split")
    for split in splits:
        if not _SPLIT_NAME.match(split):
            raise QingLMError(f"split name {split!r} must be letters, digits, '_' or '-'")
    out = Path(out_dir)
    dtype = _dtype_for(tokenizer.vocab_size)
    counts = {split: [0, 0] for split in splits}  # documents, characters
    try:
        claimed = OwnedDir.claiming(
            out, "data", [INDEX_FILE, LOCK_FILE], overwrite=overwrite, legacy=_legacy_prepared
        )
        with claimed as owned, exclusive_lock(out):
            owned.remove_leftovers()  # temp files of a killed preparation
            # Drop the old index first: if we are killed midway, the directory must not look complete.
            (out / INDEX_FILE).unlink(missing_ok=True)
            writers = {split: _ShardWriter(owned, split, dtype, shard_tokens) for split in splits}
            with tqdm(desc="prepare", unit="doc", disable=None if show_progress else True) as bar:
                for batch in _read_ahead(docs, batch_docs):  # bar: None = only on a terminal
                    flat: dict[str, list[int]] = {split: [] for split in splits}
                    for (split, doc), ids in zip(batch, tokenizer.encode_batch([d for _, d in batch])):
                        tokens = flat[split]
                        tokens.append(BOS_ID)
                        tokens.extend(ids)
                        tokens.append(EOS_ID)
                        counts[split][0] += 1
                        counts[split][1] += len(doc) + 1
                    for split, tokens in flat.items():
                        if tokens:
                            writers[split].add(np.array(tokens, dtype=dtype))
                    bar.update(len(batch))
            for writer in writers.values():
                writer.flush()
            for split, (n_docs, _) in counts.items():
                if n_docs == 0:
                    raise QingLMError(
                        f"split {split!r} has no documents; check the corpus and the split settings"
                    )
            entries = {
                split: {
                    "shards": writers[split].shards,
                    "tokens": sum(s["tokens"] for s in writers[split].shards),
                    "documents": counts[split][0],
                    "characters": counts[split][1],
                }
                for split in splits
            }
            return _finish(owned, entries, dtype, tokenizer)
    except OSError as e:  # unwritable directory, full disk
        raise QingLMError(f"cannot write prepared data to {out}: {e.strerror or e}") from None


def _finish(owned: OwnedDir, splits: dict, dtype: np.dtype, tokenizer: Tokenizer) -> dict:
    """Return the index after deleting stale shards and writing index.json (last: it marks completion)."""
    index = {
        "format": FORMAT,
        "dtype": "uint16" if dtype.itemsize == 2 else "uint32",
        "vocab_size": tokenizer.vocab_size,
        "tokenizer_fingerprint": tokenizer.fingerprint(),
        "bos": True,
        "splits": splits,
    }
    current = {s["file"] for entry in splits.values() for s in entry["shards"]}
    for name in sorted(owned.names):  # shards of an earlier, larger preparation (only QingLM's)
        m = _SHARD_NAME.match(name)
        if m and m["split"] in splits and name not in current:
            owned.delete(name)
    write_text_atomic(owned.path / INDEX_FILE, json.dumps(index, indent=2) + "\n")
    return index


def _legacy_prepared(path: Path) -> list[str] | None:
    """Return index.json and its shards for a directory prepared before manifests existed, else None."""
    try:
        index = load_index(path)
        return [INDEX_FILE, *(s["file"] for e in index["splits"].values() for s in e["shards"])]
    except (QingLMError, KeyError, TypeError):
        return None


def prepare_shards(
    docs_by_split: Mapping[str, Iterable[str]],
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike,
    **options: int | bool,
) -> dict:
    """Return the index dict after tokenizing every split into packed shards under `out_dir`
    (options: those of prepare_stream)."""
    labelled = ((split, doc) for split, docs in docs_by_split.items() for doc in docs)
    return prepare_stream(labelled, list(docs_by_split), tokenizer, out_dir, **options)


def load_index(data_dir: str | os.PathLike) -> dict:
    """Return the parsed index.json of a prepared data directory."""
    path = Path(data_dir) / INDEX_FILE
    if not path.is_file():
        raise QingLMError(f"no prepared data in {data_dir} (missing {INDEX_FILE}); {_PREPARE_HINT}")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QingLMError(f"{path} is corrupt ({e}); {_PREPARE_HINT}") from e
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise QingLMError(f"{path} is not a format-{FORMAT} shard index; {_PREPARE_HINT}")
    return index


class TokenShards:
    """Read-only view of one split as np.memmap arrays."""

    def __init__(self, data_dir: str | os.PathLike, split: str):
        self.data_dir = Path(data_dir)
        self.split = split
        self.index = load_index(self.data_dir)
        splits = self.index["splits"]
        if split not in splits:
            raise QingLMError(
                f"split {split!r} not in {self.data_dir} (has {', '.join(sorted(splits))}); {_PREPARE_HINT}"
            )
        entry = splits[split]
        dtype = np.dtype("<u2") if self.index["dtype"] == "uint16" else np.dtype("<u4")
        self.shards: list[np.memmap] = []
        for shard in entry["shards"]:
            path = self.data_dir / shard["file"]
            expected = shard["tokens"] * dtype.itemsize
            if not path.is_file() or path.stat().st_size != expected:
                raise QingLMError(f"shard {path} is missing or has the wrong size; {_PREPARE_HINT}")
            self.shards.append(np.memmap(path, dtype=dtype, mode="r", shape=(shard["tokens"],)))
        self.n_tokens: int = entry["tokens"]
        self.n_documents: int = entry["documents"]
        self.n_characters: int = entry["characters"]
        self.vocab_size: int = self.index["vocab_size"]
        self.tokenizer_fingerprint: str = self.index["tokenizer_fingerprint"]

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Return nothing; raise QingLMError if the shards were made with a different tokenizer."""
        if tokenizer.fingerprint() != self.tokenizer_fingerprint:
            raise QingLMError(
                f"{self.data_dir} was prepared with another tokenizer "
                f"({self.tokenizer_fingerprint} != {tokenizer.fingerprint()}); run `qinglm prepare` again"
            )

    def __repr__(self) -> str:
        return (
            f"TokenShards({str(self.data_dir)!r}, {self.split!r}: {self.n_tokens} tokens, "
            f"{self.n_documents} documents, {len(self.shards)} shards)"
        )
