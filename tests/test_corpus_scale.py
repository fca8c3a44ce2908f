"""Corpora at scale: compressed and sharded input, one rule for undecodable bytes, bounded memory for
huge lines, the tokenizer's bounded sample and a one-pass prepare."""

import gzip
import json
import random
import subprocess
import sys
import textwrap

import pytest
import zstandard

from qinglm.cli import main
from qinglm.data.sample import SampleStats, corpus_bytes, sample_documents
from qinglm.data.sources import ReadStats, expand_paths, read_documents, split_of
from qinglm.errors import QingLMError

_RNG = random.Random(0)
DOCS = [f"第{i}篇：" + "".join(chr(_RNG.randrange(0x4E00, 0x9FA5)) for _ in range(30)) for i in range(300)]
JSONL = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in DOCS).encode("utf-8")
TXT = "".join(d + "\n" for d in DOCS).encode("utf-8")


def read(path, **kwargs):
    return list(read_documents(path, **kwargs))


# --- compressed and sharded input --------------------------------------------------------------


def test_gz_zst_and_parquet_shards_read_like_plain_files(tmp_path):
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(JSONL))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(JSONL))
    (tmp_path / "c.txt.gz").write_bytes(gzip.compress(TXT))
    # two zstd frames in one file, as `cat x.zst y.zst` makes
    frame = zstandard.ZstdCompressor().compress
    (tmp_path / "d.txt.zst").write_bytes(frame(TXT[:1000]) + frame(TXT[1000:]))
    (tmp_path / "model.tar.gz").write_bytes(gzip.compress(b"not a corpus"))
    (tmp_path / "notes.gz").write_bytes(gzip.compress(b"not a corpus"))
    names = ["a.jsonl.gz", "b.jsonl.zst", "c.txt.gz", "d.txt.zst"]
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": DOCS}), tmp_path / "e.parquet")
    names.append("e.parquet")
    assert [p.name for p in expand_paths(tmp_path)] == names
    for name in names:
        assert read(tmp_path / name) == DOCS, name
    stats = ReadStats()
    assert read(tmp_path, stats=stats) == DOCS * len(names)
    assert stats.files == len(names)


