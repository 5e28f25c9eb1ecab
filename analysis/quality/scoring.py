"""Sample quality of generated MNIST digits: FD-MNIST, confidence and class balance.

References:
    M. Heusel et al., NeurIPS 2017 (the Frechet Inception Distance; here with the small MNIST CNN
    of models/classifier.py, hence "FD-MNIST"; the distance itself is models.classifier.frechet_distance).
    M. J. Chong, D. Forsyth, "Effectively unbiased FID and Inception score and where to find
    them", CVPR 2020 (FD is biased upward for finite N; compare scores at equal N).
    K. Pearson, "On the criterion that a given system of deviations ...", Phil. Mag. 50, 1900
    (the chi-square goodness-of-fit test of the class histogram against uniform).

What is measured, for N generated images (N, 1, 28, 28) in [0, 1]:
    * ``fd_mnist``: Frechet distance between Gaussian fits of the classifier's penultimate
      features (128-d, after ReLU) of the generated images and of the 10,000 test images.
    * ``fd_floor``: the same distance for 10,000 *real training* images (a fixed subset,
      seed 0) against the test set: what a perfect generator scores at N = 10,000. It is
      computed once at training time (training/train_classifier.py) and stored in the
      classifier's JSON sidecar, with the floor at smaller N (``fd_floor_at_n``), because FD
      grows as N shrinks.
    * ``mean_confidence``: mean top-class softmax probability (low for blurry/ambiguous digits).
    * ``class_counts``, ``chi2``, ``chi2_p``: histogram of predicted classes and Pearson's
      chi-square test against uniform (p ~ 0 flags mode collapse; note that MNIST itself is
      not exactly uniform, so for large N even real data gives a small p).

The test features' Gaussian fit is cached next to the classifier (``X.reference.safetensors``),
keyed by the classifier's and the manifest's sha256, and recomputed on a mismatch.

Command line (a DiT run is scored by its own stage, analysis/score_samples.py):
    python -m analysis.quality score --classifier PATH --shards DIR
        (--images FILE.safetensors | --folder DIR_OF_PNGS | --run RUN_DIR) [--json OUT.json]
Exit codes: 0 success, 2 an expected error (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats
import torch
from PIL import Image

from configs.cli import OneLineParser, call_cli
from configs.io import file_sha256, read_safetensors
from data_pipeline.loader import load_split_in_memory
from data_pipeline.shards import manifest_sha256
from models.classifier import (
    FLOOR_N,
    NUM_CLASSES,
    TRAIN_HINT,
    MnistClassifier,
    QualityError,
    frechet_distance,
    gaussian_fit,
    load_classifier,
    predict,
    read_reference,
    reference_path,
    resolve_device,
    save_reference,
)

__all__ = [
    "ReferenceStats",
    "load_reference_stats",
    "features",
    "score",
    "score_images",
    "as_float_images",
    "load_images_safetensors",
    "load_images_folder",
    "main",
]

RUN_SAMPLES = Path("samples") / "ema_samples.safetensors"


# ----------------------------------------------------------------------------- statistics


@dataclass
class ReferenceStats:
    """Gaussian fit of the test set's features and the floor it is compared with."""

    mu: np.ndarray
    """(128,) float64 mean of the test features."""
    sigma: np.ndarray
    """(128, 128) float64 covariance of the test features (unbiased, N - 1)."""
    n: int
    """Number of test images the fit used."""
    floor: dict[str, Any] | None = None
    """The sidecar's ``floor`` entry (``fd_mnist`` at N = 10,000 and ``by_n``), if known."""


