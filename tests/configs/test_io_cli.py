"""configs.io (atomic writes, digests, the device choice) and configs.cli (the one error convention)."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

from configs.cli import LAUNCH_DIR_ENV, UserError, call_cli, run_cli
from configs.io import atomic_save_safetensors, atomic_write, atomic_write_text, file_sha256, resolve_device
from configs.schema import ConfigError
from data_pipeline.shards import ManifestError


def test_atomic_write_replaces_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_failed_atomic_write_keeps_the_old_file_and_removes_its_temp(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_atomic_safetensors_and_sha256(tmp_path):
    from safetensors.torch import load_file

    path = atomic_save_safetensors({"x": torch.arange(6.0).reshape(2, 3)}, tmp_path / "w.safetensors", {"k": "v"})
    assert torch.equal(load_file(str(path))["x"], torch.arange(6.0).reshape(2, 3))
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.parametrize(
    "error",
    [UserError("bad run"), ConfigError("bad key"), ManifestError("no manifest"), FileNotFoundError("no such file")],
)
def test_expected_errors_are_one_line_and_exit_2(error, capsys, monkeypatch):
    monkeypatch.delenv(LAUNCH_DIR_ENV, raising=False)

    def main(argv):
        raise error

    assert call_cli(main, [], prog="tool") == 2
    assert capsys.readouterr().err == f"tool: error: {error}\n"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [], prog="tool")
    assert exit_info.value.code == 2


def test_other_errors_keep_their_traceback_and_codes_pass_through():
    def crash(argv):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        call_cli(crash, [])
    assert call_cli(lambda argv: 1, []) == 1
    assert call_cli(lambda argv: None, []) == 0


def test_under_the_launcher_the_error_is_recorded(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(LAUNCH_DIR_ENV, str(tmp_path))

    def main(argv):
        raise UserError("first line\nsecond line")

    monkeypatch.setenv("WORLD_SIZE", "1")
    assert call_cli(main, [], prog="tool") == 0  # accelerate launch would wrap a nonzero exit in a traceback
    assert capsys.readouterr().err == "tool: error: first line second line\n"
    assert [p.name for p in tmp_path.iterdir()] == [f"usererror.{os.getpid()}"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert call_cli(main, [], prog="tool") == 2  # the launcher must stop the other ranks


def test_read_safetensors_reads_or_says_what_is_wrong(tmp_path):
    import torch
    from safetensors.torch import save_file

    from configs.cli import UserError
    from configs.io import read_safetensors

    good = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(3.0)}, str(good))
    assert torch.equal(read_safetensors(good, missing="-")["a"], torch.arange(3.0))
    with pytest.raises(UserError, match=r"^nothing here: train it first$"):
        read_safetensors(tmp_path / "none.safetensors", missing="nothing here: train it first")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 40)

    class OwnError(UserError):
        pass

    with pytest.raises(OwnError, match=r"^the weights is not a readable safetensors file \(.*\); make new ones$"):
        read_safetensors(bad, missing="-", what="the weights", hint="; make new ones", error=OwnError)


def test_replace_folder_swaps_a_complete_folder_in(tmp_path):
    from configs.io import replace_folder

    dest = tmp_path / "report"
    new = tmp_path / ".tmp-report.1"
    new.mkdir()
    (new / "report.md").write_text("first")
    assert replace_folder(new, dest) == dest and (dest / "report.md").read_text() == "first" and not new.exists()
    new.mkdir()
    (new / "report.md").write_text("second")
    (new / "plot.png").write_bytes(b"png")
    (dest / "stale.png").write_bytes(b"old")
    replace_folder(new, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["plot.png", "report.md"]
    assert (dest / "report.md").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # neither the new nor the old folder left
