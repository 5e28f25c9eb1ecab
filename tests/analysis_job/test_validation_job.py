"""The job's validation by generation, eps fit space and mixture view, end to end on the smoke run (CPU).

One job run with fit_space=eps, a small mixture grid and a quickly trained classifier; a rerun of the
report stage without the classifier; and an external .npz (no decoder): latent error only.
"""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

from tests.analysis_job.conftest import JOB, copy_run, job_refusal, smoke
from tests.conftest import run_entry


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory, mnist_shards):
    """A classifier trained for one epoch on 2,000 images: enough to classify and to compute FD."""
    from training.train_classifier import train_classifier

    out = tmp_path_factory.mktemp("clf") / "mnist_cnn.safetensors"
    train_classifier(mnist_shards, out, epochs=1, limit=2000, device="cpu")
    return out


def _sections(md: str) -> list[str]:
    return [line for line in md.splitlines() if line.startswith("## ")]


def test_validation_on_top_eps_fit_and_mixture(trained_run, tiny_classifier, mnist_shards, tmp_path):
    root = copy_run(trained_run, tmp_path)
    run_dir = root / "smoke"
    shutil.copytree(trained_run / "smoke" / "latents", run_dir / "latents")  # the mixture is fitted to them
    common = smoke(
        root,
        "sindy.ray_address=local",
        f"data.shards={mnist_shards}",
        "sindy.fit_space=eps",
        "sindy.mixture_components=[1,2]",
        "sindy.mixture_samples=3000",
        "sindy.n_bootstrap=0",
    )
    # The peer is the run's own DiT (a copy): its row must agree fully, which checks how the peer row is computed.
    peer = shutil.copytree(trained_run / "smoke", tmp_path / "peer", ignore=shutil.ignore_patterns("checkpoints", "tb"))
    run_entry([sys.executable, JOB, *common, f"dit.classifier={tiny_classifier}", f"sindy.peer_runs=[{peer}]"])
    md = (run_dir / "report" / "report.md").read_text()
    eq = json.loads((run_dir / "report" / "equations.json").read_text())
    assert _sections(md)[0] == "## What the equations generate"
    val = eq["validation"]
    n_ho = eq["n_heldout"]
    ev, mv = val["equations"], val["mixture"]
    assert ev["n_noises"] == mv["n_noises"] == min(400, n_ho) == val["heldout_available"]
    for v in (ev, mv):
        im = v["images"]
        assert 0.0 <= im["class_agreement"] <= 1.0 and im["n"] == n_ho
        assert np.isfinite(im["fd_mnist"]["generated"]) and np.isfinite(im["fd_mnist"]["dit"])
        assert 0.1 <= im["mean_confidence"]["dit"] <= 1.0
        assert len(v["latent_rmse_per_step"]) == eq["timesteps"] + 1 and v["latent_rmse_per_step"][0] == 0.0
    top = md.split("## ", 2)[1]
    assert f"{100 * ev['images']['class_agreement']:.1f}%" in top
    assert f"{ev['images']['fd_mnist']['dit']:.2f}" in top and f"{mv['images']['fd_mnist']['generated']:.2f}" in top
    # fit_space=eps: the library's target is eps, the drift is composed, both R^2 reported.
    assert eq["target"] == "eps" and eq["fit_space"]["fit_space"] == "eps"
    for space in ("eps", "drift"):
        assert len(eq["fit_space"][space]["pooled"]) == 16 and len(eq["fit_space"][space]["windows"]) == 5
    assert "The sampler's linear part: eps and drift" in md
    # The mixture view: both K scored with no fitting, the chosen one by held-out likelihood, means decoded.
    mx = eq["mixture"]
    assert [r["k"] for r in mx["grid"]] == [1, 2] and sum(r["chosen"] for r in mx["grid"]) == 1
    assert len(mx["eps"]["pooled"]) == 16 and "the encoded test split" in mx["heldout"]
    for name in ("validation_rmse.png", "mixture_means.png"):
        assert (run_dir / "report" / name).is_file()
    check_yardsticks(eq, md)
    peer_row = next(r for r in eq["yardsticks"]["rows"] if r["kind"] == "peer")
    assert peer_row["name"] == f"DiT of {peer} (same recipe, another seed)"
    assert peer_row["same_digit"] == 1.0 and peer_row["final_error"] < 1e-4 and peer_row["eps_r2_median"] > 1 - 1e-9
    assert eq["yardsticks"]["headline"]["peer_same_digit"] == 1.0 and "**Against an equally good DiT:**" in md
    # The peer is this DiT, right on every noise: only it can be right alone, on each noise the equations miss.
    hl, eq_row = eq["yardsticks"]["headline"], next(r for r in eq["yardsticks"]["rows"] if r["kind"] == "equations")
    n_noises = eq["yardsticks"]["n_noises"]
    assert hl["noises_only_equations"] == 0
    assert hl["noises_only_peer"] == round(n_noises * (1 - eq_row["same_digit"]))
    lo, hi = hl["same_digit_minus_peer_ci95"]
    assert hl["same_digit_minus_peer"] == pytest.approx(eq_row["same_digit"] - 1)
    assert lo <= hl["same_digit_minus_peer"] <= hi
    assert eq["settings_fingerprint"]["inputs"]["peer_dit_ema_sha256"] == [
        eq["settings_fingerprint"]["inputs"]["dit_ema_sha256"]
    ]

    # No classifier: the report says so, nothing crashes; only the report stage runs again.
    run_entry([sys.executable, JOB, *common, f"dit.classifier={tmp_path / 'none.safetensors'}"])
    md = (run_dir / "report" / "report.md").read_text()
    eq = json.loads((run_dir / "report" / "equations.json").read_text())
    assert _sections(md)[0] == "## What the equations generate"
    assert "No image metrics: no MNIST classifier at" in md
    assert "images" not in eq["validation"]["equations"] and eq["validation"]["equations"]["images_skipped"]
    assert eq["stage_times"]["fits"] == 0.0


