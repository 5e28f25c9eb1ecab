"""The config from the shell.

    python -m configs --config X.yaml [key=value ...]        the paths `make run` needs, as shell-quoted
                                                           assignments for `eval` (the Makefile reads them)
    python -m configs show --config X.yaml [key=value ...]   the resolved config as YAML, every key with its
                                                           one-line doc and each section with its file

A bad config is one line on stderr and exit code 2.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence

from configs.cli import CONFIG_KEYS_HELP, OneLineParser, run_cli
from configs.keys import render_config
from configs.schema import Config, load_config


def show(argv: Sequence[str]) -> None:
    p = OneLineParser(prog="python -m configs show", description=__doc__, epilog=CONFIG_KEYS_HELP)
    p.add_argument("--config", help="YAML config (default: the schema's defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sindy.n_trajectories=500")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    source = args.config or "the schema defaults"
    header = f"resolved from {source}" + (f" with {' '.join(args.overrides)}" if args.overrides else "")
    print(render_config(Config, cfg, header), end="")


def main(argv: Sequence[str] | None = None) -> None:

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["show"]:
        return show(argv[1:])
    p = OneLineParser(prog="make run", description=__doc__, epilog=CONFIG_KEYS_HELP)
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    values = {"shards": cfg.data.shards, "rundir": str(cfg.run.dir), "classifier": cfg.dit.classifier}
    print(" ".join(f"{k}={shlex.quote(v)}" for k, v in values.items()))


if __name__ == "__main__":
    # Without `show` the Makefile is the caller: errors name what the user typed.
    run_cli(main, prog="python -m configs show" if sys.argv[1:2] == ["show"] else "make run")
