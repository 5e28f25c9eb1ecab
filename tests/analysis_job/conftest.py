"""Fixtures of the SINDy job tests: one trained smoke run (real entry points) and Ray helpers.

The smoke DiT is trained with ``dit.schedule=linear``: after 30 steps its EMA weights have barely
left their zero init (eps ~ 0), and under the default cosine schedule (T = 50, last beta clamped at
0.999) such a model's samplers multiply the state by ~31 at the first step, so its trajectories
overflow the library (the job then stops with a clear error). The linear schedule keeps them O(1).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, cli_refusal, run_entry

JOB = str(REPO / "analysis" / "sindy_job.py")
# The reference study's trajectories (provenance: analysis/reference/README.md).
NPZ = REPO / "analysis" / "reference" / "sindy-study-trajectories.npz"


def smoke(root: Path, *extra: str) -> list[str]:
    return ["--config", str(REPO / "configs" / "smoke.yaml"), f"run.root={root}", *extra]


NPZ_ARGS = ("sindy.ray_address=local", f"sindy.trajectories={NPZ}", "sindy.target=central_diff")


def npz_job(root: Path, *extra: str) -> list[str]:
    """The job's command on the reference study's trajectory file (no trained run needed)."""
    return [sys.executable, JOB, *smoke(root, *NPZ_ARGS, *extra)]


@pytest.fixture(scope="session")
def npz_run(tmp_path_factory) -> Path:
    """One finished job on the reference file: ``<root>/smoke`` with its fits and report (copy it to change it)."""
    root = tmp_path_factory.mktemp("npz-run")
    run_entry(npz_job(root))
    return root


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, mnist_shards) -> Path:
    """``<root>/smoke`` with ae, latent stats and a 30-step DiT (EMA), through the real entry points."""
    root = tmp_path_factory.mktemp("sindy-run")
    args = smoke(root, f"data.shards={mnist_shards}", "dit.schedule=linear", "dit.eval_samples=0")
    for script in ("train_ae.py", "encode_latents.py", "train_dit.py"):
        run_entry([sys.executable, str(REPO / "training" / script), *args])
    return root


@pytest.fixture(scope="session")
def trained_conv_run(tmp_path_factory, mnist_shards) -> Path:
    """As ``trained_run`` with the convolutional autoencoder (49 x 6 latent)."""
    root = tmp_path_factory.mktemp("sindy-conv-run")
    args = smoke(root, f"data.shards={mnist_shards}", "ae.kind=conv", "dit.schedule=linear", "dit.eval_samples=0")
    for script in ("train_ae.py", "encode_latents.py", "train_dit.py"):
        run_entry([sys.executable, str(REPO / "training" / script), *args])
    return root


def job_refusal(args: list[str], capsys) -> str:
    """The job's one-line refusal (exit 2, before Ray starts), in this process (tests.conftest.cli_refusal)."""
    from analysis import sindy_job

    line, out = cli_refusal(sindy_job.main, args, capsys)
    assert "Ray" not in out, out
    return line


def copy_run(src_root: Path, dest_root: Path, with_sindy: bool = False) -> Path:
    """A fresh run folder with the trained weights (and optionally the finished stages)."""
    import shutil

    skip = ["checkpoints", "tb", "latents", "report", "reports"] + ([] if with_sindy else ["sindy"])
    shutil.copytree(src_root / "smoke", dest_root / "smoke", ignore=shutil.ignore_patterns(*skip))
    return dest_root


def kill_marked(marker: str) -> None:
    """SIGTERM, then SIGKILL, the processes whose command line contains ``marker`` (a temp dir unique
    to one test's Ray head) and their descendants: only what that test started."""
    procs = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        procs[int(p.name)] = (cmd, ppid)
    chosen = {pid for pid, (cmd, _) in procs.items() if marker in cmd and pid != os.getpid()}
    grew = True
    while grew:
        kids = {pid for pid, (_, pp) in procs.items() if pp in chosen} - chosen
        grew = bool(kids)
        chosen |= kids
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in chosen:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(1.0)