def check_yardsticks(eq: dict, md: str) -> None:
    """The yardstick table: every generator from the same held-out noises, each figure consistent with its row."""
    from analysis.quality.agreement import NOISE_R2, gap_share, wilson_interval

    y = eq["yardsticks"]
    rows = {r["name"]: r for r in y["rows"]}
    kinds = [r["kind"] for r in y["rows"]]
    peers = kinds.count("peer")  # sindy.peer_runs: right after the ceiling
    head = ["ceiling"] + ["peer"] * peers + ["sensitivity"] * len(NOISE_R2)
    assert kinds[: len(head)] == head and kinds[-2:] == ["reference", "equations"]
    assert kinds[len(head) : -2] in (["floor"], ["floor", "floor"])  # the Gaussian, and the mixture if K > 1
    assert y["n_noises"] == eq["validation"]["equations"]["n_noises"]
    for r in y["rows"]:
        n = y["n_noises"]
        k = round(r["same_digit"] * n)
        assert r["ci95"] == pytest.approx(list(wilson_interval(k, n)))
        assert r["confident"]["n"] <= n and 0 <= r["final_error"] and r["per_sample_r2"] <= 1
        assert np.isfinite(r["fd_mnist"]) and len(r["eps_r2_windows"]) == 5
    # The sensitivity rows' eps R^2, measured on the held-out states, is the nominal one.
    for r2 in NOISE_R2:
        assert rows[f"EMA DiT + iid eps noise, R^2 {r2:g}"]["eps_r2_median"] == pytest.approx(
            r2, abs=0.3 * (1 - r2) + 2e-3
        )
    # The equations' eps R^2 in the table is the fit-space view's (same held-out states, eps space).
    assert rows["the equations"]["terms"] == sum(len(d["terms"]) for d in eq["dims"])
    h = y["headline"]
    ceil, floor, eqr = rows[h["ceiling"]], rows[h["floor"]], rows["the equations"]
    assert h["same_digit_gap_share"] == gap_share(eqr["same_digit"], floor["same_digit"], ceil["same_digit"])
    assert "## The equations beside their yardsticks" in md and f"| the equations | equations | {eqr['terms']} |" in md


def _mixture_library_job(trained_run, tmp_path, mnist_shards, *extra: str):
    """The job on a copy of the smoke run (with its latents) and a library with the mixture family (K in 1, 2), no
    bootstrap and no validation rollouts, plus ``extra``; returns the run folder."""
    root = copy_run(trained_run, tmp_path)
    run_dir = root / "smoke"
    shutil.copytree(trained_run / "smoke" / "latents", run_dir / "latents")
    args = smoke(
        root,
        "sindy.ray_address=local",
        f"data.shards={mnist_shards}",
        "sindy.library.families=[polynomial,time,mixture]",
        "sindy.n_bootstrap=0",
        "sindy.mixture_components=[1,2]",
        "sindy.mixture_samples=3000",
        "sindy.validation_noises=0",
        *extra,
    )
    run_entry([sys.executable, JOB, *args])
    return run_dir


