"""Tests for qinglm.data.sources: finding, decoding and reading users' text files."""

import json
import random

import pytest

from qinglm.data.encoding import detect_encoding
from qinglm.data.sources import (
    ReadStats,
    expand_paths,
    normalize_text,
    read_documents,
    split_of,
)
from qinglm.errors import QingLMError

CHINESE = "今天天气很好，我们去公园散步。\n春眠不觉晓，处处闻啼鸟！\n"


def read(path, **kwargs):
    return list(read_documents(path, **kwargs))


# --- paths -----------------------------------------------------------------------------------


def test_expand_paths_directory_is_recursive_sorted_and_filtered(tmp_path):
    (tmp_path / "b.txt").write_text("b", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.jsonl").write_text("{}", encoding="utf-8")
    (tmp_path / "notes.md").write_text("not a corpus", encoding="utf-8")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "c.txt").write_text("c", encoding="utf-8")
    assert expand_paths(tmp_path) == [tmp_path / "b.txt", tmp_path / "sub" / "a.jsonl"]


def test_expand_paths_glob_and_several_specs(tmp_path):
    for name in ("x1.txt", "x2.txt", "y.txt"):
        (tmp_path / name).write_text(name, encoding="utf-8")
    found = expand_paths([str(tmp_path / "x*.txt"), tmp_path / "y.txt", tmp_path / "x1.txt"])
    assert found == [tmp_path / "x1.txt", tmp_path / "x2.txt", tmp_path / "y.txt"]
    assert read(str(tmp_path / "x*.txt")) == ["x1.txt", "x2.txt"]


def test_expand_paths_errors(tmp_path):
    with pytest.raises(QingLMError, match="no such file"):
        expand_paths(tmp_path / "missing.txt")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty_dir" / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(QingLMError, match="no text files"):
        expand_paths(tmp_path / "empty_dir")
    with pytest.raises(QingLMError, match="matches no files"):
        expand_paths(str(tmp_path / "*.parquet"))
    with pytest.raises(QingLMError):
        read_documents(tmp_path / "missing.txt")  # raised at call time, before iterating


# --- encodings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("codec", "bom"),
    [
        ("utf-8", b""),
        ("utf-8", b"\xef\xbb\xbf"),
        ("utf-16-le", b"\xff\xfe"),
        ("utf-16-be", b"\xfe\xff"),
        ("utf-32-le", b"\xff\xfe\x00\x00"),
        ("gbk", b""),
        ("gb18030", b""),
        ("utf-16-le", b""),  # no BOM: found from the NUL bytes of the ASCII newlines
    ],
)
def test_auto_detected_encodings_read_the_same_text(tmp_path, codec, bom):
    path = tmp_path / "doc.txt"
    path.write_bytes(bom + ("hello 世界\n" + CHINESE).encode(codec))
    assert read(path) == ["hello 世界", "今天天气很好，我们去公园散步。", "春眠不觉晓，处处闻啼鸟！"]


def test_detect_encoding_names():
    assert detect_encoding("中文".encode()) == "utf-8"
    assert detect_encoding("中文".encode("gbk")) == "gb18030"
    assert detect_encoding(b"\xef\xbb\xbfabc") == "utf-8-sig"
    assert detect_encoding("a\nb".encode("utf-16-be")) == "utf-16-be"


def test_detect_encoding_sample_cut_inside_a_character():
    raw = ("中文" * 10).encode("utf-8")[:-1]  # last character cut in half
    assert detect_encoding(raw, truncated=True) == "utf-8"
    gbk = ("中文" * 10).encode("gbk")[:-1]
    assert detect_encoding(gbk, truncated=True) == "gb18030"


def test_explicit_encoding(tmp_path):
    path = tmp_path / "gbk.txt"
    path.write_bytes(CHINESE.encode("gbk"))
    assert read(path, encoding="gbk") == CHINESE.strip().split("\n")
    with pytest.raises(QingLMError, match="cannot decode"):
        read(path, encoding="utf-8")
    with pytest.raises(QingLMError, match="unknown encoding"):
        read_documents(path, encoding="no-such-codec")


def test_binary_file_is_rejected(tmp_path):
    rng = random.Random(0)
    path = tmp_path / "blob.txt"
    path.write_bytes(bytes(rng.randrange(256) for _ in range(4096)) + b"\x00" * 16)
    with pytest.raises(QingLMError, match="binary"):
        read(path)
    no_nul = bytes(rng.randrange(1, 256) for _ in range(4096))
    with pytest.raises(QingLMError, match="binary"):
        detect_encoding(no_nul)