def load_reference_stats(
    classifier: MnistClassifier | str | Path,
    shard_dir: str | Path | None,
    device: str | torch.device | None = "auto",
) -> ReferenceStats:
    """Test-set feature statistics: from the cache next to the classifier, else computed.

    The cache is used when it was made by these exact weights and (if ``shard_dir`` is given)
    from shards with the same manifest; otherwise the test split is re-encoded and the cache
    rewritten.

    Args:
        classifier: a loaded classifier (from ``load_classifier``) or the weights' path.
        shard_dir: the MNIST shards; may be None only when a valid cache exists.
        device: for the classifier when a path is given.
    """
    if not isinstance(classifier, MnistClassifier):
        classifier = load_classifier(classifier, device)
    path: Path | None = getattr(classifier, "source_path", None)
    if path is None:
        raise QualityError("the classifier has no weights file to key the cache on; load it with load_classifier(path)")
    classifier_sha = file_sha256(path)
    manifest_sha = manifest_sha256(shard_dir) if shard_dir is not None else None
    floor = (classifier.sidecar or {}).get("floor")
    trained_on = (classifier.sidecar or {}).get("shards_manifest_sha256")
    if manifest_sha is not None and trained_on is not None and trained_on != manifest_sha:
        warnings.warn(
            f"shards {str(shard_dir)!r} differ from those the classifier was trained on "
            f"(manifest sha256 {manifest_sha[:12]} vs {trained_on[:12]}); the floor may not apply",
            stacklevel=2,
        )
    cached = read_reference(path, classifier_sha, manifest_sha)
    if cached is not None:
        return ReferenceStats(*cached, floor)
    if shard_dir is None:
        raise QualityError(
            f"no valid reference statistics at {str(reference_path(path))!r} for these weights; pass --shards DIR "
            "(the MNIST shards) so they can be computed"
        )
    device_of_model = next(classifier.parameters()).device
    x_test, _ = load_split_in_memory(shard_dir, "test", device=device_of_model)
    feats, _ = predict(classifier, x_test, 1000)
    mu, sigma = gaussian_fit(feats.double().cpu().numpy())
    save_reference(path, mu, sigma, x_test.shape[0], classifier_sha, manifest_sha)
    return ReferenceStats(mu, sigma, int(x_test.shape[0]), floor)


def as_float_images(images: torch.Tensor | np.ndarray, what: str = "images") -> torch.Tensor:
    """Validate generated images and convert them to float32 (N, 1, 28, 28) in [0, 1].

    Args:
        images: uint8 (N, 1, 28, 28) or (N, 28, 28) (divided by 255), or floating point of
            those shapes already in [0, 1]. Nothing is clamped or rescaled silently.
        what: how to name the input in error messages.

    Raises:
        QualityError: wrong type, dtype, shape, non-finite values or values outside [0, 1].
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise QualityError(f"{what} must be a torch.Tensor or numpy array, got {type(images).__name__}")
    shape = tuple(images.shape)
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, 28, 28) or images.shape[0] == 0:
        raise QualityError(f"{what} must have shape (N, 1, 28, 28) or (N, 28, 28) with N >= 1, got {shape}")
    if images.dtype == torch.uint8:
        return images.to(torch.float32) / 255.0
    if not images.is_floating_point():
        raise QualityError(
            f"{what} must be uint8 (0..255) or float in [0, 1], got dtype {images.dtype}; "
            "convert with .to(torch.uint8) or divide by 255"
        )
    images = images.to(torch.float32)
    if not bool(torch.isfinite(images).all()):
        raise QualityError(f"{what} contain NaN or Inf values")
    lo, hi = float(images.min()), float(images.max())
    if lo < 0.0 or hi > 1.0:
        raise QualityError(
            f"{what} are float with range [{lo:.4g}, {hi:.4g}], expected [0, 1]; "
            "map model outputs in [-1, 1] with (x + 1) / 2 and clamp before scoring"
        )
    return images


def features(
    classifier: MnistClassifier, images: torch.Tensor | np.ndarray, batch_size: int = 1000
) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features and class probabilities.

    Args:
        classifier: from ``load_classifier``.
        images: (N, 1, 28, 28) or (N, 28, 28); uint8 or float in [0, 1] (see ``as_float_images``).
        batch_size: images per forward pass.

    Returns:
        features (N, 128) float64, probs (N, 10) float64 (rows sum to 1).
    """
    x = as_float_images(images)
    feats, logits = predict(classifier, x, batch_size)
    return feats.double().cpu().numpy(), torch.softmax(logits.double(), dim=1).cpu().numpy()


