"""SINDy fits: library + Gram statistics + 16 STLSQ fits over n samples of a 16-D state with the
reference library (1,035 terms), against pysindy's STLSQ on the CPU (per-sample ratio).

    python benchmarks/bench_sindy.py [--n 1000000] [--n-pysindy 20000] [--device auto]

Target (issue 6, one H100): 1,000,000 samples x 16 dimensions, library, statistics and all 16 fits
in under 10 s, coefficients equal to the CPU path's. The check rows fit the same n_pysindy samples
with pysindy and with the Gram path and compare coefficients (1e-8).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.fit import STLSQ, GramStats  # noqa: E402
from analysis.library import Library  # noqa: E402
from benchmarks.common import finish, pick_device, row, sync, time_calls  # noqa: E402

D, THRESHOLD, ALPHA = 16, 0.05, 0.05


def planted(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """States ~ N(0, 0.5^2), t ~ U(0, 1), targets from a sparse linear-plus-cubic model with noise."""
    rng = np.random.default_rng(seed)
    z = 0.5 * rng.normal(size=(n, D))
    t = rng.uniform(size=n)
    y = -z + 0.3 * np.roll(z, 1, axis=1) ** 3 + 0.2 * t[:, None] * z + 0.01 * rng.normal(size=(n, D))
    return z, t, y


def gram_fit(lib: Library, z, t, y, device: torch.device, chunk: int) -> np.ndarray:
    """Our path: stream the library in chunks into float64 statistics on ``device``, then 16 STLSQ fits."""
    stats = GramStats.from_library(lib, [(z, t, y)], device=device, chunk_size=chunk)
    sync(device)
    return STLSQ(threshold=THRESHOLD, alpha=ALPHA).fit_gram(stats).coef_


def pysindy_fit(lib: Library, z, t, y) -> np.ndarray:
    import pysindy

    theta = lib.transform(z, t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pysindy.STLSQ(threshold=THRESHOLD, alpha=ALPHA).fit(theta, y).coef_


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--n-pysindy", type=int, default=20_000)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--chunk", type=int, default=65536)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    device = pick_device(a.device)
    lib = Library.reference(D)
    z, t, y = planted(a.n)
    zs, ts, ys = z[: a.n_pysindy], t[: a.n_pysindy], y[: a.n_pysindy]
    cfg = {"d": D, "terms": lib.n_terms, "threshold": THRESHOLD, "alpha": ALPHA}
    cpu = torch.device("cpu")

    ref = pysindy_fit(lib, zs, ts, ys)
    small = gram_fit(lib, torch.from_numpy(zs).to(device), torch.from_numpy(ts).to(device), torch.from_numpy(ys).to(device),
                     device, a.chunk)
    diff = float(np.abs(small - ref).max())
    same_support = bool(np.array_equal(small != 0, ref != 0))
    check = f"max |Gram - pysindy| = {diff:.1e} on {a.n_pysindy:,}, support {'equal' if same_support else 'DIFFERS'}"

    rows = [row("pysindy STLSQ (CPU), library built in memory", {**cfg, "n": a.n_pysindy},
                time_calls(lambda: pysindy_fit(lib, zs, ts, ys), cpu, a.repeats, 0), a.n_pysindy, "samples/s")]
    zt, tt, yt = (torch.from_numpy(x).to(device) for x in (z, t, y))  # resident on the device
    rows.append(row(f"Gram path on {device.type}: library + statistics + 16 fits", {**cfg, "n": a.n, "chunk": a.chunk},
                    time_calls(lambda: gram_fit(lib, zt, tt, yt, device, a.chunk), device, a.repeats, 1), a.n,
                    "samples/s", check))
    seconds = rows[1]["seconds_median"]
    targets = [{"target": "1,000,000 x 16 x library in < 10 s (one H100)",
                "met": (bool(a.n >= 1_000_000 and seconds < 10 and diff < 1e-8 and same_support)
                        if device.type == "cuda" else None),
                "measured": f"{seconds:.2f} s for {a.n:,} samples on {device.type}; "
                            f"{rows[1]['median'] / rows[0]['median']:.1f}x pysindy per sample"
                            + ("" if device.type == "cuda" else " (not the target's device)")}]
    return finish("sindy", device, rows, targets, Path(a.out) if a.out else None)


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"total {time.time() - t0:.0f} s")
