"""`qinglm data clean`: every fix-up and filter on a hand-picked good and bad document, the report, and
outputs that are whole or absent whatever the input."""

import gzip
import json
import random

import pytest

from qinglm.cli import main
from qinglm.data.clean import FILTERS, FIXES, CleanConfig, CleanReport, clean_documents
from qinglm.data.jsonl_out import write_jsonl_shards
from qinglm.errors import QingLMError

GOOD = (
    "春节前夕，记者来到城郊的一个村子。村里新修了水泥路，家家户户都通上了自来水。"
    "村支书说，今年全村的收入比去年增加了三成，大家准备热热闹闹地过个年。"
)
# (filter, a document it drops, what the reason says)
BAD = [
    ("length", "天气很好。", "characters <"),
    ("cjk", "The weather is fine today, and we walk in the park after lunch with our friends.", "CJK share"),
    ("repetition", "好评好评好评！" * 12, "top 3-gram"),
    ("repetition", "点击领取优惠券\n" * 3 + GOOD, "duplicate lines"),
    ("repetition", GOOD + "价格便宜质量很好物流也快下次还来买" * 3, "duplicate 10-grams"),
    ("symbols", GOOD[:30] + "★☆♥♪※◆■▲●" * 3, "symbol share"),
    (
        "punctuation",
        "好！！！！？？？。。。，，，好！！！！？？？。。。。，，，好的呢。",
        "punctuation share",
    ),
]


def run(docs, enabled, **config):
    report = CleanReport()
    kept = list(clean_documents(docs, CleanConfig(enabled=set(enabled), **config), report))
    return kept, report


def test_the_good_document_passes_every_step():
    kept, report = run([GOOD], FIXES[:3] + FILTERS[:5])
    assert kept == [GOOD]
    assert not report.changed and not +report.dropped


@pytest.mark.parametrize(("step", "bad", "why"), BAD, ids=[f"{s}-{i}" for i, (s, _, _) in enumerate(BAD)])
def test_each_filter_drops_its_bad_document_for_its_reason(step, bad, why):
    kept, report = run([GOOD, bad], [step])
    assert kept == [GOOD]
    assert report.dropped == {step: 1}
    assert why in report.examples[step][0]["reason"]
    # with every other filter on too, the bad document is still dropped (by one of them)
    kept, _ = run([GOOD, bad], FILTERS[:5])
    assert kept == [GOOD]


def test_length_bounds_are_settable():
    assert run([GOOD], ["length"], max_chars=50)[0] == []
    assert run(["天气很好。"], ["length"], min_chars=5)[0] == ["天气很好。"]


def test_html_is_stripped():
    page = (
        f"<html><head><style>p {{color: red}}</style></head><body><p>{GOOD}</p><p>第二段&amp;结尾</p></body>"
    )
    kept, report = run([page, GOOD], ["html"])
    assert kept == [f"{GOOD}\n第二段&结尾", GOOD]
    assert report.changed == {"html": 1}


def test_boilerplate_lines_are_removed():
    page = f"{GOOD}\n版权所有 © 2024 某某网 京ICP备12345号\n点击这里查看更多\n{GOOD}"
    kept, report = run([page, GOOD], ["boilerplate"])
    assert kept == [f"{GOOD}\n{GOOD}", GOOD]
    assert report.changed == {"boilerplate": 1}


def test_urls_emails_and_phones_are_masked():
    doc = "详见https://example.com/a?b=1，或写信到 foo.bar@example.cn，电话13912345678、010-87654321。"
    kept, report = run([doc, GOOD], ["mask"])
    assert kept == ["详见<URL>，或写信到 <EMAIL>，电话<PHONE>、<PHONE>。", GOOD]
    assert report.changed == {"mask": 1}


def test_traditional_is_converted_to_simplified():
    pytest.importorskip("opencc")
    kept, report = run(["這是一個關於漢字簡體轉換的測試。", GOOD], ["t2s"])
    assert kept == ["这是一个关于汉字简体转换的测试。", GOOD]


def test_language_id_keeps_chinese_only():
    pytest.importorskip("py3langid")
    kept, report = run([GOOD, "これは日本語の文章です。今日はとても良い天気ですね。"], ["langid"])
    assert kept == [GOOD] and report.dropped == {"langid": 1}


def test_unknown_step_and_bad_threshold_are_one_line_errors():
    with pytest.raises(QingLMError, match="unknown cleaning step"):
        CleanConfig(enabled={"spelling"})
    with pytest.raises(QingLMError, match=r"--min-cjk must be in \[0, 1\], got 2"):
        CleanConfig(min_cjk=2)


# --- the command and its outputs -----------------------------------------------------------------