def _floor_at(floor: dict[str, Any] | None, n: int) -> tuple[float | None, int | None]:
    """The floor tabulated at the largest N' <= n, else at the smallest tabulated N'.

    FD falls with N, so for N' < n this is a somewhat higher floor than the one at n: read it
    as "what real digits score at about this N", not as an exact bound.
    """
    if not floor or "by_n" not in floor:
        return None, None
    keys = sorted(int(k) for k in floor["by_n"])
    below = [k for k in keys if k <= n]
    k = below[-1] if below else keys[0]
    return float(floor["by_n"][str(k)]), k


def score(
    images: torch.Tensor | np.ndarray,
    classifier: MnistClassifier,
    reference_stats: ReferenceStats,
    batch_size: int = 1000,
) -> dict[str, Any]:
    """Quality metrics of generated images.

    Args:
        images: (N, 1, 28, 28) or (N, 28, 28), uint8 or float in [0, 1]; N >= 2.
        classifier: from ``load_classifier``.
        reference_stats: from ``load_reference_stats``.
        batch_size: images per forward pass.

    Returns:
        dict with ``n``, ``fd_mnist``, ``fd_floor`` (N = 10,000), ``fd_floor_at_n`` and
        ``fd_floor_n`` (the floor tabulated at the largest N' <= n), ``mean_confidence``,
        ``class_counts`` (10 ints), ``chi2``, ``chi2_p`` (against uniform).
    """
    feats, probs = features(classifier, images, batch_size)
    n = feats.shape[0]
    if n < 2:
        raise QualityError(f"need at least 2 images to fit a Gaussian for FD-MNIST, got {n}")
    mu, sigma = gaussian_fit(feats)
    fd = frechet_distance(mu, sigma, reference_stats.mu, reference_stats.sigma)
    counts = np.bincount(probs.argmax(axis=1), minlength=NUM_CLASSES)
    chi = scipy.stats.chisquare(counts)  # uniform expected counts n / 10
    floor_at_n, floor_n = _floor_at(reference_stats.floor, n)
    return {
        "n": int(n),
        "fd_mnist": fd,
        "fd_floor": None if not reference_stats.floor else float(reference_stats.floor["fd_mnist"]),
        "fd_floor_at_n": floor_at_n,
        "fd_floor_n": floor_n,
        "mean_confidence": float(probs.max(axis=1).mean()),
        "class_counts": [int(c) for c in counts],
        "chi2": float(chi.statistic),
        "chi2_p": float(chi.pvalue),
    }


_CACHE: dict[tuple, tuple[MnistClassifier, ReferenceStats]] = {}


def score_images(
    images: torch.Tensor | np.ndarray,
    classifier_path: str | Path,
    shard_dir: str | Path | None,
    device: str | torch.device | None = "auto",
) -> dict[str, Any]:
    """One call for a stage: load (once per process) the classifier and stats, then score.

    Args:
        images: (N, 1, 28, 28) or (N, 28, 28), uint8 or float in [0, 1].
        classifier_path: weights written by training/train_classifier.py.
        shard_dir: MNIST shards (needed only if the reference cache is missing or stale).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...

    Returns:
        See ``score``.
    """
    path = Path(classifier_path).resolve()
    if not path.is_file():
        raise QualityError(f"classifier weights {str(classifier_path)!r} not found; {TRAIN_HINT}")
    dev = resolve_device(device)
    # mtime in the key: retraining into the same path must not serve stale weights.
    key = (str(path), path.stat().st_mtime_ns, str(Path(shard_dir).resolve()) if shard_dir else None, str(dev))
    if key not in _CACHE:
        model = load_classifier(path, dev)
        _CACHE[key] = (model, load_reference_stats(model, shard_dir))
    model, ref = _CACHE[key]
    return score(images, model, ref)


# ----------------------------------------------------------------------------- image files


def load_images_safetensors(path: str | Path) -> torch.Tensor:
    """Read ``images`` from a safetensors file and validate it (see ``as_float_images``).

    Returns:
        (N, 1, 28, 28) float32 in [0, 1].
    """
    path = Path(path)
    tensors = read_safetensors(
        path, missing=f"images file {str(path)!r} not found", what=repr(str(path)), error=QualityError
    )
    if "images" not in tensors:
        raise QualityError(f"{str(path)!r} has no tensor named 'images' (found {sorted(tensors)})")
    return as_float_images(tensors["images"], what=f"'images' in {path}")


