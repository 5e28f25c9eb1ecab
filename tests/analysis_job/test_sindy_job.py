"""analysis/sindy_job.py end to end on CPU: local Ray with a killed fit worker and resume, the
reference study's DDPM file (held-out R^2 reported and flagged), and bad inputs (exit 2, no work)."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.analysis_job.conftest import JOB, NPZ, copy_run, job_refusal, smoke
from tests.conftest import refusal_line, run_entry

REPORT_FILES = (
    "report.md",
    "equations.json",
    "equations.tex",
    "pareto.png",
    "r2.png",
    "coefficients.png",
    "rollouts.png",
    "rollout_error.png",
)


def check_report(run_dir, decoded=True, d=16, n_terms=None) -> dict:
    rep = run_dir / "report"
    for name in REPORT_FILES + (("samples_vs_sindy.png",) if decoded else ()):
        assert (rep / name).is_file(), name
    eq = json.loads((rep / "equations.json").read_text())
    n_terms = len(eq["term_names"]) if n_terms is None else n_terms  # the default library's size depends on d
    assert len(eq["dims"]) == d and eq["n_terms"] == n_terms and eq["library"]["format"] == "latent-sindy.library/1"
    for r in eq["dims"]:
        assert np.isfinite(r["r2_train"]) and "r2_heldout" in r and "rmse_heldout" in r
        assert len(r["terms"]) == r["n_terms"]
    md = (rep / "report.md").read_text()
    assert "R^2 held-out" in md and "R^2 train" in md
    assert (rep / "equations.tex").read_text().count(r"\dot z_") == d
    assert eq["stage_times"]["report"] > 0
    return eq


def test_local_job_survives_killed_worker_and_resumes(trained_run, tmp_path):
    root = copy_run(trained_run, tmp_path)
    run_dir = root / "smoke"
    proc = run_entry(
        [sys.executable, JOB, *smoke(root, "sindy.ray_address=local")], env={"LATENT_SINDY_FAULT": "kill-fit:3"}
    )
    fit_dirs = list((run_dir / "sindy" / "fits").iterdir())
    assert (fit_dirs[0] / ".fault-attempted-3").is_file(), "the fit task of dimension 3 was not killed"
    assert f"report {(run_dir / 'report' / 'report.md').resolve()}" in proc.stdout
    eq = check_report(run_dir)
    assert eq["n_trajectories"] == 64 and eq["seed"] == 1234 and eq["sampler"] == "ddim"
    assert eq["digests"]["dit_ema_sha256"] and eq["digests"]["ae_sha256"]
    assert eq["optimizer"].startswith("STLSQ")
    # The free-time reference (a quadratic per sampler step, 153 unknowns) needs more training rows per step than
    # the 51 training trajectories give: it is skipped with the reason instead of printing a meaningless R^2.
    for r in eq["dims"]:
        assert r["free_time"]["degree"] == 2 and "51 training trajectories per step" in r["free_time"]["skipped"]
    assert "Free-time reference: skipped" in (run_dir / "report" / "report.md").read_text()
    # The SINDy images decode the rollout's own end state, not the DiT's.
    roll = np.load(run_dir / "report" / "rollouts.npz")
    assert not np.allclose(roll["sindy"][-1], roll["reference"][-1])
    assert not np.array_equal(roll["images_dit"], roll["images_sindy"])
    np.testing.assert_allclose(roll["sindy"][0], roll["reference"][0])  # same initial noise
    fingerprint = os.readlink(run_dir / "report").split("/")[1]  # report -> reports/<settings fingerprint>
    ea = EventAccumulator(str(run_dir / "tb" / "sindy" / fingerprint), size_guidance={"images": 0, "tensors": 0})
    ea.Reload()
    assert "sindy/samples_vs_sindy" in ea.Tags()["images"] and ea.Tags()["tensors"]
    # Rerun: every stage is found finished and reused.
    proc = run_entry([sys.executable, JOB, *smoke(root, "sindy.ray_address=local")])
    eq2 = json.loads((run_dir / "report" / "equations.json").read_text())
    assert eq2["stage_times"]["fits"] == 0.0 and eq2["stage_times"]["trajectories"] < eq["stage_times"]["trajectories"]
    assert [r["terms"] for r in eq2["dims"]] == [r["terms"] for r in eq["dims"]]
    # The same settings: the same report folder and event folder, replaced (one set of events, not two).
    assert os.listdir(run_dir / "reports") == [fingerprint] == os.listdir(run_dir / "tb" / "sindy")
    assert len(os.listdir(run_dir / "tb" / "sindy" / fingerprint)) == 1


def test_conv_latent_fits_in_pca_coordinates_with_sr3(trained_conv_run):
    """The conv latent (49 x 6 = 294-D) is reduced by PCA before the fit; SR3 through the job."""
    run_dir = trained_conv_run / "smoke"
    proc = run_entry(
        [
            sys.executable,
            JOB,
            *smoke(
                trained_conv_run,
                "sindy.ray_address=local",
                "sindy.pca_components=4",
                "sindy.optimizer=sr3",
                "sindy.n_bootstrap=0",
            ),
        ]
    )
    assert "4-D fit (conv)" in proc.stdout
    eq = check_report(run_dir, d=4)  # the default library's size for d = 4
    assert eq["coordinates"].startswith("the first 4 principal components of the 294-D")
    assert eq["optimizer"].startswith("SR3")
    pca = load_file(str(run_dir / "report" / "pca.safetensors"))
    assert pca["components"].shape == (4, 294) and pca["mean"].shape == (294,)
    roll = np.load(run_dir / "report" / "rollouts.npz")
    assert roll["reference"].shape[2] == 4 and roll["images_dit"].shape[1:] == (28, 28)


def test_reference_ddpm_file_is_reported_as_poor(tmp_path):
    root = tmp_path / "r"
    run_entry(
        [
            sys.executable,
            JOB,
            *smoke(root, "sindy.ray_address=local", f"sindy.trajectories={NPZ}", "sindy.target=central_diff"),
        ]
    )
    eq = check_report(root / "smoke", decoded=False)
    assert eq["source"] == "npz" and eq["n_trajectories"] == 100 and eq["timesteps"] == 50
    r2 = [r["r2_heldout"] for r in eq["dims"]]
    assert all(np.isfinite(r2)) and max(r2) < 0.5, r2
    assert eq["flagged_dims"] == list(range(16))
    md = (root / "smoke" / "report" / "report.md").read_text()
    assert md.count("**POOR**") == 16 and "16 of 16 dimensions do not generalise" in md
    # 80 training rows per step cannot fit a 153-term per-step polynomial: no meaningless "reference" R^2.
    assert "Free-time reference: skipped" in md and "80 training trajectories per step" in md


def _bad_cli(args) -> str:
    """The refusal through the job's entry point in a subprocess (the other cases: job_refusal, in this process)."""
    proc = run_entry([sys.executable, JOB, *args], check=False, timeout=120)
    line = refusal_line(proc)
    assert "Ray" not in proc.stdout, proc.stdout[-2000:]
    return line


