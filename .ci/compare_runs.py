"""Are two run folders the same results? For refactors: run the same config before and after, then

    python .ci/compare_runs.py runs-before/smoke runs-after/smoke

Safetensors files (weights, latent stats, latents, the scored samples) are compared tensor by tensor, bit for bit,
with their metadata: their raw bytes can differ between two runs of the very same code, because safetensors writes
the metadata in hash-map order. equations.tex and rollouts.npz are compared byte for byte, equations.json without
its wall-clock fields ("seconds", "stage_times", "created") and the keys that name the run or hash its files
("run", "digests", and "settings_fingerprint", which hashes the settings with the weights' sha256). Prints one
line per file; exit 0 when all are identical, 1 otherwise.
"""

from __future__ import annotations

import filecmp
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

VOLATILE = ("seconds", "stage_times", "created", "digests", "run", "settings_fingerprint")
SAFETENSORS = ("ae.safetensors", "dit.safetensors", "dit_ema.safetensors", "latent_stats.safetensors")
BYTES = ("latents/meta.json", "report/equations.tex", "report/rollouts.npz")


def same_tensors(a: Path, b: Path) -> bool:
    fa, fb = safe_open(str(a), "pt"), safe_open(str(b), "pt")
    if fa.metadata() != fb.metadata() or sorted(fa.keys()) != sorted(fb.keys()):
        return False
    for k in fa.keys():
        ta, tb = fa.get_tensor(k), fb.get_tensor(k)
        if ta.dtype != tb.dtype or ta.shape != tb.shape or not torch.equal(ta, tb):
            return False
    return True


def without_volatile(x):
    if isinstance(x, dict):
        return {k: without_volatile(v) for k, v in x.items() if k not in VOLATILE}
    if isinstance(x, list):
        return [without_volatile(v) for v in x]
    return x


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    a, b = map(Path, argv)
    found = [f for f in SAFETENSORS if (a / f).is_file()]
    found += sorted(str(p.relative_to(a)) for p in (a / "latents").glob("*.safetensors"))
    found += [f for f in ("samples/ema_samples.safetensors",) if (a / f).is_file()]
    results = [(f, (b / f).is_file() and same_tensors(a / f, b / f)) for f in found]
    results += [(f, (b / f).is_file() and filecmp.cmp(a / f, b / f, shallow=False)) for f in BYTES if (a / f).is_file()]
    eq = Path("report/equations.json")
    if (a / eq).is_file():
        same = (b / eq).is_file() and without_volatile(json.loads((a / eq).read_text())) == without_volatile(
            json.loads((b / eq).read_text())
        )
        results.append((f"{eq} (less {', '.join(VOLATILE)})", same))
    for name, same in results:
        print(f"{'IDENTICAL' if same else 'DIFFERENT'}  {name}")
    return 0 if all(same for _, same in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
