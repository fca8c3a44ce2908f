"""Near-duplicate recall and distinct documents lost, on planted People's Daily copies, for dedup settings:
`python -m benchmarks.dedup_recall [--per-kind 300] [--settings 5/0.7/16 3/0.6/0 ...] [--variants 300 300]`.

The distinct documents are pd1998's paragraphs of at least 80 characters, less the later one of each pair
that quotes another (character 3-gram Jaccard >= 0.6). After them, shuffled, come planted copies of some of
them (1, 2, 3, 5, 10% of the characters replaced; sentences reordered; 5% inserted) and loosely similar
distinct paragraphs (half the sentences of one paragraph and half of another; variants with 25% of the
characters replaced, five of each paragraph). pd1998's own pairs that share phrases (3-gram Jaccard 0.3-0.6,
e.g. two weather reports) are a distinct kind too. A setting is `ngram/threshold/bands` (bands 0: chosen for
the threshold); for each, the table gives the share of each kind that dedup drops, and a second table the
share of planted pairs dropped per bin of their true Jaccard (that setting's shingles). A last table gives the
share dropped and the CPU seconds on many variants of each paragraph, the cost of proposing more candidates.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import random
import re
import time

from qinglm.data.builtin import builtin_documents
from qinglm.data.dedup import DedupConfig, DedupReport, dedup_documents, exact_key, shingles

MIN_CHARS = 80
EDITS = (0.01, 0.02, 0.03, 0.05, 0.10)
COPIES = [f"edit {round(p * 100)}%" for p in EDITS] + ["swap", "insert 5%"]
DISTINCT = ["distinct", "half", "variant 25%", "pd1998 pairs"]
BINS = [0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.01]
DEFAULT_SETTINGS = ["5/0.7/16", "5/0.6/16", "5/0.7/0", "5/0.6/0", "5/0.5/0", "4/0.65/0", "3/0.7/0", "3/0.6/0"]
_SENTENCE = re.compile(r"[^。！？；]+[。！？；]*")


def jaccard(a: str, b: str, n: int) -> float:
    """Return the Jaccard similarity of a's and b's shingle sets, as dedup makes them."""
    x, y = set(shingles(a, n)), set(shingles(b, n))
    return len(x & y) / max(len(x | y), 1)


def _best_earlier(sets: list[set[str]]) -> list[tuple[float, int]]:
    """Return, per set, the highest Jaccard with an earlier set and its number (-1: none shares a gram);
    grams held by more than 300 sets are too common to propose a pair."""
    postings: dict[str, list[int]] = collections.defaultdict(list)
    for i, s in enumerate(sets):
        for g in s:
            postings[g].append(i)
    best = []
    for i, s in enumerate(sets):
        shared = collections.Counter(j for g in s if len(postings[g]) <= 300 for j in postings[g] if j < i)
        pairs = [(len(s & sets[j]) / len(s | sets[j]), j) for j, _ in shared.most_common(20)]
        best.append(max(pairs, default=(0.0, -1)))
    return best


def distinct_paragraphs() -> tuple[list[str], list[tuple[int, int]]]:
    """Return pd1998's distinct paragraphs of MIN_CHARS or more, and the pairs (later, earlier) of them that
    share phrases (3-gram Jaccard 0.3 to 0.6); a paragraph at 0.6 or more to an earlier one (a quote) is left
    out."""
    seen, docs = set(), []
    for d in builtin_documents("pd1998"):
        if len(d) >= MIN_CHARS and exact_key(d) not in seen:
            seen.add(exact_key(d))
            docs.append(d)
    best = _best_earlier([set(shingles(d, 3)) for d in docs])
    keep = [i for i, (j, _) in enumerate(best) if j < 0.6]
    number = {old: new for new, old in enumerate(keep)}
    pairs = [(number[i], number[e]) for i in keep if 0.3 <= best[i][0] < 0.6 and (e := best[i][1]) in number]
    return [docs[i] for i in keep], pairs


def _replace(text: str, share: float, rng: random.Random, chars: list[str]) -> str:
    """Return text with round(share * len) of its word characters (at least one) replaced by others."""
    out = list(text)
    where = [i for i, c in enumerate(out) if c.isalnum()]
    for i in rng.sample(where, min(len(where), max(1, round(share * len(text))))):
        out[i] = rng.choice([c for c in rng.sample(chars, 2) if c != out[i]])
    return "".join(out)


def _halves(sentences: list[str]) -> tuple[str, str]:
    """Return the paragraph of these sentences cut at the sentence end nearest its middle."""
    ends = list(itertools.accumulate(len(s) for s in sentences))[:-1]
    cut = min(ends, key=lambda e: abs(2 * e - ends[-1] - len(sentences[-1])))
    text = "".join(sentences)
    return text[:cut], text[cut:]


def planted(per_kind: int, seed: int = 0) -> list[tuple[str, str, int]]:
    """Return [(kind, text, source)]: the distinct paragraphs (source -1, or the earlier paragraph of a pd1998
    pair), then per_kind planted documents of each other kind in shuffled order, each with the number of the
    paragraph it was made from."""
    docs, pairs = distinct_paragraphs()
    rng = random.Random(seed)
    chars = sorted({c for d in docs for c in d if "\u4e00" <= c <= "\u9fff"})
    earlier = dict(pairs)
    out = [
        ("pd1998 pairs" if i in earlier else "distinct", d, earlier.get(i, -1)) for i, d in enumerate(docs)
    ]
    sentences = [_SENTENCE.findall(d) for d in docs]
    several = [i for i, s in enumerate(sentences) if len(s) >= 2]
    extra = []
    for share, kind in zip(EDITS, COPIES):
        extra += [
            (kind, _replace(docs[i], share, rng, chars), i) for i in rng.sample(range(len(docs)), per_kind)
        ]
    for i in rng.sample(several, per_kind):
        order = list(range(len(sentences[i])))
        while order == sorted(order):
            rng.shuffle(order)
        extra.append(("swap", "".join(sentences[i][k] for k in order), i))
    for i in rng.sample(range(len(docs)), per_kind):
        d, other = docs[i], docs[rng.randrange(len(docs))]
        n = max(2, round(0.05 * len(d)))
        at, start = rng.randrange(len(d)), rng.randrange(len(other) - n)
        extra.append(("insert 5%", d[:at] + other[start : start + n] + d[at:], i))
    halves = 0
    while halves < per_kind:  # the first half of one paragraph and the second of another, neither much longer
        i, j = rng.sample(several, 2)
        a, b = _halves(sentences[i]), _halves(sentences[j])
        if 0.4 < len(a[0]) / (len(a[0]) + len(b[1])) < 0.6:
            extra.append(("half", a[0] + b[1], i))
            halves += 1
    for i in rng.sample(range(len(docs)), per_kind // 5):
        extra += [("variant 25%", _replace(docs[i], 0.25, rng, chars), i) for _ in range(5)]
    rng.shuffle(extra)
    return out + extra


def dropped(texts: list[str], config: DedupConfig) -> list[bool]:
    """Return, per text, whether dedup drops it."""
    kept = iter(dedup_documents(lambda: iter(texts), config, DedupReport()))
    following, out = next(kept, None), []
    for text in texts:
        out.append(text is not following)
        if text is following:
            following = next(kept, None)
    return out


def many_variants(settings: list[str], paragraphs: int, rounds: int) -> None:
    """Print, per setting, the share of documents dropped and the CPU seconds on `rounds` variants of each of
    the first `paragraphs` pd1998 paragraphs of 20+ characters, 8% of the characters replaced in each (what
    benchmarks/corpus_scale.py writes, at a smaller scale): many loosely similar documents, so many
    candidates to check."""
    rng = random.Random(0)
    docs = [d for d in builtin_documents("pd1998") if len(d) >= 20][:paragraphs]
    chars = sorted({c for d in docs for c in d if "\u4e00" <= c <= "\u9fff"})
    texts = [_replace(d, 0.08, rng, chars) for _ in range(rounds) for d in docs]
    print(f"\n{len(texts):,} documents, {rounds} variants of each of {len(docs)} paragraphs (8% replaced)\n")
    print("| setting | dropped, under 80 characters | dropped, 80 or more | CPU s |")
    print("|---|---:|---:|---:|")
    for spec in settings:
        config = _setting(spec)
        t0 = time.process_time()
        lost = dropped(texts, config)
        seconds = time.process_time() - t0
        short = [x for x, t in zip(lost, texts) if len(t) < 80]
        long = [x for x, t in zip(lost, texts) if len(t) >= 80]
        print(
            f"| {_name(config)} | {100 * sum(short) / max(len(short), 1):.1f}% "
            f"| {100 * sum(long) / max(len(long), 1):.1f}% | {seconds:.1f} |"
        )


def _name(config: DedupConfig) -> str:
    bands = config.lsh_bands()
    return f"{config.ngram}-grams, {bands}x{config.num_perm // bands}, t {config.threshold}"


def _setting(spec: str) -> DedupConfig:
    ngram, threshold, bands = spec.split("/")
    return DedupConfig(ngram=int(ngram), threshold=float(threshold), bands=int(bands))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-kind", type=int, default=300, help="planted documents of each kind")
    ap.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, help="ngram/threshold/bands")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--variants",
        type=int,
        nargs=2,
        default=(300, 300),
        metavar=("PARAGRAPHS", "ROUNDS"),
        help="the many-variants corpus (0 0: skip it)",
    )
    args = ap.parse_args()
    corpus = planted(args.per_kind, args.seed)
    texts = [t for _, t, _ in corpus]
    kinds = collections.Counter(k for k, _, _ in corpus)
    print(f"{len(corpus):,} documents: " + ", ".join(f"{k} {n:,}" for k, n in kinds.items()) + "\n")
    sources = [(n, k, t, texts[s]) for n, (k, t, s) in enumerate(corpus) if s >= 0]
    ngrams = sorted({_setting(s).ngram for s in args.settings})
    similarity = {n: [jaccard(t, src, n) for _, _, t, src in sources] for n in ngrams}
    print("| mean Jaccard to the source | " + " | ".join(COPIES + DISTINCT[1:]) + " |")
    print("|---|" + "---:|" * (len(COPIES) + len(DISTINCT) - 1))
    for n in ngrams:
        by_kind = collections.defaultdict(list)
        for (_, kind, _, _), j in zip(sources, similarity[n]):
            by_kind[kind].append(j)
        cells = [f"{sum(v) / len(v):.2f}" for v in (by_kind[k] for k in COPIES + DISTINCT[1:])]
        print(f"| {n}-grams | " + " | ".join(cells) + " |")
    rows, curve = [], []
    for spec in args.settings:
        config = _setting(spec)
        t0 = time.process_time()
        lost = dropped(texts, config)
        seconds = time.process_time() - t0
        share = {k: sum(x for x, (kk, _, _) in zip(lost, corpus) if kk == k) / kinds[k] for k in kinds}
        distinct_lost = sum(x for x, (k, _, _) in zip(lost, corpus) if k in DISTINCT)
        all_distinct = sum(kinds[k] for k in DISTINCT)
        name = _name(config)
        rows.append(
            f"| {name} | "
            + " | ".join(f"{100 * share[k]:.1f}" for k in COPIES)
            + f" | **{100 * distinct_lost / all_distinct:.2f}** | "
            + " | ".join(f"{100 * share[k]:.1f}" for k in DISTINCT[1:])
            + f" | {seconds:.1f} |"
        )
        bins = collections.defaultdict(lambda: [0, 0])
        for (n, _, _, _), j in zip(sources, similarity[config.ngram]):
            b = next(i for i in range(len(BINS) - 1) if j < BINS[i + 1])
            bins[b][0] += lost[n]
            bins[b][1] += 1
        curve.append(
            f"| {name} | "
            + " | ".join(
                f"{100 * bins[b][0] / bins[b][1]:.0f} ({bins[b][1]})" if bins[b][1] else "-"
                for b in range(len(BINS) - 1)
            )
            + " |"
        )
    print("\nshare dropped, %: copies found (left), distinct documents lost (right)\n")
    print(
        "| setting | " + " | ".join(COPIES) + " | distinct lost | " + " | ".join(DISTINCT[1:]) + " | CPU s |"
    )
    print("|---|" + "---:|" * (len(COPIES) + len(DISTINCT) + 1))
    print("\n".join(rows))
    print("\nplanted pairs dropped per bin of their true Jaccard (that setting's shingles), % (pairs)\n")
    heads = [f"{a:.1f}-{min(b, 1):.1f}" for a, b in zip(BINS, BINS[1:])]
    print("| setting | " + " | ".join(heads) + " |")
    print("|---|" + "---:|" * len(heads))
    print("\n".join(curve))
    if all(args.variants):
        many_variants(args.settings, *args.variants)


if __name__ == "__main__":
    main()