def test_mixture_family_in_the_library_must_earn_its_place(trained_run, mnist_shards, tmp_path):
    """The mixture's closed-form drift as library columns: fitted to the training latents in the fit's coordinates,
    gated per dimension when asked (gate 1: kept wherever it helps at all), and the library spec round-trips."""
    from analysis.sindy.library import Library

    run_dir = _mixture_library_job(
        trained_run,
        tmp_path,
        mnist_shards,
        "sindy.library.gated=[mixture]",
        "sindy.library.gate=1.0",
        "sindy.compare_targets=false",
    )
    eq = json.loads((run_dir / "report" / "equations.json").read_text())
    lib = Library.from_spec(eq["library"])
    mixtures = [f for f in lib.families if f.kind == "MixtureEps"]
    assert len(mixtures) == 1 and mixtures[0].features == ("drift",) and len(mixtures[0].weights) in (1, 2)
    # the library's mixture is the one the mixture view scores (fitted once, in the fit's coordinates)
    np.testing.assert_allclose(mixtures[0].weights, eq["mixture"]["weights"], rtol=0, atol=0)
    assert eq["term_names"][-16:] == [f"drift_mix{j}" for j in range(16)]
    for r in eq["dims"]:
        g = r["gated_families"]
        assert g is not None and isinstance(g["kept"], bool)
        used = {t["name"] for t in r["terms"]}
        assert g["kept"] or not any(n.startswith("drift_mix") for n in used), (r["dim"], g, used)
    assert "MixtureEps 16" in (run_dir / "report" / "report.md").read_text()


def test_fit_space_auto_and_the_mixture_distilled_to_the_dit(trained_run, mnist_shards, tmp_path):
    """sindy.fit_space=auto fits drift, eps and x0 and keeps the space whose training rollouts end nearest the DiT;
    sindy.mixture_fit=dit gives the library EM's mixture with constants refitted to the DiT's eps, listed."""
    from analysis.sindy.library import Library

    run_dir = _mixture_library_job(
        trained_run,
        tmp_path,
        mnist_shards,
        "sindy.mixture_fit=dit",
        "sindy.mixture_distill_iterations=150",
        "sindy.fit_space=auto",
    )
    eq = json.loads((run_dir / "report" / "equations.json").read_text())
    md = (run_dir / "report" / "report.md").read_text()
    ch = eq["fit_space"]["choice"]
    cands = {c["space"]: c for c in ch["candidates"]}
    assert set(cands) == {"drift", "eps", "x0"} and ch["noises"] > 0
    assert ch["chosen"] == min(cands, key=lambda k: cands[k]["final_error"]) == eq["fit_space"]["fit_space"]
    assert eq["target"] == ("drift" if ch["chosen"] == "drift" else "eps")
    assert cands[ch["chosen"]]["terms"] == sum(len(d["terms"]) for d in eq["dims"])
    assert f"sindy.fit_space=auto chose **{ch['chosen']}**" in md
    # the library's mixture is the distilled one: EM's start moved, its error on the DiT's eps lowered, listed
    dist = eq["mixture"]["distilled"]
    lib = Library.from_spec(eq["library"])
    (mix,) = [f for f in lib.families if f.kind == "MixtureEps"]
    np.testing.assert_allclose(mix.weights, dist["weights"], rtol=0, atol=0)
    np.testing.assert_allclose(mix.covariances, dist["covariances"], rtol=0, atol=0)
    assert len(dist["means"]) == len(eq["mixture"]["weights"]) == dist["k"]
    assert not np.allclose(dist["means"], eq["mixture"]["means"])
    assert dist["loss_end"] < dist["loss_start"] and dist["iterations"] == 150
    # distilled once, in the latent: the linear modes take that mixture rotated (as they take EM's)
    assert dist.get("rotated_from") == ("latent" if "linear modes" in eq["coordinates"] else None)
    assert "### The mixture distilled to the DiT" in md and f"{dist['weights'][0]:.4f}" in md


