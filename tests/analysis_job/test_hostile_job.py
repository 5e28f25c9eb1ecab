"""The SINDy job under faults and hostile inputs (issue 19), on the reference study's trajectory file (no trained
run needed): a stop signal keeps the finished fits, removes temporaries and exits 75; a second job on the folder
is refused; a private Ray that cannot start, custom terms with undefined constants or infinite columns, and a
report that cannot be written are one line and exit 2, and a failed report leaves the previous one whole."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.analysis_job.conftest import npz_job as job
from tests.configs.test_lock import hold_in_child
from tests.conftest import REPO, run_entry


def one_error_line(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    assert proc.returncode == code, (proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if "error:" in ln]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def leftovers(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob(".tmp-*"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_stop_signal_keeps_finished_fits_and_exits_75(tmp_path: Path, sig: signal.Signals) -> None:
    root = tmp_path / "r"
    run_dir = root / "smoke"
    cmd = job(root)  # coordinates=auto: fits in the latent's own coordinates, then in the modes
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 400
    # The first coordinate system's 16 fits are written: the signal lands in the second one's statistics.
    while time.time() < deadline and proc.poll() is None and len(list(run_dir.rglob("dim-*.json"))) < 16:
        time.sleep(0.2)
    assert proc.poll() is None, "the job ended before its first fit was written"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 75, (out[-2000:], err[-3000:])
    assert "Traceback" not in err and "stack" not in err.lower(), err[-3000:]
    stopped = [ln for ln in err.splitlines() if "stopped by" in ln]
    assert len(stopped) == 1 and sig.name in stopped[0], err[-3000:]
    kept = sorted(run_dir.rglob("dim-*.json"))
    assert len(kept) >= 16 and all(json.loads(f.read_text())["dim"] >= 0 for f in kept)  # whole, readable fits
    assert leftovers(run_dir) == [] and not (run_dir / "report").exists()
    if sig != signal.SIGTERM:
        return
    # A killed job's temporary file (what a SIGKILL leaves) is removed by the rerun, which resumes and finishes.
    stale = kept[0].parent / ".tmp-dim-015.json.99999"
    stale.write_text('{"dim": 15')
    written = {f: f.stat().st_mtime_ns for f in kept}
    run_entry(cmd)
    assert not stale.exists() and leftovers(run_dir) == []
    assert {f: f.stat().st_mtime_ns for f in kept} == written  # the finished fits were reused, not redone
    assert "reused" in (run_dir / "report" / "report.md").read_text()
    assert json.loads((run_dir / "report" / "equations.json").read_text())["n_trajectories"] == 100


def test_a_second_job_on_the_folder_is_refused_naming_the_holder(tmp_path: Path) -> None:
    root = tmp_path / "r"
    child = hold_in_child(root / "smoke", "sindy")
    try:
        line = one_error_line(run_entry(job(root), check=False, timeout=300))
    finally:
        child.kill()
        child.wait()
    assert f"pid {child.pid}" in line and "stage sindy is running" in line, line
    assert sorted(p.name for p in (root / "smoke").iterdir()) == [".locks"]


def test_a_private_ray_that_cannot_start_is_one_line(tmp_path: Path) -> None:
    long_tmp = tmp_path / ("d" * 120)  # Ray's sockets would exceed the 107-byte AF_UNIX limit
    long_tmp.mkdir()
    line = one_error_line(run_entry(job(tmp_path / "r"), env={"RAY_TMPDIR": str(long_tmp)}, check=False, timeout=300))
    assert "could not start a private Ray instance" in line, line


@pytest.mark.parametrize(
    "term, expect",
    [
        ("1/0 * z0", "divides by the constant 0"),
        ("10**400 * z1", "is undefined"),
        ("(-1)**0.5 * z2", "is not a finite real number"),
    ],
)
def test_custom_terms_with_undefined_constants_are_refused_before_work(tmp_path: Path, term: str, expect: str) -> None:
    extra = ("sindy.library.families=[polynomial,terms]", f"sindy.library.terms=[{json.dumps(term)}]")
    line = one_error_line(run_entry(job(tmp_path / "r", *extra), check=False, timeout=300))
    assert expect in line and term.split()[0] in line, line
    assert "sindy: Ray" not in line


def test_a_custom_term_with_infinite_columns_is_one_line_naming_it(tmp_path: Path) -> None:
    extra = ("sindy.library.families=[polynomial,terms]", "sindy.library.terms=['exp(1000*z0)']")
    line = one_error_line(run_entry(job(tmp_path / "r", *extra), check=False, timeout=600))
    assert "exp(1000*z0)" in line and "not finite" in line, line


def test_a_report_that_cannot_be_written_leaves_the_previous_one_whole(npz_run: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "r"
    shutil.copytree(npz_run, root, symlinks=True)
    report = root / "smoke" / "report"
    first = os.readlink(report)  # reports/<the first settings' fingerprint>
    before = {p.name: p.read_bytes() for p in report.iterdir()}
    # The kernel refuses writes past 20 kB in the job's own process from the report stage on (EFBIG, as a
    # full disk gives ENOSPC): the plots fail part way. Other settings (sindy.rollouts): another report folder.
    proc = run_entry(job(root, "sindy.rollouts=6"), env={"LATENT_SINDY_FAULT_REPORT_BYTES": "20000"}, check=False)
    line = one_error_line(proc)
    assert "could not write the report into " + str(root / "smoke" / "reports") in line, line
    assert os.readlink(report) == first and {p.name: p.read_bytes() for p in report.iterdir()} == before
    assert leftovers(root / "smoke") == [] and os.listdir(root / "smoke" / "reports") == [first.split("/")[1]]
    # Without the fault the same command writes the other settings' report beside the first; report links to it.
    run_entry(job(root, "sindy.rollouts=6"))
    assert json.loads((report / "equations.json").read_text())["rollout"]["index"].__len__() == 6
    second = os.readlink(report)
    assert second != first and sorted(os.listdir(root / "smoke" / "reports")) == sorted(
        p.split("/")[1] for p in (first, second)
    )
    assert {p.name: p.read_bytes() for p in (root / "smoke" / first).iterdir()} == before  # the first one, intact


def _with_a_term(eq: dict) -> dict:
    """The reference file's equations may all be empty (poor fits): give dimension 0 a valid term to tamper with."""
    if not eq["dims"][0]["terms"]:
        eq["dims"][0]["terms"] = [{"index": 1, "name": eq["term_names"][1], "coef": 0.25}]
    return eq


