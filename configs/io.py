"""The IO every package needs: atomic writes, file digests and the choice of a torch device.

An atomic write goes to a temporary file in the destination's folder (``.tmp-<name>.<pid>``:
the same file system, so ``os.replace`` is a rename; the ``.tmp-`` prefix lets the shard
writer and the checkpoint cleaner recognise leftovers of a killed process), is fsynced, then
renamed over the destination, and the folder is fsynced so the rename itself survives a
crash. A reader therefore sees the old file or the complete new one, never a torn one. A
failed write (disk full, permission denied) removes its temporary file.

torch and safetensors are imported where they are used: the data pipeline and the shell
helpers (``python -m configs``) import this module without needing them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError

from configs.errors import UserError

if TYPE_CHECKING:
    import torch

TMP_PREFIX = ".tmp-"
_HASH_CHUNK = 1 << 20

__all__ = [
    "TMP_PREFIX",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_save_safetensors",
    "fsync_path",
    "file_sha256",
    "resolve_device",
]


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync a file or a folder (a folder's fsync makes the renames and new names in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: str | os.PathLike[str]) -> Path:
    """Where :func:`atomic_write` writes ``path`` before renaming it into place."""
    path = Path(path)
    return path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Create ``path`` atomically: ``write(tmp)`` writes the content to ``tmp``, which is then
    fsynced and renamed to ``path``; the folder is fsynced last. Returns ``path``."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except Exception:
        # Disk full, permission denied: no half-written temp file stays behind. A kill or Ctrl-C
        # may leave one; its owners recognise it by the .tmp- prefix and remove it.
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> Path:
    """``safetensors.torch.save_file`` made atomic (see :func:`atomic_write`); the tensors are
    saved as given (callers choose dtype, device and contiguity)."""
    # heavy dependency (safetensors.torch imports torch): configs is imported by the config and cluster
    # commands, which must start fast without torch
    from safetensors.torch import save_file

    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_safetensors(
    path: str | os.PathLike[str],
    *,
    missing: str,
    what: str | None = None,
    hint: str = "",
    error: type[Exception] | None = None,
) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, on the CPU, or one clear error.

    Args:
        path: the file.
        missing: the whole message when the file does not exist (say what makes it).
        what: how the message names an unreadable file (default: the path).
        hint: appended to the unreadable-file message (e.g. how to make a good one).
        error: the exception class (default configs.errors.UserError; a subclass of it keeps the one-line CLI).
    """
    # heavy dependency (safetensors.torch imports torch): the config and cluster commands must start fast
    from safetensors.torch import load_file

    error = error or UserError
    path = Path(path)
    if not path.is_file():
        raise error(missing)
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exn:
        raise error(f"{what or path} is not a readable safetensors file ({exn}){hint}") from None


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file, read in 1 MiB blocks (shards, weights, manifests)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_HASH_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The torch device to compute on.

    Args:
        device: None or "auto" (CUDA if available, else CPU), or an explicit device.

    Raises:
        configs.cli.UserError: a CUDA device was asked for where CUDA is not available.
    """
    # heavy dependency: torch (seconds to import), which the config and cluster commands must start fast without
    import torch

    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"device={str(device)!r} was requested but CUDA is not available here; use device='cpu' or device='auto'"
        )
    return dev
