"""The checkpoint store of the training stages: listing, writing, verifying and loading checkpoints.

Checkpoints are Accelerate ``save_state`` folders written under a temporary name and renamed into place once every
rank has written its part; the last file written is ``checkpoint.sha256`` over every other file (see
training/runtime.py's docstring). The loop (training/loop.py) calls this module; it never calls back.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from configs.cli import UserError
from configs.io import atomic_save_safetensors, atomic_write_text, file_sha256, fsync_path

CKPT_RE = re.compile(r"^step_(\d{8})$")
MANIFEST = "checkpoint.sha256"


@dataclass
class TrainState:
    """Where a run is: optimizer steps done and the position in the data stream."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    config_digest: str = ""


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Checkpoint folders, oldest first (temporary folders of killed saves are ignored).

    Whether one is intact is ``verify_checkpoint``'s business.
    """
    if not ckpt_root.is_dir():
        return []
    return sorted((p for p in ckpt_root.iterdir() if CKPT_RE.match(p.name) and p.is_dir()), key=lambda p: p.name)


def write_manifest(folder: Path) -> None:
    """fsync every file of ``folder``, then write and fsync MANIFEST over them (last)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    lines = []
    for p in files:
        fsync_path(p)
        lines.append(f"{file_sha256(p)}  {p.relative_to(folder).as_posix()}\n")
    for d in {p.parent for p in files} | {folder}:
        fsync_path(d)
    atomic_write_text(folder / MANIFEST, "".join(lines))


def verify_checkpoint(path: Path) -> str | None:
    """None if ``path`` is a complete checkpoint whose files match its MANIFEST, else why not."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return f"no {MANIFEST} (incomplete or written by an older version)"
    try:
        entries = [line.split("  ", 1) for line in manifest.read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        return f"unreadable {MANIFEST} ({e})"
    if not entries or any(len(e) != 2 for e in entries):
        return f"malformed {MANIFEST}"
    for digest, rel in entries:
        f = path / rel
        if ".." in Path(rel).parts or not f.is_file():
            return f"{rel} is missing"
        if file_sha256(f) != digest:
            return f"{rel} does not match its recorded sha256 (truncated or corrupted)"
    if not (path / "train_state.json").is_file():
        return "no train_state.json"
    return None


def resolve_resume(resume: str, ckpt_root: Path, warn: Callable[[str], None] | None = None) -> Path | None:
    """Map the ``resume`` setting to a checkpoint folder (or None for a fresh start).

    ``resume=auto`` takes the newest intact checkpoint; each broken one newer than it is
    reported through ``warn`` (one line each) and skipped.

    Raises:
        UserError: ``resume=none`` over existing checkpoints, or ``resume=PATH`` to a folder that
            is not an intact checkpoint.
    """
    found = list_checkpoints(ckpt_root)
    if resume == "none":
        if found:
            raise UserError(
                f"{ckpt_root} already holds checkpoints ({found[-1].name}); pass resume=auto to "
                "continue, or pick another run.name"
            )
        return None
    if resume == "auto":
        for path in reversed(found):
            problem = verify_checkpoint(path)
            if problem is None:
                return path
            if warn is not None:
                warn(f"warning: resume=auto: skipping checkpoint {path}: {problem}")
        return None
    path = Path(resume)
    if not path.is_dir():
        raise UserError(f"resume={resume}: no such checkpoint folder")
    problem = verify_checkpoint(path)
    if problem is not None:
        raise UserError(f"resume={resume}: not an intact checkpoint: {problem}")
    return path


def save_checkpoint(
    acc: Accelerator,
    ckpt_root: Path,
    state: TrainState,
    keep: int,
    generator: torch.Generator,
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save model/optimizer (Accelerate), our counters, this rank's generator and ``extra``.

    All ranks must call this (Accelerate's save_state is collective under DeepSpeed). The LR
    scheduler is not saved: it is a function of ``state.step`` (see ``restore_scheduler``).
    """
    final = ckpt_root / f"step_{state.step:08d}"
    tmp = ckpt_root / f".tmp-step_{state.step:08d}"
    if acc.is_main_process:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    rank = acc.process_index
    save_file({"state": generator.get_state()}, str(tmp / f"generator_rank{rank}.safetensors"))
    acc.wait_for_everyone()
    if acc.is_main_process:
        if extra:
            save_file(
                {k: v.detach().float().cpu().contiguous() for k, v in extra.items()}, str(tmp / "extra.safetensors")
            )
        (tmp / "train_state.json").write_text(json.dumps(asdict(state), indent=1))
        write_manifest(tmp)
        if final.exists():  # re-saving the same step (e.g. end of a resumed run)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_path(ckpt_root)
        for old in list_checkpoints(ckpt_root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def set_aside_newer(ckpt_root: Path, step: int) -> list[Path]:
    """Rename broken checkpoints newer than ``step`` (those resume=auto skipped) to
    ``corrupt-step_*``, so that pruning old checkpoints never keeps them over intact ones."""
    moved = []
    for p in list_checkpoints(ckpt_root):
        if int(CKPT_RE.match(p.name).group(1)) > step and verify_checkpoint(p) is not None:
            dest = p.with_name("corrupt-" + p.name)
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(p, dest)
            moved.append(dest)
    return moved


def check_checkpoint(path: Path, expect_digest: str) -> TrainState:
    """Read a checkpoint's counters; refuse one written with another model/optimizer configuration."""
    try:
        state = TrainState(**json.loads((path / "train_state.json").read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"checkpoint {path}: unreadable train_state.json ({e})") from None
    if state.config_digest and state.config_digest != expect_digest:
        raise UserError(
            f"checkpoint {path} was written with a different model/optimizer configuration "
            f"(digest {state.config_digest} != {expect_digest}); resume it with its own "
            "config.yaml or start a new run.name"
        )
    return state


def preflight_resume(
    resume: str, ckpt_root: Path, expect_digest: str, warn: Callable[[str], None] | None = None
) -> tuple[Path | None, int]:
    """The checkpoint to resume from (None: a fresh start) and its step, checked before any
    output is written.

    Raises:
        UserError: ``resume`` cannot be honoured (see ``resolve_resume`` and ``check_checkpoint``).
    """
    path = resolve_resume(resume, ckpt_root, warn)
    if path is None:
        return None, 0
    return path, check_checkpoint(path, expect_digest).step


def load_checkpoint(
    acc: Accelerator, path: Path, generator: torch.Generator, expect_digest: str
) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """Restore what ``save_checkpoint`` wrote; refuses a checkpoint of a different configuration."""
    state = check_checkpoint(path, expect_digest)
    try:
        acc.load_state(str(path))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path} does not fit this model: {first}") from None
    except (OSError, EOFError, ValueError) as e:  # changed on disk after it was verified
        raise UserError(f"checkpoint {path} could not be read ({type(e).__name__}: {e})") from None
    gfile = path / f"generator_rank{acc.process_index}.safetensors"
    if not gfile.is_file():
        raise UserError(f"{gfile} is missing: the checkpoint was written with fewer processes than this run")
    generator.set_state(load_file(str(gfile))["state"])
    extra_file = path / "extra.safetensors"
    extra = load_file(str(extra_file)) if extra_file.is_file() else {}
    return state, extra


def clean_stale_tmp(ckpt_root: Path) -> None:
    if ckpt_root.is_dir():
        for p in ckpt_root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


def save_weights(module: torch.nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Final weights as safetensors, written atomically."""
    sd = {k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}
    atomic_save_safetensors(sd, path, metadata)
