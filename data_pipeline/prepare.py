"""Command line: write (or verify) the MNIST webdataset shards.

    python -m data_pipeline.prepare --out DIR [--shard-size N] [--source auto|pickle|idx:PATH]
    python -m data_pipeline.prepare --out DIR --verify

Exit codes: 0 success (including "already up to date"), 1 ``--verify`` found mismatches,
2 an expected error (bad argument, missing source, unwritable directory, disk full, permission
denied, ...), reported as one line on stderr without a traceback; a failed write removes its
temporary file and leaves no manifest.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from configs.cli import OneLineParser, UserError, call_cli
from configs.progress import progress
from data_pipeline.shards import SPLITS, PrepareResult, prepare_shards, read_manifest, verify_shards

__all__ = ["main", "build_parser"]

PROG = "python -m data_pipeline.prepare"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard-size must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--shard-size must be a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    parser = OneLineParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="shard directory (created if missing)")
    parser.add_argument("--shard-size", type=_positive_int, default=10000, help="samples per shard (default 10000)")
    parser.add_argument(
        "--source",
        default="auto",
        help="auto (default) | pickle | pickle:FILE | idx:DIR (torchvision raw IDX files)",
    )
    parser.add_argument(
        "--verify", action="store_true", help="only re-hash the shards against manifest.json; writes nothing"
    )
    return parser


def _summary(result: PrepareResult) -> str:
    splits = result.manifest["splits"]
    counts = ", ".join(f"{s}: {splits[s]['total']} samples in {len(splits[s]['shards'])} shards" for s in SPLITS)
    state = "already up to date, nothing written" if result.up_to_date else f"wrote {len(result.written)} shards"
    return f"{result.out_dir}: {state} ({counts}); source {result.manifest['source']['name']}"


class _ShardProgress:
    """One progress counter per split (a bar on a terminal, a line per shard without one)."""

    def __init__(self) -> None:
        self.bars: dict[str, object] = {}

    def __call__(self, split: str, index: int, total: int) -> None:
        bar = self.bars.get(split)
        if bar is None:
            bar = self.bars[split] = progress(total, f"prepare: {split}", unit="shards", every=1 / total)
        bar.update(1)
        if index + 1 == total:
            bar.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code instead of exiting (testable in-process)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exn:
        return int(exn.code or 0)
    return call_cli(lambda _: _run(args), prog=PROG)


def _run(args: argparse.Namespace) -> int:
    try:
        if args.verify:
            problems = verify_shards(args.out, read_manifest(args.out))
            for line in problems:
                print(line)
            if problems:
                print(f"{args.out}: {len(problems)} problem(s) found", file=sys.stderr)
                return 1
            print(f"{args.out}: all shards match manifest.json")
            return 0
        result = prepare_shards(args.out, shard_size=args.shard_size, source=args.source, progress=_ShardProgress())
    except ValueError as exn:
        raise UserError(str(exn)) from None
    except OSError as exn:  # disk full, permission denied, read-only file system: the temp file is gone
        where = f" ({exn.filename})" if exn.filename else ""
        raise UserError(
            f"cannot write the shards to {args.out}: {exn.strerror or exn}{where}; free space, fix the "
            "permissions or choose another --out"
        ) from None
    print(_summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
