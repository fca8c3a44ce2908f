"""Clean a Chinese corpus: fix-ups (HTML, boilerplate, URL / e-mail / phone masking, Traditional →
Simplified) and filters (length, CJK share, Gopher-style repetition, symbols, punctuation, language),
each switchable and counted.

The repetition rules of Gopher (Rae et al. 2021, table A1) count words; Chinese has no spaces, so here
n-grams are of characters, with n about 1.5-2 times the word n (a Chinese word is 1.5 characters
on average). Libraries such as datatrove apply these rules to words from a word segmenter (spaCy +
jieba for Chinese), which this module does not need.
"""

from __future__ import annotations

import functools
import html
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from qinglm.data.parallel import chunked_map
from qinglm.errors import QingLMError
from qinglm.typecheck import check_types

FIXES = ("html", "boilerplate", "mask", "t2s")
FILTERS = ("length", "cjk", "repetition", "symbols", "punctuation", "langid")
OPTIONAL = ("t2s", "langid")  # off unless asked for: they need an extra package
EXAMPLES = 3  # dropped documents kept per filter in the report
EXAMPLE_CHARS = 200
SHARE = {"within": "[0, 1]"}  # a share of a document's characters, lines or paragraphs

_TAG = re.compile(r"<\s*/?\s*[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?\s*>")
_SCRIPT = re.compile(r"<\s*(script|style)\b.*?<\s*/\s*\1\s*>", re.S | re.I)
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_HTML_HINT = re.compile(
    r"<\s*/?\s*(?:p|br|div|span|a|b|i|li|ul|td|tr|table|h\d|html|body|script|style|img)\b"
    r"|&(?:nbsp|amp|lt|gt|quot|#\d+);",
    re.I,
)
_BOILERPLATE = re.compile(
    r"版权所有|copyright|©|all rights reserved|免责声明|责任编辑|本文来源|转载请注明|点击(?:这里|查看|进入|下载)"
    r"|扫(?:一扫|码)|关注(?:我们|公众号|微信)|上一篇|下一篇|返回(?:顶部|首页)|ICP备|分享到|阅读原文",
    re.I,
)
BOILERPLATE_LINE_CHARS = 60  # a line naming boilerplate is removed only when it is this short or shorter
_URL = re.compile(r"(?:https?://|ftp://|www\.)[^\s<>\"'，。！？、；：）】」]+", re.I)
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
_PHONE = re.compile(r"(?<!\d)(?:(?:\+?86[- ]?)?1[3-9]\d{9}|0\d{2,3}-?\d{7,8}|400-?\d{3}-?\d{4})(?!\d)")
_PARAGRAPHS = re.compile(r"\n\s*\n")
_CJK = re.compile(  # CJK ideographs: basic block, extension A, compatibility, extensions B and on
    "[\u4e00-\u9fff\u3400-\u4dbf\uf900-\ufaff\U00020000-\U0003134f]"
)


