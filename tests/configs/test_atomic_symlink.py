"""configs.io.atomic_symlink: the `latest` pointer of versioned outputs."""

from __future__ import annotations

import pytest

from configs.io import atomic_symlink


def test_points_and_repoints(tmp_path):
    (tmp_path / "reports" / "a").mkdir(parents=True)
    (tmp_path / "reports" / "b").mkdir()
    (tmp_path / "reports" / "b" / "report.md").write_text("b")
    link = tmp_path / "report"
    atomic_symlink(link, "reports/a")
    assert link.resolve() == (tmp_path / "reports" / "a").resolve()
    atomic_symlink(link, "reports/b")
    assert (link / "report.md").read_text() == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report", "reports"]  # no temporary left


def test_refuses_to_replace_a_real_folder(tmp_path):
    (tmp_path / "report").mkdir()
    with pytest.raises(FileExistsError, match="not a pointer"):
        atomic_symlink(tmp_path / "report", "reports/a")
