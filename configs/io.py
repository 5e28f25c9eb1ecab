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

import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import shutil
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
    "atomic_symlink",
    "fsync_path",
    "file_sha256",
    "read_json",
    "remove_temporaries",
    "replace_folder",
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


def atomic_symlink(link: str | os.PathLike[str], target: str) -> Path:
    """Point ``link`` at ``target`` (a path relative to the link's folder) atomically: a reader
    sees the old target or the new one, never no link. A real folder in the way is an error
    (FileExistsError), never replaced."""
    link = Path(link)
    if link.exists() and not link.is_symlink():
        raise FileExistsError(f"{link} is a real file or folder, not a pointer; move it away first")
    tmp = temp_path(link)
    with suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_path(link.parent)
    return link


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
        raise error(f"{what or path} is not a readable safetensors file (truncated or corrupt: {exn}){hint}") from None


def remove_temporaries(
    folder: str | os.PathLike[str], name: str = f"{TMP_PREFIX}*", recursive: bool = True
) -> list[Path]:
    """Delete every ``.tmp-*`` file or folder under ``folder`` (what an interrupted atomic write or a killed
    process left behind); returns what was removed. Call it only while holding the folder's stage lock
    (configs.lock), so that no live writer's temporary file is taken.

    ``name`` (a glob starting with ``.tmp-``) narrows it to one writer's temporaries, and ``recursive=False`` to
    ``folder`` itself: for a folder that other stages write into too (a run folder)."""

    if not name.startswith(TMP_PREFIX):
        raise ValueError(f"remove_temporaries removes {TMP_PREFIX}* only, not {name!r}")
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = sorted((folder.rglob if recursive else folder.glob)(name), key=lambda p: len(p.parts))
    removed = []
    for p in found:
        if not os.path.lexists(p):
            continue  # inside a folder removed before it
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with suppress(FileNotFoundError):
                p.unlink()
        removed.append(p)
    return removed


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system or file system
    cannot. Through ctypes because Python's os module has no renameat2."""

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def replace_folder(new: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Put the complete folder ``new`` at ``dest`` (same parent folder), replacing what was there.

    A reader sees the old folder or the new one, never a mix: the two are exchanged in one rename
    where the system can (renameat2), else ``dest`` is renamed aside first (a crash between the two
    renames leaves no ``dest`` at all, and the old one beside it as ``.tmp-old-<name>.<pid>``), then
    the old one is deleted. Returns ``dest``.
    """

    new, dest = Path(new), Path(dest)
    for f in new.rglob("*"):
        if f.is_file():
            fsync_path(f)
    fsync_path(new)
    if not dest.exists():
        os.rename(new, dest)
    elif _exchange(new, dest):
        shutil.rmtree(new)  # now the old folder
    else:
        old = dest.with_name(f"{TMP_PREFIX}old-{dest.name}.{os.getpid()}")
        os.rename(dest, old)
        os.rename(new, dest)
        shutil.rmtree(old)
    fsync_path(dest.parent)
    return dest


def read_json(
    path: str | os.PathLike[str], *, missing: str, hint: str = "", max_bytes: int = 64 << 20, error: type | None = None
) -> dict:
    """A JSON object from a file that a stage wrote, or one clear line naming the file.

    Args:
        path: the file.
        missing: the whole message when the file does not exist (say what makes it).
        hint: appended to the other messages (how to make a good file).
        max_bytes: larger files are refused unread (these are small metadata files).
        error: the exception class (default configs.errors.UserError).

    Raises:
        error: missing, larger than ``max_bytes``, truncated or invalid JSON, or not a JSON object.
    """

    error = error or UserError
    path = Path(path)
    if not path.is_file():
        raise error(missing)
    size = path.stat().st_size
    if size > max_bytes:
        raise error(f"{path} is {size} bytes, more than the {max_bytes} a metadata file may have{hint}")
    try:
        data = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError) as exn:
        raise error(f"{path} is unreadable ({exn}){hint}") from None
    except ValueError as exn:
        raise error(f"{path} is truncated or not valid JSON ({exn}){hint}") from None
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object, found {type(data).__name__}{hint}")
    return data


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
