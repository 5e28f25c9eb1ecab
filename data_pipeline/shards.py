"""Writing the deterministic webdataset shards of MNIST, their manifest, and verification.

Layout (webdataset convention, https://github.com/webdataset/webdataset#the-webdataset-format):
``DIR/{split}-{i:06d}.tar``, each sample ``{split}_{index:06d}.png`` (8-bit grayscale PNG,
28x28) followed by ``{split}_{index:06d}.cls`` (label as ASCII digits). ``DIR/manifest.json``
lists every shard with its sample count, size and sha256, and is written last.

Guarantees:

* Byte-identical output for identical input: PNGs are encoded with zlib at a fixed level
  (data_pipeline/png.py), tar members are USTAR with mtime 0, uid/gid 0, empty owner names,
  mode 0o644. (Reading them back: data_pipeline/tar_reader.py.)
* Atomic: every file is written as ``DIR/.tmp-*`` and ``os.replace``d into place (configs.io); the old
  manifest is removed before any shard changes and the new one is written after all shards,
  so an interrupted run never leaves a manifest describing files that are not all there.
* Idempotent: a run whose parameters and source digest match a manifest whose files verify
  does nothing.
* Refuses directories holding files it did not write (anything other than
  ``manifest.json``, ``{train,test}-NNNNNN.tar``, ``.tmp-*`` and its lock file), so a typo in
  ``--out`` never mixes shards into an unrelated folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from configs.io import TMP_PREFIX, atomic_write_bytes, file_sha256
from data_pipeline.errors import DataPipelineError
from data_pipeline.mnist_arrays import MnistArrays
from data_pipeline.png import PNG_ZLIB_LEVEL, encode_png_gray
from data_pipeline.sources import load_mnist

__all__ = [
    "MANIFEST_NAME",
    "FORMAT_VERSION",
    "SPLITS",
    "ManifestError",
    "PrepareResult",
    "shard_name",
    "sample_key",
    "write_shard_bytes",
    "read_manifest",
    "verify_shards",
    "prepare_shards",
]

MANIFEST_NAME = "manifest.json"
FORMAT = "latent-sindy/mnist-webdataset"
FORMAT_VERSION = 1
SPLITS = ("train", "test")
LOCK_NAME = ".prepare.lock"
_SHARD_RE = re.compile(r"^(train|test)-\d{6}\.tar$")


class ManifestError(DataPipelineError):
    """The shard directory or its manifest is missing, incomplete or inconsistent."""


# --------------------------------------------------------------------------- tar


def shard_name(split: str, index: int) -> str:
    """``train-000000.tar`` style shard file name."""
    return f"{split}-{index:06d}.tar"


def sample_key(split: str, index: int) -> str:
    """``train_000123`` style sample key (no dots: webdataset splits keys at the first dot)."""
    return f"{split}_{index:06d}"


def _tar_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    tar.addfile(info, io.BytesIO(payload))


def write_shard_bytes(split: str, start: int, images: np.ndarray, labels: np.ndarray) -> bytes:
    """Build one shard's tar bytes.

    Args:
        split: ``"train"`` or ``"test"`` (used in sample keys).
        start: global index of the first sample (keys are ``{split}_{start + i:06d}``).
        images: uint8 (N, 28, 28).
        labels: int (N,).

    Returns:
        USTAR tar bytes, deterministic for identical arguments.
    """
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, (image, label) in enumerate(zip(images, labels)):
            key = sample_key(split, start + i)
            _tar_member(tar, f"{key}.png", encode_png_gray(image))
            _tar_member(tar, f"{key}.cls", str(int(label)).encode("ascii"))
    return buf.getvalue()


# --------------------------------------------------------------------------- files


@contextmanager
def _dir_lock(directory: Path) -> Iterator[None]:
    # Two prepares on one directory would delete each other's temp files; refuse the second.
    with open(directory / LOCK_NAME, "a") as lock:  # "a": never truncates, keeps mtime
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ManifestError(f"another prepare is writing to {directory}; wait for it to finish") from None
        yield


def manifest_sha256(shard_dir: str | os.PathLike[str]) -> str:
    """sha256 of a shard directory's manifest.json (what a classifier and its statistics record they were made
    from); a missing one, the common "wrong directory" mistake, is a ManifestError naming the fix."""
    path = Path(shard_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(
            f"no {MANIFEST_NAME} in shard directory {str(shard_dir)!r}; "
            f"prepare it with: python -m data_pipeline.prepare --out {shard_dir}"
        )
    return file_sha256(path)


def read_manifest(shard_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate ``shard_dir/manifest.json``.

    Returns:
        The manifest: ``format``, ``format_version``, ``source`` {name, location, digest},
        ``params`` {shard_size, limit, ...}, ``splits`` {split: {total, shards: [{name,
        samples, bytes, sha256}]}}.

    Raises:
        ManifestError: the directory is missing or empty, has no manifest, or the manifest is
            malformed; the message says to run ``python -m data_pipeline.prepare --out DIR``.
    """
    directory = Path(shard_dir)
    fix = f"run `python -m data_pipeline.prepare --out {directory}` first"
    if not directory.is_dir():
        raise ManifestError(f"shard directory {directory} does not exist; {fix}")
    path = directory / MANIFEST_NAME
    if not path.is_file():
        state = "is empty" if not any(directory.iterdir()) else f"has no {MANIFEST_NAME} (incomplete or not prepared)"
        raise ManifestError(f"shard directory {directory} {state}; {fix}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exn:
        raise ManifestError(f"{path} is not valid JSON ({exn}); {fix}") from exn
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ManifestError(f"{path} is not a {FORMAT} manifest; {fix}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ManifestError(
            f"{path} has format_version {manifest.get('format_version')!r}, this code reads "
            f"{FORMAT_VERSION}; re-run `python -m data_pipeline.prepare --out {directory}`"
        )
    try:
        for split in SPLITS:
            info = manifest["splits"][split]
            if sum(int(s["samples"]) for s in info["shards"]) != int(info["total"]):
                raise ManifestError(f"{path}: {split} shard sample counts do not add up to total {info['total']}")
            for s in info["shards"]:
                if not _SHARD_RE.match(str(s["name"])):
                    raise ManifestError(f"{path}: shard name {s['name']!r} is not a {split}-NNNNNN.tar name")
                int(s["bytes"]), str(s["sha256"])
    except (KeyError, TypeError, ValueError) as exn:
        raise ManifestError(f"{path} is missing or has a malformed field ({exn!r}); {fix}") from exn
    return manifest


def verify_shards(shard_dir: str | os.PathLike[str], manifest: dict[str, Any] | None = None) -> list[str]:
    """Re-hash every shard listed in the manifest.

    Returns:
        One human-readable line per problem (missing, wrong size, wrong sha256); empty if
        everything matches.

    Raises:
        ManifestError: no valid manifest (see :func:`read_manifest`).
    """
    directory = Path(shard_dir)
    manifest = manifest if manifest is not None else read_manifest(directory)
    problems = []
    for split in SPLITS:
        for s in manifest["splits"][split]["shards"]:
            path = directory / s["name"]
            if not path.is_file():
                problems.append(f"missing: {path}")
                continue
            size = path.stat().st_size
            if size != s["bytes"]:
                problems.append(f"wrong size: {path} is {size} bytes, manifest says {s['bytes']}")
                continue
            digest = file_sha256(path)
            if digest != s["sha256"]:
                problems.append(f"wrong sha256: {path} is {digest}, manifest says {s['sha256']}")
    return problems


@dataclass
class PrepareResult:
    """What :func:`prepare_shards` did.

    Attributes:
        out_dir: the shard directory.
        manifest: the manifest now on disk.
        up_to_date: True if nothing had to be written.
        written: shard file names written by this run.
        removed: stale files removed (temp files of killed runs, obsolete shards).
    """

    out_dir: Path
    manifest: dict[str, Any]
    up_to_date: bool
    written: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


def _params(shard_size: int, limit: int | None) -> dict[str, Any]:
    return {
        "shard_size": shard_size,
        "limit": limit,
        "image": f"png, 8-bit grayscale, 28x28, zlib level {PNG_ZLIB_LEVEL}, filter 0",
        "label": "cls, ASCII decimal digits",
        "tar": "USTAR, mtime 0, uid/gid 0, mode 0644",
    }


def _check_directory(directory: Path) -> list[Path]:
    """Return our stale temp files; raise if the directory holds files we did not write."""
    foreign, stale = [], []
    for entry in directory.iterdir():
        if entry.name.startswith(TMP_PREFIX):
            stale.append(entry)
        elif entry.name not in (MANIFEST_NAME, LOCK_NAME) and not _SHARD_RE.match(entry.name):
            foreign.append(entry.name)
    if foreign:
        shown = ", ".join(sorted(foreign)[:5]) + (" ..." if len(foreign) > 5 else "")
        raise ManifestError(
            f"{directory} contains files that prepare did not write ({shown}); choose an empty or new --out directory"
        )
    return stale


def prepare_shards(
    out_dir: str | os.PathLike[str],
    *,
    shard_size: int = 10000,
    source: str = "auto",
    arrays: MnistArrays | None = None,
    limit: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> PrepareResult:
    """Write MNIST as webdataset shards + manifest into ``out_dir`` (atomic, idempotent).

    Args:
        out_dir: target directory; created if missing.
        shard_size: samples per shard (the last shard of a split may hold fewer).
        source: MNIST source for :func:`load_mnist` (ignored when ``arrays`` is given).
        arrays: already-loaded MNIST (saves reloading, e.g. in tests).
        limit: keep only the first ``limit`` samples of each split (tests and debugging;
            recorded in the manifest so a limited directory never passes for the full one).
        progress: called as ``progress(split, shard_index, n_shards)`` after each shard.

    Returns:
        PrepareResult.

    Raises:
        ValueError: ``shard_size`` or ``limit`` is not a positive integer.
        ManifestError: ``out_dir`` is not writable, holds foreign files, or is locked.
        SourceUnavailable / SourceCorrupt: from loading the source.
    """
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size <= 0:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    directory = Path(out_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exn:
        raise ManifestError(f"cannot create output directory {directory}: {exn.strerror}") from exn
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ManifestError(f"output directory {directory} is not writable; choose another --out")
    # Load (and verify) the source first: a missing source must fail before touching DIR.
    arrays = arrays if arrays is not None else load_mnist(source)
    params = _params(shard_size, limit)

    with _dir_lock(directory):
        stale = _check_directory(directory)
        removed = []
        for path in stale:
            path.unlink(missing_ok=True)
            removed.append(path.name)

        old = None
        if (directory / MANIFEST_NAME).is_file():
            try:
                old = read_manifest(directory)
            except ManifestError:
                old = None  # unreadable or old-format manifest: rewrite everything
        if (
            old is not None
            and old["params"] == params
            and old["source"]["digest"] == arrays.source_digest
            and not verify_shards(directory, old)
        ):
            return PrepareResult(directory, old, up_to_date=True, removed=removed)

        # From here on the directory must not look complete until the new manifest lands.
        (directory / MANIFEST_NAME).unlink(missing_ok=True)
        splits: dict[str, Any] = {}
        written = []
        for split in SPLITS:
            images, labels = arrays.split(split)
            n = images.shape[0] if limit is None else min(limit, images.shape[0])
            n_shards = -(-n // shard_size)
            shards = []
            for i in range(n_shards):
                lo, hi = i * shard_size, min(n, (i + 1) * shard_size)
                payload = write_shard_bytes(split, lo, images[lo:hi], labels[lo:hi])
                name = shard_name(split, i)
                atomic_write_bytes(directory / name, payload)
                written.append(name)
                shards.append(
                    {
                        "name": name,
                        "samples": hi - lo,
                        "bytes": len(payload),
                        "sha256": hashlib.sha256(payload).hexdigest(),
                    }
                )
                if progress is not None:
                    progress(split, i, n_shards)
            splits[split] = {"total": n, "shards": shards}

        # Shards of an earlier run with another shard size would otherwise linger unlisted.
        for entry in directory.iterdir():
            if _SHARD_RE.match(entry.name) and entry.name not in written:
                entry.unlink()
                removed.append(entry.name)

        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "source": {
                "name": arrays.source_name,
                "location": arrays.source_location,
                "digest": arrays.source_digest,
            },
            "params": params,
            "splits": splits,
        }
        atomic_write_bytes(directory / MANIFEST_NAME, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
        return PrepareResult(directory, manifest, up_to_date=False, written=written, removed=removed)