def test_external_npz_gets_latent_error_without_images(tmp_path):
    """External trajectories have no decoder: no image metrics (and the reason), still the per-step error."""
    rng = np.random.default_rng(0)
    T, n, d = 20, 40, 3
    A = np.array([[-1.0, 0.5, 0.0], [-0.5, -1.0, 0.0], [0.0, 0.0, -0.3]])
    z0 = rng.normal(size=(n, d))
    traj = np.stack([z0 @ np.linalg.matrix_power(np.eye(d) + A / T, k).T for k in range(T + 1)], axis=1)
    path = tmp_path / "lin.npz"
    np.savez(path, trajectories=traj, num_timesteps=T)
    root = tmp_path / "r"
    run_entry(
        [
            sys.executable,
            JOB,
            *smoke(
                root,
                "sindy.ray_address=local",
                f"sindy.trajectories={path}",
                "sindy.target=central_diff",
                "sindy.n_bootstrap=0",
            ),
        ]
    )
    eq = json.loads((root / "smoke" / "report" / "equations.json").read_text())
    ev = eq["validation"]["equations"]
    assert "images" not in ev and "no decoder" in ev["images_skipped"]
    assert len(ev["latent_rmse_per_step"]) == T + 1 and np.isfinite(ev["latent_rmse_end"])
    assert "skipped" in eq["mixture"] and "skipped" in eq["fit_space"]
    md = (root / "smoke" / "report" / "report.md").read_text()
    assert _sections(md)[0] == "## What the equations generate" and "No image metrics: external trajectories" in md


def test_bad_fit_space_inputs_fail_before_work(tmp_path, capsys):
    def bad(*extra: str) -> str:
        return job_refusal(smoke(tmp_path / "r", *extra), capsys)

    assert "sindy.fit_space must be drift | eps | x0 | auto" in bad("sindy.fit_space=x1")
    assert "which sindy.weighting=sensitivity would replace" in bad("sindy.fit_space=x0", "sindy.weighting=sensitivity")
    assert "sindy.mixture_fit must be em | dit" in bad("sindy.mixture_fit=gd")
    assert "sindy.mixture_fit=dit refits the library's mixture family" in bad(
        "sindy.mixture_fit=dit", "sindy.library.families=[polynomial]"
    )
    assert "sindy.mixture_distill_iterations" in bad("sindy.mixture_distill_iterations=0")
    assert "cannot be combined with sindy.target=central_diff" in bad(
        "sindy.fit_space=eps", "sindy.target=central_diff"
    )
    assert "sindy.mixture_components must be a list of ints >= 1" in bad("sindy.mixture_components=[0,2]")
    assert "sindy.validation_noises" in bad("sindy.validation_noises=-1")


