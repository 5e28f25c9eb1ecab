"""The house's layout rules that are not imports: module size, setup.cfg's references, benchmarks as modules."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 450
PACKAGES = ("configs", "models", "data_pipeline", "training", "analysis", "cluster", "benchmarks", "tests")
# Over the limit when analysis/ was split (issue 18), in rooms other branches are editing: each must shrink, and
# the test fails once one of them complies so that it leaves this list.
NOT_YET_SPLIT: set[str] = set()


def test_no_module_over_450_lines():
    sizes = {
        str(p.relative_to(REPO)): len(p.read_text().splitlines())
        for pkg in PACKAGES
        for p in (REPO / pkg).rglob("*.py")
    }
    over = {f: n for f, n in sizes.items() if n > MAX_LINES and f not in NOT_YET_SPLIT}
    assert not over, f"modules over {MAX_LINES} lines (split them by what they do): {over}"
    done = sorted(f for f in NOT_YET_SPLIT if sizes.get(f, 0) <= MAX_LINES)
    assert not done, f"{done} are within {MAX_LINES} lines now: remove them from NOT_YET_SPLIT"


def test_setup_cfg_names_files_that_exist():
    text = (REPO / "setup.cfg").read_text()
    named = set(re.findall(r"\b([a-z_]+(?:/[a-z_]+)*\.py)\b", text))
    missing = sorted(p for p in named if not (REPO / p).is_file())
    assert named and not missing, f"setup.cfg names files that do not exist: {missing}"


def test_benchmarks_run_as_modules_without_path_edits():
    edits = [str(p.relative_to(REPO)) for p in (REPO / "benchmarks").glob("*.py") if "sys.path" in p.read_text()]
    assert not edits, f"benchmarks edit sys.path (run them as python -m benchmarks.X): {edits}"
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks.run_all", "--help"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0 and "--quick" in r.stdout, r.stderr[-2000:]


def test_analysis_quality_runs_as_a_module():
    r = subprocess.run(
        [sys.executable, "-m", "analysis.quality", "--help"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0 and "score" in r.stdout, r.stderr[-2000:]
