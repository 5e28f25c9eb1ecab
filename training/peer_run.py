"""Set up a peer of a run: the folder in which the same DiT recipe is trained again with another seed.

    python -m training.peer_run --config configs/local.yaml [--seed 1] [key=value ...]

Copies the run's autoencoder (ae.safetensors, ae.json), latent_stats.safetensors and latents/ into
``<run.root>/<run.name>-seed<S>/`` and prints shell assignments for `make peer`: ``peer=<folder> peername=<name>``.
`make peer` then trains the DiT there (training/train_dit.py with run.name=<name> run.seed=<S>) and reruns the SINDy
job with ``sindy.peer_runs=[<folder>]``, whose yardstick table gains the peer's row: how often an equally good DiT
that did not share this one's training gives the same digit from the same noise (analysis/job/yardsticks.py).

The peer shares the autoencoder so that both DiTs work in one latent space; only the DiT's initialisation, data
order and noise differ. A peer folder that already holds another autoencoder (the run's was retrained since) is
refused with one line: its DiT would be stale. A copy is the same bytes, so a rerun resumes the peer's DiT.
"""

from __future__ import annotations

import shlex
import shutil
from collections.abc import Sequence
from pathlib import Path

from configs.cli import OneLineParser, UserError, run_cli
from configs.io import file_sha256
from configs.schema import load_config

__all__ = ["PEER_FILES", "prepare_peer"]

PEER_FILES = ("ae.safetensors", "ae.json", "latent_stats.safetensors")


def prepare_peer(run_dir: Path, peer_dir: Path) -> None:
    """Copy the run's autoencoder, latent stats and latents into peer_dir (UserError: missing, or a stale peer)."""
    missing = [f for f in (*PEER_FILES, "latents/train.safetensors") if not (run_dir / f).is_file()]
    if missing:
        raise UserError(
            f"{run_dir} has no {', '.join(missing)}: the peer shares the run's autoencoder and latents; run "
            "`make run` (or its autoencoder and latents stages) first"
        )
    old = peer_dir / "ae.safetensors"
    if old.is_file() and file_sha256(old) != file_sha256(run_dir / "ae.safetensors"):
        raise UserError(
            f"{peer_dir} holds another autoencoder than {run_dir} (the run's was retrained since): its DiT is stale; "
            "remove that folder or choose another PEER_SEED"
        )
    peer_dir.mkdir(parents=True, exist_ok=True)
    for f in PEER_FILES:
        shutil.copy2(run_dir / f, peer_dir / f)
    shutil.copytree(run_dir / "latents", peer_dir / "latents", dirs_exist_ok=True)


def main(argv: Sequence[str] | None = None) -> None:
    p = OneLineParser(prog="make peer", description=__doc__)
    p.add_argument("--config", required=True)
    p.add_argument("--seed", type=int, default=1, help="the peer's run.seed (default 1)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.seed == cfg.run.seed:
        raise UserError(f"PEER_SEED={args.seed} is the run's own run.seed: a peer needs another seed")
    name = f"{cfg.run.name}-seed{args.seed}"
    peer = load_config(args.config, [*args.overrides, f"run.name={name}", f"run.seed={args.seed}"])  # checks both
    prepare_peer(cfg.run.dir, peer.run.dir)
    print(f"peer={shlex.quote(str(peer.run.dir))} peername={shlex.quote(name)}")


if __name__ == "__main__":
    run_cli(main, prog="make peer")
