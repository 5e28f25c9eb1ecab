"""Sample quality of generated MNIST digits: FD-MNIST, confidence and class balance.

References:
    M. Heusel, H. Ramsauer, T. Unterthiner, B. Nessler, S. Hochreiter, "GANs trained by a
    two time-scale update rule converge to a local Nash equilibrium", NeurIPS 2017 (the
    Frechet Inception Distance; here the Inception network is replaced by a small MNIST CNN,
    hence "FD-MNIST").
    D. C. Dowson, B. V. Landau, "The Frechet distance between multivariate normal
    distributions", J. Multivariate Anal. 12(3):450-455, 1982 (the closed form
    d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})).
    M. J. Chong, D. Forsyth, "Effectively unbiased FID and Inception score and where to find
    them", CVPR 2020 (FD is biased upward for finite N; compare scores at equal N).
    K. Pearson, "On the criterion that a given system of deviations ...", Phil. Mag. 50, 1900
    (the chi-square goodness-of-fit test of the class histogram against uniform).
    I. Loshchilov, F. Hutter, "Decoupled weight decay regularization" (AdamW), ICLR 2019.

What is measured, for N generated images (N, 1, 28, 28) in [0, 1]:
    * ``fd_mnist``: Frechet distance between Gaussian fits of the classifier's penultimate
      features (128-d, after ReLU) of the generated images and of the 10,000 test images.
    * ``fd_floor``: the same distance for 10,000 *real training* images (a fixed subset,
      seed 0) against the test set: what a perfect generator scores at N = 10,000. It is
      computed once at training time and stored in the classifier's JSON sidecar, with the
      floor at smaller N (``fd_floor_at_n``), because FD grows as N shrinks.
    * ``mean_confidence``: mean top-class softmax probability (low for blurry/ambiguous digits).
    * ``class_counts``, ``chi2``, ``chi2_p``: histogram of predicted classes and Pearson's
      chi-square test against uniform (p ~ 0 flags mode collapse; note that MNIST itself is
      not exactly uniform, so for large N even real data gives a small p).

Files written by ``train_classifier(out_path=X.safetensors)``:
    * ``X.safetensors``: classifier weights (safetensors only, so loading never unpickles).
    * ``X.json``: train config, test accuracy, sha256 of the shards' manifest.json, the floor.
    * ``X.reference.safetensors``: mu (128,) and Sigma (128, 128), float64, of the test
      features, keyed by the classifier's and the manifest's sha256 (recomputed on mismatch).

Command line:
    python -m analysis.quality train --shards DIR --out PATH.safetensors [--epochs N] [--device auto]
    python -m analysis.quality score --classifier PATH --shards DIR
        (--images FILE.safetensors | --folder DIR_OF_PNGS | --run RUN_DIR) [--json OUT.json]
Exit codes: 0 success, 2 an expected error (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import scipy.linalg
import scipy.stats
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file

from configs.cli import UserError
from configs.io import atomic_save_safetensors, atomic_write_bytes, file_sha256

__all__ = [
    "QualityError",
    "TrainConfig",
    "MnistClassifier",
    "ReferenceStats",
    "train_classifier",
    "load_classifier",
    "load_reference_stats",
    "features",
    "gaussian_fit",
    "frechet_distance",
    "score",
    "score_images",
    "as_float_images",
    "load_images_safetensors",
    "load_images_folder",
    "main",
]

FORMAT = "latent-sindy/mnist-classifier"
FORMAT_VERSION = 1
REF_FORMAT = "latent-sindy/mnist-classifier-reference"
FEATURE_DIM = 128
NUM_CLASSES = 10
FLOOR_N = 10_000
FLOOR_SEED = 0
# Smaller N at which the floor is also tabulated: FD depends on N, so a 1,000-sample score
# must be compared with the 1,000-sample floor, not the 10,000-sample one.
FLOOR_NS = (250, 500, 1_000, 2_000, 5_000, 10_000)
RUN_SAMPLES = Path("samples") / "ema_samples.safetensors"


class QualityError(UserError, ValueError):
    """An expected, user-fixable error (bad input, missing file); the CLI prints it in one line."""


# ----------------------------------------------------------------------------- classifier


class MnistClassifier(nn.Module):
    """conv(1->32) -> pool -> conv(32->64) -> pool -> FC 128 (features) -> FC 10.

    Pooling after each conv (rather than conv-conv-pool) keeps a CPU epoch a few seconds
    per 10k images; the GPU recipe still clears 99% test accuracy.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 7 * 7, FEATURE_DIM)
        self.fc2 = nn.Linear(FEATURE_DIM, NUM_CLASSES)
        self.dropout = nn.Dropout(0.25)
        # channels_last runs the CPU (oneDNN) convolutions ~1.5-2x faster; it changes only
        # the memory layout, not the values or the saved state dict.
        self.to(memory_format=torch.channels_last)

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        """Features. Args: x (B, 1, 28, 28) in [0, 1]. Returns: (B, 128), non-negative."""
        x = x.contiguous(memory_format=torch.channels_last)
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, 32, 14, 14)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # (B, 64, 7, 7)
        return F.relu(self.fc1(h.flatten(1)))  # (B, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits. Args: x (B, 1, 28, 28) in [0, 1]. Returns: (B, 10)."""
        return self.fc2(self.dropout(self.penultimate(x)))


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


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise QualityError(f"device {str(device)!r} asked for but CUDA is not available; use --device cpu or auto")
    return device


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


