"""Download a dataset repository from the Hugging Face Hub (or a mirror: HF_ENDPOINT) or ModelScope with
their own clients (resumable, with progress), and a short catalogue of named Chinese corpora."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from qinglm.data.sources import expand_paths
from qinglm.errors import QingLMError
from qinglm.io import LOCK_FILE, OwnedDir, exclusive_lock

SOURCES = ("hf", "modelscope")


@dataclass(frozen=True)
class Corpus:
    """A named corpus: its repository on each hub and the files that make it."""

    hf: str
    modelscope: str | None
    include: tuple[str, ...]
    description: str


_MINIMIND = ("jingyaogong/minimind_dataset", "gongjy/minimind_dataset")
CATALOGUE = {
    "minimind-pretrain": Corpus(
        *_MINIMIND, ("pretrain_hq.jsonl",), "minimind's pretraining text, 1.6 GB JSONL"
    ),
    "minimind-sft": Corpus(*_MINIMIND, ("sft_mini_512.jsonl",), "minimind's SFT conversations, 1.2 GB JSONL"),
    "minimind-dpo": Corpus(
        *_MINIMIND, ("dpo.jsonl",), "minimind's DPO pairs (chosen/rejected), 0.9 GB JSONL"
    ),
    "fineweb-edu-zh": Corpus(
        "opencsg/Fineweb-Edu-Chinese-V2.1",
        None,
        ("4_5/000000.parquet",),
        "Fineweb-Edu-Chinese V2.1, first shard of the top-score subset (more: --include '4_5/*.parquet')",
    ),
}


_BUGS = (TypeError, AttributeError, NameError, AssertionError)  # ours or the client's: tracebacks


def _hf_download(repo: str, out: Path, include: list[str] | None) -> None:
    try:
        import huggingface_hub
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    except ImportError:
        raise QingLMError(
            "downloading from the Hugging Face Hub needs: pip install huggingface_hub"
        ) from None
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    try:
        # asked first: offline, snapshot_download quietly returns an existing folder as it is
        huggingface_hub.dataset_info(repo)
        huggingface_hub.snapshot_download(repo, repo_type="dataset", local_dir=out, allow_patterns=include)
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise QingLMError(
            f"{repo}: no such dataset on {endpoint}, or it needs you to log in and accept its terms "
            f"(hf auth login) ({type(e).__name__})"
        ) from None
    except _BUGS:
        raise
    except Exception as e:  # offline, DNS, timeouts: the client's network errors share no base class
        raise QingLMError(
            f"cannot download {repo} from {endpoint} ({type(e).__name__}: {str(e)[:120]}); check the network, "
            "or set HF_ENDPOINT to a mirror (export HF_ENDPOINT=https://hf-mirror.com), or use --source modelscope"
        ) from None


def _modelscope_download(repo: str, out: Path, include: list[str] | None) -> None:
    try:
        from modelscope.hub.snapshot_download import dataset_snapshot_download
    except ImportError:
        raise QingLMError("--source modelscope needs the ModelScope SDK: pip install modelscope") from None
    try:
        dataset_snapshot_download(repo, local_dir=str(out), allow_file_pattern=include)
    except _BUGS:
        raise
    except Exception as e:  # the SDK raises requests' and its own error types, not one base class
        raise QingLMError(
            f"cannot download {repo} from ModelScope ({type(e).__name__}: {str(e)[:120]}); check the "
            "network and the dataset id, or use --source hf"
        ) from None


def download(
    name: str,
    out: str | os.PathLike,
    *,
    source: str = "hf",
    include: Sequence[str] = (),
    overwrite: bool = False,
) -> list[Path]:
    """Return the corpus files in out after downloading a catalogue name or a dataset repository id there.

    Files already there are resumed or kept by the hub client. out must be new, empty, or an earlier
    download (QingLM's manifest says so); another non-empty directory needs overwrite.
    """
    if source not in SOURCES:
        raise QingLMError(f"--source must be one of {', '.join(SOURCES)}, got {source!r}")
    entry = CATALOGUE.get(name)
    if entry is None and name.count("/") != 1:
        raise QingLMError(
            f"{name!r} is neither a catalogue name ({', '.join(CATALOGUE)}) nor a dataset id like owner/name"
        )
    repo = entry and (entry.hf if source == "hf" else entry.modelscope)
    if entry is not None and repo is None:
        raise QingLMError(f"{name} is not on {source}; use --source hf")
    repo = repo or name
    patterns = list(include) or (list(entry.include) if entry else None)
    path = Path(out)
    try:  # a download that fails (offline, no such dataset) leaves no claim on path
        with OwnedDir.claiming(path, "download", [LOCK_FILE], overwrite=overwrite) as owned:
            with exclusive_lock(path):
                (_hf_download if source == "hf" else _modelscope_download)(repo, path, patterns)
                owned.add(*(p.name for p in path.iterdir() if not p.name.startswith(".")))
    except OSError as e:  # the clients' own errors are QingLMErrors by now
        raise QingLMError(f"cannot write to {path}: {e.strerror or e}") from None
    try:
        return expand_paths(path)
    except QingLMError:
        shown = ", ".join(patterns) if patterns else "all files"
        raise QingLMError(
            f"{repo} on {source} has no corpus files matching {shown}; check its file list and pass --include"
        ) from None
