"""The MNIST feature classifier of FD-MNIST, its Gaussian feature statistics and its files.

References:
    M. Heusel, H. Ramsauer, T. Unterthiner, B. Nessler, S. Hochreiter, "GANs trained by a
    two time-scale update rule converge to a local Nash equilibrium", NeurIPS 2017 (the
    Frechet Inception Distance; here the Inception network is replaced by this small MNIST CNN,
    hence "FD-MNIST").
    D. C. Dowson, B. V. Landau, "The Frechet distance between multivariate normal
    distributions", J. Multivariate Anal. 12(3):450-455, 1982 (the closed form
    d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})).

The Frechet distance lives here, next to the network, because both sides of the classifier use
it: training (training/train_classifier.py) stores the floor, the distance of real training
digits to the test set, in the sidecar; scoring (analysis/quality/scoring.py) compares generated digits.

Files of a classifier ``X.safetensors``:
    * ``X.safetensors``: weights (safetensors only, so loading never unpickles).
    * ``X.json``: the sidecar: train config, test accuracy, sha256 of the shards' manifest.json,
      the floor (``fd_mnist`` at ``FLOOR_N`` and ``by_n`` at ``FLOOR_NS``).
    * ``X.reference.safetensors``: mu (128,) and Sigma (128, 128), float64, of the test
      features, keyed by the classifier's and the manifest's sha256.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

from configs.cli import UserError
from configs.io import atomic_save_safetensors, atomic_write_bytes, file_sha256, read_safetensors
from configs.io import resolve_device as _resolve_device

__all__ = [
    "QualityError",
    "MnistClassifier",
    "resolve_device",
    "predict",
    "gaussian_fit",
    "frechet_distance",
    "save_classifier",
    "write_sidecar",
    "load_classifier",
    "save_reference",
    "read_reference",
    "sidecar_path",
    "reference_path",
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
TRAIN_HINT = "train one with: python training/train_classifier.py --shards DIR --out PATH.safetensors"


class QualityError(UserError, ValueError):
    """An expected, user-fixable error (bad input, missing file); the CLIs print it in one line."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None: CUDA when available; otherwise the named device, refused if CUDA is absent."""
    try:
        return _resolve_device(device)
    except UserError as e:  # the scoring CLIs' own error type, so callers catch one class
        raise QualityError(str(e)) from None


class MnistClassifier(nn.Module):
    """conv(1->32) -> pool -> conv(32->64) -> pool -> FC 128 (features) -> FC 10.

    Pooling after each conv (rather than conv-conv-pool) keeps a CPU epoch a few seconds
    per 10k images; the GPU recipe still clears 99% test accuracy.
    """

    ARCHITECTURE = "conv3x3(1->32)-relu-maxpool2-conv3x3(32->64)-relu-maxpool2-fc(3136->128)-relu-fc(128->10)"

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


@torch.no_grad()
def predict(model: MnistClassifier, images: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, 128) float32 and logits (N, 10) on the model's device, in eval mode.

    Args:
        images: (N, 1, 28, 28) float in [0, 1].
    """
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


# ----------------------------------------------------------------------------- feature statistics


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


# ----------------------------------------------------------------------------- files


def sidecar_path(path: Path) -> Path:
    return path.with_suffix(".json")


def reference_path(path: Path) -> Path:
    return path.with_suffix(".reference.safetensors")


def save_classifier(model: MnistClassifier, path: Path) -> str:
    """Write the weights atomically; returns their sha256 (the key of the reference statistics)."""
    state = {k: v for k, v in model.state_dict().items()}
    atomic_save_safetensors(
        {k: v.detach().contiguous().cpu() for k, v in state.items()},
        path,  # channels_last
        {"format": FORMAT, "format_version": str(FORMAT_VERSION)},
    )
    return file_sha256(path)


def write_sidecar(path: Path, sidecar: dict[str, Any]) -> None:
    """The JSON sidecar next to the weights at ``path``, written atomically."""
    out = sidecar_path(path)
    atomic_write_bytes(out, (json.dumps(sidecar, indent=2) + "\n").encode())


def load_classifier(path: str | Path, device: str | torch.device | None = "auto") -> MnistClassifier:
    """Load weights written by ``save_classifier`` (safetensors only: no pickle is executed).

    Args:
        path: the ``*.safetensors`` file.
        device: where to put the model; ``"auto"`` = CUDA when available.

    Returns:
        The classifier in eval mode; ``model.sidecar`` holds the JSON sidecar (or None).

    Raises:
        QualityError: the file is missing, not a safetensors file, or holds other weights.
    """
    path = Path(path)
    state = read_safetensors(
        path,
        missing=f"classifier weights {str(path)!r} not found; {TRAIN_HINT}",
        what=f"classifier {str(path)!r}",
        hint=f"; {TRAIN_HINT}",
        error=QualityError,
    )
    model = MnistClassifier()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        shapes = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
        raise QualityError(
            f"classifier {str(path)!r} does not match MnistClassifier "
            f"(missing {missing}, unexpected {extra}, wrong shapes {shapes}); {TRAIN_HINT}"
        )
    model.load_state_dict(state)
    model.to(resolve_device(device)).eval()
    side = sidecar_path(path)
    model.sidecar = json.loads(side.read_text()) if side.is_file() else None
    model.source_path = path
    return model


def save_reference(
    path: Path, mu: np.ndarray, sigma: np.ndarray, n: int, classifier_sha: str, manifest_sha: str
) -> None:
    """Test-feature statistics (mu (D,), sigma (D, D) float64 over n images) next to the weights at ``path``."""
    meta = {
        "format": REF_FORMAT,
        "split": "test",
        "n": str(n),
        "classifier_sha256": classifier_sha,
        "shards_manifest_sha256": manifest_sha,
    }
    atomic_save_safetensors(
        {"mu": torch.from_numpy(mu).contiguous(), "sigma": torch.from_numpy(sigma).contiguous()},
        reference_path(path),
        meta,
    )


def read_reference(
    path: Path, classifier_sha: str, manifest_sha: str | None
) -> tuple[np.ndarray, np.ndarray, int] | None:
    """The cached (mu, sigma, n) next to the weights at ``path``, or None when it is missing or was made
    by other weights or (when ``manifest_sha`` is given) from other shards."""
    ref = reference_path(path)
    if not ref.is_file():
        return None
    with safe_open(str(ref), framework="pt") as fh:
        meta = fh.metadata() or {}
        if (
            meta.get("format") == REF_FORMAT
            and meta.get("classifier_sha256") == classifier_sha
            and (manifest_sha is None or meta.get("shards_manifest_sha256") == manifest_sha)
        ):
            return fh.get_tensor("mu").numpy(), fh.get_tensor("sigma").numpy(), int(meta["n"])
    return None
