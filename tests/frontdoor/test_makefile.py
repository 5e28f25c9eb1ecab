"""``make run`` picks the accelerate launch for the machine: CPU, one GPU, or every GPU of the node.

Read with ``make -n`` (prints the recipe, runs nothing). This machine has no GPU, so a stand-in
``nvidia-smi`` on PATH prints the ``--list-gpus`` lines of an 8-GPU node; the Makefile only counts them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def launch_line(tmp_path: Path, gpus: int | None, *args: str) -> str:
    env = dict(os.environ)
    path = [p for p in env["PATH"].split(os.pathsep) if not (Path(p) / "nvidia-smi").exists()]
    if gpus is not None:
        fake = tmp_path / "bin"
        fake.mkdir(exist_ok=True)
        lines = "".join(f"GPU {i}: NVIDIA H100 (UUID: GPU-{i})\\n" for i in range(gpus))
        (fake / "nvidia-smi").write_text(f'#!/bin/sh\nprintf "{lines}"\n')
        (fake / "nvidia-smi").chmod(0o755)
        path.insert(0, str(fake))
    env["PATH"] = os.pathsep.join(path)
    out = subprocess.run(
        ["make", "-n", "-C", str(REPO), "run", *args], env=env, capture_output=True, text=True, check=True
    ).stdout
    (line,) = {m.group(0) for m in re.finditer(r"-m training\.launch [^;]*?training/train_ae\.py", out)}
    return line


def test_cpu_without_nvidia_smi(tmp_path):
    assert "configs/accelerate/cpu.yaml" in launch_line(tmp_path, None)


def test_every_gpu_of_the_node(tmp_path):
    line = launch_line(tmp_path, 8)
    assert "configs/accelerate/multi_gpu.yaml --num_processes 8 " in line


def test_gpus_override_and_one_gpu(tmp_path):
    assert "multi_gpu.yaml --num_processes 2 " in launch_line(tmp_path, 8, "GPUS=2")
    assert "configs/accelerate/single_gpu.yaml" in launch_line(tmp_path, 8, "GPUS=1")
    assert "configs/accelerate/single_gpu.yaml" in launch_line(tmp_path, 1)
