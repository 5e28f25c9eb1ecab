"""The README is a front door: short, with quickstarts whose commands name files, modules, make targets
and config keys that exist (the ones without side effects run as written), and links (here and in docs/) that
resolve."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from configs.schema import load_config

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
# Made by the commands themselves or placeholders for the user's own values.
GENERATED = ("runs/", "data/", ".venv/", "~/", "<", "$", ".../", "http")


def code_blocks(text: str) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    # One command per logical line: join backslash continuations, drop comments.
    return [ln.split(" #")[0].strip() for b in blocks for ln in b.replace("\\\n", " ").splitlines() if ln.strip()]


def make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][a-z-]*):", (REPO / "Makefile").read_text(), re.M))


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; move reference material to docs/"


def test_quickstart_commands_name_things_that_exist():
    commands = code_blocks(README.read_text())
    assert len(commands) >= 15
    targets = make_targets()
    for cmd in commands:
        words = shlex.split(cmd)
        if words[0] == "make":
            for w in words[1:]:
                if "=" not in w:
                    assert w in targets, f"{cmd}: no make target {w!r}"
            assignments = dict(w.split("=", 1) for w in words[1:] if "=" in w)
            config = assignments.get("CONFIG", "configs/local.yaml")
            load_config(REPO / config, shlex.split(assignments.get("ARGS", "")))  # raises on a bad key
        for i, w in enumerate(words):
            if w == "-m":
                module = REPO / words[i + 1].replace(".", "/")
                assert module.with_suffix(".py").is_file() or (module / "__main__.py").is_file(), cmd
            elif "/" in w and not w.startswith(("-", *GENERATED)) and "=" not in w:
                assert (REPO / w.rstrip("/")).exists(), f"{cmd}: {w} does not exist"
            elif w.startswith("--config") and "=" in w:
                assert (REPO / w.split("=", 1)[1]).is_file(), cmd
        if "--config" in words:
            path = words[words.index("--config") + 1]
            if not path.startswith(GENERATED):
                load_config(REPO / path)


@pytest.mark.parametrize("doc", ["README.md", *(f"docs/{p.name}" for p in sorted((REPO / "docs").glob("*.md")))])
def test_links_resolve(doc):
    path = REPO / doc
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        assert (path.parent / target).exists(), f"{doc}: broken link {target}"


def test_the_docs_it_points_to_hold_the_reference():
    for name, must in {
        "TRAINING.md": ["## Several GPUs", "## TensorBoard", "train/loss", "python -m configs show"],
        "SINDY.md": ["load_pysindy", "Selection rule", "## Ray"],
        "CLUSTER.md": [
            "slurm.setup",
            "data_pipeline.prepare",
            "train_classifier.py",
            "sacct",
            "cluster/ray/nodes.yaml",
        ],
    }.items():
        text = (REPO / "docs" / name).read_text()
        for needle in must:
            assert needle in text, f"docs/{name} lacks {needle!r}"


def readme_commands(needle: str) -> list[list[str]]:
    """The README's commands containing ``needle``, as argv with `.venv/bin/python` replaced by this Python."""
    out = []
    for cmd in code_blocks(README.read_text()):
        if needle in cmd:
            words = shlex.split(cmd)
            out.append([sys.executable if w == ".venv/bin/python" else w for w in words])
    return out


def test_quickstart_lines_without_side_effects_run_as_written():
    """The config printout (quickstart 1) and the Slurm dry run (quickstart 3) run verbatim: the dry run renders
    the whole pipeline, the score stage included, and queues nothing."""
    (show,) = readme_commands("configs show")
    proc = subprocess.run(show, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "sindy:" in proc.stdout and "n_trajectories" in proc.stdout
    (dry,) = readme_commands("--dry-run")
    proc = subprocess.run(dry, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    stages = re.findall(r"^# ===== stage (\S+) =====$", proc.stdout, re.M)
    assert stages == ["train-ae", "encode", "train-dit", "score", "sindy"], stages
