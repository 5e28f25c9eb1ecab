"""GPU paths of the training entry points (skipped without CUDA; run them on a GPU machine):

.venv/bin/python -m pytest -m gpu tests/training/test_gpu.py -v
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_entry
from tests.training.test_train_ae import smoke_args
from tests.training.test_train_dit import ENCODE, TRAIN_AE, TRAIN_DIT

pytestmark = pytest.mark.gpu

ACCEL = [str(Path(sys.executable).parent / "accelerate"), "launch"]


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory, mnist_shards):
    root = tmp_path_factory.mktemp("gpu")
    run_entry(
        ACCEL
        + [
            "--config_file",
            str(REPO / "configs/accelerate/single_gpu.yaml"),
            TRAIN_AE,
            *smoke_args(root, mnist_shards, "ae.mixed_precision=bf16"),
        ]
    )
    run_entry([sys.executable, ENCODE, *smoke_args(root, mnist_shards)])
    return root


@pytest.mark.parametrize("precision", ["bf16", "fp16", "no"])
def test_dit_mixed_precision_on_cuda(gpu_run, tmp_path, precision):
    root = tmp_path / "r"
    shutil.copytree(gpu_run, root)
    run_entry(
        ACCEL
        + [
            "--config_file",
            str(REPO / "configs/accelerate/single_gpu.yaml"),
            TRAIN_DIT,
            *smoke_args(
                root, REPO / "unused", f"dit.mixed_precision={precision}", "dit.max_steps=100", "dit.fused_adamw=true"
            ),
        ]
    )
    meta = json.loads((root / "smoke" / "dit.json").read_text())
    hist = [loss for _, loss in meta["loss_history"]]
    assert hist[-1] < hist[0]


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="pip install -e '.[deepspeed]'")
def test_deepspeed_zero2_trains_saves_resumes(gpu_run, tmp_path):
    root = tmp_path / "r"
    shutil.copytree(gpu_run, root)
    launch = ACCEL + ["--config_file", str(REPO / "configs/accelerate/deepspeed_zero2.yaml"), "--num_processes", "1"]
    run_entry(launch + [TRAIN_DIT, *smoke_args(root, REPO / "unused", "dit.max_steps=60", "dit.checkpoint_every=30")])
    first = json.loads((root / "smoke" / "dit.json").read_text())
    assert first["loss_history"][-1][1] < first["loss_history"][0][1]
    assert (root / "smoke" / "checkpoints" / "dit" / "step_00000060").is_dir()
    # Load the DeepSpeed checkpoint back (resume at the final step re-exports the weights).
    proc = run_entry(launch + [TRAIN_DIT, *smoke_args(root, REPO / "unused", "dit.max_steps=60", "resume=auto")])
    assert "resumed from" in proc.stdout
