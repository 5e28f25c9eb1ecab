"""train_ae.py through the real entry points: one process, a two-rank gloo group, SIGKILL +
resume, TensorBoard read back with TensorBoard's reader, and bad input."""

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
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import REPO, accelerate_cmd, cli_refusal, refusal_line, run_entry

TRAIN_AE = str(REPO / "training" / "train_ae.py")


def smoke_args(root: Path, shards: Path, *extra: str) -> list[str]:
    return ["--config", str(REPO / "configs/smoke.yaml"), f"run.root={root}", f"data.shards={shards}", *extra]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs"


@pytest.fixture(scope="module")
def one_proc_run(tmp_path_factory, mnist_shards) -> Path:
    root = tmp_path_factory.mktemp("ae1")
    run_entry(accelerate_cmd() + [TRAIN_AE, *smoke_args(root, mnist_shards)])
    return root / "smoke"


def test_single_process_outputs(one_proc_run):
    run = one_proc_run
    for name in ("config.yaml", "ae.safetensors", "ae.json"):
        assert (run / name).is_file(), name
    meta = json.loads((run / "ae.json").read_text())
    assert meta["kind"] == "vae16" and meta["latent_shape"] == [16, 1] and meta["steps"] == 30
    assert 0 < meta["test_bce"] < 0.7 and 0 < meta["test_mse"] < 0.25
    ckpts = sorted(p.name for p in (run / "checkpoints" / "ae").iterdir())
    assert ckpts == ["step_00000020", "step_00000030"]  # keep_checkpoints=2
    assert "lr: 0.002" in (run / "config.yaml").read_text()


def test_tensorboard_has_loss_and_reconstruction(one_proc_run):
    tb = one_proc_run / "tb" / "ae"
    acc = EventAccumulator(str(tb), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/samples_per_s"} <= set(tags["scalars"])
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert [e.step for e in acc.Scalars("train/loss")] == [5, 10, 15, 20, 25, 30]
    assert losses[-1] < losses[0]
    assert "ae/reconstruction" in tags["images"]
    img = acc.Images("ae/reconstruction")[-1]
    assert img.step == 30 and img.width > 28 * 8 and img.height > 28


def test_two_ranks_form_a_group(tmp_path, mnist_shards):
    proc = run_entry(
        accelerate_cmd(two_procs=True) + [TRAIN_AE, *smoke_args(tmp_path, mnist_shards, "ae.max_steps=12")],
        env={"ACCELERATE_USE_CPU": "true"},
    )
    meta = json.loads((tmp_path / "smoke" / "ae.json").read_text())
    assert meta["num_processes"] == 2, proc.stdout
    digests = meta["rank_param_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert "128 x 1" not in proc.stdout and "x 2 processes" in proc.stdout


def test_sigkill_then_resume_is_bit_exact(tmp_path, mnist_shards):
    extra = ("ae.max_steps=160", "ae.checkpoint_every=40", "ae.kind=conv")
    ref_root, cut_root = tmp_path / "ref", tmp_path / "cut"
    run_entry([sys.executable, TRAIN_AE, *smoke_args(ref_root, mnist_shards, *extra)])

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, TRAIN_AE, *smoke_args(cut_root, mnist_shards, *extra)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    first = cut_root / "smoke" / "checkpoints" / "ae" / "step_00000040"
    deadline = time.time() + 300
    while not (first / "train_state.json").exists():
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (cut_root / "smoke" / "ae.safetensors").exists(), "the run finished before it was killed"

    # A fresh start into a folder with checkpoints is refused; resume=auto continues.
    refused = run_entry([sys.executable, TRAIN_AE, *smoke_args(cut_root, mnist_shards, *extra)], check=False)
    assert refused.returncode == 2 and "resume=auto" in refused.stderr
    resumed = run_entry([sys.executable, TRAIN_AE, *smoke_args(cut_root, mnist_shards, *extra, "resume=auto")])
    assert "resumed from" in resumed.stdout
    assert_same_weights(ref_root / "smoke" / "ae.safetensors", cut_root / "smoke" / "ae.safetensors")
    # What the killed run logged after its checkpoint is purged: every step reads back once.
    ea = EventAccumulator(str(cut_root / "smoke" / "tb" / "ae"), size_guidance={"scalars": 0})
    ea.Reload()
    assert [e.step for e in ea.Scalars("train/loss")] == list(range(5, 161, 5))


def test_stop_signal_checkpoints_and_resumes(tmp_path, mnist_shards):
    """SIGUSR1 (Slurm's preemption warning) -> checkpoint at the next step and exit 75 (preempted)."""
    extra = ("ae.max_steps=2000", "ae.checkpoint_every=1000", "ae.kind=conv")
    proc = subprocess.Popen(
        [sys.executable, TRAIN_AE, *smoke_args(tmp_path, mnist_shards, *extra)],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    tb = tmp_path / "smoke" / "tb" / "ae"
    deadline = time.time() + 300
    while not (tb.is_dir() and any(tb.rglob("events.*"))):  # training has started
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out
    assert "exiting for requeue" in out
    ckpts = list((tmp_path / "smoke" / "checkpoints" / "ae").glob("step_*"))
    assert len(ckpts) == 1 and not (tmp_path / "smoke" / "ae.safetensors").exists()
    step = int(ckpts[0].name.split("_")[1])
    assert 0 < step < 2000


BAD_CONFIGS = [
    (["ae.bogus=1"], "unknown config key 'ae.bogus'"),
    (["ae.lr=fast"], "ae.lr"),
    (["ae.lr=-0.1"], "ae.lr must be > 0"),
    (["ae.kind=gan"], "ae.kind"),
]


def _refusal_in_process(args: list[str], capsys) -> str:
    """train_ae's refusal in this process: the config is parsed before anything is built."""
    from training import train_ae

    return cli_refusal(train_ae.main, args, capsys)[0]


@pytest.mark.parametrize("overrides,needle", BAD_CONFIGS)
def test_bad_config_is_one_line_error(tmp_path, capsys, overrides, needle):
    assert needle in _refusal_in_process(smoke_args(tmp_path, tmp_path / "nodata", *overrides), capsys)
    assert not any(tmp_path.iterdir()), "nothing may be written on bad input"


def test_missing_config_file(tmp_path, capsys):
    assert "config file not found" in _refusal_in_process(["--config", str(tmp_path / "nope.yaml")], capsys)


def _expect_data_error(tmp_path: Path, shards: Path, needle: str) -> None:
    root = tmp_path / "runs"
    line = refusal_line(run_entry([sys.executable, TRAIN_AE, *smoke_args(root, shards)], check=False))
    assert needle in line, line
    assert not (root / "smoke" / "ae.safetensors").exists() and not (root / "smoke" / "checkpoints").exists()


def test_missing_and_empty_shard_folder(tmp_path):
    _expect_data_error(tmp_path, tmp_path / "missing", "missing")
    (tmp_path / "empty").mkdir()
    _expect_data_error(tmp_path, tmp_path / "empty", "empty")


def test_truncated_shard_is_named(tmp_path, mnist_shards):
    bad = tmp_path / "shards"
    shutil.copytree(mnist_shards, bad)
    shard = sorted(bad.glob("train-*.tar"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    _expect_data_error(tmp_path, bad, shard.name)
