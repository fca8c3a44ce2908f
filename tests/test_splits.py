"""Validation splits that share no article, review or idiom with training (qinglm.data.splits)."""

from __future__ import annotations

import collections
import inspect

import pytest

from qinglm.data.builtin import builtin_documents, builtin_labelled
from qinglm.data.corpus import labelled_documents
from qinglm.data.sources import split_of
from qinglm.data.splits import PD1998_BLOCK, Splitter, is_val_block, pd1998_blocks
from qinglm.errors import QingLMError
from qinglm.pipeline import iter_documents, prepare_data
from qinglm.train.config import TrainConfig


def test_val_blocks_are_evenly_spread_and_exact():
    val = [i for i in range(1000) if is_val_block(i, 0.02)]
    assert val == list(range(24, 1000, 50))  # one in 50, the first in the middle of the first 50
    assert sum(is_val_block(i, 0.1) for i in range(1000)) == 100


def test_builtin_splits_are_deterministic_and_disjoint():
    for name in ("pd1998", "reviews", "idioms"):
        train, val = builtin_documents(name, "train"), builtin_documents(name, "val")
        assert train == builtin_documents(name, "train") and val == builtin_documents(name, "val")
        assert val and not set(train) & set(val)
        assert len(train) + len(val) == len(builtin_documents(name))


def test_no_pd1998_article_block_straddles_train_and_val():
    docs = builtin_documents("pd1998")
    blocks = pd1998_blocks(tuple(docs))
    labels = [label for label, _ in builtin_labelled("pd1998", 0.02)]
    counts = collections.Counter(docs)
    by_block = collections.defaultdict(set)
    for b, label, d in zip(blocks, labels, docs):
        if counts[d] == 1:  # a line repeated elsewhere in training (a byline) is train anywhere
            by_block[b].add(label)
    assert all(len(s) == 1 for s in by_block.values())
    sizes = collections.Counter(blocks)
    assert min(sizes[b] for b in list(sizes)[:-1]) >= PD1998_BLOCK
    val_blocks = [b for b, s in by_block.items() if s == {"val"}]
    assert 5 <= len(val_blocks) <= 12 and len(set(val_blocks)) == len(val_blocks)
    # Each held-out block starts at a headline, right after a paragraph that ends a sentence.
    for b in val_blocks:
        start = blocks.index(b)
        assert docs[start - 1][-1] in "。！？”…）" and docs[start][-1] not in "。！？”…）"
    # The older split holds out single paragraphs inside articles whose other paragraphs train.
    old = [label for label, _ in builtin_labelled("pd1998", 0.02, "document")]
    assert any(len({old[i] for i, x in enumerate(blocks) if x == b}) == 2 for b in val_blocks)


@pytest.mark.parametrize("split_by", ["auto", "document"])
def test_sft_held_out_idioms_are_in_no_training_split(split_by):
    from qinglm.data.idioms_sft import idioms, is_held_out

    held = {i.word for i in idioms() if is_held_out(i.word)}
    assert len(held) > 500
    for name in ("pd1998", "reviews", "idioms"):
        train = builtin_documents(name, "train", 0.02, split_by)
        assert not [d for d in train if d.split("（", 1)[0] in held], name
    val = builtin_documents("idioms", "val", 0.02, split_by)
    assert held <= {d.split("（", 1)[0] for d in val}


