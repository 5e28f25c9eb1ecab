"""Discover the sparse equations of a trained latent DiT's denoising dynamics (Ray driver).

    python analysis/sindy_job.py --config configs/X.yaml [key=value ...]
    ray job submit --address http://127.0.0.1:8265 -- python analysis/sindy_job.py --config ...
    ray submit cluster/ray/local.yaml analysis/sindy_job.py --config ...

Method: SINDy (Brunton, Proctor & Kutz, PNAS 2016) on denoising trajectories, as in
the SINDy study (docs/REFERENCES.md), with held-out validation, the sampler's
drift as the default target and bagging (Fasel et al. 2022) for uncertainties.

Stages (each reused on rerun when its outputs exist, so a preempted job resumes):
    1. trajectories   Ray actors (one per GPU, else one per CPU) generate seeded blocks   sindy/trajectories/
    2. fits           statistics streamed once per block (tasks), then one task per dimension
                      sharing the Gram statistics through the object store                 sindy/fits/<key>/
    3. report         integration of the equations on held-out noise, plots, TensorBoard   reports/<fingerprint>/,
                      one folder per settings fingerprint; report links to the latest      tb/sindy/<fingerprint>/
Every input is checked before Ray starts; bad inputs are one line on stderr and exit code 2. One job per run
folder (configs/lock.py); SIGTERM/SIGUSR1 keep the finished blocks and fits, remove temporary files and exit 75.

The steps live in analysis/job/plan.py (checks), analysis/job/stages.py (stages 1 and 3), analysis/job/coordinate_choice.py
and analysis/job/fits.py (stage 2), analysis/job/views.py (theory, mixture and validation views) and analysis/report/write.py.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def _find_repo() -> Path:
    # `ray submit` copies this file alone to ~/sindy_job.py on the head; the code is then found via
    # LATENT_SINDY_REPO (set for the CI key in tests/analysis_job/setup_sshd.sh) and paths in the
    # command line are taken relative to it, as from the repository root.
    here = Path(__file__).resolve().parents[1]
    if (here / "configs" / "schema.py").is_file():
        return here
    env = os.environ.get("LATENT_SINDY_REPO", "")
    if env and (Path(env) / "configs" / "schema.py").is_file():
        os.chdir(env)
        return Path(env)
    sys.exit(
        f"{Path(__file__).name}: error: cannot find the latent-sindy repository next to {__file__}; "
        "set LATENT_SINDY_REPO=/path/to/repo"
    )


REPO = _find_repo()

from analysis.job import ray_utils  # noqa: E402
from analysis.job.coordinate_choice import fit_in_coordinates, save_coordinates  # noqa: E402
from analysis.job.dagger import stage_dagger  # noqa: E402
from analysis.job.plan import check_inputs  # noqa: E402
from analysis.job.report_folders import (  # noqa: E402
    ReportFolders,
    adopt_old_layout,
    check_report_folders,
    report_folders,
)
from analysis.job.space_choice import choose_fit_space  # noqa: E402
from analysis.job.stages import (  # noqa: E402
    split_trajectories,
    stage_polish,
    stage_queries,
    stage_report,
    stage_sensitivity,
    stage_trajectories,
    x0_step_weights,
)
from configs.cli import parse_cli, run_cli  # noqa: E402
from configs.exit_codes import PREEMPTED_EXIT  # noqa: E402
from configs.io import TMP_PREFIX, remove_temporaries  # noqa: E402
from configs.lock import acquire_stage_lock  # noqa: E402
from configs.schema import Config  # noqa: E402
from configs.stop import STOPS, Stopped  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    cfg: Config = parse_cli(argv, __doc__)
    # 1. Check every input before starting anything; then take the run folder's lock (one job per folder), check
    # where the report will go (its settings fingerprint's folder), move an earlier job's report folder into
    # reports/ and remove what an interrupted job left (.tmp-* of fits, blocks, reports, events; only we write there).
    plan = check_inputs(cfg)
    acquire_stage_lock(plan.run_dir, "sindy")
    folders = report_folders(cfg.sindy, plan)
    check_report_folders(folders)
    for line in adopt_old_layout(folders):
        print(f"sindy: {line}", file=sys.stderr, flush=True)
    for stale in _remove_temporaries(folders):
        print(f"sindy: removed {stale}, left by an interrupted job", file=sys.stderr, flush=True)
    print(
        f"sindy: {plan.n} trajectories, {plan.d}-D fit ({plan.kind}), targets {plan.targets}, "
        f"~{plan.memory_gib:.2f} GiB for the statistics",
        flush=True,
    )
    # 2. Ray: join the cluster the user named or start a private one (a lone copy of this script
    # outside the repository is one `ray submit` put on a head: that head's cluster is named).
    ray_how = ray_utils.connect(
        cfg.sindy.ray_address, cfg.sindy.num_cpus, submitted=REPO != Path(__file__).resolve().parents[1]
    )
    print(f"sindy: Ray {ray_how}", flush=True)
    # SIGTERM/SIGUSR1 (preemption, the time limit) from now on: keep the finished blocks and fits, exit 75.
    STOPS.install()
    try:
        return _stages(cfg, plan, folders, ray_how)
    except BaseException as e:
        if not STOPS.signum:  # not a stop signal (or Ray's error around one): a failure of its own
            raise
        return _stopped(plan, folders, e)


def _remove_temporaries(folders: ReportFolders) -> list[Path]:
    """The .tmp-* files and folders of an interrupted job: fits and blocks, report folders, event folders, and the
    link's (or an earlier job's report's) temporary beside runs/<name>/report."""
    return (
        remove_temporaries(folders.run_dir / "sindy")
        + remove_temporaries(folders.reports)
        + remove_temporaries(folders.tb_root)
        # the run folder itself holds the training stages' temporaries too: only the report link's, at top level
        + remove_temporaries(folders.run_dir, f"{TMP_PREFIX}{folders.link.name}.*", recursive=False)
    )