@pytest.mark.parametrize("name", ["a.jsonl.gz", "a.jsonl.zst"])
def test_a_truncated_compressed_file_is_read_to_the_break_and_counted(tmp_path, name):
    compress = gzip.compress if name.endswith(".gz") else zstandard.ZstdCompressor().compress
    rng = random.Random(1)  # 3,000 lines that do not compress well: several zstd blocks
    many = ["".join(chr(rng.randrange(0x4E00, 0x9FA5)) for _ in range(40)) for _ in range(3000)]
    whole = compress("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in many).encode())
    path = tmp_path / name
    path.write_bytes(whole[: len(whole) // 2])
    stats = ReadStats()
    docs = read(path, stats=stats)
    assert 0 < len(docs) < len(many) and docs == many[: len(docs)]
    reason = "truncated or corrupt compressed data"
    assert stats.skipped[reason] == 1
    assert f"{path} after line " in stats.summary() and reason in stats.summary()


def test_a_file_that_is_not_compressed_data_is_one_line(tmp_path, capsys):
    for name in ("x.jsonl.gz", "x.jsonl.zst"):
        (tmp_path / name).write_bytes(b"plain text, not compressed\n" * 10)
        with pytest.raises(QingLMError, match="cannot decompress"):
            read(tmp_path / name)
    rc = main(["tokenizer", "train", "--data", str(tmp_path / "x.jsonl.gz"), "--out", str(tmp_path / "t")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "cannot decompress" in err


# --- invalid UTF-8: one rule -------------------------------------------------------------------


def test_a_bad_line_is_skipped_and_counted_wherever_it_is_and_named_by_its_number(tmp_path, monkeypatch):
    import qinglm.data.encoding as encoding

    lines = [f"第{i}行，正常的文本。".encode() for i in range(1, 3001)]
    lines[2000] = b"bad \xff\xfe line"  # line 2001, inside the first MB
    path = tmp_path / "mixed.txt"
    path.write_bytes(b"\n".join(lines) + b"\n")
    expected = [f"第{i}行，正常的文本。" for i in range(1, 3001) if i != 2001]
    for how in ({}, {"encoding": "utf-8"}, {"encoding": "gb18030"}):
        if how.get("encoding") == "gb18030":  # a wrong codec: most lines fail, so the file is refused
            with pytest.raises(QingLMError, match="cannot decode .* as gb18030"):
                read(path, **how)
            continue
        for sample_bytes in (1 << 20, 64):  # the bad line inside, then beyond, the detection sample
            monkeypatch.setattr(encoding, "SAMPLE_BYTES", sample_bytes)
            stats = ReadStats()
            assert read(path, txt_mode="line", stats=stats, **how) == expected
            assert stats.skipped == {"undecodable bytes": 1}
            assert f"the first at {path} line 2001 (undecodable bytes)" in stats.summary()
    book = tmp_path / "book.txt"  # paragraphs: the one holding the bad line is skipped, named by it
    book.write_bytes("甲一\n甲二\n\n乙一\n".encode() + b"\xff\xfe\n" + "乙三\n\n丙\n".encode())
    stats = ReadStats()
    assert read(book, stats=stats) == ["甲一\n甲二", "丙"]
    assert stats.first_skipped == f"{book} line 5 (undecodable bytes)"


def test_a_file_of_undecodable_lines_is_one_clear_error(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("héllo wörld\n".encode("latin-1") * 5 + b"\x81\xff\xfe\n" * 5)
    with pytest.raises(QingLMError, match="cannot decode .* as utf-8"):
        read(path, encoding="utf-8")
    one_bad = tmp_path / "one_bad.txt"
    one_bad.write_bytes(b"ok\n" * 3 + b"\xff\xfe\n")  # 1 line in 4: read, the bad one counted
    stats = ReadStats()
    assert read(one_bad, stats=stats) == ["ok"] * 3 and stats.skipped["undecodable bytes"] == 1


# --- one huge line: bounded memory ------------------------------------------------------------


def test_a_huge_line_takes_bounded_memory(tmp_path):
    """A 30 MB JSON line is skipped and counted, a 30 MB .txt line read in pieces, each with peak RSS
    growing by far less than the line (the whole line in memory took 20x it before)."""
    text = "今天天气很好，我们去公园散步。" * 700_000  # 10.5M characters, 31.5 MB of UTF-8
    jsonl = tmp_path / "big.jsonl"
    jsonl.write_text(
        '{"text": "前"}\n' + json.dumps({"text": text}, ensure_ascii=False) + '\n{"text": "后"}\n',
        encoding="utf-8",
    )
    (tmp_path / "big.txt").write_text(text + "\n", encoding="utf-8")
    script = textwrap.dedent(
        f"""
        import resource, sys
        import qinglm.data.sources as sources
        from qinglm.data.sources import ReadStats, read_documents
        sources.MAX_LINE_CHARS = 1 << 20  # 1M characters: 2 MB of Chinese in a str
        def peak_mb(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        base, stats = peak_mb(), ReadStats()
        short = [d for d in read_documents({str(jsonl)!r}, stats=stats) if len(d) < 10]
        json_growth, base = peak_mb() - base, peak_mb()
        n = sum(len(d) for d in read_documents({str(tmp_path / "big.txt")!r}))
        print(json_growth, peak_mb() - base, n, "".join(short), dict(stats.skipped))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    json_growth, txt_growth, n, short, skipped = out.stdout.split(maxsplit=4)
    assert short == "前后" and skipped.strip() == "{'line longer than 1,048,576 characters': 1}"
    assert int(n) == len(text)  # the .txt line: nothing lost
    assert float(json_growth) < 20 and float(txt_growth) < 20, out.stdout  # MB, for a 31.5 MB line


# --- the tokenizer's sample ---------------------------------------------------------------------


def test_the_tokenizer_sample_is_bounded_even_and_reproducible():
    docs = [f"文档{i:05d}：" + "字" * (i % 50) for i in range(20_000)]
    size = sum(len(d.encode()) for d in docs)
    stats = SampleStats()
    sample = list(sample_documents(iter(docs), size, size // 10, stats))
    assert sample == list(sample_documents(iter(docs), size, size // 10))  # the same every time
    assert stats.bytes == sum(len(d.encode()) for d in sample) <= size // 10
    assert 0.8 * size // 10 < stats.bytes
    where = [docs.index(d) * 10 // len(docs) for d in sample[::50]]
    assert set(where) == set(range(10))  # from every tenth of the corpus, not only its start
    val = [d for d in docs if split_of(d, 0.02) == "val"]
    train_sample = list(sample_documents((d for d in docs if d not in val), size, size // 10))
    assert len(train_sample) > 0.9 * len(sample)  # independent of the train/val split
    assert list(sample_documents(iter(docs), size, 10 * size)) == docs  # small corpus: all of it
    with pytest.raises(QingLMError, match="at least 1 byte"):
        sample_documents(iter(docs), size, 0)  # at once, before the trainer starts


def test_tokenizer_train_feeds_only_the_sample(tmp_path, capfd):
    path = tmp_path / "c.jsonl.gz"
    path.write_bytes(gzip.compress(JSONL * 10))
    assert corpus_bytes([str(path)]) == len(JSONL) * 10
    rc = main(
        ["tokenizer", "train", "--data", str(path), "--vocab-size", "300", "--sample-bytes", "20000"]
        + ["--out", str(tmp_path / "tok")]
    )
    out = capfd.readouterr().out
    assert rc == 0
    line = next(x for x in out.splitlines() if x.startswith("tokenizer sample:"))
    fed = int(line.split(", ")[1].split(" bytes")[0].replace(",", ""))
    assert 10_000 < fed <= 20_000 and f"of about {len(JSONL) * 10:,} bytes" in line


# --- prepare ------------------------------------------------------------------------------------


def test_prepare_reads_the_corpus_once(tmp_path, monkeypatch):
    import qinglm.data.sources as sources
    from qinglm.pipeline import prepare_data
    from qinglm.tokenizer import train_tokenizer
    from qinglm.train.config import TrainConfig

    path = tmp_path / "c.txt"
    path.write_bytes(TXT)
    opened = []
    real = sources.read_lines
    monkeypatch.setattr(sources, "read_lines", lambda *a: opened.append(a) or real(*a))
    tok = train_tokenizer(DOCS, 300, show_progress=False)
    cfg = TrainConfig(data=[str(path)], split_by="document")  # "auto" counts a small corpus first
    index = prepare_data([str(path)], tok, tmp_path / "data", cfg, log=print)
    assert len(opened) == 1
    splits = index["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == len(DOCS)
    assert splits["val"]["documents"] == sum(split_of(d, 0.02) == "val" for d in DOCS)
