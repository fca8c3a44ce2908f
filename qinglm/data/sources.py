"""Read users' text corpora (.txt, .jsonl/.json, .parquet) as a stream of document strings."""

from __future__ import annotations

import codecs
import collections
import glob
import json
import os
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qinglm.data.encoding import SAMPLE_BYTES, open_text
from qinglm.errors import QingLMError

PathSpec = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
TXT_MODES = ("auto", "line", "paragraph")
# A longer document (a whole book on one line, say) is cut into pieces of at most this many
# characters, at a sentence end where one is near: tokenizing and packing stay fast and bounded.
MAX_DOC_CHARS = 100_000
_SENTENCE_ENDS = "。！？!?\n"
_PARQUET_BATCH_ROWS = 8192

# Full-width forms that are plain ASCII in disguise.  Full-width punctuation that Chinese text
# really uses (，！？：；（）［］｛｝＂＇～) is deliberately absent.
_HALF_WIDTH_SYMBOLS = "#$%&*+-./<=>@\\^_`|"
_NORMALIZE_TABLE = {
    **{cp: cp - 0xFEE0 for cp in range(0xFF10, 0xFF1A)},  # ０-９
    **{cp: cp - 0xFEE0 for cp in range(0xFF21, 0xFF3B)},  # Ａ-Ｚ
    **{cp: cp - 0xFEE0 for cp in range(0xFF41, 0xFF5B)},  # ａ-ｚ
    **{ord(c) + 0xFEE0: ord(c) for c in _HALF_WIDTH_SYMBOLS},  # ．％－／ ...
    0x3000: 0x20,  # ideographic space
}
# Undecodable bytes come back as lone surrogates (errors="surrogateescape"); a document with one
# would crash any later UTF-8 encode, so it is skipped.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_BLANK_LINE_BETWEEN_TEXT = re.compile(r"\S[^\S\n]*\n[^\S\n]*\n\s*\S")


@dataclass
class ReadStats:
    """Counts gathered while reading: files, documents, characters and skipped records by reason."""

    files: int = 0
    documents: int = 0
    characters: int = 0
    skipped: collections.Counter[str] = field(default_factory=collections.Counter)
    split_long: int = 0  # documents longer than MAX_DOC_CHARS, each cut into pieces

    def summary(self) -> str:
        """Return one human line, e.g. 'read 3 files, 12 documents, 345 characters; skipped 2 (empty: 2)'."""
        files = "1 file" if self.files == 1 else f"{self.files:,} files"
        line = f"read {files}, {self.documents:,} documents, {self.characters:,} characters"
        total = sum(self.skipped.values())
        if total:
            reasons = ", ".join(f"{reason}: {n:,}" for reason, n in self.skipped.most_common())
            line += f"; skipped {total:,} ({reasons})"
        if self.split_long:
            docs = "document" if self.split_long == 1 else "documents"
            line += f"; split {self.split_long:,} {docs} longer than {MAX_DOC_CHARS:,} characters into pieces"
        return line


def normalize_text(s: str) -> str:
    """Return `s` with full-width ASCII letters, digits and symbols made half-width, U+3000 a space.

    This is a narrow, fast stand-in for NFKC.  Full NFKC would also turn the full-width
    punctuation of Chinese text (，！？：；（）) into ASCII, which changes how Chinese is
    written, so that punctuation is left alone; only characters that are ASCII in disguise
    (ＡＢＣ１２３, and symbols such as ．％－／ used in numbers and units) are mapped.
    """
    return s.translate(_NORMALIZE_TABLE)


def split_of(doc: str, val_fraction: float) -> str:
    """Return "val" or "train" for `doc`, decided by a stable hash of its text.

    Identical documents always land in the same split (no train/val leakage) and the
    answer does not depend on the order documents are read in.
    """
    if not 0.0 <= val_fraction <= 1.0:
        raise QingLMError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    return "val" if zlib.crc32(doc.encode("utf-8")) % 10_000 < val_fraction * 10_000 else "train"


