"""The one command-line convention of every entry point.

An expected failure (bad input: a config, a missing or corrupt file, a mismatched run) raises
:class:`UserError` or one of its subclasses; :func:`run_cli` turns it into one line on stderr,
``<prog>: error: <message>``, and exit code 2, without a traceback. Anything else is a bug and
keeps its traceback. Argument errors go the same way through :class:`OneLineParser`.

Under ``python -m training.launch`` (``LATENT_SINDY_LAUNCH_DIR`` set) a worker that fails this
way also leaves ``usererror.<pid>`` in the launch folder, from which the wrapper exits 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from configs.errors import UserError
from configs.schema import Config, load_config
from configs.text import MESSAGE_LIMIT

LAUNCH_DIR_ENV = "LATENT_SINDY_LAUNCH_DIR"
"""Set by ``python -m training.launch`` for its workers: a folder where a ``stop`` file asks
them to checkpoint and stop, where a stopped worker leaves ``preempted.*`` and a worker that
stopped on a UserError leaves ``usererror.*`` (see training/launch.py)."""

__all__ = ["CONFIG_KEYS_HELP", "LAUNCH_DIR_ENV", "UserError", "OneLineParser", "parse_cli", "call_cli", "run_cli"]


CONFIG_KEYS_HELP = """\
config keys:
  python -m configs show --config FILE [key=value ...]   the resolved config, every key with its value and doc
  configs/schema.py    run, data, ae, latents, dit, resume (the schema; YAML files only override it)
  configs/sindy.py     sindy.* and sindy.library.* (equation discovery)
  configs/slurm.py     slurm.* (python -m cluster.submit)"""


class OneLineParser(argparse.ArgumentParser):
    """argparse with the house's one-line errors. Descriptions and epilogs keep their line breaks
    (RawDescriptionHelpFormatter): the entry points' docstrings hold tables and command lists."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        # argparse prints the whole usage block first; the house rule is one line naming the problem.
        message = " ".join(message.split("\n"))
        if len(message) > MESSAGE_LIMIT:
            message = f"{message[:MESSAGE_LIMIT]}... ({len(message)} characters)"
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_cli(argv: Sequence[str] | None, description: str) -> Config:
    """``--config X.yaml key=value ...`` -> validated Config."""
    p = OneLineParser(description=description, epilog=CONFIG_KEYS_HELP)
    p.add_argument("--config", required=True, help="YAML config (configs/smoke.yaml, local.yaml, gpu.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. ae.lr=1e-3 resume=auto")
    args = p.parse_args(argv)
    return load_config(args.config, args.overrides)


def call_cli(
    main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None, prog: str | None = None
) -> int:
    """Run ``main(argv)`` and return the process's exit code: main's own when it returns an int,
    0 when it returns anything else, 2 after an expected error (printed as one line).

    Expected: UserError (and its subclasses: ConfigError, DataPipelineError, QualityError, ...)
    and a missing file. ``prog`` names the command in the message (default: the script's name).
    """
    try:
        rc = main(argv)
    except (UserError, FileNotFoundError) as e:
        return _report(e, prog)
    return rc if isinstance(rc, int) and not isinstance(rc, bool) else 0


def run_cli(
    main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None, prog: str | None = None
) -> NoReturn:
    """``sys.exit(call_cli(main, argv, prog))``: the last line of every entry point."""
    sys.exit(call_cli(main, argv, prog))


def _report(e: BaseException, prog: str | None) -> int:
    # A live progress bar has no newline yet: close it so the error gets a line of its own.
    bars = getattr(sys.modules.get("tqdm"), "tqdm", None)
    for bar in list(getattr(bars, "_instances", ())):
        bar.close()
    prog = prog or Path(sys.argv[0]).name
    msg = " ".join(str(e).split("\n"))  # one line even when a library's message has several
    if len(msg) > MESSAGE_LIMIT:
        msg = f"{msg[:MESSAGE_LIMIT]}... ({len(msg)} characters)"
    print(f"{prog}: error: {msg}", file=sys.stderr, flush=True)
    launch_dir = os.environ.get(LAUNCH_DIR_ENV)
    if launch_dir and Path(launch_dir).is_dir():
        # Under python -m training.launch: record the error for the wrapper, which exits 2. A
        # single process then exits 0 because `accelerate launch` wraps any nonzero worker exit
        # in a traceback of its own; with several ranks a nonzero exit is kept, so the launcher
        # stops the ranks that did not fail instead of leaving them in a collective.
        (Path(launch_dir) / f"usererror.{os.getpid()}").touch()
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            return 0
    return 2
