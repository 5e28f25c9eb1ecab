"""Every benchmark in one go (on a GPU machine: the full sizes), then one summary table.

    python -m benchmarks.run_all [--quick] [--shards data/mnist]

--quick shrinks every size (a functional check on any machine; its numbers mean nothing).
Results: benchmarks/results/<name>.json and results/summary.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks import bench_data, bench_sampling, bench_sindy, bench_train
from benchmarks.common import RESULTS, verdict


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--shards", default="data/mnist")
    ap.add_argument("--out-dir", default=str(RESULTS))
    a = ap.parse_args(argv)
    out = Path(a.out_dir)
    q = a.quick
    runs = [
        ("data", bench_data.main, ["--shards", a.shards] + (["--repeats", "1", "--workers", "0"] if q else [])),
        (
            "train_conv",
            bench_train.main,
            ["--kind", "conv"]
            + (["--preset", "tiny", "--steps", "1", "--repeats", "1", "--large-batch", "512"] if q else []),
        ),
        (
            "sampling_conv",
            bench_sampling.main,
            ["--kind", "conv"] + (["--preset", "tiny", "--repeats", "1", "--large-batch", "256"] if q else []),
        ),
        (
            "sampling_vae16",
            bench_sampling.main,
            ["--kind", "vae16"] + (["--preset", "tiny", "--repeats", "1", "--large-batch", "256"] if q else []),
        ),
        ("sindy", bench_sindy.main, (["--n", "4000", "--n-pysindy", "2000", "--repeats", "1"] if q else [])),
    ]
    results = [fn(args + ["--out", str(out / f"{name}.json")]) for name, fn, args in runs]
    print("\nsummary")
    for r in results:
        for t in r["targets"]:
            print(f"- {r['benchmark']}: {t['target']}: {verdict(t['met'])} ({t['measured']})")
    (out / "summary.json").write_text(
        json.dumps(
            [{"benchmark": r["benchmark"], "device": r["device"], "targets": r["targets"]} for r in results], indent=1
        )
    )
    return results


if __name__ == "__main__":
    main()