@torch.no_grad()
def _predict(model: MnistClassifier, images: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, 128) float32 and logits (N, 10) on the model's device, in eval mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    feats, logits = [], []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(device=device, dtype=torch.float32)
        f = model.penultimate(x)
        feats.append(f)
        logits.append(model.fc2(f))
    model.train(was_training)
    return torch.cat(feats), torch.cat(logits)



def _manifest_sha256(shard_dir: str | Path) -> str:
    from data_pipeline.shards import MANIFEST_NAME

    path = Path(shard_dir) / MANIFEST_NAME
    if not path.is_file():
        raise QualityError(
            f"no {MANIFEST_NAME} in shard directory {str(shard_dir)!r}; "
            f"prepare it with: python -m data_pipeline.prepare --out {shard_dir}"
        )
    return file_sha256(path)


def _load_split(shard_dir: str | Path, split: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    from data_pipeline.loader import load_split_in_memory
    from data_pipeline.sources import DataPipelineError

    _manifest_sha256(shard_dir)  # a clear message for the common "wrong directory" case
    try:
        return load_split_in_memory(shard_dir, split, device=device)
    except DataPipelineError as exn:
        raise QualityError(f"cannot read the {split} split from {str(shard_dir)!r}: {exn}") from exn


def _sidecar_path(path: Path) -> Path:
    return path.with_suffix(".json")


def _reference_path(path: Path) -> Path:
    return path.with_suffix(".reference.safetensors")


def _atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    atomic_save_safetensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path, metadata)


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
    dev = _resolve_device(device)
    manifest_sha = _manifest_sha256(shard_dir)
    x_train, y_train = _load_split(shard_dir, "train", dev)  # (60000, 1, 28, 28), (60000,)
    x_test, y_test = _load_split(shard_dir, "test", dev)  # (10000, 1, 28, 28), (10000,)
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

    test_feats, test_logits = _predict(model, x_test, 1000)
    test_acc = float((test_logits.argmax(1) == y_test).float().mean())
    ref_mu, ref_sigma = gaussian_fit(test_feats.double().cpu().numpy())

    # The floor: a fixed random 10,000-image subset of the training split (seed 0) against
    # the test set -- a "perfect generator" at the N used for scoring.
    floor_idx = torch.randperm(x_train.shape[0], generator=torch.Generator().manual_seed(FLOOR_SEED))[:FLOOR_N]
    floor_feats, _ = _predict(model, x_train[floor_idx.to(dev)], 1000)
    floor_feats = floor_feats.double().cpu().numpy()
    floor_by_n = {
        str(k): frechet_distance(*gaussian_fit(floor_feats[:k]), ref_mu, ref_sigma) for k in FLOOR_NS
    }

    state = {k: v for k, v in model.state_dict().items()}
    _atomic_save_safetensors(state, out_path, {"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    classifier_sha = file_sha256(out_path)
    _save_reference(out_path, ref_mu, ref_sigma, x_test.shape[0], classifier_sha, manifest_sha)
    sidecar = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": "conv3x3(1->32)-relu-maxpool2-conv3x3(32->64)-relu-maxpool2-fc(3136->128)-relu-fc(128->10)",
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
        "reference_stats": _reference_path(out_path).name,
        "floor": {
            "fd_mnist": floor_by_n[str(FLOOR_N)],
            "n": FLOOR_N,
            "description": f"FD-MNIST of a random {FLOOR_N}-image subset of the train split "
            f"(torch.randperm, seed {FLOOR_SEED}) vs the full test split",
            "seed": FLOOR_SEED,
            "by_n": floor_by_n,
        },
    }
    atomic_write_bytes(_sidecar_path(out_path), (json.dumps(sidecar, indent=2) + "\n").encode())
    return sidecar


def load_classifier(path: str | Path, device: str | torch.device | None = "auto") -> MnistClassifier:
    """Load weights written by ``train_classifier`` (safetensors only: no pickle is executed).

    Args:
        path: the ``*.safetensors`` file.
        device: where to put the model; ``"auto"`` = CUDA when available.

    Returns:
        The classifier in eval mode; ``model.sidecar`` holds the JSON sidecar (or None).

    Raises:
        QualityError: the file is missing, not a safetensors file, or holds other weights.
    """
    path = Path(path)
    hint = "train one with: python -m analysis.quality train --shards DIR --out PATH.safetensors"
    if not path.is_file():
        raise QualityError(f"classifier weights {str(path)!r} not found; {hint}")
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exn:
        raise QualityError(f"classifier {str(path)!r} is not a readable safetensors file ({exn}); {hint}") from exn
    model = MnistClassifier()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        shapes = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
        raise QualityError(
            f"classifier {str(path)!r} does not match MnistClassifier "
            f"(missing {missing}, unexpected {extra}, wrong shapes {shapes}); {hint}"
        )
    model.load_state_dict(state)
    model.to(_resolve_device(device)).eval()
    sidecar_path = _sidecar_path(path)
    model.sidecar = json.loads(sidecar_path.read_text()) if sidecar_path.is_file() else None
    model.source_path = path
    return model


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


def _save_reference(
    path: Path, mu: np.ndarray, sigma: np.ndarray, n: int, classifier_sha: str, manifest_sha: str
) -> None:
    meta = {
        "format": REF_FORMAT,
        "split": "test",
        "n": str(n),
        "classifier_sha256": classifier_sha,
        "shards_manifest_sha256": manifest_sha,
    }
    _atomic_save_safetensors(
        {"mu": torch.from_numpy(mu), "sigma": torch.from_numpy(sigma)}, _reference_path(path), meta
    )


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
    manifest_sha = _manifest_sha256(shard_dir) if shard_dir is not None else None
    floor = (classifier.sidecar or {}).get("floor")
    trained_on = (classifier.sidecar or {}).get("shards_manifest_sha256")
    if manifest_sha is not None and trained_on is not None and trained_on != manifest_sha:
        warnings.warn(
            f"shards {str(shard_dir)!r} differ from those the classifier was trained on "
            f"(manifest sha256 {manifest_sha[:12]} vs {trained_on[:12]}); the floor may not apply",
            stacklevel=2,
        )
    ref_path = _reference_path(path)
    if ref_path.is_file():
        from safetensors import safe_open

        with safe_open(str(ref_path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if (
                meta.get("format") == REF_FORMAT
                and meta.get("classifier_sha256") == classifier_sha
                and (manifest_sha is None or meta.get("shards_manifest_sha256") == manifest_sha)
            ):
                return ReferenceStats(
                    fh.get_tensor("mu").numpy(), fh.get_tensor("sigma").numpy(), int(meta["n"]), floor
                )
    if shard_dir is None:
        raise QualityError(
            f"no valid reference statistics at {str(ref_path)!r} for these weights; pass --shards DIR "
            "(the MNIST shards) so they can be computed"
        )
    device_of_model = next(classifier.parameters()).device
    x_test, _ = _load_split(shard_dir, "test", device_of_model)
    feats, _ = _predict(classifier, x_test, 1000)
    mu, sigma = gaussian_fit(feats.double().cpu().numpy())
    _save_reference(path, mu, sigma, x_test.shape[0], classifier_sha, manifest_sha)
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
        classifier: from ``load_classifier`` or ``train_classifier``'s weights.
        images: (N, 1, 28, 28) or (N, 28, 28); uint8 or float in [0, 1] (see ``as_float_images``).
        batch_size: images per forward pass.

    Returns:
        features (N, 128) float64, probs (N, 10) float64 (rows sum to 1).
    """
    x = as_float_images(images)
    feats, logits = _predict(classifier, x, batch_size)
    return feats.double().cpu().numpy(), torch.softmax(logits.double(), dim=1).cpu().numpy()


def gaussian_fit(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), float64; needs N >= 2."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise QualityError(f"need features of shape (N, D) with N >= 2 to fit a Gaussian, got {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (D, D); rounding negatives clipped to 0."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Frechet (2-Wasserstein) distance between N(mu1, S1) and N(mu2, S2).

    d^2 = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2})   (Dowson & Landau 1982).

    S1 S2 is not symmetric, so ``scipy.linalg.sqrtm`` of it returns a complex matrix whose
    imaginary part is rounding noise (and fails outright for the singular covariances that
    N < D samples give); FID code therefore takes the real part and retries with S + eps I.
    Instead we use that S1 S2 is similar to the symmetric PSD matrix M = S1^{1/2} S2 S1^{1/2}
    (S1 S2 = S1^{1/2} M S1^{-1/2} when S1 is invertible, and by continuity otherwise), so
    Tr((S1 S2)^{1/2}) = sum_i sqrt(lambda_i(M)) with real eigenvalues from ``eigh``; the
    tiny negative eigenvalues rounding produces are clipped to zero. This needs no eps,
    works for singular covariances, and the result is real by construction.

    Args:
        mu1, mu2: (D,) means.
        sigma1, sigma2: (D, D) symmetric positive semi-definite covariances.

    Returns:
        The distance (squared, as in FID), a non-negative float.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise QualityError(
            f"shape mismatch: mu1 {mu1.shape}, mu2 {mu2.shape}, sigma1 {s1.shape}, sigma2 {s2.shape}; "
            "expected (D,), (D,), (D, D), (D, D)"
        )
    for name, a in (("mu1", mu1), ("mu2", mu2), ("sigma1", s1), ("sigma2", s2)):
        if not np.isfinite(a).all():
            raise QualityError(f"{name} contains NaN or Inf")
    r1 = _psd_sqrt(s1)
    m = r1 @ s2 @ r1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_sqrt = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)
    # Rounding can push a true zero slightly negative; anything worse is a real bug.
    if value < -1e-6 * max(1.0, float(np.trace(s1) + np.trace(s2))):
        raise AssertionError(f"Frechet distance came out negative ({value}); covariances not PSD?")
    return max(value, 0.0)


def _frechet_distance_sqrtm(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Reference implementation with ``scipy.linalg.sqrtm`` (FID-style), for cross-checks."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = np.real(covmean)  # the imaginary part is rounding noise, see frechet_distance
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


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
    """One call for training code: load (once per process) the classifier and stats, then score.

    Args:
        images: (N, 1, 28, 28) or (N, 28, 28), uint8 or float in [0, 1].
        classifier_path: weights written by ``train_classifier``.
        shard_dir: MNIST shards (needed only if the reference cache is missing or stale).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...

    Returns:
        See ``score``.
    """
    path = Path(classifier_path).resolve()
    if not path.is_file():
        raise QualityError(
            f"classifier weights {str(classifier_path)!r} not found; train one with: "
            "python -m analysis.quality train --shards DIR --out PATH.safetensors"
        )
    dev = _resolve_device(device)
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
    if not path.is_file():
        raise QualityError(f"images file {str(path)!r} not found")
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exn:
        raise QualityError(f"{str(path)!r} is not a readable safetensors file ({exn})") from exn
    if "images" not in tensors:
        raise QualityError(f"{str(path)!r} has no tensor named 'images' (found {sorted(tensors)})")
    return as_float_images(tensors["images"], what=f"'images' in {path}")


def load_images_folder(folder: str | Path) -> torch.Tensor:
    """Read every ``*.png`` (28x28, 8-bit grayscale) in a folder, sorted by name.

    Returns:
        (N, 1, 28, 28) float32 in [0, 1].
    """
    from PIL import Image

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


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse prints the whole usage block; the house rule is one line naming the problem.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser (subcommands ``train`` and ``score``)."""
    parser = _OneLineParser(prog="python -m analysis.quality", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)
    tr = sub.add_parser("train", help="train the feature classifier, write weights + sidecar + reference stats")
    tr.add_argument("--shards", required=True, help="MNIST shard directory (python -m data_pipeline.prepare)")
    tr.add_argument("--out", required=True, help="weights path, *.safetensors")
    d = TrainConfig()
    tr.add_argument("--epochs", type=int, default=d.epochs, help=f"default {d.epochs}")
    tr.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
    tr.add_argument("--lr", type=float, default=d.lr, help=f"peak AdamW learning rate, default {d.lr}")
    tr.add_argument("--seed", type=int, default=d.seed, help=f"default {d.seed}")
    tr.add_argument("--limit", type=int, default=None, help="train on the first N training images only")
    tr.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda[:i]")
    sc = sub.add_parser("score", help="score generated images")
    sc.add_argument("--classifier", required=True, help="weights from `train`")
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


def _cmd_train(args: argparse.Namespace) -> int:
    info = train_classifier(
        args.shards, args.out, args.epochs, args.batch_size, args.lr, args.seed, args.device, limit=args.limit, log=True
    )
    print(
        f"{args.out}: test accuracy {info['test_accuracy']:.4f}, FD-MNIST floor {info['floor']['fd_mnist']:.3f} "
        f"(N={FLOOR_N}), {info['train_seconds']:.0f} s on {info['device']}"
    )
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    if not Path(args.classifier).is_file():  # before reading images: the cheaper mistake to report first
        raise QualityError(
            f"classifier weights {args.classifier!r} not found; train one with: "
            "python -m analysis.quality train --shards DIR --out PATH.safetensors"
        )
    if args.images:
        source, images = args.images, load_images_safetensors(args.images)
    elif args.folder:
        source, images = args.folder, load_images_folder(args.folder)
    else:
        path = Path(args.run) / RUN_SAMPLES
        if not path.is_file():
            raise QualityError(f"run directory {args.run!r} has no {RUN_SAMPLES} (did the DiT training finish?)")
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
    from data_pipeline.sources import DataPipelineError

    try:
        return _cmd_train(args) if args.command == "train" else _cmd_score(args)
    except (QualityError, DataPipelineError, OSError) as exn:
        print(f"python -m analysis.quality: error: {exn}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
