"""Train the latent DiT denoiser (epsilon prediction) on the run's normalised latents.

    accelerate launch training/train_dit.py --config configs/X.yaml [key=value ...]

Recipe (docs/REFERENCES.md, "Latent diffusion for MNIST", section 4): AdamW lr 5e-4, cosine
annealing, gradient clipping 1.0, batch 256, EMA 0.999 used for sampling and export.
Writes into ``runs/<name>/``: dit.safetensors, dit_ema.safetensors, dit.json, tb/dit,
checkpoints/dit. The final EMA samples are drawn and scored by the next stage,
analysis/score_samples.py (FD-MNIST).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch
from torchvision.utils import make_grid

from configs.cli import UserError, parse_cli, run_cli
from configs.io import atomic_write_text
from configs.schema import Config, to_dict
from models.artifacts import load_autoencoder, load_latent_data, save_weights
from models.diffusion import eps_loss
from models.dit import DiT, build_dit
from models.generate import decode_samples
from models.schedules import LATENT_SCHEDULES, schedule_for
from training.batches import TensorBatches
from training.ema import EMA
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
from training.stage import optim_digest, start_stage

STAGE = "dit"


def build_denoiser(cfg: Config, latent_shape: tuple[int, int]) -> DiT:
    """The configured preset for a latent of N tokens of C; 2-D RoPE over the conv latent's 7x7 grid."""
    n_tokens, channels = latent_shape
    try:
        # vae16 coordinates have no order, so they also get a learned absolute embedding.
        return build_dit(
            cfg.dit.preset,
            channels,
            n_tokens,
            rope="2d" if cfg.ae.kind == "conv" else "1d",
            abs_pos=cfg.ae.kind != "conv",
        )
    except ValueError as e:
        raise UserError(str(e)) from None


def _configure_deepspeed(acc, cfg: Config) -> None:
    """Fill what DeepSpeed needs but cannot infer here (no dataloader goes through prepare())."""
    plugin = acc.state.deepspeed_plugin
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = cfg.dit.batch_size
    ds["gradient_accumulation_steps"] = cfg.dit.grad_accum
    if cfg.dit.grad_clip > 0:
        ds["gradient_clipping"] = cfg.dit.grad_clip


def main(argv: Sequence[str] | None = None) -> None:
    cfg: Config = parse_cli(argv, __doc__)
    run_dir = cfg.run.dir
    # 1. Inputs, all checked before any training step.
    data = load_latent_data(run_dir, cfg.ae.kind)
    latent_shape = tuple(data.train.shape[1:])
    acc = make_accelerator(cfg.dit, run_dir)
    _configure_deepspeed(acc, cfg)
    seed_everything(cfg.run.seed)
    ae, _ = load_autoencoder(run_dir, acc.device)
    schedule_kind = None if cfg.dit.schedule == "auto" else cfg.dit.schedule
    schedule = schedule_for(cfg.ae.kind, schedule_kind, cfg.dit.timesteps or None).to(acc.device)
    mean, std = data.mean.to(acc.device), data.std.to(acc.device)
    in_dtype = torch.bfloat16 if (acc.state.deepspeed_plugin and cfg.dit.mixed_precision == "bf16") else torch.float32
    batches = TensorBatches(
        (data.train.to(acc.device, in_dtype),), cfg.dit.batch_size, acc.process_index, acc.num_processes, cfg.run.seed
    )

    # 2. Model, EMA, optimizer, schedule.
    model = build_denoiser(cfg, latent_shape)
    ema = EMA(build_denoiser(cfg, latent_shape), model, cfg.dit.ema_decay, cfg.dit.ema_warmup)
    optimizer = make_optimizer(model.parameters(), cfg.dit, acc.device)
    total = total_steps(cfg.dit, batches.batches_per_epoch)
    scheduler = cosine_with_warmup(optimizer, cfg.dit.warmup_steps, total, cfg.dit.min_lr_ratio)
    if cfg.dit.compile:
        model = torch.compile(model)
    # Not the scheduler: prepare() would step it once per process (see cosine_with_warmup).
    model, optimizer = acc.prepare(model, optimizer)
    raw = acc.unwrap_model(model, keep_torch_compile=False)
    ema.bind(raw)
    ema.model.to(acc.device)

    digest = optim_digest(cfg.dit, cfg.run.seed)
    ckpt_root, ckpt = start_stage(acc, cfg, STAGE, digest)
    acc.print(
        f"dit: {cfg.dit.preset} on {cfg.ae.kind} latents {list(latent_shape)}, "
        f"{sum(p.numel() for p in raw.parameters()):,} parameters, {schedule.name}, {total} steps of "
        f"{cfg.dit.batch_size} x {acc.num_processes} processes on {acc.device}"
    )

    # 3. Train.
    def loss_fn(batch, generator):
        return eps_loss(model, schedule, batch[0], generator), {}

    def log_images(step, writer):
        if step % cfg.dit.sample_every == 0 or step == total:
            imgs = decode_samples(ema.model, schedule, ae, mean, std, cfg.dit.num_samples, cfg.run.seed, acc.device)
            writer.add_image("dit/ema_samples", make_grid(imgs.cpu(), nrow=8, pad_value=1.0), step)

    hooks = Hooks(
        after_step=ema.update, log_images=log_images, extra_state=ema.state_dict, load_extra=ema.load_state_dict
    )
    result = run_loop(
        acc,
        model,
        optimizer,
        scheduler,
        batches,
        cfg.dit,
        total,
        loss_fn,
        ckpt_root,
        ckpt,
        cfg.run.seed,
        digest,
        hooks,
        StopFlag().install(),
        desc="dit",
    )
    if result.stopped_early:
        acc.end_training()
        exit_preempted()

    # 4. Export (main process): weights, EMA weights, metadata.
    if acc.is_main_process:
        arch = {
            "preset": cfg.dit.preset,
            "kind": cfg.ae.kind,
            "latent_shape": list(latent_shape),
            "schedule": schedule.name,
            "schedule_kind": schedule_kind or LATENT_SCHEDULES[cfg.ae.kind][0],
            "timesteps": schedule.T,
            "ae_sha256": data.ae_sha256,
        }
        st_meta = {k: json.dumps(v) for k, v in arch.items()}
        save_weights(raw, run_dir / "dit.safetensors", st_meta)
        save_weights(ema.model, run_dir / "dit_ema.safetensors", st_meta)
        meta = {
            **arch,
            "dit_config": to_dict(raw.cfg),
            "steps": result.state.step,
            "train_seconds": round(result.seconds, 2),
            "final_train_loss": result.last_loss,
            "loss_history": result.history,
            "num_processes": acc.num_processes,
            "mixed_precision": cfg.dit.mixed_precision,
        }
        atomic_write_text(run_dir / "dit.json", json.dumps(meta, indent=1))  # the stage's done marker
        print(
            f"dit: final loss {result.last_loss:.4f} after {result.state.step} steps ({result.seconds:.0f} s); "
            f"weights {run_dir / 'dit_ema.safetensors'}"
        )
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    run_cli(main)