def expand_paths(spec: PathSpec) -> list[Path]:
    """Return the input files named by `spec`: files, directories (searched recursively) or globs.

    A directory contributes its *.txt, *.jsonl, *.json and *.parquet files (hidden ones
    excluded), sorted.  A glob contributes every file it matches, like the shell would.
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not specs:
        raise QingLMError("no input given; pass a file, a directory or a glob pattern")
    paths: list[Path] = []
    seen: set[Path] = set()
    for item in specs:
        for path in _expand_one(os.fspath(item)):
            if path.resolve() not in seen:
                seen.add(path.resolve())
                paths.append(path)
    return paths


def _expand_one(text: str) -> list[Path]:
    """Return the files named by one path, directory or glob pattern."""
    path = Path(os.path.expanduser(text))
    if path.is_file():
        return [path]
    if path.is_dir():
        found = _scan_dir(path)
        if not found:
            raise QingLMError(f"{path} contains no text files ({', '.join(TEXT_SUFFIXES)})")
        return found
    if re.search(r"[*?[]", text):
        found = []
        for match in sorted(glob.glob(os.path.expanduser(text), recursive=True)):
            match_path = Path(match)
            found.extend([match_path] if match_path.is_file() else _scan_dir(match_path))
        if not found:
            raise QingLMError(f"the pattern {text!r} matches no files; check the pattern")
        return found
    raise QingLMError(f"{text}: no such file or directory; check the path")


def _scan_dir(root: Path) -> list[Path]:
    """Return the text files under `root`, recursively, sorted, hidden files and folders excluded."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in TEXT_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def read_documents(
    spec: PathSpec,
    *,
    encoding: str | None = None,
    nfkc: bool = True,
    text_field: str = "text",
    txt_mode: str = "auto",
    stats: ReadStats | None = None,
) -> Iterator[str]:
    """Return an iterator over the documents in the files named by `spec`, streamed one by one.

    .txt: one document per line (txt_mode "line"), per blank-line-separated paragraph
    ("paragraph"), or "auto" (paragraphs if the first MB has a blank line between text).
    .jsonl/.json: one JSON object per line with a string `text_field` (a .json file holding a
    JSON array is also accepted, loaded whole); bad lines are skipped and counted.
    .parquet: the `text_field` column, or else the only string column.
    `encoding=None` detects each file's encoding.  `nfkc` applies normalize_text.  Documents
    are stripped of surrounding whitespace; empty ones are skipped.  `stats` is updated.
    Path problems raise QingLMError at once, file problems when the file is reached.
    """
    if txt_mode not in TXT_MODES:
        raise QingLMError(f"txt_mode must be one of {', '.join(TXT_MODES)}, got {txt_mode!r}")
    if encoding is not None:
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise QingLMError(f"unknown encoding {encoding!r}; try utf-8, gbk or gb18030") from None
    paths = expand_paths(spec)
    return _iter_documents(
        paths, encoding, nfkc, text_field, txt_mode, stats if stats is not None else ReadStats()
    )


def _iter_documents(
    paths: list[Path], encoding: str | None, nfkc: bool, text_field: str, txt_mode: str, stats: ReadStats
) -> Iterator[str]:
    """Yield the cleaned documents of each file in turn, keeping `stats` up to date."""
    for path in paths:
        try:
            size = path.stat().st_size
        except OSError as e:
            raise QingLMError(f"cannot read {path} ({e.strerror}); check the path") from None
        if size == 0:
            raise QingLMError(f"{path} is empty; remove it from the inputs or add text to it")
        stats.files += 1
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            raw_docs = _parquet_texts(path, text_field, stats)
        elif suffix in (".jsonl", ".json"):
            raw_docs = _json_texts(path, encoding, text_field, stats)
        else:
            raw_docs = _txt_texts(path, encoding, txt_mode)
        yielded = 0
        problems_before = sum(stats.skipped.values()) - stats.skipped["empty"]
        for doc in raw_docs:
            doc = (normalize_text(doc) if nfkc else doc).strip()
            if not doc:
                stats.skipped["empty"] += 1
            elif _LONE_SURROGATE.search(doc):
                stats.skipped["undecodable bytes"] += 1
            else:
                pieces = split_long_document(doc)
                stats.split_long += len(pieces) > 1
                for piece in pieces:
                    yielded += 1
                    stats.documents += 1
                    stats.characters += len(piece)
                    yield piece
        problems = sum(stats.skipped.values()) - stats.skipped["empty"] - problems_before
        if yielded == 0 and problems == 0:
            raise QingLMError(f"{path} is empty (no text in it); remove it from the inputs or add text")


def split_long_document(doc: str, limit: int = MAX_DOC_CHARS) -> list[str]:
    """Return doc as pieces of at most `limit` characters, cut after a sentence end when one is in the
    last half of a piece; [doc] when it is short enough. The pieces, joined, give doc back exactly."""
    if len(doc) <= limit:
        return [doc]
    pieces, start = [], 0
    while len(doc) - start > limit:
        window = doc[start : start + limit]
        cut = max(window.rfind(ch) for ch in _SENTENCE_ENDS) + 1
        if cut <= limit // 2:  # no sentence end near: a hard cut (str indexes whole characters)
            cut = limit
        pieces.append(doc[start : start + cut])
        start += cut
    pieces.append(doc[start:])
    return pieces


def _lines(path: Path, encoding: str | None) -> Iterator[str]:
    """Yield the lines of a text file (CRLF/CR made LF, a leading BOM dropped)."""
    lineno = 0
    try:
        with open_text(path, encoding) as f:
            for lineno, line in enumerate(f, 1):
                yield line.lstrip("\ufeff") if lineno == 1 else line
    except UnicodeDecodeError as e:
        how = f"as {encoding}" if encoding else "with the detected encoding"
        raise QingLMError(
            f"{path}: cannot decode line {lineno + 1} {how} ({e.reason}); pass the right --encoding"
        ) from None


