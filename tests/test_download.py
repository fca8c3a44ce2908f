"""`qinglm data download`: the right client calls, a hub-style snapshot read as a corpus, one-line errors.
No network: the hub clients are replaced by fakes that lay out files as the hubs do."""

import fnmatch
import json
import sys
import types
from pathlib import Path

import pytest

from qinglm.cli import main
from qinglm.data.sources import read_documents

DOCS = ["第一篇预训练文本，内容在这里。", "第二篇预训练文本，内容也在这里。"]


def _lay_out_snapshot(local_dir, files=("pretrain_hq.jsonl",)):
    """Write what a hub snapshot leaves in local_dir: the files, a README, the client's hidden cache."""
    for name in files:
        lines = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in DOCS)
        (local_dir / name).write_text(lines, encoding="utf-8")
    (local_dir / "README.md").write_text("# dataset card\n", encoding="utf-8")
    (local_dir / ".gitattributes").write_text("*.jsonl filter=lfs\n", encoding="utf-8")
    cache = local_dir / ".cache" / "huggingface" / "download"
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "pretrain_hq.jsonl.metadata").write_text("etag\n", encoding="utf-8")


@pytest.fixture
def fake_hf(monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        patterns = kwargs["allow_patterns"] or ["*"]
        files = [f for f in ("pretrain_hq.jsonl",) if any(fnmatch.fnmatch(f, p) for p in patterns)]
        _lay_out_snapshot(kwargs["local_dir"], files)
        return str(kwargs["local_dir"])

    monkeypatch.setattr(hub, "dataset_info", lambda repo_id: None)
    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    return calls


def test_a_catalogue_name_downloads_its_files_and_the_folder_is_a_corpus(fake_hf, tmp_path, capsys):
    out = tmp_path / "minimind"
    assert main(["data", "download", "minimind-pretrain", "--out", str(out)]) == 0
    ((repo, kwargs),) = fake_hf
    assert repo == "jingyaogong/minimind_dataset"
    assert kwargs == {"repo_type": "dataset", "local_dir": out, "allow_patterns": ["pretrain_hq.jsonl"]}
    printed = capsys.readouterr().out
    assert "1 corpus file(s)" in printed and f"--data {out}" in printed
    assert list(read_documents(out)) == DOCS  # README, .gitattributes and the hidden cache are no corpus
    # again into the same folder (a resumed download) is allowed; a user's folder is not
    assert main(["data", "download", "owner/name", "--out", str(out), "--include", "*.jsonl"]) == 0
    assert fake_hf[1][0] == "owner/name" and fake_hf[1][1]["allow_patterns"] == ["*.jsonl"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine", encoding="utf-8")
    assert main(["data", "download", "owner/name", "--out", str(mine)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_modelscope_is_called_with_its_own_id_and_patterns(monkeypatch, tmp_path):
    calls = []

    def dataset_snapshot_download(dataset_id, **kwargs):
        calls.append((dataset_id, kwargs))
        _lay_out_snapshot(Path(kwargs["local_dir"]))
        return kwargs["local_dir"]

    snapshot = types.ModuleType("modelscope.hub.snapshot_download")
    snapshot.dataset_snapshot_download = dataset_snapshot_download
    for name, module in (
        ("modelscope", types.ModuleType("modelscope")),
        ("modelscope.hub", types.ModuleType("modelscope.hub")),
        ("modelscope.hub.snapshot_download", snapshot),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    out = tmp_path / "ms"
    assert main(["data", "download", "minimind-sft", "--out", str(out), "--source", "modelscope"]) == 0
    assert calls == [
        ("gongjy/minimind_dataset", {"local_dir": str(out), "allow_file_pattern": ["sft_mini_512.jsonl"]})
    ]


def test_offline_is_one_line_that_says_what_to_do(monkeypatch, tmp_path, capsys):
    hub = pytest.importorskip("huggingface_hub")

    class ConnectError(Exception):
        pass

    def offline(repo_id):
        raise ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(hub, "dataset_info", offline)
    assert main(["data", "download", "minimind-pretrain", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "HF_ENDPOINT" in err and "--source modelscope" in err


def test_bad_names_and_empty_snapshots_are_one_line(fake_hf, tmp_path, capsys):
    assert main(["data", "download", "minimind", "--out", str(tmp_path / "a")]) == 2
    assert "neither a catalogue name" in capsys.readouterr().err
    assert (
        main(["data", "download", "fineweb-edu-zh", "--source", "modelscope", "--out", str(tmp_path / "b")])
        == 2
    )
    assert "not on modelscope" in capsys.readouterr().err
    assert main(["data", "download", "owner/name", "--out", str(tmp_path / "c"), "--include", "*.csv"]) == 2
    assert "no corpus files matching *.csv" in capsys.readouterr().err
