"""Training under N processes, broken checkpoints, signals and logs (issue 11, items 1, 3, 7, 8):
the LR sequence is the same on 1 and 2 ranks, resume=auto skips a corrupt checkpoint, a signal
to the launcher checkpoints and exits 75 without orphans, and TensorBoard holds each step once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import REPO, accelerate_cmd, refusal_line, run_entry
from tests.training.test_train_ae import assert_same_weights, smoke_args

TRAIN_AE = str(REPO / "training" / "train_ae.py")
TRAIN_DIT = str(REPO / "training" / "train_dit.py")
ENCODE = str(REPO / "training" / "encode_latents.py")
PREEMPTED_EXIT = 75  # documented in docs/TRAINING.md, "Exit codes"


def scalars(tb: Path, tag: str) -> list[tuple[int, float]]:
    ea = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    ea.Reload()
    return [(e.step, e.value) for e in ea.Scalars(tag)]


def assert_plain_log(*texts: str) -> None:
    """Output to a file (not a TTY): no carriage-return bars, no endless lines."""
    for text in texts:
        assert "\r" not in text
        assert max((len(line) for line in text.splitlines()), default=0) <= 300


# ---- 1. the LR schedule on 1 and 2 processes with the same global batch ------------------------

LR_ARGS = ("ae.max_steps=12", "ae.warmup_steps=2", "ae.log_every=1", "ae.checkpoint_every=100", "ae.image_every=1000")


@pytest.fixture(scope="module")
def ae_runs(tmp_path_factory, mnist_shards) -> dict[int, Path]:
    """The autoencoder trained 12 steps on 1 process (batch 16), on 2 (8 each) and on 1 with 2 x 8 accumulated."""
    root = tmp_path_factory.mktemp("lr")
    one = run_entry(accelerate_cmd() + [TRAIN_AE, *smoke_args(root / "p1", mnist_shards, *LR_ARGS, "ae.batch_size=16")])
    two = run_entry(
        accelerate_cmd(two_procs=True)
        + [TRAIN_AE, *smoke_args(root / "p2", mnist_shards, *LR_ARGS, "ae.batch_size=8")],
        env={"ACCELERATE_USE_CPU": "true"},
    )
    # The same global batch as 2 accumulated micro-batches of 8 on one process.
    accum = run_entry(
        [
            sys.executable,
            TRAIN_AE,
            *smoke_args(root / "ga", mnist_shards, *LR_ARGS, "ae.batch_size=8", "ae.grad_accum=2"),
        ]
    )
    assert "x 2 processes" in two.stdout
    assert_plain_log(one.stdout, one.stderr, two.stdout, two.stderr, accum.stdout, accum.stderr)
    assert "ae: step 12/12 loss" in one.stdout
    return {1: root / "p1" / "smoke", 2: root / "p2" / "smoke", "accum": root / "ga" / "smoke"}


@pytest.mark.slow
def test_ae_lr_sequence_is_the_same_on_two_ranks(ae_runs):
    lr1, lr2, lr_accum = (scalars(ae_runs[n] / "tb" / "ae", "train/lr") for n in (1, 2, "accum"))
    assert [s for s, _ in lr1] == list(range(1, 13))
    assert lr1 == lr2 == lr_accum
    # Warm-up over 2 steps to the peak, then a cosine that reaches 0 at the last step, not before.
    values = [v for _, v in lr1]
    assert values[:2] == pytest.approx([1e-3 * 2, 2e-3]) and values[-1] == pytest.approx(0.0, abs=1e-9)
    assert all(a > b for a, b in zip(values[1:], values[2:]))
    assert json.loads((ae_runs[2] / "ae.json").read_text())["num_processes"] == 2


@pytest.mark.slow
def test_dit_lr_sequence_is_the_same_on_two_ranks(ae_runs, tmp_path, mnist_shards):
    base = tmp_path / "base"
    shutil.copytree(ae_runs[1], base / "smoke", ignore=shutil.ignore_patterns("checkpoints", "tb"))
    enc = run_entry([sys.executable, ENCODE, *smoke_args(base, mnist_shards)])
    assert "latents: train: encoding 60000 images" in enc.stdout
    assert_plain_log(enc.stdout, enc.stderr)
    args = (
        "dit.max_steps=12",
        "dit.warmup_steps=3",
        "dit.log_every=1",
        "dit.checkpoint_every=100",
        "dit.image_every=1000",
        "dit.eval_samples=0",
    )
    for root in (tmp_path / "d1", tmp_path / "d2"):
        shutil.copytree(base, root)
    run_entry(accelerate_cmd() + [TRAIN_DIT, *smoke_args(tmp_path / "d1", REPO / "unused", *args, "dit.batch_size=32")])
    two = run_entry(
        accelerate_cmd(two_procs=True)
        + [TRAIN_DIT, *smoke_args(tmp_path / "d2", REPO / "unused", *args, "dit.batch_size=16")],
        env={"ACCELERATE_USE_CPU": "true"},
    )
    assert_plain_log(two.stdout, two.stderr)
    lr1, lr2 = (scalars(tmp_path / d / "smoke" / "tb" / "dit", "train/lr") for d in ("d1", "d2"))
    assert [s for s, _ in lr1] == list(range(1, 13)) and lr1 == lr2
    assert lr1[-1][1] == pytest.approx(0.0, abs=1e-9) and lr1[-2][1] > 0


# ---- 3. corrupt checkpoints -------------------------------------------------------------------

CKPT_ARGS = (
    "ae.max_steps=12",
    "ae.checkpoint_every=4",
    "ae.keep_checkpoints=3",
    "ae.log_every=1",
    "ae.image_every=1000",
    "ae.batch_size=16",
)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, mnist_shards) -> Path:
    """12 uninterrupted steps with checkpoints at 4, 8 and 12."""
    root = tmp_path_factory.mktemp("ref")
    run_entry([sys.executable, TRAIN_AE, *smoke_args(root, mnist_shards, *CKPT_ARGS)])
    return root


def _truncate(f: Path) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _flip_byte(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


CORRUPTIONS = {
    "model.safetensors": _truncate,
    "optimizer.bin": lambda f: f.write_bytes(b""),
    "train_state.json": _truncate,
    "generator_rank0.safetensors": _flip_byte,
    "random_states_0.pkl": _truncate,
    "checkpoint.sha256": lambda f: f.unlink(),
}


def _interrupted_copy(reference_run: Path, dest: Path) -> Path:
    """The reference run as if killed after step 12's events but before its checkpoint."""
    shutil.copytree(reference_run, dest)
    run = dest / "smoke"
    shutil.rmtree(run / "checkpoints" / "ae" / "step_00000012")
    for f in ("ae.safetensors", "ae.json"):
        (run / f).unlink()
    return run


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_resume_auto_skips_a_corrupt_checkpoint(reference_run, tmp_path, mnist_shards, name):
    run = _interrupted_copy(reference_run, tmp_path / "cut")
    ckpts = run / "checkpoints" / "ae"
    assert (ckpts / "step_00000008" / name).is_file(), sorted(p.name for p in (ckpts / "step_00000008").iterdir())
    CORRUPTIONS[name](ckpts / "step_00000008" / name)
    proc = run_entry([sys.executable, TRAIN_AE, *smoke_args(tmp_path / "cut", mnist_shards, *CKPT_ARGS, "resume=auto")])
    warnings = [line for line in proc.stderr.splitlines() if "skipping checkpoint" in line]
    assert len(warnings) == 1 and "step_00000008" in warnings[0], proc.stderr
    assert "resumed from" in proc.stdout and "step_00000004 at step 4" in proc.stdout
    assert_same_weights(reference_run / "smoke" / "ae.safetensors", run / "ae.safetensors")
    # The broken checkpoint is set aside, never pruned in favour of, nor resumed from again.
    assert (ckpts / "corrupt-step_00000008").is_dir()
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000004", "step_00000008", "step_00000012"]
    # 8. The resumed run re-logged steps 5..12, which the first run had logged too: each reads back once.
    assert [s for s, _ in scalars(run / "tb" / "ae", "train/loss")] == list(range(1, 13))
    assert_plain_log(proc.stdout, proc.stderr)