def load_images_folder(folder: str | Path) -> torch.Tensor:
    """Read every ``*.png`` (28x28, 8-bit grayscale) in a folder, sorted by name.

    Returns:
        (N, 1, 28, 28) float32 in [0, 1].
    """

    folder = Path(folder)
    if not folder.is_dir():
        raise QualityError(f"image folder {str(folder)!r} not found")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png")
    if not files:
        raise QualityError(f"no .png files in {str(folder)!r}")
    out = np.empty((len(files), 28, 28), dtype=np.uint8)  # (N, 28, 28)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                if im.mode != "L" or im.size != (28, 28):
                    raise QualityError(
                        f"{str(f)!r} is {im.size[0]}x{im.size[1]} mode {im.mode}, expected 28x28 8-bit grayscale "
                        "(mode L); convert with PIL: im.convert('L').resize((28, 28))"
                    )
                out[i] = np.asarray(im, dtype=np.uint8)
        except OSError as exn:
            raise QualityError(f"cannot read PNG {str(f)!r}: {exn}") from exn
    return as_float_images(out, what=f"PNGs in {folder}")


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser (subcommand ``score``; the classifier is trained by training/train_classifier.py)."""
    parser = OneLineParser(prog="python -m analysis.quality", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    sc = sub.add_parser("score", help="score generated images")
    sc.add_argument("--classifier", required=True, help="weights from training/train_classifier.py")
    sc.add_argument("--shards", required=True, help="MNIST shard directory (for the test reference statistics)")
    src = sc.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="safetensors file with 'images' uint8 or float [0,1], (N,1,28,28) or (N,28,28)")
    src.add_argument("--folder", help="folder of 28x28 grayscale PNGs")
    src.add_argument("--run", help=f"a DiT run directory; scores RUN/{RUN_SAMPLES}")
    sc.add_argument("--json", help="also write the metrics to this JSON file")
    sc.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    return parser


def _format_table(m: dict[str, Any]) -> str:
    def fmt(v: float | None, spec: str = ".3f") -> str:
        return "n/a" if v is None else format(v, spec)

    rows = [
        ("images", str(m["n"])),
        ("FD-MNIST", fmt(m["fd_mnist"])),
        (f"floor (train vs test, N={m['fd_floor_n']})", fmt(m["fd_floor_at_n"])),
        (f"floor (train vs test, N={FLOOR_N})", fmt(m["fd_floor"])),
        ("mean confidence", fmt(m["mean_confidence"], ".4f")),
        ("chi2 vs uniform", f"{m['chi2']:.2f} (p = {m['chi2_p']:.3g})"),
        ("class counts 0..9", " ".join(str(c) for c in m["class_counts"])),
    ]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _cmd_score(args: argparse.Namespace) -> int:
    if not Path(args.classifier).is_file():  # before reading images: the cheaper mistake to report first
        raise QualityError(f"classifier weights {args.classifier!r} not found; {TRAIN_HINT}")
    if args.images:
        source, images = args.images, load_images_safetensors(args.images)
    elif args.folder:
        source, images = args.folder, load_images_folder(args.folder)
    else:
        path = Path(args.run) / RUN_SAMPLES
        if not path.is_file():
            raise QualityError(
                f"run directory {args.run!r} has no {RUN_SAMPLES}; sample it with "
                "python analysis/score_samples.py --config ... (after the DiT training)"
            )
        source, images = str(path), load_images_safetensors(path)
    metrics = score_images(images, args.classifier, args.shards, args.device)
    print(_format_table(metrics))
    if args.json:
        record = {"source": source, "classifier": str(args.classifier), **metrics}
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code instead of exiting (testable in-process)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exn:
        return int(exn.code or 0)
    return call_cli(lambda _: _cmd_score(args), prog="python -m analysis.quality")


if __name__ == "__main__":
    sys.exit(main())