def _stages(cfg: Config, plan, folders: ReportFolders, ray_how: str) -> int:
    times: dict = {}
    # 3. Stage 1: trajectories.
    t0 = time.time()
    tset, how = stage_trajectories(cfg, plan)
    times["trajectories"] = (time.time() - t0, how)
    if cfg.sindy.queries:  # 3b. States the DiT labels beside the trajectories (training rows only).
        t0 = time.time()
        fwd, how = stage_queries(cfg, plan)
        plan.queries.append(fwd)
        times["queries"] = (time.time() - t0, how)
    if cfg.sindy.weighting == "sensitivity":  # 3c. How much each step's eps error moves the sample.
        t0 = time.time()
        plan.step_weights, plan.sensitivity = stage_sensitivity(cfg, plan, tset)
        times["sensitivity"] = (
            time.time() - t0,
            f"the DiT perturbed at each step, {cfg.sindy.sensitivity_noises} noises",
        )
    if cfg.sindy.fit_space == "x0":  # 3d. x0 space: the eps model's rows weighed by (s/a)^2 per step.
        plan.step_weights = x0_step_weights(plan)
    # 4. Stage 2: split, coordinates, statistics and per-dimension fits.
    split = split_trajectories(tset.n, plan.n_heldout, plan.n_groups, cfg.sindy.seed)
    if cfg.sindy.fit_space == "auto":  # every space fitted, the one whose rollouts end nearest the DiT's kept
        plan.fit_space, coords, fits, lib, choice, plan.space_choice = choose_fit_space(cfg, plan, tset, split, times)
    else:
        coords, fits, lib, choice = fit_in_coordinates(cfg, plan, tset, split, times)
        plan.fit_space = cfg.sindy.fit_space
    # 4b. DAgger: the states the equations' own rollouts visit, labelled by the DiT, then a refit (same coordinates).
    for r in range(cfg.sindy.dagger_rounds):
        fits, lib, choice = stage_dagger(cfg, plan, tset, coords, split, fits, lib, choice, r, times)
    if cfg.sindy.polish_iterations:  # 4c. The chosen coefficients polished through the integrator.
        t0 = time.time()
        fits, plan.polish = stage_polish(cfg, plan, tset, coords, split, fits, lib)
        times["polish"] = (
            time.time() - t0,
            f"rollout RMSE {plan.polish['rmse_before']:.4g} -> {plan.polish['rmse_after']:.4g} "
            f"({plan.polish['nonzeros']} coefficients, {plan.polish['noises']} training noises)",
        )
    # 5. Stage 3: the report, written elsewhere and swapped in whole (with the coordinates it is in).
    t0 = time.time()
    extra = (lambda folder: save_coordinates(coords, folder / coords.file_name)) if coords.file_name else None
    path = stage_report(cfg, plan, tset, coords, split, fits, lib, times, ray_how, choice, folders, extra=extra)
    print(
        f"sindy: report stage {time.time() - t0:.1f} s; stage times "
        + ", ".join(f"{k} {v[0]:.1f} s" for k, v in times.items()),
        flush=True,
    )
    flagged = json.loads((path.parent / "equations.json").read_text())["flagged_dims"]
    print(f"sindy: {len(flagged)} of {len(fits)} dimensions flagged as not generalising", flush=True)
    print(f"sindy: report {path.resolve()}")
    print(f"sindy: TensorBoard {folders.tb.resolve()} (every report's: {folders.tb_root.resolve()})")
    # The last line names the report folder and says how to use it (the equations' coordinates are in report.md).
    print(
        f"sindy: report folder {folders.report.resolve()} (settings fingerprint {folders.fingerprint}; "
        f"{folders.link} links to it); load the equations: from analysis.sindy.export import load_pysindy; "
        f"model = load_pysindy({str(folders.report.resolve())!r}); model.print()",
        flush=True,
    )
    return 0


def _stopped(plan, folders: ReportFolders, e: BaseException) -> int:
    """After a stop signal: stop Ray's workers (a fit being written stops with them), remove the temporary files
    and say what was kept; the rerun resumes from the finished blocks and fits."""
    import ray  # heavy: imported where it is used, as ray_utils does

    name = Stopped(STOPS.signum).name
    ray.shutdown()
    removed = _remove_temporaries(folders)
    kept = len(list((plan.run_dir / "sindy" / "fits").rglob("dim-*.json")))
    print(
        f"sindy: stopped by {name}: {kept} finished fits kept in {plan.run_dir / 'sindy'}, {len(removed)} temporary "
        f"files removed, no report written; run the same command again to resume (exit {PREEMPTED_EXIT})",
        file=sys.stderr,
        flush=True,
    )
    return PREEMPTED_EXIT


if __name__ == "__main__":
    run_cli(main)
