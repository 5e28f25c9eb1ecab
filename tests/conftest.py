"""Shared fixtures: the real MNIST shards (prepared once and cached), helpers to run entry points."""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARD_CACHE = REPO / ".cache" / "test-shards"

# Under pytest-xdist (make test) the workers share the cores: each worker, and every process it starts,
# gets an equal share of threads unless OMP_NUM_THREADS is set already. Two workers with a thread per
# core each would oversubscribe the cores, and OpenMP's waiting threads spin on them.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _WORKERS))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: unknown, and never called, without it
def pytest_xdist_make_scheduler(config, log):
    """make test's scheduler (pytest-xdist, --dist loadscope): a module's tests run on one worker, so its module
    fixtures are built once, and all of tests/cluster on one worker, since two tests' jobs on the single-node
    Slurm (2 CPUs) would queue behind each other.

    By the scope xdist's scheduler asks for rather than by xdist_group marks: --dist loadgroup reads those marks
    from a suffix it writes into the node ids, which pytest 9.2 no longer lets it change (pytest-xdist issue
    1386), so loadgroup silently spreads the tests of a group over the workers."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "tests/cluster" if module.startswith("tests/cluster/") else module

    return ModuleScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def mnist_shards() -> Path:
    """The full real MNIST as shards; prepare is idempotent, so later sessions reuse the cache.

    Under pytest-xdist every worker asks for them: the first prepares, the others wait on this lock
    and then find the finished shards. Prepare's own lock on the folder refuses a second writer rather
    than waiting (what a user running two prepares wants to hear), so waiting is this fixture's job."""
    SHARD_CACHE.parent.mkdir(parents=True, exist_ok=True)
    with open(SHARD_CACHE.parent / "test-shards.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = subprocess.run(
            [sys.executable, "-m", "data_pipeline.prepare", "--out", str(SHARD_CACHE)],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
    assert proc.returncode == 0, proc.stderr
    return SHARD_CACHE


def run_entry(
    args: list[str], cwd: Path = REPO, env: dict | None = None, timeout: float = 600, check: bool = True
) -> subprocess.CompletedProcess:
    """Run a command with the venv's executables first on PATH; assert success when ``check``."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env["PATH"] = f"{Path(sys.executable).parent}:{full_env.get('PATH', '')}"
    proc = subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def cli_refusal(main, args: list[str], capsys) -> tuple[str, str]:
    """An entry point's refusal through its own CLI wrapper (configs.cli.run_cli) in this process: exit 2 and one
    line on stderr, returned with what it printed on stdout. For what is checked before any work; a subprocess
    per case costs seconds of imports (tests/training/test_cli_errors.py runs the entry points themselves)."""
    from configs.cli import run_cli

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, args)
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1, out
    return lines[0], out.out


def refusal_line(proc: subprocess.CompletedProcess) -> str:
    """A subprocess's refusal: exit 2 and exactly one line on stderr (so no traceback); returns the line."""
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-3000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_cmd(*, two_procs: bool = False) -> list[str]:
    """``accelerate launch`` for one CPU process, or for a real two-rank gloo group.

    Two ranks need ACCELERATE_USE_CPU=true in the environment (see docs/REFERENCES.md).
    """
    exe = str(Path(sys.executable).parent / "accelerate")
    if two_procs:
        return [
            exe,
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(free_port()),
        ]
    return [exe, "launch", "--config_file", str(REPO / "configs/accelerate/cpu.yaml")]
