"""Shared helpers of the benchmark scripts: timing, the device line, the table and the JSON file.

Every script times a plain baseline and its variants in the same process, reports median, min and
max over repeats, and the ratio of each variant's median throughput to the baseline's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from models.dit import build_dit

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}, torch {torch.__version__}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Seconds per call of ``fn`` (synchronised), after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def row(variant: str, config: dict, seconds: list[float], work: float, unit: str, check: str = "") -> dict:
    """A result row: throughput ``work / seconds`` in ``unit`` (median, min, max over repeats)."""
    rates = sorted(work / s for s in seconds)
    return {
        "variant": variant,
        "config": config,
        "unit": unit,
        "median": statistics.median(rates),
        "min": rates[0],
        "max": rates[-1],
        "seconds_median": statistics.median(seconds),
        "repeats": len(seconds),
        "check": check,
    }


def finish(
    name: str, device: torch.device, rows: list[dict], targets: list[dict] | None = None, out: Path | None = None
) -> dict:
    """Ratios to the first row (the baseline), the table on stdout and ``results/<name>.json``."""
    base = rows[0]["median"]
    for r in rows:
        r["ratio"] = r["median"] / base if base else float("nan")
    payload = {
        "benchmark": name,
        "device": device_name(device),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "baseline": rows[0]["variant"],
        "rows": rows,
        "targets": targets or [],
    }
    print(f"\n{name} on {payload['device']}")
    print(format_table(rows))
    for t in payload["targets"]:
        print(f"target {t['target']}: {verdict(t['met'])} ({t['measured']})")
    path = out or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))
    print(f"wrote {path}")
    return payload


def verdict(met: bool | None) -> str:
    """None: the target's hardware was not there, so the run says nothing about it."""
    return "NOT MEASURED (needs its GPU)" if met is None else ("MET" if met else "NOT MET")


def format_table(rows: list[dict]) -> str:
    head = ["variant", "median", "min", "max", "unit", "ratio", "check"]
    body = [
        [
            r["variant"],
            f"{r['median']:,.0f}",
            f"{r['min']:,.0f}",
            f"{r['max']:,.0f}",
            r["unit"],
            f"{r['ratio']:.2f}x",
            r.get("check", ""),
        ]
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(b) for b in body])


def model_parser(doc: str):
    """The arguments the model benchmarks share: --kind, --preset, --device, --repeats, --out."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--kind", default="conv", choices=sorted(LATENTS))
    ap.add_argument("--preset", default="reference")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="JSON path (default results/<name>.json)")
    return ap


def pick_device(arg: str) -> torch.device:
    if arg == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if arg == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    return torch.device(arg)


LATENTS = {"conv": ((49, 6), dict(rope="2d", abs_pos=False)), "vae16": ((16, 1), dict(rope="1d", abs_pos=True))}


def bench_model(kind: str, preset: str, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """The DiT of ``preset`` for a latent ``kind`` as train_dit builds it; the zero-initialised
    layers get small random weights so that its output (and every check) is not trivially zero."""
    (n, c), kw = LATENTS[kind]
    model = build_dit(preset, c, n, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return model.to(device)
