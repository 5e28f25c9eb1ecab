"""ReportContext: what the report says about a run besides the fits.

Its own module so that the sequence (write.py) and the output modules (markdown.py, equations.py) all import it
from below, with no circle between them.
"""

from __future__ import annotations

import dataclasses

from configs.sindy import SindyConfig

__all__ = ["ReportContext"]


@dataclasses.dataclass
class ReportContext:
    """What the report says about the run besides the fits: data, split, settings, provenance, stage times.

    Attributes:
        run: run.name. n, n_train, n_heldout: trajectories in all, in training, held out. seed: sindy.seed.
        sampler, T: the trajectories' sampler and steps. target, target_note: the fit target and what it is.
        t_convention: the trajectories' time convention. coordinates: the fit coordinates in words.
        settings: the job's `sindy` config (optimizer, thresholds, budget, bagging, poor_r2, integrator, seed).
        n_groups: bagging's trajectory groups (sindy.bootstrap_groups, capped by the training trajectories).
        stage_times: {stage: (seconds, note)}, the report's own added by write_report (from report_t0, if given).
        source: "generated" or "npz". warnings: lines for the report. digests: the weights' or file's
        sha256. provenance: one line on where the trajectories come from and how Ray ran.
        fingerprint: the settings fingerprint's record (analysis/job/report_folders.py: id, the sindy.* settings
        and inputs it covers, the keys it leaves out), or None outside the job.
    """

    run: str
    n: int
    n_train: int
    n_heldout: int
    settings: SindyConfig
    sampler: str | None
    T: int
    target: str
    target_note: str
    t_convention: str
    coordinates: str
    n_groups: int
    stage_times: dict
    source: str
    warnings: list
    digests: dict
    provenance: str
    report_t0: float | None = None
    fingerprint: dict | None = None
