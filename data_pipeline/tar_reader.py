"""Reading the shards: samples of an in-memory ustar tar, grouped by webdataset key."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from data_pipeline.errors import DataPipelineError

__all__ = ["ShardError", "iter_tar_samples"]


class ShardError(DataPipelineError):
    """A shard file is unreadable, truncated or corrupt."""


def iter_tar_samples(data: bytes, url: str) -> Iterator[dict[str, Any]]:
    """Samples ({"__key__", "__url__", ext: bytes}) of an in-memory ustar tar, grouped by key.

    Written by hand because webdataset reads tars through Python's tarfile, whose header parsing
    costs about 100 us per member: two thirds of the loader's time on MNIST (28x28 PNGs). This
    reader parses the ustar header fields it needs (name, size, type, checksum) straight from
    the bytes. Keys follow webdataset's rule: the basename up to its first dot.

    Raises:
        ShardError: a bad header checksum, a size past the end (truncation), or a member type
            other than regular files and directories (pax/GNU long names: re-write the shards
            with python -m data_pipeline.prepare).
    """
    view = memoryview(data)
    pos, n = 0, len(data)
    current: dict[str, Any] | None = None
    while pos + 512 <= n:
        header = data[pos : pos + 512]
        if header.count(0) == 512:
            break  # end-of-archive block
        stored = header[148:156].split(b"\0", 1)[0].strip()
        try:
            chksum = int(stored, 8)
            size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            raise ShardError(f"corrupt tar header at byte {pos} of {url}") from None
        if chksum != sum(header[:148]) + 256 + sum(header[156:]):
            raise ShardError(f"corrupt tar header at byte {pos} of {url} (checksum mismatch)")
        kind = header[156:157]
        name = header[:100].split(b"\0", 1)[0].decode("utf-8")
        prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8") if header[257:262] == b"ustar" else ""
        start, pos = pos + 512, pos + 512 + (size + 511) // 512 * 512
        if kind == b"5":
            continue
        if kind not in (b"0", b"\0"):
            raise ShardError(f"tar member {name!r} of {url} has type {kind!r}; only plain ustar files are supported")
        if start + size > n:
            raise ShardError(f"truncated tar: member {name!r} of {url} ends past the end of the file")
        full = f"{prefix}/{name}" if prefix else name
        slash = full.rfind("/") + 1
        dot = full.find(".", slash)
        if dot < 0:
            continue  # no extension: webdataset ignores such members too
        key, ext = full[:dot], full[dot + 1 :]
        if current is None or current["__key__"] != key:
            if current is not None:
                yield current
            current = {"__key__": key, "__url__": url}
        current[ext] = bytes(view[start : start + size])
    else:
        if pos != n:
            raise ShardError(f"truncated tar: {url} ends inside a header")
    if current is not None:
        yield current
