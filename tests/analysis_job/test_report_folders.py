"""One report folder per settings fingerprint (issue 20, analysis/job/report_folders.py): the report in
runs/<name>/reports/<fingerprint>/, runs/<name>/report linking to the latest, its TensorBoard events in
tb/sindy/<fingerprint>/; what the fingerprint covers; an earlier job's report folder and events moved, never lost;
what stands in the way refused with one line before any work. Two reports of other settings side by side:
tests/analysis_job/test_hostile_job.py (the report that cannot be written)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from analysis.job.report_folders import (
    EXECUTION_KNOBS,
    ReportFolders,
    adopt_old_layout,
    check_report_folders,
    settings_fingerprint,
)
from configs.errors import UserError
from configs.schema import load_config
from configs.sindy import SindyConfig
from tests.analysis_job.conftest import NPZ
from tests.analysis_job.conftest import npz_job as job
from tests.analysis_job.test_hostile_job import one_error_line
from tests.conftest import REPO, run_entry

DIGESTS = {"dit_ema_sha256": "a" * 64, "ae_sha256": "b" * 64}


def fingerprint(*overrides: str, inputs: dict = DIGESTS) -> str:
    return settings_fingerprint(load_config(REPO / "configs" / "smoke.yaml", overrides).sindy, inputs)[0]


# ----------------------------------------------------------------------------- the fingerprint


def test_the_fingerprint_is_the_same_in_another_process():
    code = (
        "from analysis.job.report_folders import settings_fingerprint; from configs.schema import load_config; "
        f"print(settings_fingerprint(load_config('configs/smoke.yaml').sindy, {DIGESTS!r})[0])"
    )
    proc = run_entry([sys.executable, "-c", code], env={"PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO)})
    assert proc.stdout.strip() == fingerprint() and re.fullmatch(r"[0-9a-f]{12}", fingerprint())


@pytest.mark.parametrize(
    "override",
    [
        "sindy.alpha=0.01",
        "sindy.poor_r2=0.4",
        "sindy.rollouts=5",
        "sindy.seed=7",
        "sindy.library.poly_degree=3",
        "sindy.library.tanh_scales=[0.5,1.0]",
        "sindy.trajectories_order=ascending",
    ],
)
def test_a_setting_that_changes_results_changes_the_fingerprint(override):
    assert fingerprint(override) != fingerprint()


@pytest.mark.parametrize(
    "override",
    [
        "sindy.workers=3",
        "sindy.num_cpus=1",
        "sindy.ray_address=local",
        "sindy.device=cpu",
        "sindy.chunk_size=999",
        "sindy.max_memory_gb=2.5",
        f"sindy.trajectories={NPZ}",  # the path: its content's sha256 is in the inputs instead
        "sindy.alpha=0",  # the default value, spelled as an int
    ],
)
def test_an_execution_knob_leaves_the_fingerprint(override):
    assert fingerprint(override) == fingerprint()


def test_other_inputs_change_the_fingerprint_and_every_knob_left_out_is_a_setting():
    assert fingerprint(inputs={**DIGESTS, "ae_sha256": "c" * 64}) != fingerprint()
    assert set(EXECUTION_KNOBS) <= {f.name for f in dataclasses.fields(SindyConfig)}
    _, record = settings_fingerprint(SindyConfig(), DIGESTS)
    assert record["inputs"] == DIGESTS and "workers" not in record["sindy"] and "poor_r2" in record["sindy"]


# ----------------------------------------------------------------------------- the folders


def folders(tmp_path: Path, fp: str = "0123456789ab") -> ReportFolders:
    run = tmp_path / "smoke"
    run.mkdir(exist_ok=True)
    return ReportFolders(run, fp, {"id": fp})


@pytest.mark.parametrize(
    "how, expect",
    [
        ("file_at_report", "is a file where the job keeps its link to the latest report"),
        ("dangling_link", "links to reports/gone, which is missing"),
        ("foreign_link", "links to /tmp, not to a folder in"),
        ("file_at_reports", "is not a folder but must be the folder of the reports"),
        ("file_at_fingerprint", "is not a folder but must be the report of settings fingerprint 0123456789ab"),
        ("file_at_tb_sindy", "is not a folder but must be the SINDy reports' TensorBoard folder"),
    ],
)
def test_what_stands_in_the_way_is_one_line(tmp_path, how, expect):
    f = folders(tmp_path)
    if how == "file_at_report":
        f.link.write_text("x")
    elif how == "dangling_link":
        f.link.symlink_to("reports/gone")
    elif how == "foreign_link":
        f.link.symlink_to("/tmp")
    elif how == "file_at_reports":
        f.reports.write_text("x")
    elif how == "file_at_fingerprint":
        f.reports.mkdir()
        f.report.write_text("x")
    else:
        f.tb_root.parent.mkdir()
        f.tb_root.write_text("x")
    with pytest.raises(UserError, match=re.escape(expect)) as info:
        check_report_folders(f)
    assert "\n" not in str(info.value) and str(f.run_dir) in str(info.value)


def test_an_old_report_recording_its_fingerprint_is_moved_under_it(tmp_path):
    f = folders(tmp_path)
    f.link.mkdir()
    (f.link / "equations.json").write_text(json.dumps({"settings_fingerprint": {"id": "fedcba987654"}}))
    assert len(adopt_old_layout(f)) == 1
    assert os.readlink(f.link) == "reports/fedcba987654" and (f.reports / "fedcba987654" / "equations.json").is_file()
    assert adopt_old_layout(f) == []  # nothing left to move
    check_report_folders(f)  # the link into reports/ is what the job expects


def test_an_earlier_jobs_report_is_moved_and_the_same_settings_replace_their_own(npz_run, tmp_path):
    root = tmp_path / "r"
    shutil.copytree(npz_run, root, symlinks=True)
    run = root / "smoke"
    fp = os.readlink(run / "report").split("/")[1]
    tb = run / "tb" / "sindy"
    [events] = list((tb / fp).iterdir())
    # The layout before fingerprints: a real report folder recording none, its events directly in tb/sindy.
    (run / "report").unlink()
    shutil.copytree(run / "reports" / fp, run / "report")
    eq = json.loads((run / "report" / "equations.json").read_text())
    del eq["settings_fingerprint"]
    (run / "report" / "equations.json").write_text(json.dumps(eq))
    old_report = {p.name: p.read_bytes() for p in (run / "report").iterdir()}
    shutil.copy2(events, tb / events.name)

    proc = run_entry(job(root))
    legacy = [n for n in os.listdir(run / "reports") if n != fp]
    assert len(legacy) == 1 and re.fullmatch(r"legacy-\d{8}-\d{6}", legacy[0]), os.listdir(run / "reports")
    assert {p.name: p.read_bytes() for p in (run / "reports" / legacy[0]).iterdir()} == old_report  # moved, whole
    assert os.readlink(run / "report") == f"reports/{fp}" and "moved the report folder of an earlier job" in proc.stderr
    # TensorBoard: one run per report; the same settings' events replaced, not a second set beside the first.
    assert sorted(os.listdir(tb)) == sorted([fp, legacy[0]])
    assert os.listdir(tb / legacy[0]) == [events.name]
    [new_events] = os.listdir(tb / fp)
    assert new_events != events.name
    for sub in (fp, legacy[0]):
        ea = EventAccumulator(str(tb / sub), size_guidance={"tensors": 0, "scalars": 0})
        ea.Reload()
        assert len(ea.Tensors("sindy/report/text_summary")) == 1 and len(ea.Scalars("sindy/r2_heldout")) == 16
    # The report says its fingerprint and what it covers; the job's last line names its folder.
    eq = json.loads((run / "report" / "equations.json").read_text())
    assert eq["settings_fingerprint"]["id"] == fp and "workers" in eq["settings_fingerprint"]["not_covered"]
    assert eq["settings_fingerprint"]["inputs"] == {"trajectories_sha256": eq["digests"]["external_sha256"]}
    assert f"settings fingerprint **{fp}**" in (run / "report" / "report.md").read_text()
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith(f"sindy: report folder {(run / 'reports' / fp).resolve()} ") and "load_pysindy" in last


def test_a_file_where_the_report_link_belongs_stops_the_job_before_work(tmp_path):
    run = tmp_path / "r" / "smoke"
    run.mkdir(parents=True)
    (run / "report").write_text("notes")
    proc = run_entry(job(tmp_path / "r"), check=False, timeout=300)
    line = one_error_line(proc)
    assert str(run / "report") in line and "move it away" in line and "sindy: Ray" not in proc.stdout, line
    assert (run / "report").read_text() == "notes" and sorted(os.listdir(run)) == [".locks", "report"]