def test_bad_inputs_fail_before_work(trained_run, tmp_path, capsys):
    # No EMA checkpoint.
    root = copy_run(trained_run, tmp_path / "noema")
    (root / "smoke" / "dit_ema.safetensors").unlink()
    assert "no EMA checkpoint dit_ema.safetensors" in _bad_cli(smoke(root))
    # Trajectories of another model: a manifest of this run against a run whose DiT differs.
    root = copy_run(trained_run, tmp_path / "other")
    src = tmp_path / "src"
    copy_run(trained_run, src)
    manifest = src / "smoke" / "sindy" / "trajectories" / "x" / "manifest.json"
    manifest.parent.mkdir(parents=True)
    from configs.io import file_sha256

    manifest.write_text(
        json.dumps(
            {
                "format": "latent-sindy.trajectories/1",
                "blocks": [],
                "block_size": 32,
                "latent_shape": [16, 1],
                "timesteps": 50,
                "dit_ema_sha256": file_sha256(src / "smoke" / "dit_ema.safetensors"),
                "ae_sha256": file_sha256(src / "smoke" / "ae.safetensors"),
            }
        )
    )
    w = load_file(str(root / "smoke" / "dit_ema.safetensors"))
    save_file({k: v + 1e-3 for k, v in w.items()}, str(root / "smoke" / "dit_ema.safetensors"))
    assert "generated by another model" in job_refusal(smoke(root, f"sindy.trajectories={manifest}"), capsys)
    # An external file whose latent dimension is not the run's.
    npz = tmp_path / "eight.npz"
    np.savez(npz, trajectories=np.zeros((10, 51, 8), np.float32), num_timesteps=50)
    msg = job_refusal(smoke(src, f"sindy.trajectories={npz}", "sindy.target=central_diff"), capsys)
    assert "latent dimension 8" in msg and "another model" in msg
    # A library that does not fit the memory budget: says how much it needs.
    msg = job_refusal(smoke(src, "sindy.max_memory_gb=0.01"), capsys)
    assert "the fit needs 0." in msg and "GiB" in msg and "sindy.max_memory_gb=0.01" in msg
    # The drift target is not available for an external file.
    assert "sindy.target=central_diff" in job_refusal(smoke(src, f"sindy.trajectories={NPZ}"), capsys)
    # Unknown optimizer, bad SR3 relaxation.
    assert "sindy.optimizer must be stlsq | sr3" in job_refusal(smoke(src, "sindy.optimizer=lasso"), capsys)
    assert "sindy.sr3_nu" in job_refusal(smoke(src, "sindy.optimizer=sr3", "sindy.sr3_nu=0"), capsys)


def test_trajectories_do_not_depend_on_workers(trained_run):
    from analysis.job.trajectories import generate_block
    from models.artifacts import load_denoiser

    model, schedule, meta = load_denoiser(trained_run / "smoke", "cpu")
    a = generate_block(model, schedule, (16, 1), "ddpm", 7, 3, 8, "cpu")
    b = generate_block(model, schedule, (16, 1), "ddpm", 7, 3, 8, "cpu")
    c = generate_block(model, schedule, (16, 1), "ddpm", 7, 4, 8, "cpu")
    assert torch.equal(a["z"], b["z"]) and not torch.equal(a["z"], c["z"])
    # The recorded drift is the sampler's mean step: z[k+1] = z[k] - drift[k]/T + noise.
    d = generate_block(model, schedule, (16, 1), "ddim", 7, 3, 8, "cpu")
    torch.testing.assert_close(d["z"][1:], d["z"][:-1] - d["drift"] / schedule.T, atol=1e-5, rtol=1e-5)
