"""A training corpus (built-in corpus names and files) as one stream of ("train" | "val", document)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from qinglm.data.builtin import builtin_labelled, is_builtin
from qinglm.data.sample import corpus_bytes
from qinglm.data.sources import ReadStats, read_documents
from qinglm.data.splits import PD1998_BLOCK, SMALL_CORPUS_BYTES, Splitter, first_val_block

# How each built-in corpus is split when split_by is not "document" (builtin_labelled).
_BUILTIN_UNITS = {
    "pd1998": f"blocks of whole articles (>= {PD1998_BLOCK} paragraphs)",
    "reviews": "review",
    "idioms": "idiom",
    "passkey": "key (held-out keys in val only)",
}


def labelled_documents(
    specs: list[str], cfg: Any, stats: ReadStats | None = None
) -> Iterator[tuple[str, str]]:
    """Yield ("train" | "val", document) for the built-in corpora and files in specs, in one streaming
    pass; cfg (a TrainConfig) gives split_by, split_block, val_fraction and how to read the files."""
    stats = stats if stats is not None else ReadStats()
    splitter = Splitter(resolve_split_by(specs, cfg), cfg.val_fraction, cfg.split_block)
    for spec in specs:
        if is_builtin(spec):
            yield from builtin_labelled(spec, cfg.val_fraction, cfg.split_by)
            continue
        for doc in read_documents(
            spec, encoding=cfg.encoding, nfkc=cfg.nfkc, text_field=cfg.text_field, stats=stats
        ):
            yield splitter(doc, stats.path), doc


def resolve_split_by(specs: list[str], cfg: Any) -> str:
    """Return cfg.split_by, except "document" for "auto" on files too small for one held-out block
    (their documents are counted first: one quick extra pass over less than SMALL_CORPUS_BYTES)."""
    files = [spec for spec in specs if not is_builtin(spec)]
    if cfg.split_by != "auto" or not files or corpus_bytes(files) >= SMALL_CORPUS_BYTES:
        return cfg.split_by
    docs = read_documents(files, encoding=cfg.encoding, nfkc=cfg.nfkc, text_field=cfg.text_field)
    n = sum(1 for _ in docs)
    return "document" if n < (first_val_block(cfg.val_fraction) + 1) * cfg.split_block else "auto"


def describe_split(specs: list[str], cfg: Any) -> str:
    """Return how the val split was chosen, e.g. "2% held out: pd1998 by blocks of whole articles"."""
    parts = []
    for spec in specs:
        if is_builtin(spec):
            unit = "paragraph" if cfg.split_by == "document" and spec == "pd1998" else _BUILTIN_UNITS[spec]
            parts.append(f"{spec} by {unit}")
    if any(not is_builtin(spec) for spec in specs):
        by = resolve_split_by(specs, cfg)
        parts.append(
            {
                "document": "files by document",
                "block": f"files by blocks of {cfg.split_block} documents",
                "file": "files by file",
                "auto": f"files by blocks of {cfg.split_block} documents (.txt) or by document (records)",
            }[by]
        )
    return f"{cfg.val_fraction:.0%} held out: " + ", ".join(parts)