def test_explicit_resume_of_a_corrupt_checkpoint_is_one_line(reference_run, tmp_path, mnist_shards):
    run = _interrupted_copy(reference_run, tmp_path / "cut")
    bad = run / "checkpoints" / "ae" / "step_00000008"
    _truncate(bad / "model.safetensors")
    proc = run_entry(
        [sys.executable, TRAIN_AE, *smoke_args(tmp_path / "cut", mnist_shards, *CKPT_ARGS, f"resume={bad}")],
        check=False,
    )
    line = refusal_line(proc)
    assert "not an intact checkpoint" in line and "model.safetensors" in line
    assert not (run / "ae.safetensors").exists()


# ---- 7. signals and the preemption exit code --------------------------------------------------

SIGNAL_ARGS = (
    "ae.max_steps=100",
    "ae.checkpoint_every=1000",
    "ae.batch_size=16",
    "ae.log_every=5",
    "ae.image_every=1000",
)


def _processes_mentioning(needle: str) -> list[int]:
    """Live processes whose command line contains ``needle`` (the test's unique run folder)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (d / "stat").read_text().split(") ")[1][0]
            except OSError:
                continue
            if needle in cmd and state != "Z":
                found.append(int(d.name))
    return found


def _start_and_wait_for_training(cmd: list[str], run: Path, env: dict | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env["PATH"] = f"{Path(sys.executable).parent}:{full_env['PATH']}"
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    tb = run / "tb" / "ae"
    deadline = time.time() + 300
    while not (tb.is_dir() and any(tb.rglob("events.*"))):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(1.0)
    return proc


def _wait_gone(needle: str, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while _processes_mentioning(needle):
        assert time.time() < deadline, f"orphaned workers: {_processes_mentioning(needle)}"
        time.sleep(0.2)


# One intra-op thread everywhere: a different thread count changes the order of float sums.
LAUNCH = [
    sys.executable,
    "-m",
    "training.launch",
    "--config_file",
    str(REPO / "configs/accelerate/cpu.yaml"),
    "--num_cpu_threads_per_process",
    "1",
]


@pytest.fixture(scope="module")
def signal_reference(tmp_path_factory, mnist_shards) -> Path:
    root = tmp_path_factory.mktemp("sigref")
    run_entry(LAUNCH + [TRAIN_AE, *smoke_args(root, mnist_shards, *SIGNAL_ARGS)])
    return root / "smoke" / "ae.safetensors"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_to_the_launcher_checkpoints_and_exits_75(tmp_path, mnist_shards, signal_reference, sig):
    root = tmp_path / "cut"
    launch = LAUNCH
    proc = _start_and_wait_for_training(
        launch + [TRAIN_AE, *smoke_args(root, mnist_shards, *SIGNAL_ARGS)], root / "smoke"
    )
    os.kill(proc.pid, sig)  # the launcher only, as `kill PID` would
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT, (out[-2000:], err[-3000:])
    assert "resume=auto to continue" in err and "Traceback" not in err
    _wait_gone(str(root))
    ckpts = list((root / "smoke" / "checkpoints" / "ae").glob("step_*"))
    assert len(ckpts) == 1 and 0 < int(ckpts[0].name.split("_")[1]) < 100
    assert not (root / "smoke" / "ae.safetensors").exists()
    assert_plain_log(out, err)

    resumed = run_entry(launch + [TRAIN_AE, *smoke_args(root, mnist_shards, *SIGNAL_ARGS, "resume=auto")])
    assert "resumed from" in resumed.stdout
    assert_same_weights(signal_reference, root / "smoke" / "ae.safetensors")
    steps = [s for s, _ in scalars(root / "smoke" / "tb" / "ae", "train/loss")]
    assert steps == sorted(set(steps)) and steps[-1] == 100


def test_plain_accelerate_launch_killed_leaves_no_training_orphan(tmp_path, mnist_shards):
    """Without the wrapper the launcher dies of SIGTERM; its worker must checkpoint and exit."""
    root = tmp_path / "cut"
    # Far more steps than run before the kill lands: with 100 a fast machine could finish first (seen once in CI).
    proc = _start_and_wait_for_training(
        accelerate_cmd() + [TRAIN_AE, *smoke_args(root, mnist_shards, *SIGNAL_ARGS, "ae.max_steps=5000")],
        root / "smoke",
    )
    os.kill(proc.pid, signal.SIGTERM)
    proc.communicate(timeout=60)
    _wait_gone(str(root))
    ckpts = list((root / "smoke" / "checkpoints" / "ae").glob("step_*"))
    assert len(ckpts) == 1 and not (root / "smoke" / "ae.safetensors").exists()
    assert int(ckpts[0].name.split("_")[1]) < 5000, ckpts  # a checkpoint of the stop, not of the end


@pytest.mark.slow
def test_two_ranks_stop_together_under_the_launcher(tmp_path, mnist_shards):
    root = tmp_path / "cut"
    launch = [
        sys.executable,
        "-m",
        "training.launch",
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
        "0",
    ]
    proc = _start_and_wait_for_training(
        launch + [TRAIN_AE, *smoke_args(root, mnist_shards, *SIGNAL_ARGS, "ae.batch_size=8")],
        root / "smoke",
        env={"ACCELERATE_USE_CPU": "true"},
    )
    os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT, (out[-2000:], err[-3000:])
    _wait_gone(str(root))
    ckpt = next((root / "smoke" / "checkpoints" / "ae").glob("step_*"))
    assert {p.name for p in ckpt.glob("generator_rank*")} == {
        "generator_rank0.safetensors",
        "generator_rank1.safetensors",
    }
