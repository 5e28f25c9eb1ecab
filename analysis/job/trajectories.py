"""Denoising trajectories of a trained latent DiT: generation in seeded blocks, shards, manifest, readers.

References:
    J. Ho, A. Jain, P. Abbeel, "Denoising Diffusion Probabilistic Models", NeurIPS 2020 (ancestral
    sampling, the reference study's sampler); J. Song, C. Meng, S. Ermon, "Denoising Diffusion
    Implicit Models", ICLR 2021 (DDIM, eta = 0: deterministic); Y. Song et al., "Score-Based
    Generative Modeling through Stochastic Differential Equations", ICLR 2021 (probability-flow
    ODE). The samplers themselves live in models/diffusion.py; this module only records them.
    The study reproduced: the SINDy study, phase 3 (docs/REFERENCES.md).

Time convention (the one of models/diffusion.py, used everywhere in analysis/): state k of a
trajectory sits at t = 1 - k/T (z_T first at t = 1, the sample z_0 last at t = 0), dt = 1/T, and
velocities are dz/dt in *increasing* t, so one sampler step is z[k+1] = z[k] - dt * drift[k].

Determinism: trajectories come in blocks of ``block_size``; block b takes all its randomness
from generators seeded by ``block_seed(seed, b)`` (the initial noise from a CPU generator, so
z_T is the same on any device; DDPM's injected noise from a generator on the sampling device).
Workers take whole blocks, so N trajectories are the same whatever the number of workers (on
one device type; CPU and CUDA kernels differ in the last bits).

On disk (``<run>/sindy/trajectories/<sampler>-seed<S>-bs<B>-<dit digest>/``):
    block-000000.safetensors   z (T+1, b, D), eps (T, b, D), drift (T, b, D) float32 and
                               t (T+1,) float64, D = N*C the flattened latent; metadata: block,
                               count, seed, sampler, digests (one JSON object, so the file's bytes
                               are a function of its contents: a regenerated block has the same sha256)
    manifest.json              written last, once every block is there: N, T, sampler, seed,
                               block list with sha256, dit_ema / ae sha256, latent shape, t convention
A folder without manifest.json is an unfinished stage; finished blocks are reused on rerun.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from configs.cli import UserError
from configs.io import atomic_save_safetensors, atomic_write_text, file_sha256
from models.artifacts import describe_nonfinite
from models.diffusion import sample

MANIFEST_FORMAT = "latent-sindy.trajectories/1"
BLOCK_META_KEY = "latent_sindy_block"  # the block's safetensors metadata: one sorted JSON object
T_CONVENTION = "state k at t = 1 - k/T (z_T first, t = 1; z_0 last, t = 0); dt = 1/T; velocities are dz/dt"


def block_seed(seed: int, block: int) -> int:
    """A 63-bit seed for block ``block`` of a job seeded with ``seed`` (no overlap between blocks)."""
    digest = hashlib.sha256(f"latent-sindy:{seed}:{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def plan_blocks(n: int, block_size: int) -> list[tuple[int, int]]:
    """[(block index, trajectories in the block)] covering n trajectories; the last may be short."""
    return [(b, min(block_size, n - b * block_size)) for b in range(math.ceil(n / block_size))]


def block_name(block: int, count: int) -> str:
    # The count is part of the name: a short last block is not a prefix of a full one (DDPM draws
    # noise for the whole batch at each step), so it may only be reused at the same size.
    return f"block-{block:06d}-n{count}.safetensors"


def trajectory_dir(run_dir: Path, sampler: str, seed: int, block_size: int, dit_sha256: str) -> Path:
    """Where the trajectories of one (sampler, seed, block size, checkpoint) live; N only adds blocks."""
    return run_dir / "sindy" / "trajectories" / f"{sampler}-seed{seed}-bs{block_size}-{dit_sha256[:12]}"


@torch.no_grad()
def generate_block(
    model: torch.nn.Module,
    schedule,
    latent_shape: tuple[int, int],
    sampler: str,
    seed: int,
    block: int,
    count: int,
    device: torch.device | str,
) -> dict[str, torch.Tensor]:
    """Sample ``count`` trajectories of block ``block`` and record every state.

    Args:
        model: the EMA DiT in eval mode on ``device`` (eps prediction on normalised latents).
        schedule: its models.schedules.Schedule on ``device``.
        latent_shape: (N, C) of one latent.
        sampler: "ddpm" (ancestral, beta variance, as the reference) | "ddim" (eta = 0) | "ode".
        seed, block: the block's randomness is a function of these two only.
        count: trajectories in the block.
        device: sampling device.

    Returns:
        {"z": (T+1, count, N*C) float32, "eps": (T, count, N*C), "drift": (T, count, N*C),
        "t": (T+1,) float64 descending 1 -> 0}, all on CPU.
    """

    device = torch.device(device)
    s = block_seed(seed, block)
    z_T = torch.randn((count, *latent_shape), generator=torch.Generator().manual_seed(s))  # (B, N, C)
    g = torch.Generator(device=device).manual_seed(s + 1)
    res = sample(
        model,
        schedule,
        (count, *latent_shape),
        sampler=sampler,
        generator=g,
        noise=z_T.to(device),
        record=True,
        record_device="cpu",
        device=device,
    )
    flat = lambda x: x.reshape(x.shape[0], count, -1).float().contiguous()  # noqa: E731
    return {
        "z": flat(res.z),
        "eps": flat(res.eps),
        "drift": flat(res.drift),
        "t": res.t_norm.to(torch.float64).contiguous(),
    }


def write_block(folder: Path, block: int, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write one block atomically (a killed worker never leaves a file that looks finished); one with NaN or Inf
    is refused (UserError naming array, step, trajectory and dimension) and not written."""
    folder.mkdir(parents=True, exist_ok=True)
    count = int(tensors["z"].shape[1])
    path = folder / block_name(block, count)
    # One metadata key: safetensors stores the metadata as a Rust HashMap, written in a per-process
    # random order, so several keys would make a regenerated block differ in bytes (and sha256) from
    # the original although every tensor is equal, and invalidate the fits keyed by the blocks' digests.
    problem = describe_nonfinite({k: tensors.get(k) for k in ("z", "drift", "eps", "t")})
    if problem:  # never written, so no block with NaN ever stands behind a manifest
        raise UserError(
            f"the trajectories of block {block} for {path} {problem}: the DiT's sampler diverged (an undertrained or "
            "broken model); train the DiT again or use another sindy.sampler"
        )
    record = json.dumps({**meta, "block": block, "count": count}, sort_keys=True)
    return atomic_save_safetensors(tensors, path, {BLOCK_META_KEY: record})


