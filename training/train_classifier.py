"""Train the MNIST feature classifier of FD-MNIST (models/classifier.py).

    python training/train_classifier.py --shards DIR --out PATH.safetensors [--epochs N] [--device auto]

References:
    I. Loshchilov, F. Hutter, "Decoupled weight decay regularization" (AdamW), ICLR 2019.

Writes PATH.safetensors (weights), PATH.json (sidecar: train config, test accuracy, sha256 of the
shards' manifest.json, the floor) and PATH.reference.safetensors (Gaussian fit of the test
features). The floor is FD-MNIST of 10,000 *real training* images (a fixed subset, seed 0)
against the test set, also tabulated at smaller N because FD grows as N shrinks: what a perfect
generator scores. Exit codes: 0 success, 2 an expected error (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from configs.cli import OneLineParser, call_cli
from data_pipeline.loader import load_split_in_memory
from data_pipeline.shards import manifest_sha256
from models.classifier import (
    FEATURE_DIM,
    FLOOR_N,
    FLOOR_NS,
    FLOOR_SEED,
    FORMAT,
    FORMAT_VERSION,
    MnistClassifier,
    QualityError,
    frechet_distance,
    gaussian_fit,
    predict,
    reference_path,
    resolve_device,
    save_classifier,
    save_reference,
    write_sidecar,
)

PROG = "training/train_classifier.py"


@dataclass
class TrainConfig:
    """Training recipe of the feature classifier (defaults: the GPU recipe, >= 99% test acc)."""

    epochs: int = 6
    """Passes over the (possibly limited) training split."""
    batch_size: int = 128
    """Images per optimizer step."""
    lr: float = 2e-3
    """Peak AdamW learning rate; cosine-decayed to zero over all steps."""
    weight_decay: float = 1e-4
    """AdamW decoupled weight decay."""
    max_shift: int = 2
    """Random integer translation of each training image by up to this many pixels per axis."""
    seed: int = 0
    """Seeds initialization, shuffling, augmentation and dropout (deterministic on CPU)."""
    limit: int | None = None
    """Train on the first ``limit`` training images only (fast CPU tests); None = all 60,000."""

    def validate(self) -> None:
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise QualityError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise QualityError(f"lr must be > 0, got {self.lr!r}")
        if self.max_shift < 0 or self.max_shift > 8:
            raise QualityError(f"max_shift must be in [0, 8] pixels, got {self.max_shift!r}")
        if self.limit is not None and self.limit < 1:
            raise QualityError(f"limit must be a positive integer or None, got {self.limit!r}")


def _random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by its own integer offset in [-max_shift, max_shift], zero fill.

    Args:
        x: (B, 1, 28, 28).
    Returns:
        (B, 1, 28, 28).
    """
    if max_shift == 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)  # (B, 1, H + 2s, W + 2s)
    # Offsets drawn on CPU from the seeded generator so CPU and CUDA runs see the same shifts.
    off = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator).to(x.device)
    rows = off[0, :, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = off[1, :, None] + torch.arange(w, device=x.device)  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded[batch, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)  # (B, 1, H, W)


def train_classifier(
    shard_dir: str | Path,
    out_path: str | Path,
    epochs: int = 6,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    device: str | torch.device | None = "auto",
    *,
    limit: int | None = None,
    weight_decay: float = 1e-4,
    max_shift: int = 2,
    log: bool = False,
) -> dict[str, Any]:
    """Train the feature classifier; write weights, JSON sidecar and test reference stats.

    Deterministic for a given seed on CPU (all randomness comes from seeded generators and
    CPU kernels are deterministic); on CUDA, cuDNN may pick nondeterministic kernels.

    Args:
        shard_dir: MNIST shards (``python -m data_pipeline.prepare --out DIR``).
        out_path: ``*.safetensors`` weights; ``*.json`` and ``*.reference.safetensors`` go
            next to it.
        epochs, batch_size, lr, seed, limit, weight_decay, max_shift: see ``TrainConfig``.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ...
        log: print one line per epoch to stderr.

    Returns:
        The sidecar dict: ``test_accuracy``, ``floor`` (FD-MNIST of 10,000 training images vs
        the test set, and at smaller N), ``train_config``, ``shards_manifest_sha256``, ...
    """
    cfg = TrainConfig(epochs, batch_size, lr, weight_decay, max_shift, seed, limit)
    cfg.validate()
    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        raise QualityError(f"--out must end in .safetensors, got {str(out_path)!r}")
    if not out_path.parent.is_dir():
        raise QualityError(f"output directory {str(out_path.parent)!r} does not exist; create it first")
    dev = resolve_device(device)
    manifest_sha = manifest_sha256(shard_dir)
    x_train, y_train = load_split_in_memory(shard_dir, "train", device=dev)  # (60000, 1, 28, 28), (60000,)
    x_test, y_test = load_split_in_memory(shard_dir, "test", device=dev)  # (10000, 1, 28, 28), (10000,)
    if cfg.limit is not None:
        if cfg.limit > x_train.shape[0]:
            raise QualityError(f"limit {cfg.limit} exceeds the {x_train.shape[0]} training images; lower it or drop it")
        x_fit, y_fit = x_train[: cfg.limit], y_train[: cfg.limit]
    else:
        x_fit, y_fit = x_train, y_train
    n = x_fit.shape[0]

    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed)
    # fork_rng keeps the caller's global RNG untouched while dropout draws from a seeded one.
    fork_devices = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(cfg.seed)
        model = MnistClassifier().to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps_per_epoch = math.ceil(n / cfg.batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.15, anneal_strategy="cos"
        )
        model.train()
        for epoch in range(cfg.epochs):
            perm = torch.randperm(n, generator=gen).to(dev)
            total_loss = torch.zeros((), device=dev)  # summed on device: no sync per step
            for start in range(0, n, cfg.batch_size):
                idx = perm[start : start + cfg.batch_size]
                x = _random_shift(x_fit[idx], cfg.max_shift, gen)  # (B, 1, 28, 28)
                loss = F.cross_entropy(model(x), y_fit[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total_loss += loss.detach() * idx.numel()
            if log:
                mean_loss = float(total_loss) / n
                print(f"epoch {epoch + 1}/{cfg.epochs}: train loss {mean_loss:.4f}", file=sys.stderr, flush=True)
    model.eval()
    train_seconds = time.perf_counter() - t0

    test_feats, test_logits = predict(model, x_test, 1000)
    test_acc = float((test_logits.argmax(1) == y_test).float().mean())
    ref_mu, ref_sigma = gaussian_fit(test_feats.double().cpu().numpy())

    # The floor: a fixed random 10,000-image subset of the training split (seed 0) against
    # the test set -- a "perfect generator" at the N used for scoring.
    floor_idx = torch.randperm(x_train.shape[0], generator=torch.Generator().manual_seed(FLOOR_SEED))[:FLOOR_N]
    floor_feats, _ = predict(model, x_train[floor_idx.to(dev)], 1000)
    floor_feats = floor_feats.double().cpu().numpy()
    floor_by_n = {str(k): frechet_distance(*gaussian_fit(floor_feats[:k]), ref_mu, ref_sigma) for k in FLOOR_NS}

    classifier_sha = save_classifier(model, out_path)
    save_reference(out_path, ref_mu, ref_sigma, x_test.shape[0], classifier_sha, manifest_sha)
    sidecar = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": MnistClassifier.ARCHITECTURE,
        "feature_dim": FEATURE_DIM,
        "train_config": dataclasses.asdict(cfg),
        "train_samples": int(n),
        "device": str(dev),
        "torch_version": torch.__version__,
        "train_seconds": round(train_seconds, 2),
        "test_accuracy": test_acc,
        "shards_dir": str(Path(shard_dir).resolve()),
        "shards_manifest_sha256": manifest_sha,
        "classifier_sha256": classifier_sha,
        "reference_stats": reference_path(out_path).name,
        "floor": {
            "fd_mnist": floor_by_n[str(FLOOR_N)],
            "n": FLOOR_N,
            "description": f"FD-MNIST of a random {FLOOR_N}-image subset of the train split "
            f"(torch.randperm, seed {FLOOR_SEED}) vs the full test split",
            "seed": FLOOR_SEED,
            "by_n": floor_by_n,
        },
    }
    write_sidecar(out_path, sidecar)
    return sidecar


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--shards", required=True, help="MNIST shard directory (python -m data_pipeline.prepare)")
    parser.add_argument("--out", required=True, help="weights path, *.safetensors")
    d = TrainConfig()
    parser.add_argument("--epochs", type=int, default=d.epochs, help=f"default {d.epochs}")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
    parser.add_argument("--lr", type=float, default=d.lr, help=f"peak AdamW learning rate, default {d.lr}")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"default {d.seed}")
    parser.add_argument("--limit", type=int, default=None, help="train on the first N training images only")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda[:i]")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code instead of exiting (testable in-process)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exn:
        return int(exn.code or 0)

    def run(_) -> None:
        info = train_classifier(
            args.shards,
            args.out,
            args.epochs,
            args.batch_size,
            args.lr,
            args.seed,
            args.device,
            limit=args.limit,
            log=True,
        )
        print(
            f"{args.out}: test accuracy {info['test_accuracy']:.4f}, FD-MNIST floor {info['floor']['fd_mnist']:.3f} "
            f"(N={FLOOR_N}), {info['train_seconds']:.0f} s on {info['device']}"
        )

    return call_cli(run, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