def _tamper(eq: dict, how: str) -> None:
    term = eq["dims"][0]["terms"][0]
    if how == "string_coef":
        term["coef"] = "0.5"
    elif how == "index_out_of_range":
        term["index"] = eq["n_terms"] + 3
    elif how == "negative_index":
        term["index"] = -1
    elif how == "n_terms_too_small":
        eq["n_terms"] = 2
    elif how == "nan_coef":
        term["coef"] = float("nan")
    elif how == "changed_term_name":
        term["name"] = "z15^7"
    elif how == "changed_term_names_list":
        eq["term_names"][1] = "sin(z0)"
    elif how == "truncated":
        pass


TAMPER = {
    "string_coef": r"field 'dims\[\d+\]\.terms\[0\]\.coef' is '0\.5', not a finite number",
    "index_out_of_range": r"field 'dims\[\d+\]\.terms\[0\]\.index' is \d+, not an int in 0\.\.\d+",
    "negative_index": r"field 'dims\[\d+\]\.terms\[0\]\.index' is -1, not an int in 0\.\.\d+",
    "n_terms_too_small": r"field 'n_terms' is 2, but the library has \d+ terms",
    "nan_coef": r"field 'dims\[\d+\]\.terms\[0\]\.coef' is nan, not a finite number",
    "changed_term_name": r"field 'dims\[\d+\]\.terms\[0\]\.name' is 'z15\^7', but term \d+ of the library is",
    "changed_term_names_list": r"field 'term_names\[1\]' is 'sin\(z0\)', the library's term is",
    "truncated": r"equations\.json is truncated or not valid JSON",
}


@pytest.mark.parametrize("how", sorted(TAMPER))
def test_a_tampered_equations_json_is_one_line_naming_file_and_field(npz_run: Path, tmp_path: Path, how: str) -> None:
    from analysis.sindy.export import load_pysindy
    from configs.cli import UserError

    src = npz_run / "smoke" / "report" / "equations.json"
    path = tmp_path / "equations.json"
    path.write_text(json.dumps(_with_a_term(json.loads(src.read_text()))))
    assert load_pysindy(path).coefficients()[0, 1] == 0.25  # the untampered file loads
    text = path.read_text()
    if how == "truncated":
        path.write_text(text[: len(text) // 2])
    else:
        eq = json.loads(text)
        _tamper(eq, how)
        path.write_text(json.dumps(eq))
    with pytest.raises(UserError, match=TAMPER[how]) as info:
        load_pysindy(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
