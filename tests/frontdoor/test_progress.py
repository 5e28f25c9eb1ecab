"""Progress of long steps: plain lines without a terminal (Slurm logs, files), tqdm's bar on one."""

from __future__ import annotations

import io
import re

from configs.progress import PROGRESS_ENV, progress
from data_pipeline.prepare import main as prepare_main


def test_lines_without_a_terminal(monkeypatch):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    out = io.StringIO()  # not a tty
    with progress(1000, "encode: train", unit="images", file=out) as bar:
        for _ in range(40):
            bar.update(25)
    text = out.getvalue()
    assert "\r" not in text
    counts = [int(m) for m in re.findall(r"^encode: train: (\d+)/1000 images \(\d+%\) [\d.]+ s$", text, re.M)]
    assert counts == [100, 200, 300, 400, 500, 600, 700, 800, 900, 1000]


def test_bar_when_asked(monkeypatch):
    monkeypatch.setenv(PROGRESS_ENV, "bar")
    out = io.StringIO()
    with progress(10, "fits", file=out) as bar:
        bar.update(10)
    assert "\r" in out.getvalue() and "10/10" in out.getvalue()  # tqdm's own bar


def test_prepare_reports_each_shard(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    assert prepare_main(["--out", str(tmp_path / "shards"), "--shard-size", "30000"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    assert re.findall(r"^prepare: (\w+): (\d)/(\d) shards", err, re.M) == [
        ("train", "1", "2"),
        ("train", "2", "2"),
        ("test", "1", "1"),
    ]


def test_ray_tasks_progress_in_plain_lines(monkeypatch, capsys):
    """The equation-discovery job's progress over Ray tasks (trajectory blocks, fits) in a log."""
    ray = __import__("pytest").importorskip("ray")
    from analysis.job.ray_utils import wait_all

    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        square = ray.remote(lambda i: i * i)
        assert wait_all([square.remote(i) for i in range(20)], "fits") == [i * i for i in range(20)]
    finally:
        ray.shutdown()
    err = capsys.readouterr().err
    assert "\r" not in err
    assert re.findall(r"^fits: (\d+)/20 tasks", err, re.M) == [str(n) for n in range(2, 21, 2)]