def test_splitter_block_and_file_and_auto(tmp_path):
    block = Splitter("block", 0.25, 3)
    labels = [block(f"doc {i}", None) for i in range(24)]
    # blocks of 3: block 1 and block 5 (of 0..7) are held out
    assert labels == ["train"] * 3 + ["val"] * 3 + ["train"] * 9 + ["val"] * 3 + ["train"] * 6
    file = Splitter("file", 0.5, 3)
    for name in ("a.txt", "b.txt", "c.jsonl", "d.txt"):
        assert len({file(f"{name} {i}", tmp_path / name) for i in range(20)}) == 1
    auto = Splitter("auto", 0.5, 4)
    jsonl = [auto(f"record {i}", tmp_path / "x.jsonl.gz") for i in range(40)]
    assert jsonl == [Splitter("document", 0.5, 4)(f"record {i}", None) for i in range(40)]
    # One Splitter over a .txt, a .jsonl, then a .txt again (one Path object per file, as the reader
    # gives): each file's documents are split the way its own format says.
    auto, doc, block = Splitter("auto", 0.5, 4), Splitter("document", 0.5, 4), Splitter("block", 0.5, 4)
    for name in ("a.txt", "b.jsonl", "c.txt"):
        path = tmp_path / name
        for i in range(40):
            by_doc, by_block = doc(f"{name} {i}", None), block(f"{name} {i}", None)
            assert auto(f"{name} {i}", path) == (by_doc if name.endswith(".jsonl") else by_block), name
    with pytest.raises(QingLMError, match="split_by"):
        Splitter("paragraph", 0.1, 3)
    with pytest.raises(QingLMError, match="split_block"):
        Splitter("block", 0.1, 0)


def _write_corpus(tmp_path, files: int, lines: int) -> list[str]:
    specs = []
    for f in range(files):
        path = tmp_path / f"part{f:02d}.txt"
        path.write_text("\n".join(f"第{f}篇第{i}行：今天天气真不错。" for i in range(lines)) + "\n", "utf-8")
        specs.append(str(path))
    return specs


def test_prepare_splits_by_block_streaming(tmp_path):
    from qinglm.tokenizer import train_tokenizer

    specs = _write_corpus(tmp_path, 2, 100)
    cfg = TrainConfig(data=specs, split_by="block", split_block=10, val_fraction=0.1)
    labelled = labelled_documents(specs, cfg)
    assert inspect.isgenerator(labelled)  # one streaming pass, no list of the corpus
    labels = [label for label, _ in labelled]
    # blocks of 10 across both files; one in ten held out: blocks 4 and 14
    assert labels == ["val" if 40 <= i < 50 or 140 <= i < 150 else "train" for i in range(200)]
    val = [d for label, d in labelled_documents(specs, cfg) if label == "val"]
    assert list(iter_documents(specs, "val", cfg)) == val
    tok = train_tokenizer(["今天天气真不错。第篇行"] * 20, 300, show_progress=False)
    index = prepare_data(specs, tok, tmp_path / "data", cfg, log=lambda s: None)
    assert index["splits"]["val"]["documents"] == 20 and index["splits"]["train"]["documents"] == 180
    # .txt defaults to blocks (of 100): the documents of one block stay together
    auto = [label for label, _ in labelled_documents(specs, TrainConfig(data=specs, val_fraction=0.5))]
    assert auto == ["val"] * 100 + ["train"] * 100
    # too small for one held-out block of 100 at 2%: single documents are held out instead
    small = labelled_documents(specs, TrainConfig(data=specs))
    assert [label for label, _ in small] == [split_of(d, 0.02) for d in iter_documents(specs, "all", cfg)]


def test_prepare_splits_by_file(tmp_path):
    specs = _write_corpus(tmp_path, 8, 5)
    cfg = TrainConfig(data=specs, split_by="file", val_fraction=0.3)
    pairs = list(labelled_documents(specs, cfg))
    per_file = collections.defaultdict(set)
    for label, doc in pairs:
        per_file[doc.split("篇", 1)[0]].add(label)
    assert all(len(s) == 1 for s in per_file.values())
    assert {next(iter(s)) for s in per_file.values()} == {"train", "val"}


def test_the_split_is_described(tmp_path):
    from qinglm.data.corpus import describe_split

    specs = _write_corpus(tmp_path, 1, 3000)
    cfg = TrainConfig(data=["pd1998", "idioms", *specs])
    assert describe_split(cfg.data, cfg) == (
        "2% held out: pd1998 by blocks of whole articles (>= 50 paragraphs), idioms by idiom, "
        "files by blocks of 100 documents (.txt) or by document (records)"
    )
    old = TrainConfig(data=["pd1998"], split_by="document", val_fraction=0.05)
    assert describe_split(old.data, old) == "5% held out: pd1998 by paragraph"
