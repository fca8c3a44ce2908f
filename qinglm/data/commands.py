"""`qinglm data`: list and export the built-in corpora; download, clean and deduplicate corpora."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from pathlib import Path

from qinglm.data.clean import FILTERS, FIXES, OPTIONAL, CleanConfig


def register(sub: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], None]]:
    """Return {"data": handler} after adding the `qinglm data` parsers to sub."""
    p = sub.add_parser("data", help="built-in corpora; download, clean and deduplicate corpora")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    dsub.add_parser("list", help="list the built-in corpora with their sizes")
    e = dsub.add_parser("export", help="write a built-in corpus as text, one document per line")
    e.add_argument("name")
    e.add_argument("out")
    e.add_argument("--split", default="all", choices=["all", "train", "val"])
    e.add_argument("--overwrite", action="store_true", help="replace an OUT file QingLM did not write")
    add_parsers(dsub)
    return {"data": cmd_data}


def cmd_data(args: argparse.Namespace) -> None:
    from qinglm.data.builtin import BUILTINS, builtin_info, export_builtin

    if args.data_command in ("clean", "dedup", "download"):
        run(args)
    elif args.data_command == "list":
        print(f"{'name':<8} {'documents':>10} {'characters':>12}  source")
        for name in BUILTINS:
            info = builtin_info(name)
            print(f"{name:<8} {info['documents']:>10,} {info['characters']:>12,}  {info['source']}")
            print(f"{'':<8} {info['description']}")
    else:
        n = export_builtin(args.name, args.out, split=args.split, overwrite=args.overwrite)
        print(f"wrote {n:,} documents to {args.out}")


def add_parsers(dsub: argparse._SubParsersAction) -> None:
    """Return nothing; add the clean and dedup actions to the `data` command group."""
    c = dsub.add_parser(
        "clean",
        help="clean a Chinese corpus into JSONL shards, with a report of what each filter dropped",
        description="Fix up (HTML, boilerplate, URL/e-mail/phone masking, optional Traditional to Simplified) "
        "and filter (length, CJK share, repetition, symbols, punctuation, optional language id) "
        "documents; write DIR/clean_0000.jsonl, ... and DIR/clean_report.json.",
    )
    _add_io(c, nfkc_help="normalise full-width Latin letters and digits (default: on)")
    for step in FIXES + FILTERS:
        c.add_argument(
            f"--{step}",
            action=argparse.BooleanOptionalAction,
            default=step not in OPTIONAL,
            help=f"run the {step} step (default: {'off' if step in OPTIONAL else 'on'})",
        )
    d = CleanConfig()
    c.add_argument("--min-chars", type=int, default=d.min_chars, help="shortest document kept")
    c.add_argument("--max-chars", type=int, default=d.max_chars, help="longest document kept")
    c.add_argument("--min-cjk", type=float, default=d.min_cjk, help="least share of CJK ideographs")
    c.add_argument("--max-symbols", type=float, default=d.max_symbols, help="most share of symbols")
    c.add_argument(
        "--max-punctuation", type=float, default=d.max_punctuation, help="most share of punctuation"
    )
    c.add_argument("--lang", default=d.langid, help="language kept by --langid (py3langid code)")

    p = dsub.add_parser(
        "dedup",
        help="remove exact and near-duplicate documents (MinHash-LSH over character n-grams)",
        description="Keep the first of each group of duplicates; write DIR/dedup_0000.jsonl, ... and "
        "DIR/dedup_report.json.",
    )
    _add_io(
        p,
        nfkc=False,
        nfkc_help="write full-width Latin letters and digits as ASCII (default: off, the documents kept are "
        "written as read; duplicates are compared normalised either way)",
    )
    add_download_parser(dsub)
    from qinglm.data.dedup import DedupConfig

    dd = DedupConfig()
    p.add_argument(
        "--exact", action=argparse.BooleanOptionalAction, default=dd.exact, help="drop exact copies"
    )
    p.add_argument("--near", action=argparse.BooleanOptionalAction, default=dd.near, help="drop near copies")
    p.add_argument("--threshold", type=float, default=dd.threshold, help="Jaccard similarity of a near copy")
    p.add_argument("--ngram", type=int, default=dd.ngram, help="characters per n-gram")
    p.add_argument("--num-perm", type=int, default=dd.num_perm, help="MinHash permutations")
    p.add_argument(
        "--bands",
        type=int,
        default=dd.bands,
        help="LSH bands, of num-perm // bands permutations each (default 0: chosen for the threshold)",
    )
    p.add_argument(
        "--tmp-dir",
        default=None,
        help="where the spill files go (about 720 bytes per document; default: $TMPDIR or /tmp)",
    )


def add_download_parser(dsub: argparse._SubParsersAction) -> None:
    """Return nothing; add the download action to the `data` command group."""
    from qinglm.data.download import CATALOGUE, SOURCES

    names = "; ".join(f"{name}: {c.description}" for name, c in CATALOGUE.items())
    p = dsub.add_parser(
        "download",
        help="download a dataset repository (Hugging Face Hub, a mirror via HF_ENDPOINT, or ModelScope)",
        description=f"Download a dataset repository, resumably, into --out; its files are ordinary --data "
        f"input. Named corpora: {names}.",
    )
    p.add_argument("name", metavar="NAME", help="a catalogue name or a dataset id (owner/name)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--source", choices=SOURCES, default="hf", help="hf (default; honours HF_ENDPOINT) or modelscope"
    )
    p.add_argument(
        "--include", nargs="+", default=[], metavar="PATTERN", help="only files matching these globs"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="download into a non-empty --out QingLM did not create"
    )


def _add_io(p: argparse.ArgumentParser, nfkc_help: str, nfkc: bool = True) -> None:
    p.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="file(s), directory or glob (.txt, .jsonl, ...)"
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--encoding", default=None, help="text encoding (default: detect)")
    p.add_argument("--text-field", default="text", help="JSONL/Parquet field holding the text")
    p.add_argument("--nfkc", action=argparse.BooleanOptionalAction, default=nfkc, help=nfkc_help)
    p.add_argument("--shard-mb", type=int, default=256, help="size of each output shard")
    p.add_argument(
        "--workers", type=int, default=0, help="worker processes (default 0: one per CPU; 1: none)"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="write into a non-empty --out QingLM did not create"
    )


def run(args: argparse.Namespace) -> None:
    """Return nothing; run `data download`, `data clean` or `data dedup` and print what it did."""
    if args.data_command == "download":
        from qinglm.data.download import download

        files = download(
            args.name, args.out, source=args.source, include=args.include, overwrite=args.overwrite
        )
        shown = "\n".join(f"  {f}" for f in files[:10]) + (
            f"\n  ... ({len(files)} in all)" if len(files) > 10 else ""
        )
        print(f"{len(files)} corpus file(s) in {args.out}:\n{shown}\nuse them with --data {args.out}")
        return
    from qinglm.data.jsonl_out import drop_table, write_jsonl_shards
    from qinglm.data.parallel import check_workers
    from qinglm.data.sources import ReadStats, read_documents

    stats = ReadStats()

    passes: list[ReadStats] = []

    def read() -> Iterator[str]:  # dedup reads twice; the first pass's counts are the ones reported
        passes.append(stats if not passes else ReadStats())
        return read_documents(
            args.inputs, encoding=args.encoding, nfkc=args.nfkc, text_field=args.text_field, stats=passes[-1]
        )

    if args.data_command == "clean":
        from qinglm.data.clean import CleanReport, clean_documents

        config = CleanConfig(
            enabled={s for s in FIXES + FILTERS if getattr(args, s)},
            langid=args.lang,
            **{
                k: getattr(args, k)
                for k in ("min_chars", "max_chars", "min_cjk", "max_symbols", "max_punctuation")
            },
        )
        report = CleanReport()
        kept = clean_documents(read(), config, report, workers=check_workers(args.workers))
    else:
        from qinglm.data.dedup import DedupConfig, DedupReport, dedup_documents

        config = DedupConfig(
            **{k: getattr(args, k) for k in ("exact", "near", "ngram", "threshold", "num_perm", "bands")}
        )
        report = DedupReport()
        kept = dedup_documents(
            read, config, report, tmp_dir=args.tmp_dir, workers=check_workers(args.workers)
        )

    def summary() -> dict:
        read = {"files": stats.files, "documents": stats.documents, "skipped": dict(stats.skipped)}
        return {"read": read, **report.as_dict(config)}

    out = Path(args.out)
    shards = write_jsonl_shards(
        kept, out, args.data_command, summary, shard_bytes=args.shard_mb << 20, overwrite=args.overwrite
    )
    print(stats.summary())
    changed = getattr(report, "changed", {})
    if changed:
        print("changed: " + ", ".join(f"{k} {n:,}" for k, n in changed.items() if n))
    print(drop_table(list(summary()["dropped"].items()), report.documents))
    share = 100 * report.kept / max(report.documents, 1)
    print(
        f"kept {report.kept:,} of {report.documents:,} documents ({share:.1f}%) in {len(shards)} shard(s) "
        f"in {out}; report: {out / f'{args.data_command}_report.json'}"
    )