@dataclass
class CleanConfig:
    """Which fix-ups and filters run, and their thresholds."""

    enabled: set[str] = field(default_factory=lambda: set(FIXES + FILTERS) - set(OPTIONAL))
    min_chars: int = field(default=20, metadata={"within": "[0, inf)"})
    max_chars: int = field(default=100_000, metadata={"within": "[0, inf)"})
    min_cjk: float = field(default=0.3, metadata=SHARE)  # CJK ideographs / non-space characters
    max_dup_line: float = field(default=0.3, metadata=SHARE)  # duplicate lines / lines (Gopher)
    max_dup_para: float = field(default=0.3, metadata=SHARE)  # duplicate paragraphs / paragraphs
    max_dup_line_chars: float = field(default=0.2, metadata=SHARE)  # characters in duplicate lines / all
    max_dup_para_chars: float = field(default=0.2, metadata=SHARE)
    # (n, most share of the characters): the most frequent n-gram (seen 3 times or more), and all the
    # n-grams seen twice or more; set above the 99.9th percentile of edited news (pd1998, documents of
    # 100+ characters), since characters repeat more than words do
    top_ngrams: tuple[tuple[int, float], ...] = ((3, 0.25), (5, 0.25), (8, 0.25))
    dup_ngrams: tuple[tuple[int, float], ...] = ((10, 0.35), (15, 0.30), (20, 0.25))
    # symbol characters (#, emoji, box drawing, ...) / non-space characters
    max_symbols: float = field(default=0.1, metadata=SHARE)
    max_punctuation: float = field(default=0.3, metadata=SHARE)
    langid: str = "zh"
    mask: dict[str, str] = field(
        default_factory=lambda: {"url": "<URL>", "email": "<EMAIL>", "phone": "<PHONE>"}
    )

    def __post_init__(self) -> None:
        check_types(self)  # each number's type and range
        unknown = set(self.enabled) - set(FIXES + FILTERS)
        if unknown:
            raise QingLMError(
                f"unknown cleaning step(s) {', '.join(sorted(unknown))}; known: {', '.join(FIXES + FILTERS)}"
            )
        if self.min_chars > self.max_chars:
            raise QingLMError(
                f"--min-chars ({self.min_chars}) must not be more than --max-chars ({self.max_chars})"
            )


@dataclass
class CleanReport:
    """Documents read, kept, changed by each fix-up and dropped by each filter (with a few examples)."""

    documents: int = 0
    kept: int = 0
    changed: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[dict[str, str]]] = field(default_factory=dict)

    def drop(self, step: str, reason: str, doc: str) -> None:
        """Return nothing; count doc dropped by step, keeping it as an example while there are few."""
        self.dropped[step] += 1
        shown = self.examples.setdefault(step, [])
        if len(shown) < EXAMPLES:
            shown.append({"reason": reason, "text": doc[:EXAMPLE_CHARS]})

    def as_dict(self, config: CleanConfig) -> dict:
        return {
            "documents": self.documents,
            "kept": self.kept,
            "changed": {s: self.changed[s] for s in FIXES if s in config.enabled},
            "dropped": {s: self.dropped[s] for s in FILTERS if s in config.enabled},
            "examples": self.examples,
            "config": {k: sorted(v) if isinstance(v, set) else v for k, v in vars(config).items()},
        }


# ---------------------------------------------------------------------------- fix-ups: text -> text


def strip_html(text: str) -> str:
    """Return text without HTML tags, scripts, styles and comments, its entities decoded; block tags
    become line breaks. Text that does not look like HTML is returned as it is."""
    if not _HTML_HINT.search(text):
        return text
    text = _COMMENT.sub("", _SCRIPT.sub("", text))
    text = re.sub(r"<\s*(?:br|/p|/div|/li|/h\d|/tr)\b[^>]*>", "\n", text, flags=re.I)
    text = html.unescape(_TAG.sub("", text)).replace("\xa0", " ")
    return re.sub(r"\n[ \t]*(?:\n[ \t]*)+", "\n\n", text).strip()


def strip_boilerplate(text: str) -> str:
    """Return text without its short lines of web boilerplate (copyright, "click here", share, ...)."""
    if not _BOILERPLATE.search(text):
        return text
    lines = text.split("\n")
    kept = [ln for ln in lines if len(ln) > BOILERPLATE_LINE_CHARS or not _BOILERPLATE.search(ln)]
    return "\n".join(kept).strip()


def mask_contacts(text: str, mask: dict[str, str]) -> str:
    """Return text with URLs, e-mail addresses and phone numbers replaced by mask's placeholders."""
    text = _URL.sub(mask["url"], text)
    text = _EMAIL.sub(mask["email"], text)
    return _PHONE.sub(mask["phone"], text)


