"""Trajectory generation with full recording (every z_t, eps and drift): trajectories/s against
the plain sampler (eager fp32, batch 256), and a check that each variant's recorded trajectories
match the plain sampler's from the same noise.

    python -m benchmarks.bench_sampling [--kind conv|vae16] [--large-batch 8192]

Targets (issue 6, one H100, reference DiT): conv latent, 100 DDPM steps: >= 20,000 trajectories/s;
vae16, 50 steps: >= 150,000 trajectories/s; recorded trajectories equal to bf16 tolerance.
"""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.common import LATENTS, bench_model, finish, model_parser, pick_device, row, time_calls
from models.diffusion import sample
from models.schedules import schedule_for

TARGETS = {"conv": 20_000, "vae16": 150_000}
CHECK_BATCH = 256


def make_sampler(model, schedule, shape, device, bf16: bool, compile_mode: str | None):
    net = torch.compile(model, mode=compile_mode) if compile_mode else model

    def eps(x, t):
        if bf16:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return net(x, t)
        return net(x, t)

    @torch.no_grad()
    def run(seed: int = 0, batch: int | None = None):
        b = shape[0] if batch is None else batch
        gen = torch.Generator(device=device).manual_seed(seed)
        return sample(eps, schedule, (b, *shape[1:]), sampler="ddpm", generator=gen, record=True, device=device)

    return run


def main(argv: list[str] | None = None) -> dict:
    ap = model_parser(__doc__)
    ap.add_argument("--large-batch", type=int, default=0, help="default 8192 on CUDA, 1024 on the CPU")
    a = ap.parse_args(argv)
    device = pick_device(a.device)
    cuda = device.type == "cuda"
    large = a.large_batch or (8192 if cuda else 1024)
    model = bench_model(a.kind, a.preset, device).eval()
    schedule = schedule_for(a.kind).to(device)
    latent = LATENTS[a.kind][0]
    variants = [
        ("plain: eager fp32, batch 256", CHECK_BATCH, False, None),
        (f"fp32, batch {large}", large, False, None),
    ]
    if cuda:
        variants += [
            (f"bf16, batch {large}", large, True, None),
            (f"bf16 + compile, batch {large}", large, True, "default"),
        ]
    else:
        variants += [(f"compile, batch {large}", large, False, "default")]
    plain = make_sampler(model, schedule, (CHECK_BATCH, *latent), device, False, None)(seed=1)
    scale = float(plain.z.float().std())
    rows = []
    for name, batch, bf16, mode in variants:
        run = make_sampler(model, schedule, (batch, *latent), device, bf16, mode)
        ref = run(seed=1, batch=CHECK_BATCH)  # same noise as the plain sampler (also warms up)
        err = float((ref.z.float() - plain.z.float()).abs().max()) / scale
        tol = 0.05 if bf16 else 1e-4
        check = f"max |z - plain| / std(z) = {err:.1e} ({'ok' if err <= tol else 'FAILS'} at {tol:g})"
        secs = time_calls(run, device, a.repeats, warmup=1)
        rows.append(
            row(
                name,
                {
                    "kind": a.kind,
                    "preset": a.preset,
                    "batch": batch,
                    "steps": schedule.T,
                    "bf16": bf16,
                    "compile": mode,
                    "sampler": "ddpm",
                    "record": True,
                },
                secs,
                batch,
                "trajectories/s",
                check,
            )
        )
        del run
    best = max(rows, key=lambda r: r["median"])
    ok = cuda and a.preset == "reference"
    targets = [
        {
            "target": f">= {TARGETS[a.kind]:,} trajectories/s, {a.kind}, {schedule.T} DDPM steps, recorded (one H100)",
            "met": (best["median"] >= TARGETS[a.kind] and "FAILS" not in best["check"]) if ok else None,
            "measured": f"{best['median']:,.0f} trajectories/s ({best['variant']}), "
            f"{best['median'] / rows[0]['median']:.1f}x plain",
        }
    ]
    return finish(f"sampling_{a.kind}", device, rows, targets, Path(a.out) if a.out else None)


if __name__ == "__main__":
    main()