def test_bench_window_costs_on_the_smoke_run(trained_run, tiny_classifier, tmp_path):
    """benchmarks/bench_window_costs.py: its rollout is the DiT's own DDIM sampler, and every row is scored."""
    import torch

    from benchmarks import bench_window_costs as bench
    from models.diffusion import sample

    run = trained_run / "smoke"
    su = bench.Setup(run)
    z_T = np.random.default_rng(0).standard_normal((8, su.D))
    ours = su.rollout(z_T, su.dit_eps)[0][-1]
    with torch.no_grad():
        theirs = sample(
            su.model,
            su.schedule,
            (8, *su.shape),
            sampler="ddim",
            noise=torch.from_numpy(z_T).float().reshape(8, *su.shape),
        ).x0
    np.testing.assert_allclose(ours, theirs.reshape(8, -1).double().numpy(), atol=1e-4)

    # The dense peer is least squares per step: a per-step quadratic target is recovered exactly at degree 2 and
    # not at degree 1.
    rng = np.random.default_rng(1)
    z = rng.standard_normal((3, 400, su.D))
    target = np.stack([k + z[k] ** 2 - 2 * z[k] * np.roll(z[k], 1, axis=1) for k in range(3)])
    quad, lin = bench.DensePerStep(z, target, 2, ridges=(0.0,)), bench.DensePerStep(z, target, 1, ridges=(0.0,))
    assert quad.columns == (su.D + 1) * (su.D + 2) // 2 and lin.columns == su.D + 1
    probe = rng.standard_normal((5, su.D))
    np.testing.assert_allclose(quad(probe, 2), 2 + probe**2 - 2 * probe * np.roll(probe, 1, axis=1), atol=1e-6)
    assert np.abs(lin(probe, 2) - quad(probe, 2)).max() > 0.1
    assert np.isnan(quad(np.full((2, su.D), np.inf), 0)).all()  # a diverged state: NaN, not an exception
    # The ridge is chosen on held-out rows: the smallest for an exact target, the largest for pure noise.
    assert bench.DensePerStep(z, target, 2).ridge == [1e-8] * 3
    assert bench.DensePerStep(z, rng.standard_normal(z.shape), 2).ridge == [1e-2] * 3

    W = 2
    out = tmp_path / "window_costs.json"
    args = ["--run", str(run), "--classifier", str(tiny_classifier), "--train", "40", "--heldout", "24"]
    args += ["--queries", "16", "--components", "2", "--iterations", "5", "--windows", str(W), "--out", str(out)]
    payload = bench.main(args + ["--dense-degrees", "1", "--peers", str(run)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))
    rows = payload["rows"]
    # generators: the distilled mixture, the Gaussian, the dense degree-1 peer, the empirical denoiser and the peer
    # DiT, here the run's own DiT: it must agree fully wherever it is swapped in
    G = 5
    same = [r for r in rows if r["generator"] == f"peer DiT {run}"]
    assert len(same) == 1 + W and all(r["same_digit"] == 1.0 and r["eps_r2"] == 1.0 for r in same)
    assert [r["swapped"] for r in rows].count("all steps") == 1 + G  # the ceiling and each generator
    assert len(rows) == 1 + G + (G + 1) * W + (W - 1)
    assert sum(r["generator"].startswith("empirical, h = 0 (") for r in rows) == 1 + W
    dense = [r for r in rows if r["generator"].startswith("dense degree 1")]
    assert len(dense) == 1 + W and dense[0]["generator"] == f"dense degree 1 ({su.D + 1} col/dim/step)"
    peers = [r for r in rows if r["generator"].startswith("DiT + iid noise")]
    distilled = [r for r in rows if r["generator"] == "distilled mixture" and r["swapped"] != "all steps"]
    assert [p["eps_r2"] for p in peers] == [r["eps_r2"] for r in distilled]  # the peer has the distilled R^2
    assert rows[0]["generator"].startswith("DiT, raw weights") and rows[0]["eps_r2"] > 0.99
    for r in rows:
        assert 0.0 <= r["same_digit"] <= 1.0 and r["ci95"][0] <= r["same_digit"] <= r["ci95"][1]
        assert np.isfinite(r["final_error"]) and r["diverged"] == 0
    windows = [r["swapped"] for r in rows if r["generator"] == "Gaussian" and r["swapped"] != "all steps"]
    assert windows == [f"t in ({1 - 0.5 * (w + 1):.2f}, {1 - 0.5 * w:.2f}]" for w in range(W)]

    with pytest.raises(SystemExit) as e:
        bench.main(["--run", str(tmp_path), "--out", str(tmp_path / "x.json")])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        bench.main(["--run", str(run), "--heldout", "0"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        bench.main(["--run", str(run), "--dense-degrees", "2,x"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        bench.main(["--run", str(run), "--empirical-bandwidths", "-0.1"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        bench.main(["--run", str(run), "--peers", str(tmp_path)])
    assert e.value.code == 2


def test_peer_runs_are_checked_before_work(trained_run, tmp_path, capsys):
    """sindy.peer_runs: each must be a trained DiT of the same recipe on this run's autoencoder (one line, exit 2)."""
    root = copy_run(trained_run, tmp_path / "r")

    def bad(peer, *extra: str) -> str:
        return job_refusal(smoke(root, "sindy.ray_address=local", f"sindy.peer_runs=[{peer}]", *extra), capsys)

    assert "sindy.peer_runs takes run folders" in bad("''")
    assert "has no dit_ema.safetensors: train the peer first (`make peer`" in bad(tmp_path / "nothing")
    peer = shutil.copytree(root / "smoke", tmp_path / "peer")
    meta = json.loads((peer / "dit.json").read_text())
    (peer / "dit.json").write_text(json.dumps({**meta, "ae_sha256": "0" * 64}))
    assert "trained on the latents of another autoencoder (ae sha256 000000000000" in bad(peer)
    (peer / "dit.json").write_text(json.dumps({**meta, "timesteps": meta["timesteps"] + 1}))
    assert f"its DiT has timesteps {meta['timesteps'] + 1}" in bad(peer)
    (peer / "dit.json").write_text(json.dumps(meta))
    weights = (peer / "dit_ema.safetensors").read_bytes()
    (peer / "dit_ema.safetensors").write_bytes(weights[:1000])
    assert "dit_ema.safetensors is not a readable safetensors file (truncated or corrupt" in bad(peer)
    npz = tmp_path / "t.npz"
    np.savez(npz, trajectories=np.zeros((4, 3, 16)), num_timesteps=2)
    assert "compares DiTs from the noise of the job's own trajectories" in bad(
        root / "smoke", f"sindy.trajectories={npz}", "sindy.target=central_diff"
    )
