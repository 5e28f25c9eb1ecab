"""The scoring stage takes the run folder's lock (configs/lock.py, issue 19): a second scoring job on the folder
stops with one line naming the holder and exit code 2, before it samples anything."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import torch

from configs.io import file_sha256
from models.artifacts import save_latent_stats, save_weights
from models.autoencoder import build_autoencoder
from models.dit import build_dit
from tests.configs.test_lock import hold_in_child
from tests.conftest import REPO, refusal_line


def test_a_second_scoring_job_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "runs" / "smoke"
    run.mkdir(parents=True)
    save_weights(build_autoencoder("vae16", 1.0), run / "ae.safetensors")
    (run / "ae.json").write_text(json.dumps({"kind": "vae16", "latent_shape": [16, 1], "kl_weight": 1.0}))
    save_latent_stats(run, torch.zeros(16, 1), torch.ones(16, 1), file_sha256(run / "ae.safetensors"), "vae16")
    model = build_dit("tiny", 1, 16, rope="1d", abs_pos=True)
    for name in ("dit.safetensors", "dit_ema.safetensors"):
        save_weights(model, run / name)
    meta = {"preset": "tiny", "kind": "vae16", "latent_shape": [16, 1], "schedule": "cosine", "schedule_kind": "cosine"}
    meta.update(timesteps=50, steps=30, dit_config=dataclasses.asdict(model.cfg))
    (run / "dit.json").write_text(json.dumps(meta))
    child = hold_in_child(run, "score")
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "analysis/score_samples.py",
                "--config",
                "configs/smoke.yaml",
                f"run.root={tmp_path / 'runs'}",
                "dit.eval_samples=0",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        child.kill()
        child.wait()
    line = refusal_line(proc)
    assert f"pid {child.pid}" in line and "stage score is running" in line, line
    assert not (run / "quality.json").exists()
