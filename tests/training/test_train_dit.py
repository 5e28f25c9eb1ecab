"""train_dit.py through the real entry points: 1 and 2 processes, SIGKILL + exact resume of
weights and EMA, and the bad inputs that must stop it before any training step; the scoring
stage that follows it (analysis/score_samples.py) on the runs it trains."""

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
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import REPO, accelerate_cmd, cli_refusal, refusal_line, run_entry
from tests.training.test_train_ae import assert_same_weights, smoke_args

TRAIN_AE = str(REPO / "training" / "train_ae.py")
ENCODE = str(REPO / "training" / "encode_latents.py")
TRAIN_DIT = str(REPO / "training" / "train_dit.py")
SCORE = str(REPO / "analysis" / "score_samples.py")


@pytest.fixture(scope="module", params=["vae16", "conv"])
def encoded_run(request, tmp_path_factory, mnist_shards) -> tuple[Path, str]:
    """A run folder with a (briefly) trained autoencoder and encoded latents."""
    kind = request.param
    root = tmp_path_factory.mktemp(f"dit-{kind}")
    run_entry([sys.executable, TRAIN_AE, *smoke_args(root, mnist_shards, f"ae.kind={kind}")])
    run_entry([sys.executable, ENCODE, *smoke_args(root, mnist_shards, f"ae.kind={kind}")])
    return root, kind


def fresh_copy(encoded_run, dest: Path) -> Path:
    root, _ = encoded_run
    shutil.copytree(root, dest, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    return dest


def test_latents_and_stats(encoded_run):
    from safetensors.torch import load_file

    root, kind = encoded_run
    run = root / "smoke"
    train = load_file(str(run / "latents" / "train.safetensors"))
    test = load_file(str(run / "latents" / "test.safetensors"))
    stats = load_file(str(run / "latent_stats.safetensors"))
    shape = [16, 1] if kind == "vae16" else [49, 6]
    assert list(train["latents"].shape) == [60000, *shape] and list(test["latents"].shape) == [10000, *shape]
    assert list(stats["mean"].shape) == ([16, 1] if kind == "vae16" else [1, 6])
    z = (train["latents"] - stats["mean"]) / stats["std"]
    dims = (0,) if kind == "vae16" else (0, 1)
    assert z.mean(dims).abs().max() < 1e-3 and (z.std(dims) - 1).abs().max() < 1e-3


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory, mnist_shards) -> Path:
    """A quickly trained classifier: enough to exercise FD-MNIST scoring after training."""
    from training.train_classifier import train_classifier

    out = tmp_path_factory.mktemp("clf") / "clf.safetensors"
    train_classifier(mnist_shards, out, epochs=1, limit=2000, device="cpu")
    return out