def block_is_complete(path: Path, expect: dict) -> bool:
    """Whether ``path`` is a readable block written with the metadata ``expect`` (seed, digests, ...).

    safetensors refuses a file its header does not exactly cover, so a truncated block is not
    complete; changed tensor bytes are only caught by the manifest's sha256 (:func:`block_problems`).
    """
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), "pt") as f:
            raw = f.metadata() or {}
        # Blocks written before BLOCK_META_KEY hold one JSON value per metadata key.
        meta = json.loads(raw[BLOCK_META_KEY]) if BLOCK_META_KEY in raw else {k: json.loads(v) for k, v in raw.items()}
    except Exception:  # a torn or foreign file: regenerate it
        return False
    return all(meta.get(k) == v for k, v in expect.items())


# Per-block metadata that write_block records and the manifest repeats (block and count come per entry).
_BLOCK_META_KEYS = ("seed", "sampler", "dit_ema_sha256", "ae_sha256")


def read_trajectory_manifest(path: Path) -> dict:
    """A trajectory manifest, checked for the fields the readers use.

    Raises:
        UserError: missing, unreadable, of another format or malformed (names the file).
    """
    if not path.is_file():
        raise UserError(f"trajectory manifest {path} not found")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"trajectory manifest {path} is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise UserError(
            f"{path} is not a trajectory manifest of this project (format {got!r}, expected {MANIFEST_FORMAT!r})"
        )
    try:
        for b in manifest["blocks"]:
            int(b["block"]), int(b["count"]), str(b["file"]), str(b["sha256"])
        int(manifest["block_size"]), int(manifest["timesteps"]), list(manifest["latent_shape"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"trajectory manifest {path} is missing or has a malformed field ({e!r})") from None
    return manifest


def block_problems(path: Path, manifest: dict) -> list[tuple[Path, str]]:
    """The blocks of a manifest that cannot be used, each with the reason.

    A block must exist, have the sha256 the manifest recorded when it was written (so a truncated
    or modified file is caught, not only a torn header) and carry the per-block metadata of its
    entry (block index, count, seed, sampler, digests), so a file swapped in from another job is
    caught too. Reads every block once (sha256 at disk speed).

    Args:
        path: the manifest.json (blocks are beside it).
        manifest: its contents (:func:`read_trajectory_manifest`).

    Returns:
        [(block file, why)], empty when every block is intact.
    """
    folder, bad = path.parent, []
    common = {k: manifest[k] for k in _BLOCK_META_KEYS if k in manifest}
    for entry in manifest["blocks"]:
        f = folder / entry["file"]
        if not f.is_file():
            bad.append((f, "is missing"))
            continue
        digest = file_sha256(f)
        if digest != entry["sha256"]:
            bad.append(
                (
                    f,
                    f"has sha256 {digest[:12]}, the manifest recorded {entry['sha256'][:12]} "
                    f"({f.stat().st_size} bytes: truncated or modified)",
                )
            )
        elif not block_is_complete(f, {**common, "block": entry["block"], "count": entry["count"]}):
            bad.append((f, "has metadata (block, count, seed, sampler, digests) that differ from its manifest entry"))
        elif problem := describe_nonfinite(load_file(str(f))):  # NaN under a valid (or recomputed) digest
            bad.append((f, problem))
    return bad


def write_manifest(folder: Path, n: int, blocks: list[tuple[int, int]], meta: dict) -> Path:
    """The stage's completion marker: written once every block file is in place."""
    entries = []
    for b, count in blocks:
        p = folder / block_name(b, count)
        entries.append({"block": b, "count": count, "file": p.name, "sha256": file_sha256(p)})
    manifest = {"format": MANIFEST_FORMAT, "n_trajectories": n, "t_convention": T_CONVENTION, **meta, "blocks": entries}
    return atomic_write_text(folder / "manifest.json", json.dumps(manifest, indent=1))


# ----------------------------------------------------------------------------- readers


@dataclass
class TrajectoryBlock:
    """One block in the flattened latent (before any coordinate change).

    Attributes:
        index: (b,) global trajectory indices.
        z: (T+1, b, D) float32 states, z_T first.
        t: (T+1,) float64, 1 -> 0.
        drift: (T, b, D) sampler drift dz/dt at states 0..T-1, or None (external files).
        eps: (T, b, D) the DiT's eps_theta at states 0..T-1, or None (external files).
    """

    index: np.ndarray
    z: np.ndarray
    t: np.ndarray
    drift: np.ndarray | None
    eps: np.ndarray | None = None


class TrajectorySet:
    """Trajectories to fit: this job's blocks (manifest.json) or an external .npz.

    Attributes:
        n: number of trajectories.
        T: steps (states are T+1).
        dim: D, flattened latent size.
        source: "generated" | "npz".
        manifest: provenance (for the report).
    """

    def __init__(self, n: int, T: int, dim: int, source: str, manifest: dict, loader, n_blocks: int):
        self.n, self.T, self.dim, self.source, self.manifest = n, T, dim, source, manifest
        self._loader, self.n_blocks = loader, n_blocks

    @property
    def has_drift(self) -> bool:
        """Whether velocities come with the states (the sampler's drift, or an .npz's 'velocities')."""
        return self.source == "generated" or bool(self.manifest.get("velocities"))

    def block(self, i: int) -> TrajectoryBlock:
        return self._loader(i)

    def blocks(self) -> Iterator[TrajectoryBlock]:
        for i in range(self.n_blocks):
            yield self._loader(i)

    def select(self, idx: np.ndarray) -> TrajectoryBlock:
        """The trajectories with global indices ``idx`` (in that order), gathered from the blocks."""
        idx = np.asarray(idx)
        want, cols, t = set(idx.tolist()), {}, None
        for blk in self.blocks():
            for p, g in enumerate(blk.index.tolist()):
                if g in want:
                    cols[g] = (
                        blk.z[:, p],
                        None if blk.drift is None else blk.drift[:, p],
                        None if blk.eps is None else blk.eps[:, p],
                    )
                    t = blk.t
        missing = sorted(want - set(cols))
        if missing:
            raise ValueError(f"trajectories {missing[:5]} are not in this set of {self.n}")
        z = np.stack([cols[i][0] for i in idx.tolist()], axis=1)  # (T+1, b, D)
        drift = None if not self.has_drift else np.stack([cols[i][1] for i in idx.tolist()], axis=1)
        # An .npz may bring velocities without the DiT's eps: eps only where every block has it.
        has_eps = all(cols[i][2] is not None for i in idx.tolist())
        eps = np.stack([cols[i][2] for i in idx.tolist()], axis=1) if has_eps else None
        return TrajectoryBlock(index=idx, z=z, t=t, drift=drift, eps=eps)

    @classmethod
    def from_manifest(cls, path: Path, verify: bool = True) -> TrajectorySet:
        """Open a finished generation stage (``manifest.json`` or its folder).

        Args:
            path: the manifest or its folder.
            verify: check every block against the manifest first (:func:`block_problems`); False
                only where the caller has just written or checked them.

        Raises:
            UserError: a missing or malformed manifest, or (``verify``) a missing, truncated or
                modified block, naming the first one.
        """
        path = Path(path)
        if path.is_dir():
            path = path / "manifest.json"
        manifest = read_trajectory_manifest(path)
        if verify:
            bad = block_problems(path, manifest)
            if bad:
                f, why = bad[0]
                more = f" (and {len(bad) - 1} more bad blocks)" if len(bad) > 1 else ""
                raise UserError(
                    f"trajectory block {f} listed in {path} {why}{more}; it cannot be used or "
                    "regenerated from here: rerun the job that wrote it without sindy.trajectories "
                    "(it regenerates bad blocks), or delete the folder"
                )
        folder = path.parent
        starts = np.cumsum([0] + [b["count"] for b in manifest["blocks"]])
        bs = manifest["block_size"]

        def load(i: int) -> TrajectoryBlock:
            entry = manifest["blocks"][i]
            f = folder / entry["file"]
            if not f.is_file():
                raise UserError(f"{f} listed in {path} is missing; delete {folder} to regenerate")
            d = load_file(str(f))
            problem = describe_nonfinite({k: d.get(k) for k in ("z", "drift", "eps", "t")})
            if problem:
                raise UserError(
                    f"trajectory block {f} listed in {path} {problem}; rerun the job that wrote it without "
                    "sindy.trajectories (it regenerates bad blocks), or delete the folder"
                )
            index = entry["block"] * bs + np.arange(entry["count"])
            return TrajectoryBlock(
                index=index, z=d["z"].numpy(), t=d["t"].numpy(), drift=d["drift"].numpy(), eps=d["eps"].numpy()
            )

        dim = int(np.prod(manifest["latent_shape"]))
        return cls(
            int(starts[-1]), int(manifest["timesteps"]), dim, "generated", manifest, load, len(manifest["blocks"])
        )

    @classmethod
    def from_npz(cls, path: Path, order: str = "descending") -> TrajectorySet:
        """An external file: 'trajectories' (n, T+1, d), 'num_timesteps', optional 'velocities' and 't'.

        Args:
            path: the .npz (read with allow_pickle=False).
            order: without 't': "descending" (z_T first, state k at t = 1 - k/T) or "ascending" (z_0 first;
                the states are put in this project's order, t descending). With 't' (T+1,), strictly
                monotone in either direction, the states stay in the file's order at those times.

        The optional 'velocities' (n, T+1, d) are dz/dt at each state (in increasing t) and become the
        'drift' target; the last state's velocity is not a regression row (as for the sampler's drift).

        Raises:
            UserError: a missing file or array, or shapes that disagree (one line, before any work).
        """
        path = Path(path)
        if not path.is_file():
            raise UserError(f"sindy.trajectories={path}: file not found")
        try:
            data = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UserError(f"sindy.trajectories={path} is not a readable .npz ({e})") from None
        if "trajectories" not in data.files:
            raise UserError(f"{path} has no array 'trajectories' (found {data.files}); expected (n, T+1, d)")
        traj = np.asarray(data["trajectories"], dtype=np.float64)
        if traj.ndim != 3 or traj.shape[0] < 3 or traj.shape[1] < 3:
            raise UserError(f"{path}: 'trajectories' must be (n >= 3, T+1 >= 3, d), got {traj.shape}")
        T = int(data["num_timesteps"]) if "num_timesteps" in data.files else traj.shape[1] - 1
        if traj.shape[1] != T + 1:
            raise UserError(f"{path}: num_timesteps={T} but trajectories hold {traj.shape[1]} states (need T+1)")
        if "latent_dim" in data.files and int(data["latent_dim"]) != traj.shape[2]:
            raise UserError(f"{path}: latent_dim={int(data['latent_dim'])} but trajectories have {traj.shape[2]}")
        vel = None
        if "velocities" in data.files:
            vel = np.asarray(data["velocities"], dtype=np.float64)
            if vel.shape != traj.shape:
                raise UserError(
                    f"{path}: 'velocities' must have the shape of 'trajectories' {traj.shape}, got {vel.shape}"
                )
            if not np.isfinite(vel[:, :-1]).all():
                raise UserError(f"{path}: 'velocities' hold NaN or inf at states 0..T-1")
        if not np.isfinite(traj).all():
            raise UserError(f"{path}: 'trajectories' hold NaN or inf")
        if "t" in data.files:
            t = np.asarray(data["t"], dtype=np.float64)
            steps = np.diff(t) if t.ndim == 1 else np.zeros(0)
            if t.shape != (T + 1,) or not (np.all(steps > 0) or np.all(steps < 0)):
                raise UserError(f"{path}: 't' must be ({T + 1},) strictly monotone times, got shape {t.shape}")
            order = "as in the file (array 't')"
        else:
            if order == "ascending":
                traj = traj[:, ::-1]
                vel = None if vel is None else vel[:, ::-1]
            t = 1.0 - np.arange(T + 1, dtype=np.float64) / T
        z = np.ascontiguousarray(traj.transpose(1, 0, 2))  # (T+1, n, d)
        drift = None if vel is None else np.ascontiguousarray(vel.transpose(1, 0, 2)[:-1])  # (T, n, d)
        n = traj.shape[0]
        manifest = {
            "format": "npz",
            "path": str(path),
            "sha256": file_sha256(path),
            "n_trajectories": n,
            "timesteps": T,
            "latent_shape": [traj.shape[2], 1],
            "order": order,
            "t_convention": T_CONVENTION if "t" not in data.files else "t from the file; velocities are dz/dt",
            "sampler": "unknown (external file)",
            "velocities": vel is not None,
            "extra_arrays": {
                k: data[k].tolist()
                for k in data.files
                if k not in ("trajectories", "velocities", "t") and data[k].size == 1
            },
        }
        blk = TrajectoryBlock(index=np.arange(n), z=z, t=t, drift=drift)
        return cls(n, T, traj.shape[2], "npz", manifest, lambda i: blk, 1)
