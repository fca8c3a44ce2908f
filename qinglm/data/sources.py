"""Read users' text corpora (.txt, .jsonl/.json, also .gz/.zst; .parquet) as a stream of document strings."""

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
from typing import NamedTuple

from qinglm.data.encoding import LONE_SURROGATE, SAMPLE_BYTES, open_text, read_lines, whole_lines
from qinglm.data.files import CorruptInput, format_of
from qinglm.errors import QingLMError
from qinglm.io import OwnedDir, not_a_file

PathSpec = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".txt.gz", ".jsonl.zst", "...")
TXT_MODES = ("auto", "line", "paragraph")
REPORT_SUFFIX = "_report.json"  # what `data clean` / `data dedup` write beside their shards
# A longer document (a whole book on one line, say) is cut into pieces of at most this many
# characters, at a sentence end where one is near: tokenizing and packing stay fast and bounded.
MAX_DOC_CHARS = 100_000
_SENTENCE_ENDS = "。！？!?\n"
# Lines are read at most this many characters at a time, so one huge line cannot take unbounded
# memory: a longer .txt line is read on in pieces (then cut like any long document); a longer
# JSON line cannot be parsed in pieces, so it is skipped and counted.
MAX_LINE_CHARS = 1 << 23  # 8,388,608 characters, about 24 MB of Chinese UTF-8
MAX_JSON_ARRAY_CHARS = 1 << 26  # a .json file holding one array is parsed whole: at most this big

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
# Most Chinese text has nothing to map: a regex finds that ~15x faster than translate's per-character lookup.
_TO_NORMALIZE = re.compile("[" + "".join(re.escape(chr(cp)) for cp in sorted(_NORMALIZE_TABLE)) + "]")
_BLANK_LINE_BETWEEN_TEXT = re.compile(r"\S[^\S\n]*\n[^\S\n]*\n\s*\S")


@dataclass
class ReadStats:
    """Counts gathered while reading: files, documents, characters and skipped records by reason."""

    files: int = 0
    documents: int = 0
    characters: int = 0
    skipped: collections.Counter[str] = field(default_factory=collections.Counter)
    split_long: int = 0  # documents longer than MAX_DOC_CHARS, each cut into pieces
    first_skipped: str = ""  # where the first skipped record is, e.g. "a.txt line 2001 (undecodable bytes)"
    path: Path | None = None  # the file being read now (the file of the document just yielded)

    def skip(self, reason: str, where: str) -> None:
        """Return nothing; count one skipped record and remember where the first one was."""
        self.skipped[reason] += 1
        self.first_skipped = self.first_skipped or f"{where} ({reason})"

    def summary(self) -> str:
        """Return one human line, e.g. 'read 3 files, 12 documents, 345 characters; skipped 2 (empty: 2)'."""
        files = "1 file" if self.files == 1 else f"{self.files:,} files"
        line = f"read {files}, {self.documents:,} documents, {self.characters:,} characters"
        total = sum(self.skipped.values())
        if total:
            reasons = ", ".join(f"{reason}: {n:,}" for reason, n in self.skipped.most_common())
            line += f"; skipped {total:,} ({reasons})"
            if self.first_skipped:
                line += f", the first at {self.first_skipped}"
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
    return s.translate(_NORMALIZE_TABLE) if _TO_NORMALIZE.search(s) else s


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

    A directory contributes its *.txt, *.jsonl, *.json and *.parquet files, and .txt/.jsonl/.json
    files compressed as .gz or .zst (hidden ones excluded), sorted.  A glob contributes every file it matches, like the shell would.
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
    raise QingLMError(f"{text}: {not_a_file(path)}; check the path")  # missing, /dev/zero, a pipe, ...


