"""Where the SINDy job's report goes: one folder per settings fingerprint, and ``report`` pointing at the latest.

    runs/<name>/reports/<fingerprint>/      one complete report per fingerprint (a rerun replaces it whole)
    runs/<name>/report -> reports/<fp>      the latest report: a relative link, switched atomically
    runs/<name>/tb/sindy/<fingerprint>/     its TensorBoard events (one TensorBoard run per report)

A rerun with other ``sindy.*`` settings (or other inputs) writes beside the earlier reports and leaves them as they
were; a rerun with the same ones replaces its own folder. Every reader of ``runs/<name>/report/...`` sees the latest.

The fingerprint is the first 12 hex digits of the sha256 of the canonical JSON (sorted keys, no spaces) of the
``sindy.*`` settings that can change a result and of the identity of the inputs (the sha256 of the EMA DiT and the
autoencoder the job generates trajectories with, or of an external trajectory file). A report folder written before
this layout (a real folder at ``runs/<name>/report``) is moved into ``reports/``, never deleted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

from analysis.job.plan import Plan
from configs.errors import UserError
from configs.io import atomic_symlink, fsync_path
from configs.schema import to_dict
from configs.sindy import SindyConfig

__all__ = [
    "EXECUTION_KNOBS",
    "ReportFolders",
    "adopt_old_layout",
    "check_report_folders",
    "covered_settings",
    "inputs_identity",
    "point_report_at",
    "report_folders",
    "settings_fingerprint",
]

# sindy.* keys the fingerprint leaves out, and why: they say how or where the job computes, not what. A key not
# listed here is covered (so a new setting is covered unless someone adds it here with a reason).
EXECUTION_KNOBS = {
    "device": "where trajectories and statistics are computed (the trajectory cache ignores it too)",
    "workers": "trajectory workers; each block is seeded on its own, so the trajectories do not depend on them",
    "num_cpus": "the size of the private Ray instance",
    "ray_address": "which Ray cluster runs the tasks",
    "max_memory_gb": "the memory budget the statistics are checked against, not what they are",
    "chunk_size": "rows evaluated at once while streaming the statistics (round-off only; the fit cache ignores it)",
    "trajectories": "the path of an external file: its content's sha256 is in the inputs instead",
}
FINGERPRINT_CHARS = 12
EVENT_PREFIX = "events.out.tfevents"


def covered_settings(settings: SindyConfig) -> dict:
    """The sindy.* settings the fingerprint covers, as plain JSON types (every key but EXECUTION_KNOBS)."""
    return {k: v for k, v in to_dict(settings).items() if k not in EXECUTION_KNOBS}


def inputs_identity(plan: Plan) -> dict:
    """What the report analyses, by content: the sha256 of the EMA DiT and the autoencoder when the job generates
    the trajectories (the run's latents and their stats derive from the autoencoder) and of any peer DiTs
    (sindy.peer_runs), else of the external file (or of its blocks' sha256 list, for a manifest this job wrote)."""
    if plan.external is None:
        ids = dict(plan.digests or {})
        if plan.peers:  # the peer DiTs' content, not only their paths (sindy.peer_runs, covered as a setting)
            ids["peer_dit_ema_sha256"] = [p["dit_ema_sha256"] for p in plan.peers]
        return ids
    m = plan.external.manifest
    if m.get("sha256"):
        return {"trajectories_sha256": m["sha256"]}
    blocks = json.dumps([b["sha256"] for b in m["blocks"]]).encode()
    return {"trajectory_blocks_sha256": hashlib.sha256(blocks).hexdigest()}


def settings_fingerprint(settings: SindyConfig, inputs: dict) -> tuple[str, dict]:
    """(fingerprint, the record it is the hash of, with the keys it leaves out): the same in every process."""
    record = {"sindy": covered_settings(settings), "inputs": inputs}
    blob = json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()
    fp = hashlib.sha256(blob).hexdigest()[:FINGERPRINT_CHARS]
    return fp, {"id": fp, **record, "not_covered": sorted(EXECUTION_KNOBS)}


@dataclasses.dataclass(frozen=True)
class ReportFolders:
    """The paths of one report (see the module's docstring). ``settings``: the fingerprint's record."""

    run_dir: Path
    fingerprint: str
    settings: dict

    @property
    def reports(self) -> Path:
        return self.run_dir / "reports"

    @property
    def report(self) -> Path:
        return self.reports / self.fingerprint

    @property
    def link(self) -> Path:
        return self.run_dir / "report"

    @property
    def tb_root(self) -> Path:
        return self.run_dir / "tb" / "sindy"

    @property
    def tb(self) -> Path:
        return self.tb_root / self.fingerprint


def report_folders(settings: SindyConfig, plan: Plan) -> ReportFolders:
    """The report's folders for these settings and the plan's inputs."""
    fp, record = settings_fingerprint(settings, inputs_identity(plan))
    return ReportFolders(plan.run_dir, fp, record)


def check_report_folders(f: ReportFolders) -> None:
    """Refuse, before any work, what the job would have to overwrite or guess about: a file where a folder or the
    link belongs, a link that dangles or points outside ``reports/``. One line each, naming the path and the fix."""
    run = f.run_dir
    link = f.link
    if link.is_symlink():
        target = os.readlink(link)
        parts = Path(target).parts
        if len(parts) != 2 or parts[0] != "reports":
            raise UserError(
                f"{link} links to {target}, not to a folder in {run / 'reports'} (the job keeps {link} pointing at "
                "the latest report there); move the link away and rerun"
            )
        if not link.is_dir():
            raise UserError(
                f"{link} links to {target}, which is missing or not a folder (a report removed by hand?); remove the link "
                f"(rm {link}) and rerun: the other reports in {run / 'reports'} are kept"
            )
    elif link.exists() and not link.is_dir():
        raise UserError(
            f"{link} is a file where the job keeps its link to the latest report (reports/<fingerprint>); move it "
            "away and rerun"
        )
    for path, what in (
        (f.reports, "the folder of the reports"),
        (f.report, f"the report of settings fingerprint {f.fingerprint}"),
        (run / "tb", "the TensorBoard folder"),
        (f.tb_root, "the SINDy reports' TensorBoard folder"),
        (f.tb, f"the TensorBoard events of settings fingerprint {f.fingerprint}"),
    ):
        if os.path.lexists(path) and not path.is_dir():
            raise UserError(f"{path} is not a folder but must be {what}; move it away and rerun")


def adopt_old_layout(f: ReportFolders) -> list[str]:
    """Move what a job before this layout left into it: a real ``report/`` folder into ``reports/<name>`` (its own
    fingerprint if its equations.json records one that is free, else ``legacy-<time of its equations.json>``),
    with ``report`` then linking to it, and event files directly in ``tb/sindy`` into ``tb/sindy/<that name>``.
    Nothing is deleted. Returns one line per move.

    Raises:
        UserError: a move failed (permissions): one line naming what to move where by hand.
    """
    try:
        return _adopt(f)
    except OSError as e:
        raise UserError(
            f"could not move an earlier job's report or events into {f.reports} / {f.tb_root} ({e.strerror or e}: "
            f"{e.filename}); move {f.link} to {f.reports}/<any name> by hand and rerun"
        ) from None


def _adopt(f: ReportFolders) -> list[str]:
    said, name = [], None
    if f.link.is_dir() and not f.link.is_symlink():
        name = _old_report_name(f.link, f.reports)
        f.reports.mkdir(parents=True, exist_ok=True)
        os.rename(f.link, f.reports / name)
        atomic_symlink(f.link, f"reports/{name}")
        said.append(f"moved the report folder of an earlier job to {f.reports / name}; {f.link} links to it")
    events = sorted(p for p in f.tb_root.glob(f"{EVENT_PREFIX}*") if p.is_file()) if f.tb_root.is_dir() else []
    if events:
        base = name or f"legacy-{_stamp(max(p.stat().st_mtime for p in events))}"
        dest = f.tb_root / _free(f.tb_root, base)
        dest.mkdir()
        for p in events:
            os.rename(p, dest / p.name)
        fsync_path(f.tb_root)
        said.append(f"moved {len(events)} TensorBoard event files of an earlier job to {dest}")
    return said


def point_report_at(f: ReportFolders) -> Path:
    """Switch ``runs/<name>/report`` to ``reports/<fingerprint>`` atomically (a reader sees the old report or the new
    one, never none); returns the link."""
    try:
        return atomic_symlink(f.link, f"reports/{f.fingerprint}")
    except OSError as e:
        raise UserError(
            f"could not point {f.link} at {f.report} ({e.strerror or e}); the report is complete there"
        ) from None


def _old_report_name(folder: Path, reports: Path) -> str:
    eq = folder / "equations.json"
    try:
        recorded = json.loads(eq.read_text()).get("settings_fingerprint", {}).get("id")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if isinstance(recorded, str) and recorded.isalnum() and not os.path.lexists(reports / recorded):
        return recorded
    when = (eq if eq.is_file() else folder).stat().st_mtime
    return _free(reports, f"legacy-{_stamp(when)}")


def _stamp(t: float) -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(t))


def _free(folder: Path, base: str) -> str:
    """``base``, or ``base-2``, ``base-3``, ... : the first name not taken in ``folder``."""
    name, k = base, 1
    while os.path.lexists(folder / name):
        k += 1
        name = f"{base}-{k}"
    return name