def _jsonl(path, docs):
    path.write_text(
        "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8"
    )


def _texts(out):
    return [json.loads(line)["text"] for f in sorted(out.glob("clean_*.jsonl")) for line in f.open()]


def test_clean_command_writes_shards_and_a_report(tmp_path, capsys):
    _jsonl(tmp_path / "in.jsonl", [GOOD + str(i) for i in range(40)] + [bad for _, bad, _ in BAD])
    out = tmp_path / "out"
    assert main(["data", "clean", str(tmp_path / "in.jsonl"), "--out", str(out), "--shard-mb", "0"]) == 2
    assert main(["data", "clean", str(tmp_path / "in.jsonl"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "kept 40 of 47 documents" in printed and "repetition" in printed
    assert _texts(out) == [GOOD + str(i) for i in range(40)]
    report = json.loads((out / "clean_report.json").read_text(encoding="utf-8"))
    assert report["kept"] == 40 and sum(report["dropped"].values()) == 7
    assert report["examples"]["length"][0]["text"] == "天气很好。"
    # the directory is input for the next stage: its shards are read, its report is not
    assert main(["data", "clean", str(out), "--out", str(tmp_path / "again")]) == 0
    assert "read 1 file, 40 documents" in capsys.readouterr().out
    # worker processes give the same shards and report
    workers = tmp_path / "workers"
    assert main(["data", "clean", str(tmp_path / "in.jsonl"), "--out", str(workers), "--workers", "2"]) == 0
    assert (workers / "clean_0000.jsonl").read_bytes() == (out / "clean_0000.jsonl").read_bytes()
    again = json.loads((workers / "clean_report.json").read_text(encoding="utf-8"))
    assert again["dropped"] == report["dropped"] and again["examples"] == report["examples"]
    # without the repetition filter, its bad documents are kept
    assert main(["data", "clean", str(tmp_path / "in.jsonl"), "--out", str(out), "--no-repetition"]) == 0
    assert len(_texts(out)) == 43


def test_bad_input_is_a_counted_skip_or_one_line(tmp_path, capsys):
    rng = random.Random(0)  # lines that do not compress well, so that half the file holds many
    docs = ["".join(chr(rng.randrange(0x4E00, 0x9FA5)) for _ in range(40)) for _ in range(3000)]
    whole = gzip.compress("".join(d + "\n" for d in docs).encode("utf-8"))
    (tmp_path / "cut.txt.gz").write_bytes(whole[: len(whole) // 2])
    raw = "".join(d + "\n" for d in docs).encode("utf-8")
    (tmp_path / "bad.txt").write_bytes(raw[:3000] + b"\xff\xfe\xfa\n" + raw[3000:])
    out = tmp_path / "out"
    assert (
        main(["data", "clean", str(tmp_path / "cut.txt.gz"), str(tmp_path / "bad.txt"), "--out", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "truncated or corrupt compressed data: 1" in printed and "undecodable bytes: 1" in printed
    report = json.loads((out / "clean_report.json").read_text(encoding="utf-8"))
    assert report["read"]["skipped"] == {"truncated or corrupt compressed data": 1, "undecodable bytes": 1}
    # a file with nothing usable: one line, and no output under a real name
    (tmp_path / "none.jsonl").write_text('{"title": 1}\n', encoding="utf-8")
    out2 = tmp_path / "out2"
    assert (
        main(["data", "clean", str(tmp_path / "bad.txt"), str(tmp_path / "none.jsonl"), "--out", str(out2)])
        == 2
    )
    assert "no usable record" in capsys.readouterr().err
    assert sorted(p.name for p in out2.iterdir()) == [".qinglm-manifest.json"]


def test_a_failed_run_leaves_no_shard_and_keeps_the_users_files(tmp_path):
    out = tmp_path / "out"

    def docs():
        for i in range(500):
            yield GOOD * 3 + str(i)
        raise QingLMError("the input broke")

    with pytest.raises(QingLMError, match="broke"):
        write_jsonl_shards(docs(), out, "clean", dict, shard_bytes=10_000)
    assert sorted(p.name for p in out.iterdir()) == [".qinglm-manifest.json"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's", encoding="utf-8")
    with pytest.raises(QingLMError, match="not empty"):
        write_jsonl_shards([GOOD], mine, "clean", dict)
    # a later, smaller run deletes the extra shards of an earlier one
    assert len(write_jsonl_shards([GOOD * 3] * 100, out, "clean", dict, shard_bytes=10_000)) > 1
    assert write_jsonl_shards([GOOD], out, "clean", dict) == ["clean_0000.jsonl"]
    assert sorted(p.name for p in out.glob("clean_*")) == ["clean_0000.jsonl", "clean_report.json"]