def _scan_dir(root: Path) -> list[Path]:
    """Return the text files under `root`, recursively, sorted, hidden files and folders excluded, and
    the reports QingLM wrote beside its cleaned shards (`data clean`, `data dedup`)."""
    reports: dict[Path, set[str]] = {}  # folder -> the reports its QingLM manifest lists

    def report(p: Path) -> bool:
        if p.parent not in reports:
            owned = OwnedDir.read(p.parent)
            reports[p.parent] = {n for n in owned.names if n.endswith(REPORT_SUFFIX)} if owned else set()
        return p.name in reports[p.parent]

    return sorted(
        p
        for p in root.rglob("*")
        if format_of(p) is not None
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and not report(p)
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


class Raw(NamedTuple):
    """One record of a file before cleaning: its text, or why it is skipped, and where it starts."""

    number: int  # line, item or row number where the record starts
    text: str | None  # None: skipped, for `reason`
    reason: str = ""
    more: bool = False  # the text goes on in the next record (a line longer than MAX_LINE_CHARS)
    unit: str = "line"


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
        stats.path = path
        kind, hint = format_of(path), ""
        if kind == ".parquet":
            from qinglm.data.parquet import parquet_texts

            records = (
                Raw(n, text, reason, unit="row") for n, text, reason in parquet_texts(path, text_field)
            )
        elif kind in (".jsonl", ".json"):
            records = _json_texts(path, encoding, text_field)
            hint = f"each line must be a JSON object with a string {text_field!r} field (see --text-field)"
        else:
            records = _txt_texts(path, encoding, txt_mode)
        yield from _documents_of(path, records, nfkc, stats, hint)


def _documents_of(
    path: Path, records: Iterator[Raw], nfkc: bool, stats: ReadStats, hint: str
) -> Iterator[str]:
    """Yield the cleaned documents of one file's records; count the skipped ones and where they are.
    Raise QingLMError, with `hint`, when the file gives no document at all."""
    yielded, first_problem, continued, last = 0, "", False, 0
    try:
        for record in records:
            last = record.number
            text, reason = record.text, record.reason
            if text is not None and LONE_SURROGATE.search(text):
                text, reason = None, "undecodable bytes"
            if text is None:
                stats.skip(reason, f"{path} {record.unit} {record.number}")
                first_problem = first_problem or f"{record.unit} {record.number}: {reason}"
            elif doc := (normalize_text(text) if nfkc else text).strip():
                pieces = split_long_document(doc)
                stats.split_long += (len(pieces) > 1 or record.more) and not continued
                for piece in pieces:
                    yielded += 1
                    stats.documents += 1
                    stats.characters += len(piece)
                    yield piece
            elif not (record.more or continued):
                stats.skipped["empty"] += 1
            continued = record.more
    except CorruptInput as e:
        reason = "truncated or corrupt compressed data"
        stats.skip(reason, f"{path} after line {last}")
        first_problem = first_problem or f"after line {last}: {reason} ({e})"
    if yielded == 0 and first_problem:
        if "undecodable" in first_problem:
            hint = "pass the right --encoding"
        raise QingLMError(f"{path}: no usable record ({first_problem}); {hint or 'check the file'}")
    if yielded == 0:
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


def _txt_texts(path: Path, encoding: str | None, txt_mode: str) -> Iterator[Raw]:
    """Yield the raw documents of a .txt file: lines or blank-line-separated paragraphs."""
    if txt_mode == "auto":
        with open_text(path, encoding) as f:
            try:
                sample = f.read(SAMPLE_BYTES)
            except CorruptInput:
                sample = ""  # reported, with where, when the lines are read
        txt_mode = "paragraph" if _BLANK_LINE_BETWEEN_TEXT.search(sample) else "line"
    lines = read_lines(path, encoding, MAX_LINE_CHARS)
    if txt_mode == "line":
        for number, text, more in lines:
            yield Raw(number, text, more=more)
        return
    parts: list[str] = []  # the paragraph so far, its lines rstripped and ended by "\n"
    start = size = 0
    in_line = False  # the last piece read ends inside a long line
    for number, text, more in lines:
        if not in_line and not text.strip():  # a blank line ends the paragraph
            if parts:
                yield _paragraph(start, parts)
                parts, size = [], 0
            continue
        start = start if parts else number
        parts.append(text if more else text.rstrip() + "\n")
        size += len(text)
        in_line = more
        if size >= MAX_LINE_CHARS:  # a paragraph too long to hold: hand it on in pieces
            yield _paragraph(start, parts, more=True)
            parts, size = [], 0
    if parts:
        yield _paragraph(start, parts)


def _paragraph(start: int, parts: list[str], more: bool = False) -> Raw:
    """Return the record of a paragraph starting at line `start`; one with undecodable bytes is
    placed at the line that holds them, so the skip names that line."""
    text = "".join(parts)
    bad = LONE_SURROGATE.search(text)
    return Raw(start + text.count("\n", 0, bad.start()) if bad else start, text, more=more)


def _record_text(record: object, text_field: str) -> tuple[str | None, str]:
    """Return (text, "") for a usable JSON record, else (None, the reason it is skipped)."""
    if isinstance(record, str):
        return record, ""
    if not isinstance(record, dict):
        return None, "not a JSON object"
    if text_field not in record:
        return None, f"missing '{text_field}' field"
    text = record[text_field]
    return (text, "") if isinstance(text, str) else (None, "non-string text")


def _json_texts(path: Path, encoding: str | None, text_field: str) -> Iterator[Raw]:
    """Yield the text fields of a JSON-lines file (or of a .json array), or why each is skipped."""
    items = _json_array(path, encoding) if format_of(path) == ".json" else None
    if items is not None:
        for number, item in enumerate(items, 1):
            yield Raw(number, *_record_text(item, text_field), unit="item")
        return
    for number, record, reason in json_lines(path, encoding):
        yield Raw(number, None, reason) if reason else Raw(number, *_record_text(record, text_field))


def json_lines(path: Path, encoding: str | None) -> Iterator[tuple[int, object, str]]:
    """Yield (line number, record, "") for each non-blank line of a JSON-lines file, or (line number,
    None, why) for a line skipped: longer than MAX_LINE_CHARS, undecodable bytes, or not JSON.

    The one reader of user JSONL (corpora, SFT and DPO data): memory stays bounded by MAX_LINE_CHARS
    whatever the lines' lengths.
    """
    for number, line in whole_lines(path, encoding, MAX_LINE_CHARS):
        if line is None:
            yield number, None, f"line longer than {MAX_LINE_CHARS:,} characters"
        elif LONE_SURROGATE.search(line):
            yield number, None, "undecodable bytes"
        elif line.strip():
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):  # RecursionError: nested too deep
                yield number, None, "invalid JSON"
                continue
            yield number, record, ""


def _json_array(path: Path, encoding: str | None) -> list[object] | None:
    """Return the items of a .json file holding one JSON array, or None when it is JSON lines."""
    with open_text(path, encoding) as f:
        try:
            head = f.read(4096).lstrip("\ufeff \t\r\n")
            if not head.startswith("["):
                return None
            # A JSON array cannot be streamed with the standard library: it is parsed whole, if small.
            text = head + f.read(MAX_JSON_ARRAY_CHARS)
        except CorruptInput as e:
            raise QingLMError(
                f"{path} is truncated or corrupt ({e}); download or compress it again"
            ) from None
        if f.read(1):
            raise QingLMError(
                f"{path} holds a JSON array longer than {MAX_JSON_ARRAY_CHARS:,} characters, too big to "
                "parse at once; write it as JSON lines (one object per line), which is read as a stream"
            )
    try:
        items = json.loads(text)
    except ValueError as e:
        raise QingLMError(f"{path}: invalid JSON ({e}); fix the file or write it as JSON lines") from None
    return items if isinstance(items, list) else None
