"""``python -m configs --config X.yaml [key=value ...]``: the paths ``make run`` needs, as
shell-quoted assignments for ``eval``; a bad config is one line on stderr and exit code 2."""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from configs.cli import OneLineParser, run_cli
from configs.schema import load_config


def main(argv: Sequence[str] | None = None) -> None:
    p = OneLineParser(prog="make run", description=__doc__)
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    values = {"shards": cfg.data.shards, "rundir": str(cfg.run.dir), "classifier": cfg.dit.classifier}
    print(" ".join(f"{k}={shlex.quote(v)}" for k, v in values.items()))


if __name__ == "__main__":
    run_cli(main, prog="make run")
