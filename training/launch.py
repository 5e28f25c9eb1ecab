"""``accelerate launch`` that survives a stop signal and reports a preempted stage.

    python -m training.launch [accelerate launch options] training/train_ae.py --config X.yaml [key=value ...]

``accelerate launch`` alone does not forward signals: SIGTERM or SIGUSR1 kills it and its worker
trains on as an orphan (workers also ask the kernel for SIGUSR1 when their launcher dies, see
``runtime._stop_when_parent_dies``), and it turns every nonzero worker exit into exit 1, so a
stage preempted at a checkpoint cannot be told apart from a crash. This wrapper runs it as a
child and

* on SIGUSR1, SIGTERM or SIGINT asks the workers to checkpoint and stop: it creates the
  ``stop`` file they poll (torchrun starts workers in sessions of their own, so a signal to the
  launcher's process group would miss them) and sends SIGUSR1 to the launcher's process group,
  in which ``accelerate launch`` ignores it (SIG_IGN is inherited; the workers install their own
  handler). A second Ctrl-C (SIGINT) kills the launcher's process group outright; repeated
  SIGUSR1/SIGTERM only repeat the request (Slurm's job script re-sends USR1 while it waits);
* exits with ``runtime.PREEMPTED_EXIT`` (75) when a worker stopped early (it leaves a
  ``preempted.*`` file in the launch folder), with 2 when a worker stopped on an expected error
  (bad config, missing or corrupt input: its one line is on stderr, ``usererror.*``), else with
  the launcher's exit code.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from configs.cli import LAUNCH_DIR_ENV
from training.runtime import PREEMPTED_EXIT

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


def _ignore_usr1() -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if args else 2
    launch_dir = Path(tempfile.mkdtemp(prefix="latent-sindy-launch-"))
    env = {**os.environ, LAUNCH_DIR_ENV: str(launch_dir)}
    interrupts = 0
    child: subprocess.Popen | None = None

    def on_signal(signum, frame) -> None:  # noqa: ARG001
        nonlocal interrupts
        # Only a second Ctrl-C kills: Slurm's job script re-sends USR1 every 30 s, and Slurm
        # follows its TERM with KILL by itself, so neither may cut a checkpoint short here.
        if signum == signal.SIGINT:
            interrupts += 1
            if interrupts > 1:
                _signal_group(child, signal.SIGKILL)
                return
        if not (launch_dir / "stop").exists():
            hint = " (Ctrl-C again to kill)" if signum == signal.SIGINT else ""
            print(
                f"launch: got {signal.Signals(signum).name}: asking the stage to checkpoint and stop{hint}",
                file=sys.stderr,
                flush=True,
            )
            (launch_dir / "stop").touch()
        _signal_group(child, signal.SIGUSR1)

    # Handlers first, so a signal arriving while the child starts is not lost (it waits in the
    # stop file); the child restores the defaults for SIGTERM/SIGINT itself (Python does).
    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)
    try:
        child = subprocess.Popen(
            [sys.executable, "-m", "accelerate.commands.launch", *args],
            env=env,
            start_new_session=True,
            preexec_fn=_ignore_usr1,
        )
        if (launch_dir / "stop").exists():
            _signal_group(child, signal.SIGUSR1)
        rc = child.wait()
        if any(launch_dir.glob("preempted.*")):
            print(
                f"launch: the stage stopped at a checkpoint before it finished (exit {PREEMPTED_EXIT}); "
                "run the same command with resume=auto to continue",
                file=sys.stderr,
                flush=True,
            )
            return PREEMPTED_EXIT
        if any(launch_dir.glob("usererror.*")):
            return 2  # the worker has printed its one-line error (configs.cli.run_cli)
        return rc if rc >= 0 else 128 - rc
    finally:
        if child is not None and child.poll() is None:
            _signal_group(child, signal.SIGKILL)
            child.wait()
        shutil.rmtree(launch_dir, ignore_errors=True)


def _signal_group(child: subprocess.Popen | None, sig: int) -> None:
    if child is None:
        return
    try:
        os.killpg(child.pid, sig)
    except ProcessLookupError:
        pass


if __name__ == "__main__":
    sys.exit(main())