def _t2s() -> Callable[[str], str]:
    try:
        import opencc
    except ImportError:
        raise QingLMError("--t2s needs OpenCC: pip install 'qinglm[data]' (or pip install opencc)") from None
    return opencc.OpenCC("t2s").convert


# ---------------------------------------------------------------------------- filters: text -> reason or ""


def check_length(text: str, c: CleanConfig) -> str:
    n = len(text)
    if n < c.min_chars:
        return f"{n} characters < {c.min_chars}"
    return f"{n} characters > {c.max_chars}" if n > c.max_chars else ""


def _non_space(text: str) -> int:
    return max(1, len("".join(text.split())))


@functools.cache
def _deleting(kind: str) -> dict[int, None]:
    """Return a str.translate table deleting the characters of a Unicode category class ("S", "P")."""
    table = dict.fromkeys(cp for cp in range(0x10000) if unicodedata.category(chr(cp))[0] == kind)
    if kind == "S":
        table[ord("#")] = None
    return table


def _count(text: str, kind: str) -> int:
    """Return how many characters of text are in the category class (counted in C, not per character)."""
    return len(text) - len(text.translate(_deleting(kind)))


def check_cjk(text: str, c: CleanConfig) -> str:
    share = len(_CJK.findall(text)) / _non_space(text)
    return f"CJK share {share:.2f} < {c.min_cjk}" if share < c.min_cjk else ""


def _duplicates(items: list[str]) -> tuple[int, int]:
    """Return (how many items repeat an earlier one, their characters)."""
    seen: set[str] = set()
    n = chars = 0
    for item in items:
        if item in seen:
            n, chars = n + 1, chars + len(item)
        seen.add(item)
    return n, chars


def dup_ngram_share(text: str, n: int) -> float:
    """Return the share of characters covered by character n-grams that occur more than once."""
    if len(text) < n:
        return 0.0
    grams = [text[i : i + n] for i in range(len(text) - n + 1)]
    counts = Counter(grams)
    if len(counts) == len(grams):  # nothing repeats (most documents)
        return 0.0
    covered = bytearray(len(text))
    for i, g in enumerate(grams):
        if counts[g] > 1:
            covered[i : i + n] = b"\x01" * n
    return sum(covered) / len(text)


def check_repetition(text: str, c: CleanConfig) -> str:
    total = max(1, len(text))
    for unit, parts, max_n, max_chars in (
        ("paragraph", _PARAGRAPHS.split(text), c.max_dup_para, c.max_dup_para_chars),
        ("line", [ln for ln in text.split("\n") if ln.strip()], c.max_dup_line, c.max_dup_line_chars),
    ):
        n, chars = _duplicates([p.strip() for p in parts])
        if parts and n / len(parts) > max_n:
            return f"duplicate {unit}s {n}/{len(parts)} > {max_n}"
        if chars / total > max_chars:
            return f"characters in duplicate {unit}s {chars / total:.2f} > {max_chars}"
    flat = "".join(text.split())
    for n, limit in c.top_ngrams:
        if len(flat) > n:
            gram, count = Counter(flat[i : i + n] for i in range(len(flat) - n + 1)).most_common(1)[0]
            if count > 2 and count * n / len(flat) > limit:
                return f"top {n}-gram {gram!r} covers {count * n / len(flat):.2f} > {limit}"
    rules = sorted(c.dup_ngrams)
    for i, (n, limit) in enumerate(rules):
        share = dup_ngram_share(flat, n)
        if share > limit:
            return f"duplicate {n}-grams cover {share:.2f} > {limit}"
        # repeated longer n-grams cover no more than repeated shorter ones: stop when none can fail
        if share <= min((lim for _, lim in rules[i + 1 :]), default=1.0):
            break
    return ""


def check_symbols(text: str, c: CleanConfig) -> str:
    share = _count(text, "S") / _non_space(text)
    return f"symbol share {share:.2f} > {c.max_symbols}" if share > c.max_symbols else ""


