"""One job per run folder and stage: ``run_dir/.locks/<stage>.lock``.

Two jobs on one folder and stage would both do all the work and the last writer would win (and TensorBoard
would get every scalar twice). A stage therefore takes this lock before its first write; a second job finds it
held and stops with one line naming the holder (host, pid, start time) and exit code 2.

The lock is ``fcntl.flock`` on the file (the kernel releases it when its process dies, however it dies; Linux
NFS clients map it to a POSIX lock the server sees), plus a JSON record of the holder in the same file, for the
message. A record left by a killed job is stale: its lock was released with the process, so the next job takes
it over and says so. On a file system without flock (ENOLCK, EOPNOTSUPP) the record alone decides: a holder on
this host whose pid is gone (or now belongs to a later process) is stale; one on another host is taken to be
alive. Written by hand because the maintained lock packages (filelock, portalocker) say nothing about who holds
a lock nor whether a holder died.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from configs.errors import UserError

__all__ = ["StageLocked", "StageLock", "acquire_stage_lock"]

LOCK_DIR = ".locks"
_HELD: dict[str, StageLock] = {}  # path -> this process's lock (a stage run twice in one process reuses it)


class StageLocked(UserError):
    """Another job holds the run folder's lock for this stage."""


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22): tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(record: dict) -> bool:
    """Whether the record's process still runs (only answerable on its own host)."""
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    started = record.get("proc_start")
    return started is None or _proc_start(pid) in (None, started)


def _describe(record: dict) -> str:
    when = record.get("started_utc", "an unknown time")
    return f"host {record.get('host', '?')} pid {record.get('pid', '?')} (started {when})"


class StageLock:
    """A held lock; :meth:`release` (or leaving the ``with`` block, or the process ending) frees it.

    Stages keep it until their process ends: the kernel then releases the flock, and a normal exit also clears
    the holder record (atexit), so only a killed job leaves a record behind for the next one to take over.
    """

    def __init__(self, path: Path, fd: int, stale: dict | None) -> None:
        self.path, self.fd = path, fd
        self.stale = stale
        """The record of a dead holder this lock took over, or None."""

    def release(self) -> None:
        if self.fd < 0:
            return
        _HELD.pop(str(self.path), None)
        try:
            os.ftruncate(self.fd, 0)  # a clean exit leaves no holder record behind
        finally:
            os.close(self.fd)  # closing the file releases the flock
            self.fd = -1

    def __enter__(self) -> StageLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_record(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 1 << 16)
    try:
        record = json.loads(raw) if raw.strip() else {}
    except ValueError:
        record = {}
    return record if isinstance(record, dict) else {}


def acquire_stage_lock(run_dir: str | os.PathLike[str], stage: str) -> StageLock:
    """Take the lock of ``stage`` in ``run_dir`` (creating the folder) or stop with one line naming its holder.

    Args:
        run_dir: the run folder.
        stage: the stage's name (``ae``, ``latents``, ``dit``, ``score``, ``sindy``).

    Returns:
        The held lock; a stale record of a dead holder is reported once on stderr and replaced.

    Raises:
        StageLocked: another live job holds it (exit code 2 through configs.cli).
    """
    path = Path(run_dir) / LOCK_DIR / f"{stage}.lock"
    if str(path) in _HELD:
        return _HELD[str(path)]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        record = _read_record(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked_by_kernel = True
        except BlockingIOError:
            raise StageLocked(_held_message(path, stage, _read_record(fd) or record)) from None
        except OSError as exn:
            if exn.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            locked_by_kernel = False
        here = socket.gethostname()
        if record.get("pid") is not None and not locked_by_kernel:
            if record.get("host") != here or _alive(record):
                raise StageLocked(
                    _held_message(path, stage, record) + f" (this file system has no flock: delete {path} if that "
                    "job is gone)"
                )
        stale = record if record.get("pid") is not None else None
        if stale is not None:
            print(
                f"warning: took over the lock of stage {stage} in {run_dir}: its holder, {_describe(stale)}, is no "
                "longer running",
                file=sys.stderr,
                flush=True,
            )
        mine = {
            "host": here,
            "pid": os.getpid(),
            "proc_start": _proc_start(os.getpid()),
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "stage": stage,
            "command": " ".join(sys.argv)[:500],
        }
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(mine) + "\n").encode())
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    lock = StageLock(path, fd, stale)
    _HELD[str(path)] = lock
    atexit.register(lock.release)  # a normal exit (sys.exit included) clears the record; a kill leaves it stale
    return lock


def _held_message(path: Path, stage: str, record: dict) -> str:
    return (
        f"run folder {path.parent.parent} is in use: stage {stage} is running there as {_describe(record)} "
        f"(lock {path}); wait for that job to end or stop it, or use another run.name"
    )