def _txt_texts(path: Path, encoding: str | None, txt_mode: str) -> Iterator[str]:
    """Yield the raw documents of a .txt file: lines or blank-line-separated paragraphs."""
    if txt_mode == "auto":
        with open_text(path, encoding) as f:
            try:
                sample = f.read(SAMPLE_BYTES)
            except UnicodeDecodeError:
                sample = ""  # _lines reports the decoding problem with its line number
        txt_mode = "paragraph" if _BLANK_LINE_BETWEEN_TEXT.search(sample) else "line"
    if txt_mode == "line":
        yield from _lines(path, encoding)
        return
    paragraph: list[str] = []
    for line in _lines(path, encoding):
        line = line.rstrip()
        if line:
            paragraph.append(line)
        elif paragraph:
            yield "\n".join(paragraph)
            paragraph = []
    if paragraph:
        yield "\n".join(paragraph)


def _record_text(record: object, text_field: str) -> tuple[str | None, str | None]:
    """Return (text, None) for a usable JSON record, else (None, the reason it is skipped)."""
    if isinstance(record, str):
        return record, None
    if not isinstance(record, dict):
        return None, "not a JSON object"
    if text_field not in record:
        return None, f"missing '{text_field}' field"
    text = record[text_field]
    return (text, None) if isinstance(text, str) else (None, "non-string text")


def _json_texts(path: Path, encoding: str | None, text_field: str, stats: ReadStats) -> Iterator[str]:
    """Yield the text fields of a JSON-lines file (or a .json array); bad records are counted."""
    records = _json_array(path, encoding) if path.suffix.lower() == ".json" else None
    where = "item" if records is not None else "line"
    good = bad = 0
    first_problem = ""
    for number, problem, record in records if records is not None else _parsed_lines(path, encoding):
        text, reason = (None, problem) if problem else _record_text(record, text_field)
        if text is None:
            bad += 1
            stats.skipped[reason] += 1
            first_problem = first_problem or f"{where} {number}: {reason}"
            continue
        good += 1
        yield text
    if good == 0 and bad > 0:
        raise QingLMError(
            f"{path}: no usable record ({first_problem}); each line must be a JSON object "
            f"with a string {text_field!r} field (see --text-field)"
        )


def _json_array(path: Path, encoding: str | None) -> list[tuple[int, str | None, object]] | None:
    """Return the items of a .json file holding one JSON array, or None when it is JSON lines."""
    with open_text(path, encoding) as f:
        head = f.read(4096).lstrip("\ufeff \t\r\n")
    if not head.startswith("["):
        return None
    # A JSON array cannot be streamed with the standard library; such files are usually small.
    try:
        items = json.loads("".join(_lines(path, encoding)))
    except ValueError as e:
        raise QingLMError(f"{path}: invalid JSON ({e}); fix the file or write it as JSON lines") from None
    if not isinstance(items, list):
        return None
    return [(i, None, item) for i, item in enumerate(items, 1)]


def _parsed_lines(path: Path, encoding: str | None) -> Iterator[tuple[int, str | None, object]]:
    """Yield (line number, problem or None, parsed object) for each non-blank line."""
    for number, line in enumerate(_lines(path, encoding), 1):
        if not line.strip():
            continue
        try:
            yield number, None, json.loads(line)
        except ValueError:
            yield number, "invalid JSON", None


def _parquet_texts(path: Path, text_field: str, stats: ReadStats) -> Iterator[str]:
    """Yield the text column of a parquet file, one row group batch at a time."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise QingLMError("reading .parquet files needs pyarrow: pip install pyarrow") from None
    try:
        parquet = pq.ParquetFile(path)
        column = _text_column(path, parquet.schema_arrow, text_field)
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[column]):
            for value in batch.column(0).to_pylist():
                if value is None:
                    stats.skipped["null text"] += 1
                else:
                    yield value
    except (pa.ArrowException, OSError) as e:
        raise QingLMError(f"{path} is not a readable parquet file ({e})") from None


def _text_column(path: Path, schema: object, text_field: str) -> str:
    """Return the name of the column holding the text: `text_field`, else the only string column."""
    import pyarrow as pa

    def is_string(t: object) -> bool:
        return pa.types.is_string(t) or pa.types.is_large_string(t) or str(t) == "string_view"

    columns = ", ".join(f"{f.name} ({f.type})" for f in schema)
    if text_field in schema.names:
        if not is_string(schema.field(text_field).type):
            raise QingLMError(f"{path}: column {text_field!r} is not text; columns are: {columns}")
        return text_field
    strings = [f.name for f in schema if is_string(f.type)]
    if len(strings) != 1:
        which = "no" if not strings else "several"
        raise QingLMError(
            f"{path}: no {text_field!r} column and {which} string columns; "
            f"pass --text-field with one of: {columns}"
        )
    return strings[0]