def test_single_process_smoke_then_scoring(encoded_run, tmp_path, tiny_classifier, mnist_shards):
    from safetensors.torch import load_file

    from analysis.quality.scoring import score_images
    from data_pipeline.shards import file_sha256

    root = fresh_copy(encoded_run, tmp_path / "r")
    _, kind = encoded_run
    args = smoke_args(root, mnist_shards, f"ae.kind={kind}", f"dit.classifier={tiny_classifier}")
    run_entry(accelerate_cmd() + [TRAIN_DIT, *args])
    run = root / "smoke"
    for name in ("dit.safetensors", "dit_ema.safetensors", "dit.json", "latent_stats.safetensors", "config.yaml"):
        assert (run / name).is_file(), name
    meta = json.loads((run / "dit.json").read_text())
    assert "quality" not in meta and not (run / "samples").exists(), "sampling and scoring are the next stage's"
    assert meta["steps"] == 30 and meta["timesteps"] == (50 if kind == "vae16" else 100)
    first_loss = meta["loss_history"][0][1]
    assert 0.5 < first_loss < 1.5, "an untrained zero-output DiT starts near loss 1"
    ea = EventAccumulator(str(run / "tb" / "dit"), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    assert "train/loss" in ea.Tags()["scalars"] and "dit/ema_samples" in ea.Tags()["images"]

    weights = {name: (run / name).read_bytes() for name in ("dit.safetensors", "dit_ema.safetensors")}
    run_entry([sys.executable, SCORE, *args])
    assert weights == {name: (run / name).read_bytes() for name in weights}
    record = json.loads((run / "quality.json").read_text())
    assert record["eval_samples"] == 64 and record["dit_steps"] == 30
    assert record["dit_ema_sha256"] == file_sha256(run / "dit_ema.safetensors")
    q = record["quality"]
    assert q["n"] == 64 and sum(q["class_counts"]) == 64 and q["fd_mnist"] > 0
    images = load_file(str(run / "samples" / "ema_samples.safetensors"))["images"]
    assert images.shape == (64, 1, 28, 28) and images.dtype == torch.uint8
    again = score_images(images, tiny_classifier, mnist_shards, "cpu")  # the scores are those of these samples
    assert again["class_counts"] == q["class_counts"] and again["fd_mnist"] == pytest.approx(q["fd_mnist"], rel=1e-6)
    ea = EventAccumulator(str(run / "tb" / "dit"), size_guidance={"scalars": 0})
    ea.Reload()
    assert {"eval/fd_mnist", "eval/mean_confidence", "train/loss"} <= set(ea.Tags()["scalars"])
    assert [e.step for e in ea.Scalars("eval/fd_mnist")] == [30]


def test_two_processes(encoded_run, tmp_path):
    root = fresh_copy(encoded_run, tmp_path / "r")
    _, kind = encoded_run
    if kind == "conv":
        pytest.skip("one latent kind is enough for the 2-process check")
    proc = run_entry(
        accelerate_cmd(two_procs=True)
        + [TRAIN_DIT, *smoke_args(root, REPO / "unused", "dit.max_steps=12", "dit.eval_samples=0")],
        env={"ACCELERATE_USE_CPU": "true"},
    )
    meta = json.loads((root / "smoke" / "dit.json").read_text())
    assert meta["num_processes"] == 2, proc.stdout
    # dit.eval_samples=0: the scoring stage samples nothing and records that it skipped.
    proc = run_entry([sys.executable, SCORE, *smoke_args(root, REPO / "unused", "dit.eval_samples=0")])
    assert "skipping FD-MNIST: dit.eval_samples=0" in proc.stdout
    record = json.loads((root / "smoke" / "quality.json").read_text())
    assert record["quality"] is None and record["eval_samples"] == 0 and not (root / "smoke" / "samples").exists()


def test_sigkill_resume_weights_and_ema_bit_exact(encoded_run, tmp_path):
    _, kind = encoded_run
    if kind == "conv":
        pytest.skip("resume is latent-agnostic; vae16 is the faster kind")
    ref = fresh_copy(encoded_run, tmp_path / "ref")
    cut = fresh_copy(encoded_run, tmp_path / "cut")
    extra = ("dit.max_steps=120", "dit.checkpoint_every=40", "dit.eval_samples=0", "dit.image_every=1000")
    run_entry([sys.executable, TRAIN_DIT, *smoke_args(ref, REPO / "unused", *extra)])
    proc = subprocess.Popen(
        [sys.executable, TRAIN_DIT, *smoke_args(cut, REPO / "unused", *extra)],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    first = cut / "smoke" / "checkpoints" / "dit" / "step_00000040" / "train_state.json"
    deadline = time.time() + 300
    while not first.exists():
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (cut / "smoke" / "dit.safetensors").exists(), "the run finished before it was killed"
    run_entry([sys.executable, TRAIN_DIT, *smoke_args(cut, REPO / "unused", *extra, "resume=auto")])
    for name in ("dit.safetensors", "dit_ema.safetensors"):
        assert_same_weights(ref / "smoke" / name, cut / "smoke" / name)


def _expect_error(root: Path, needle: str, *extra: str, capsys=None) -> None:
    """train_dit refuses in one line, exit 2, before any step. With ``capsys``, in this process (for what it checks
    before it builds anything: the config, the run's latents); without, through the entry point."""
    args = smoke_args(root, REPO / "unused", *extra)
    if capsys is not None:
        from training import train_dit

        line = cli_refusal(train_dit.main, args, capsys)[0]
    else:
        line = refusal_line(run_entry([sys.executable, TRAIN_DIT, *args], check=False))
    assert needle in line, line
    assert not (root / "smoke" / "dit.safetensors").exists()
    assert not (root / "smoke" / "tb" / "dit").exists(), "no training step may have run"


def test_bad_inputs(encoded_run, tmp_path, capsys):
    root = fresh_copy(encoded_run, tmp_path / "r")
    _, kind = encoded_run
    other = "conv" if kind == "vae16" else "vae16"
    _expect_error(root, f"holds a {kind} autoencoder", f"ae.kind={other}")
    _expect_error(root, "dit.preset must be one of tiny | small", f"ae.kind={kind}", "dit.preset=huge", capsys=capsys)
    # A checkpoint written by another architecture is refused before any step.
    ckpts = root / "smoke" / "checkpoints" / "dit"
    run_entry(
        [
            sys.executable,
            TRAIN_DIT,
            *smoke_args(root, REPO / "unused", f"ae.kind={kind}", "dit.max_steps=10", "dit.eval_samples=0"),
        ]
    )
    for f in ("dit.safetensors", "dit_ema.safetensors", "dit.json"):
        (root / "smoke" / f).unlink()
    shutil.rmtree(root / "smoke" / "tb" / "dit")
    assert ckpts.is_dir()
    _expect_error(
        root, "different model/optimizer configuration", f"ae.kind={kind}", "dit.preset=reference", "resume=auto"
    )
    (root / "smoke" / "latent_stats.safetensors").unlink()
    _expect_error(root, "latent stats", f"ae.kind={kind}", capsys=capsys)
    # The scoring stage refuses a run without a trained DiT in one line.
    proc = run_entry([sys.executable, SCORE, *smoke_args(root, REPO / "unused", f"ae.kind={kind}")], check=False)
    assert "has no trained DiT" in refusal_line(proc)
