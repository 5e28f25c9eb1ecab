"""TensorBoard's HParams tab for tb/ae and tb/dit, read back with TensorBoard's own reader and its
hparams plugin's parsers. The autoencoder runs with the README's one-node launch (the multi-GPU
Accelerate config) as a real two-rank gloo group, 2 CPU processes standing in for 2 GPUs: the tab
shows what the per-process batch becomes (global_batch = 2 x 64)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata

from tests.conftest import REPO, free_port, run_entry


def smoke_args(root: Path, shards: Path, *extra: str) -> list[str]:
    return ["--config", str(REPO / "configs/smoke.yaml"), f"run.root={root}", f"data.shards={shards}", *extra]


def read_hparams(tb: Path) -> tuple[dict, list[str]]:
    acc = EventAccumulator(str(tb), size_guidance={"tensors": 0})
    acc.Reload()
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    values = {}
    for name, v in start.hparams.items():
        kind = v.WhichOneof("kind")
        values[name] = getattr(v, kind)
    metrics = [m.name.tag for m in experiment.metric_infos]
    # The metrics the tab shows are scalars of this same run (event folder).
    assert set(metrics) & set(acc.Tags()["scalars"]), (metrics, acc.Tags()["scalars"])
    return values, metrics


@pytest.mark.slow
def test_hparams_tab_of_ae_and_dit(tmp_path, mnist_shards):
    env = {"ACCELERATE_USE_CPU": "true"}
    train_ae, encode, train_dit = (
        str(REPO / p) for p in ("training/train_ae.py", "training/encode_latents.py", "training/train_dit.py")
    )
    # README's quickstart 2 launch (configs/accelerate/multi_gpu.yaml), 2 CPU processes for 2 GPUs.
    launch = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file"]
    launch += [str(REPO / "configs/accelerate/multi_gpu.yaml"), "--num_processes", "2", "--main_process_port"]
    run_entry(launch + [str(free_port()), train_ae, *smoke_args(tmp_path, mnist_shards)], env=env)
    encoded = run_entry([sys.executable, encode, *smoke_args(tmp_path, mnist_shards)])
    # Progress without a terminal: plain lines, the last one complete, no carriage returns.
    assert "latents: train: 60000/60000 images (100%)" in encoded.stderr and "\r" not in encoded.stderr
    run_entry([sys.executable, train_dit, *smoke_args(tmp_path, mnist_shards, "dit.max_steps=5")])
    tb = tmp_path / "smoke" / "tb"

    ae, ae_metrics = read_hparams(tb / "ae")
    assert ae["num_processes"] == 2 and ae["ae.batch_size"] == 64 and ae["global_batch"] == 128
    assert ae["ae.lr"] == 2e-3 and ae["ae.kind"] == "vae16" and ae["ae.betas"] == "[0.9, 0.999]"
    assert "train/loss" in ae_metrics and "eval/test_bce" in ae_metrics
    assert not [p for p in (tb / "ae").iterdir() if p.is_dir()]  # no timestamped sub-runs

    dit, dit_metrics = read_hparams(tb / "dit")
    assert dit["num_processes"] == 1 and dit["global_batch"] == 128 and dit["dit.preset"] == "tiny"
    assert dit["dit.max_steps"] == 5 and "eval/fd_mnist" in dit_metrics
