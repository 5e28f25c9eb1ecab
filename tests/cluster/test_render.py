"""The rendered job scripts: the 4 nodes x 8 GPUs training script (syntax, accelerate arguments,
preemption and log options), DeepSpeed, the Ray script, and bad input rejected before sbatch."""

from __future__ import annotations

import difflib
import subprocess

import pytest

from tests.cluster.conftest import SMOKE, submit
from tests.conftest import REPO

MULTINODE = str(REPO / "configs" / "multinode.yaml")


def bash_syntax_ok(text: str, tmp_path) -> None:
    script = tmp_path / "job.sh"
    script.write_text(text)
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_multinode_training_script(tmp_path):
    text = submit("train-dit", "--config", MULTINODE, "--dry-run").stdout
    bash_syntax_ok(text, tmp_path)
    header = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    for opt in (
        "--nodes=4",
        "--ntasks-per-node=1",
        "--gpus-per-node=8",
        "--cpus-per-task=64",
        "--partition=gpu",
        "--time=04:00:00",
        "--mem=0",
        "--open-mode=append",
        "--signal=B:USR1@300",
        "--requeue",
        "--exclusive",
        f"--output={REPO}/runs/multinode/slurm/%x-%j.out",
    ):
        assert f"#SBATCH {opt}" in header, opt
    # One `accelerate launch` per node: rank = node index, rank 0's address = the first node.
    assert 'srun --nodes="$SLURM_NNODES" --ntasks="$SLURM_NNODES" --ntasks-per-node=1' in text
    assert 'MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in text
    assert '-m training.launch --machine_rank "$SLURM_NODEID"' in text
    for arg in (
        '--num_machines "$SLURM_NNODES"',
        '--num_processes "$((SLURM_NNODES * 8))"',
        '--main_process_ip "$MAIN_ADDR"',
        '--main_process_port "$MAIN_PORT"',
        "--config_file configs/accelerate/multi_gpu.yaml",
        "--mixed_precision bf16",
    ):
        assert arg in text, arg
    assert f"training/train_dit.py --config {MULTINODE} resume=auto" in text
    assert "ACCELERATE_USE_CPU" not in text and "--multi_gpu" not in text
    # Preemption: trap, forward to the step, requeue when the final outputs are missing.
    assert "trap 'on_signal USR1' USR1" in text and "trap 'on_signal TERM' TERM" in text
    assert 'scancel --signal=USR1 "$SLURM_JOB_ID"' in text and 'scontrol requeue "$SLURM_JOB_ID"' in text
    assert f"DONE={REPO}/runs/multinode/dit.json" in text and "SLURM_RESTART_COUNT" in text
    assert "source $HOME/latent-sindy/.venv/bin/activate" in text


def test_cpu_script_differs_only_in_resources_and_launcher(tmp_path):
    """The 1-node, 2-task CPU script the Slurm tests run is the 4 x 8 GPU script but for the
    resources and the launcher's device arguments."""
    gpu = submit("train-ae", "--config", MULTINODE, "--dry-run").stdout
    cpu = submit(
        "train-ae",
        "--config",
        MULTINODE,
        "--dry-run",
        "--nodes",
        "1",
        "--gpus-per-node",
        "0",
        "--cpu-processes-per-node",
        "2",
    ).stdout
    changed = [
        line[1:].strip()
        for line in difflib.unified_diff(gpu.splitlines(), cpu.splitlines(), lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    allowed = (
        "#SBATCH --nodes=",
        "#SBATCH --ntasks-per-node=",
        "#SBATCH --gpus-per-node=",
        "srun ",
        "--config_file",
        "--multi_gpu",
        "export ACCELERATE_USE_CPU=true",
        "training/train_ae.py",
        "",
    )
    assert changed and all(c.startswith(allowed) for c in changed), changed
    assert '--multi_gpu --num_processes "$((SLURM_NNODES * 2))"' in cpu and "export ACCELERATE_USE_CPU=true" in cpu


def test_deepspeed_choice():
    text = submit(
        "train-dit",
        "--config",
        MULTINODE,
        "--dry-run",
        "slurm.accelerate_config=configs/accelerate/deepspeed_zero2.yaml",
    ).stdout
    assert "--config_file configs/accelerate/deepspeed_zero2.yaml" in text
    from omegaconf import OmegaConf

    acc = OmegaConf.load(REPO / "configs/accelerate/deepspeed_zero2.yaml")
    assert acc.distributed_type == "DEEPSPEED" and acc.deepspeed_config.deepspeed_multinode_launcher == "standard"
    import json

    ds = json.loads((REPO / acc.deepspeed_config.deepspeed_config_file).read_text())
    assert ds["zero_optimization"]["stage"] == 2


def test_ray_script(tmp_path):
    text = submit("sindy", "--config", MULTINODE, "--dry-run").stdout
    bash_syntax_ok(text, tmp_path)
    assert "#SBATCH --nodes=4" in text and "#SBATCH --ntasks-per-node=1" in text
    assert "start --head --block" in text and '-x "$HEAD_NODE"' in text and "trap stop_ray EXIT" in text
    assert 'export RAY_ADDRESS="$HEAD_IP:$GCS_PORT"' in text
    assert f"analysis/sindy_job.py --config {MULTINODE} resume=auto" in text


def test_pipeline_dry_run_lists_the_configured_stages():
    out = submit("pipeline", "--config", str(SMOKE), "--dry-run").stdout  # the default slurm.pipeline
    assert [line for line in out.splitlines() if line.startswith("# =====")] == [
        f"# ===== stage {s} =====" for s in ("train-ae", "encode", "train-dit", "score", "sindy")
    ]
    assert 'srun --nodes=1 --ntasks=1 "$PY" training/encode_latents.py' in out
    out = submit("pipeline", "--config", str(SMOKE), "--dry-run", "--stages", "train-ae,encode").stdout
    assert [line for line in out.splitlines() if line.startswith("# =====")] == [
        "# ===== stage train-ae =====",
        "# ===== stage encode =====",
    ], "exactly the stages asked for"


def test_scoring_script(tmp_path):
    """FD-MNIST of the DiT's samples: one process (one GPU), after train-dit; quality.json marks it done."""
    text = submit("score", "--config", MULTINODE, "--dry-run").stdout
    bash_syntax_ok(text, tmp_path)
    header = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    for opt in ("--nodes=1", "--ntasks=1", "--gpus-per-node=1", "--job-name=multinode-score"):
        assert f"#SBATCH {opt}" in header, opt
    assert f'srun --nodes=1 --ntasks=1 "$PY" analysis/score_samples.py --config {MULTINODE} resume=auto' in text
    assert f"DONE={REPO}/runs/multinode/quality.json" in text


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--config", "configs/nope.yaml"], "config file not found: configs/nope.yaml"),
        (["--config", str(SMOKE), "resume=none"], "resume=auto"),
        (["--config", str(SMOKE), "slurm.time=4h"], "slurm.time must be a Slurm time limit"),
        (["--config", str(SMOKE), "slurm.nodes=0"], "slurm.nodes must be > 0"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, expect):
    proc = submit("train-ae", "--dry-run", *args, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cluster.submit: error:") and expect in lines[0], proc.stderr