def test_empty_and_whitespace_files_are_rejected(tmp_path):
    (tmp_path / "zero.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text(" \n\n\t\n", encoding="utf-8")
    for name in ("zero.txt", "blank.txt"):
        with pytest.raises(QingLMError, match="empty"):
            read(tmp_path / name)


def test_undecodable_line_is_skipped_in_auto_mode(tmp_path, monkeypatch):
    import qinglm.data.encoding as encoding

    path = tmp_path / "mixed.txt"
    path.write_bytes("好的\n".encode() + b"bad \xff\xfe line\n" + "再见\n".encode())
    # A bad line beyond the detection sample: emulate a huge file with a tiny sample.
    monkeypatch.setattr(encoding, "SAMPLE_BYTES", 6)
    stats = ReadStats()
    assert read(path, stats=stats, txt_mode="line") == ["好的", "再见"]
    assert stats.skipped["undecodable bytes"] == 1


# --- txt modes -------------------------------------------------------------------------------


def test_line_mode_crlf_and_empty_lines(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_bytes(b"first line  \r\nsecond\r\n\r\n   \r\nthird\r\n")
    stats = ReadStats()
    assert read(path, txt_mode="line", stats=stats) == ["first line", "second", "third"]
    assert stats.skipped["empty"] == 2
    assert (stats.files, stats.documents, stats.characters) == (1, 3, 21)


def test_paragraph_mode_and_auto(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("　　第一段第一行\n第一段第二行\n\n\n第二段\r\n  \n第三段\n", encoding="utf-8")
    expected = ["第一段第一行\n第一段第二行", "第二段", "第三段"]
    assert read(path, txt_mode="paragraph") == expected
    assert read(path) == expected  # auto: a blank line between text means paragraphs
    one_per_line = tmp_path / "lines.txt"
    one_per_line.write_text("甲\n乙\n丙\n", encoding="utf-8")
    assert read(one_per_line) == ["甲", "乙", "丙"]
    with pytest.raises(QingLMError, match="txt_mode"):
        read_documents(path, txt_mode="sentence")


# --- JSON ------------------------------------------------------------------------------------


def test_jsonl_bad_lines_are_skipped_and_counted(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [
        json.dumps({"text": "第一篇"}, ensure_ascii=False),
        "{not json",
        json.dumps({"content": "no text field"}),
        json.dumps({"text": 42}),
        "",
        json.dumps({"text": "  "}),
        json.dumps({"text": "第二篇\n两行"}, ensure_ascii=False),
        "[1, 2]",
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    stats = ReadStats()
    assert read(path, stats=stats) == ["第一篇", "第二篇\n两行"]
    assert stats.skipped == {
        "invalid JSON": 1,
        "missing 'text' field": 1,
        "non-string text": 1,
        "empty": 1,
        "not a JSON object": 1,
    }
    summary = stats.summary()
    assert summary.startswith("read 1 file, 2 documents, 9 characters; skipped 5 (")
    assert "invalid JSON: 1" in summary


def test_jsonl_custom_field(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"content": "甲"}\n{"content": "乙"}\n', encoding="utf-8")
    assert read(path, text_field="content") == ["甲", "乙"]


def test_jsonl_all_bad_raises_with_first_problem(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"content": "x"}\nnot json\n', encoding="utf-8")
    with pytest.raises(QingLMError, match=r"bad\.jsonl.*line 1: missing 'text' field"):
        read(path)


def test_json_array_file(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"text": "一"}, "二", {"text": None}], ensure_ascii=False, indent=2))
    stats = ReadStats()
    assert read(path, stats=stats) == ["一", "二"]
    assert stats.skipped == {"non-string text": 1}


# --- parquet ---------------------------------------------------------------------------------


def test_parquet_columns(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": ["甲", None, "乙"], "id": [1, 2, 3]}), tmp_path / "a.parquet")
    stats = ReadStats()
    assert read(tmp_path / "a.parquet", stats=stats) == ["甲", "乙"]
    assert stats.skipped == {"null text": 1}
    pq.write_table(pa.table({"body": ["丙", "丁"], "n": [1, 2]}), tmp_path / "b.parquet")
    assert read(tmp_path / "b.parquet") == ["丙", "丁"]
    pq.write_table(pa.table({"n": [1, 2], "x": [0.5, 1.5]}), tmp_path / "c.parquet")
    with pytest.raises(QingLMError, match=r"n \(int64\), x \(double\)"):
        read(tmp_path / "c.parquet")
    (tmp_path / "d.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(QingLMError, match="parquet"):
        read(tmp_path / "d.parquet")


def test_parquet_is_read_in_batches(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    import qinglm.data.parquet as parquet

    monkeypatch.setattr(parquet, "_PARQUET_BATCH_ROWS", 3)
    docs = [f"文档{i}" for i in range(10)]
    pq.write_table(pa.table({"text": docs}), tmp_path / "a.parquet", row_group_size=4)
    assert read(tmp_path / "a.parquet") == docs


# --- normalisation and splits ----------------------------------------------------------------


def test_normalize_text():
    assert normalize_text("ＡＢＣ１２３ａｂｃ") == "ABC123abc"
    assert normalize_text("，。！？：；（）“”《》、～") == "，。！？：；（）“”《》、～"
    assert normalize_text("１．５％\u3000完") == "1.5% 完"
    long = "中文，標點。" * 5000
    assert normalize_text(long) is long  # nothing to map: the text itself, not scanned character by character
    assert normalize_text(long + "Ｑ") == long + "Q"


def test_nfkc_flag(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("ＧＰＴ模型，第２版\n", encoding="utf-8")
    assert read(path) == ["GPT模型，第2版"]
    assert read(path, nfkc=False) == ["ＧＰＴ模型，第２版"]


def test_split_of_is_deterministic_and_proportional():
    docs = [f"文档 {i}" for i in range(20_000)]
    splits = [split_of(d, 0.1) for d in docs]
    assert splits == [split_of(d, 0.1) for d in docs]
    assert 0.08 < splits.count("val") / len(docs) < 0.12
    assert {split_of(d, 0.0) for d in docs[:100]} == {"train"}
    assert {split_of(d, 1.0) for d in docs[:100]} == {"val"}
    with pytest.raises(QingLMError):
        split_of("x", 1.5)
