"""Score a trained DiT's samples: FD-MNIST, confidence and class balance (the stage after DiT training).

    python analysis/score_samples.py --config configs/X.yaml [key=value ...]

Loads the run's EMA DiT, autoencoder and latent statistics, draws ``dit.eval_samples`` DDPM
samples from a generator seeded with ``run.seed + 1`` (models.generate.decode_samples, the
sampler of the DiT's TensorBoard grids), decodes them and scores them with the MNIST classifier
``dit.classifier`` (analysis/quality/scoring.py). Writes into ``runs/<name>/``:
    samples/ema_samples.safetensors   the samples: ``images`` (N, 1, 28, 28) uint8
    tb/dit                            eval/fd_mnist, eval/fd_floor_at_n, eval/mean_confidence,
                                      eval/chi2_uniform and the text eval/class_counts, at the
                                      DiT's last step (next to its training curves)
    quality.json                      eval_samples, the DiT's steps and EMA sha256, the classifier,
                                      and ``quality`` (analysis.quality.scoring.score; null when skipped)
quality.json is written last, also when scoring is skipped (``dit.eval_samples=0`` or no
classifier file), so a scheduler can take it as the stage's completion mark. Bad inputs are one
line on stderr and exit code 2, before any sampling.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from analysis.quality.scoring import RUN_SAMPLES, score_images
from configs.cli import parse_cli, run_cli
from configs.io import atomic_save_safetensors, atomic_write_text, file_sha256
from configs.schema import Config
from models.artifacts import load_autoencoder, load_denoiser, load_latent_stats
from models.classifier import load_classifier
from models.generate import decode_samples

QUALITY_FILE = "quality.json"
TB_DIR = Path("tb") / "dit"


def log_to_tensorboard(log_dir: Path, q: dict, step: int) -> None:
    """The scalars and class histogram under the tags the DiT's training logged them with before."""
    # optional heavy dependency: tensorboard, only when its entries are written
    from torch.utils.tensorboard import SummaryWriter

    scalars = {
        "eval/fd_mnist": q["fd_mnist"],
        "eval/fd_floor_at_n": q["fd_floor_at_n"],
        "eval/mean_confidence": q["mean_confidence"],
        "eval/chi2_uniform": q["chi2"],
    }
    with SummaryWriter(str(log_dir)) as writer:
        for tag, value in scalars.items():
            if value is not None:
                writer.add_scalar(tag, value, step)
        writer.add_text("eval/class_counts", " ".join(str(c) for c in q["class_counts"]), step)


def main(argv: Sequence[str] | None = None) -> None:
    cfg: Config = parse_cli(argv, __doc__)
    run_dir, n = cfg.run.dir, cfg.dit.eval_samples
    # 1. Inputs, all checked before sampling.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, schedule, meta = load_denoiser(run_dir, device)
    ae, _ = load_autoencoder(run_dir, device)
    mean, std = (t.to(device) for t in load_latent_stats(run_dir))
    classifier = Path(cfg.dit.classifier)
    record = {
        "eval_samples": n,
        "dit_steps": meta["steps"],
        "dit_ema_sha256": file_sha256(run_dir / "dit_ema.safetensors"),
        "classifier": str(classifier),
        "quality": None,
    }
    skip = None
    if n == 0:
        skip = "dit.eval_samples=0"
    elif not classifier.is_file():
        skip = (
            f"no classifier at {classifier} (train one with python training/train_classifier.py "
            f"--shards {cfg.data.shards} --out {classifier})"
        )
    else:
        load_classifier(classifier, "cpu")  # a corrupt file: one line (QualityError) now, not after sampling

    # 2. Samples: the EMA model, seed run.seed + 1 (the grids in TensorBoard use run.seed).
    if n > 0:
        imgs = decode_samples(model, schedule, ae, mean, std, n, cfg.run.seed + 1, device)
        images_u8 = (imgs * 255).round().to(torch.uint8).cpu()  # (n, 1, 28, 28)
        (run_dir / RUN_SAMPLES).parent.mkdir(exist_ok=True)
        atomic_save_safetensors({"images": images_u8}, run_dir / RUN_SAMPLES)

    # 3. Scores.
    if skip is not None:
        print(f"score: skipping FD-MNIST: {skip}")
    else:
        q = score_images(images_u8, classifier, cfg.data.shards, device)  # QualityError: one line, exit 2
        log_to_tensorboard(run_dir / TB_DIR, q, meta["steps"])
        floor = "n/a" if q["fd_floor_at_n"] is None else f"{q['fd_floor_at_n']:.2f}"
        print(
            f"score: FD-MNIST {q['fd_mnist']:.2f} (floor at this n: {floor}), "
            f"confidence {q['mean_confidence']:.3f}, classes {q['class_counts']}"
        )
        record["quality"] = q
    atomic_write_text(run_dir / QUALITY_FILE, json.dumps(record, indent=1))
    print(f"score: {run_dir / QUALITY_FILE}")


if __name__ == "__main__":
    run_cli(main)
