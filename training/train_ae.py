"""Train the autoencoder (ConvAE or VAE16) on MNIST shards.

    accelerate launch training/train_ae.py --config configs/local.yaml [key=value ...]

Writes ``runs/<name>/``: config.yaml, tb/ae (TensorBoard), checkpoints/ae (Accelerate state),
ae.safetensors (final weights) and ae.json (kind, latent shape, test reconstruction error).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from accelerate.utils import gather_object
from torchvision.utils import make_grid

from configs.cli import parse_cli, run_cli
from configs.io import atomic_write_text
from configs.schema import Config
from models.artifacts import save_weights
from models.autoencoder import build_autoencoder
from training.batches import StreamBatches, TensorBatches
from training.loop import Hooks, run_loop
from training.runtime import (
    StopFlag,
    cosine_with_warmup,
    exit_preempted,
    make_accelerator,
    make_optimizer,
    seed_everything,
    total_steps,
)
from training.stage import load_images, optim_digest, param_digest, start_stage

STAGE = "ae"


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 2000) -> dict[str, float]:
    """Reconstruction error on ``images`` (N, 1, 28, 28): mean per-pixel BCE and MSE of sigmoid(logits)."""
    model.eval()
    bce = mse = 0.0
    for i in range(0, images.shape[0], batch_size):
        x = images[i : i + batch_size]
        logits = model.decode(model.encode(x)).float()
        bce += F.binary_cross_entropy_with_logits(logits, x, reduction="sum").item()
        mse += F.mse_loss(torch.sigmoid(logits), x, reduction="sum").item()
    model.train()
    n = images.numel()
    return {"test_bce": bce / n, "test_mse": mse / n}


def recon_grid(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Originals (top rows) above their reconstructions: (3, H, W) in [0, 1]."""
    with torch.no_grad():
        model.eval()
        recon = torch.sigmoid(model.decode(model.encode(images)).float())
        model.train()
    return make_grid(torch.cat([images.float(), recon]).cpu(), nrow=images.shape[0] // 2, pad_value=1.0)


def main(argv: Sequence[str] | None = None) -> None:
    cfg: Config = parse_cli(argv, __doc__)
    run_dir = cfg.run.dir
    acc = make_accelerator(cfg.ae, run_dir)
    seed_everything(cfg.run.seed)

    # 1. Data: fail before building anything if the shards are missing or broken.
    train_x = load_images(cfg, "train", acc.device) if cfg.data.loader == "memory" else None
    test_x = load_images(cfg, "test", acc.device)
    if train_x is not None:
        batches = TensorBatches((train_x,), cfg.ae.batch_size, acc.process_index, acc.num_processes, cfg.run.seed)
    else:
        batches = StreamBatches(
            cfg.data.shards,
            "train",
            cfg.ae.batch_size,
            acc.process_index,
            acc.num_processes,
            cfg.run.seed,
            cfg.data.num_workers,
            cfg.data.shuffle_buffer,
            cfg.data.on_error,
            acc.device,
        )

    # 2. Model, optimizer, schedule.
    model = build_autoencoder(cfg.ae.kind, cfg.ae.kl_weight)
    optimizer = make_optimizer(model.parameters(), cfg.ae, acc.device)
    total = total_steps(cfg.ae, batches.batches_per_epoch)
    scheduler = cosine_with_warmup(optimizer, cfg.ae.warmup_steps, total, cfg.ae.min_lr_ratio)
    # Not the scheduler: prepare() would step it once per process (see cosine_with_warmup).
    model, optimizer = acc.prepare(model, optimizer)
    raw = acc.unwrap_model(model)

    digest = optim_digest(cfg.ae, cfg.run.seed)
    ckpt_root, ckpt = start_stage(acc, cfg, STAGE, digest)
    acc.print(
        f"ae: {cfg.ae.kind}, {sum(p.numel() for p in raw.parameters()):,} parameters, {total} steps of "
        f"{cfg.ae.batch_size} x {acc.num_processes} processes on {acc.device}"
    )

    # 3. Train.
    probe = test_x[:16]

    def loss_fn(batch, generator):
        return model(batch[0], generator)

    def log_images(step, writer):
        writer.add_image("ae/reconstruction", recon_grid(raw, probe), step)

    result = run_loop(
        acc,
        model,
        optimizer,
        scheduler,
        batches,
        cfg.ae,
        total,
        loss_fn,
        ckpt_root,
        ckpt,
        cfg.run.seed,
        digest,
        Hooks(log_images=log_images),
        StopFlag().install(),
        desc="ae",
    )
    if result.stopped_early:
        acc.end_training()
        exit_preempted()

    # 4. Evaluate and export (main process). Every rank reports a digest of its parameters so a
    # multi-process run shows that data parallelism kept the replicas identical.
    digests = gather_object([param_digest(raw)])
    if acc.is_main_process:
        metrics = evaluate(raw, test_x)
        acc.log({f"eval/{k}": v for k, v in metrics.items()}, step=result.state.step)
        meta = {
            "kind": cfg.ae.kind,
            "latent_shape": list(raw.latent_shape),
            "kl_weight": cfg.ae.kl_weight,
            "steps": result.state.step,
            "train_seconds": round(result.seconds, 2),
            "final_train_loss": result.last_loss,
            "num_processes": acc.num_processes,
            "rank_param_sha256": digests,
            **metrics,
        }
        save_weights(raw, run_dir / "ae.safetensors", {"kind": cfg.ae.kind})
        atomic_write_text(run_dir / "ae.json", json.dumps(meta, indent=1))  # the stage's done marker
        print(
            f"ae: test BCE {metrics['test_bce']:.4f}, test MSE {metrics['test_mse']:.5f} after "
            f"{result.state.step} steps ({result.seconds:.0f} s)"
        )
        print(f"ae: weights {run_dir / 'ae.safetensors'}; TensorBoard: tensorboard --logdir {run_dir / 'tb'}")
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    run_cli(main)
