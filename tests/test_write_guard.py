"""Every command that writes goes through one guard, and claims a directory only when it writes into it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qinglm import run_dir as run_dirs
from qinglm.cli import main
from qinglm.errors import QingLMError
from qinglm.io import MANIFEST, OwnedDir


def files(root: Path) -> dict[str, bytes]:
    """Return every file under root with its bytes (the manifest included)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------- one guard for every writer


def test_tokenizer_train_into_a_users_tokenizer_folder_is_refused_until_overwrite(tmp_path, capsys):
    data = tmp_path / "corpus.txt"
    data.write_text("".join(f"春眠不觉晓，处处闻啼鸟。第{i}行。\n" for i in range(200)), encoding="utf-8")
    out = tmp_path / "my-tokenizer"
    out.mkdir()
    (out / "tokenizer.json").write_text('{"mine": true}')
    (out / "tokenizer_config.json").write_text('{"mine": true}')
    before = files(out)
    args = ["tokenizer", "train", "--data", str(data), "--vocab-size", "300", "--out", str(out)]
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert files(out) == before
    assert main([*args, "--overwrite"]) == 0
    assert json.loads((out / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    assert main(args) == 0  # its own folder now: retrained in place without --overwrite


def test_tokenizer_train_that_fails_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "tok"
    args = ["tokenizer", "train", "--data", str(tmp_path / "missing.txt"), "--out", str(out)]
    assert main(args) == 2
    assert not out.exists()


def test_data_export_does_not_replace_a_users_file_without_overwrite(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    assert main(["data", "export", "pd1998", str(notes)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert notes.read_text() == "my notes"
    assert main(["data", "export", "pd1998", str(notes), "--overwrite"]) == 0
    assert notes.read_text() != "my notes"
    assert main(["data", "export", "pd1998", str(tmp_path / "new.txt")]) == 0


def test_plot_out_does_not_replace_a_users_file_without_overwrite(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        json.dumps({"kind": "train", "step": 1, "loss": 2.0, "lr": 1e-3}) + "\n"
    )
    png = tmp_path / "photo.png"
    png.write_bytes(b"my photo")
    assert main(["plot", str(run), "--out", str(png)]) == 2
    assert png.read_bytes() == b"my photo"
    assert main(["plot", str(run), "--out", str(png), "--overwrite"]) == 0
    assert png.read_bytes().startswith(b"\x89PNG")


def test_claim_file_records_a_name_in_its_folders_manifest_and_refuses_a_users_file(tmp_path):
    from qinglm.io import claim_file

    owned = OwnedDir.claim(tmp_path / "run", "run")
    (owned.path / "report.md").write_text("mine")
    with pytest.raises(QingLMError, match="move it away first"):
        claim_file(owned.path / "report.md")
    claim_file(owned.path / "eval_results.json")
    assert OwnedDir.read(owned.path).owns("eval_results.json")
    claim_file(owned.path / "eval_results.json")  # QingLM's from now on


# ---------------------------------------------------------------------------- claimed only when written


def test_a_directory_refused_for_its_run_kind_is_left_as_it_was(tmp_path, phrase_corpus):
    _, tokenizer, _ = phrase_corpus
    run = tmp_path / "old"  # a pretraining run written before manifests existed, with the user's report
    (run / "tokenizer").mkdir(parents=True)
    for f in Path(tokenizer).iterdir():
        (run / "tokenizer" / f.name).write_bytes(f.read_bytes())
    (run / "config.json").write_text(json.dumps({"kind": "pretrain", "model": {}, "train": {}}))
    (run / "data").mkdir()
    (run / "report.md").write_text("my notes")
    before = files(run)
    with pytest.raises(QingLMError, match="holds a run of kind 'pretrain'"):
        run_dirs.claim(run, kind="sft")
    assert files(run) == before and not (run / MANIFEST).exists()


def test_a_run_that_fails_before_writing_leaves_no_claim(tmp_path):
    new, empty = tmp_path / "a" / "new", tmp_path / "empty"
    empty.mkdir()
    for out in (new, empty):
        with pytest.raises(QingLMError, match="no preference pairs"):
            with run_dirs.writing(out, kind="dpo"):
                raise QingLMError("no preference pairs")  # what a dpo run with bad data does
    assert not (tmp_path / "a").exists()
    assert list(empty.iterdir()) == []
    with pytest.raises(RuntimeError):
        with run_dirs.writing(new):
            (new / "metrics.jsonl").write_text("")
            raise RuntimeError("a crash after writing")
    assert OwnedDir.read(new).owns("metrics.jsonl")  # what it wrote stays QingLM's


def test_a_failed_resume_keeps_the_claim_it_found(tmp_path):
    run = tmp_path / "run"
    run_dirs.claim(run)
    with pytest.raises(QingLMError):
        with run_dirs.writing(run):
            raise QingLMError("bad flag")
    assert OwnedDir.read(run) is not None


def test_an_offline_download_leaves_no_claim(monkeypatch, tmp_path, capsys):
    hub = pytest.importorskip("huggingface_hub")

    def offline(repo_id):
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(hub, "dataset_info", offline)
    out, empty = tmp_path / "d", tmp_path / "empty"
    empty.mkdir()
    for folder in (out, empty):
        assert main(["data", "download", "minimind-pretrain", "--out", str(folder)]) == 2
    assert not out.exists() and list(empty.iterdir()) == []


def test_sweep_out_of_a_users_folder_is_refused_and_a_failed_preparation_leaves_no_claim(tmp_path, capsys):
    pytest.importorskip("optuna")
    space = tmp_path / "space.json"
    space.write_text('{"lr": {"low": 1e-4, "high": 1e-3}}')
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.md").write_text("my results")
    args = ["sweep", "--space", str(space), "--max-steps", "2", "--data", str(tmp_path / "missing.txt")]
    assert main([*args, "--out", str(mine)]) == 2
    assert "--overwrite" in capsys.readouterr().err and files(mine) == {"results.md": b"my results"}
    assert main([*args, "--out", str(tmp_path / "new")]) == 2  # no data: fails before writing
    assert "missing.txt" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_a_dpo_run_whose_data_has_no_pair_leaves_no_out(tmp_path, tiny_base_run, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "p"}\n', encoding="utf-8")
    out = tmp_path / "dpo"
    args = ["dpo", "--base", str(tiny_base_run), "--data", str(data), "--out", str(out), "--max-steps", "1"]
    assert main(args) == 2
    assert "no usable preference pairs" in capsys.readouterr().err
    assert not out.exists()


def test_experiment_out_of_a_users_folder_is_refused_and_a_failed_first_run_leaves_no_claim(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.md").write_text("my results")
    args = ["experiment", "init", "--inits", "default", "--data", str(tmp_path / "missing.txt")]
    assert main([*args, "--out", str(mine)]) == 2
    assert "--overwrite" in capsys.readouterr().err and files(mine) == {"results.md": b"my results"}
    assert main([*args, "--out", str(tmp_path / "new")]) == 2
    assert "missing.txt" in capsys.readouterr().err and not (tmp_path / "new").exists()