def check_punctuation(text: str, c: CleanConfig) -> str:
    share = _count(text, "P") / _non_space(text)
    return f"punctuation share {share:.2f} > {c.max_punctuation}" if share > c.max_punctuation else ""


def _langid(want: str) -> Callable[[str, CleanConfig], str]:
    try:
        import py3langid
        from py3langid import langid
    except ImportError:
        raise QingLMError(
            "--langid needs py3langid: pip install 'qinglm[data]' (or pip install py3langid)"
        ) from None
    if langid.IDENTIFIER is None:
        py3langid.classify("")  # loads the model, which holds the languages it knows
    known = sorted(langid.IDENTIFIER.nb_classes)
    if want not in known:  # it would drop every document
        raise QingLMError(
            f"--lang {want!r} is not a language py3langid knows; choose one of {' '.join(known)}"
        )

    def check(text: str, c: CleanConfig) -> str:
        lang = py3langid.classify(text.replace("\n", " "))[0]
        return f"language {lang} != {want}" if lang != want else ""

    return check


CHECKS: dict[str, Callable[[str, CleanConfig], str]] = {
    "length": check_length,
    "cjk": check_cjk,
    "repetition": check_repetition,
    "symbols": check_symbols,
    "punctuation": check_punctuation,
}


CHUNK = 256  # documents per task sent to a worker


def clean_documents(
    docs: Iterable[str], config: CleanConfig, report: CleanReport, workers: int = 1
) -> Iterator[str]:
    """Return an iterator over the cleaned documents that pass every enabled filter, counting in report;
    with workers > 1 the documents are cleaned in that many processes (same output, in order)."""
    _steps(config)  # a missing package is reported before any output
    return _cleaned(docs, config, report, workers)


def _steps(config: CleanConfig) -> tuple[list[tuple[str, Callable[[str], str]]], list]:
    """Return the enabled (name, fix) and (name, check) steps, in the order they run."""
    on = config.enabled
    fixes: list[tuple[str, Callable[[str], str]]] = []
    if "html" in on:
        fixes.append(("html", strip_html))
    if "boilerplate" in on:
        fixes.append(("boilerplate", strip_boilerplate))
    if "mask" in on:
        fixes.append(("mask", lambda t: mask_contacts(t, config.mask)))
    if "t2s" in on:
        fixes.append(("t2s", _t2s()))
    checks = [(name, CHECKS[name]) for name in FILTERS if name in on and name in CHECKS]
    if "langid" in on:
        checks.append(("langid", _langid(config.langid)))
    return fixes, checks


_worker: dict[str, Any] = {}  # this process's config and steps (set by _init_worker)


def _init_worker(config: CleanConfig) -> None:
    _worker["config"], (_worker["fixes"], _worker["checks"]) = config, _steps(config)


def clean_chunk(docs: list[str]) -> list[tuple[str, list[str], tuple[str, str] | None]]:
    """Return (fixed document, the fixes that changed it, (filter, reason) when dropped) for each doc."""
    config, out = _worker["config"], []
    for doc in docs:
        changed = []
        for name, fix in _worker["fixes"]:
            fixed = fix(doc)
            if fixed != doc:
                changed.append(name)
                doc = fixed
        dropped = None
        for name, check in _worker["checks"]:
            if reason := check(doc, config):
                dropped = (name, reason)
                break
        out.append((doc[:EXAMPLE_CHARS] if dropped else doc, changed, dropped))  # only examples need it
    return out


def _cleaned(docs: Iterable[str], config: CleanConfig, report: CleanReport, workers: int) -> Iterator[str]:
    chunks = chunked_map(
        clean_chunk, docs, workers=workers, chunk=CHUNK, init=_init_worker, initargs=(config,)
    )
    for results in chunks:
        for doc, changed, dropped in results:
            report.documents += 1
            report.changed.update(changed)
            if dropped:
                report.drop(*dropped, doc)
            else:
                report.kept += 1
                yield doc
