"""The coordinates a SINDy fit works in: the latent's own, its principal components, or the dynamics' linear modes.

Why linear modes. For Gaussian data x0 ~ N(mu, Sigma) the exact denoiser is affine,
eps*(z, t) = s (a^2 Sigma + s^2 I)^-1 (z - a mu), so the DDIM / probability-flow drift
dz/dt = p(t) z + q(t) eps* (analysis/sindy/theory.py) is A(t) z + b(t) with every A(t) a function of Sigma:
all A(t) share Sigma's eigenvectors. In that eigenbasis each coordinate's equation holds one state
and the time functions (about 10 terms); in any other basis it couples all d coordinates (d + 1 affine
terms times the time functions: 85 at d = 16 with a degree-4 time basis), more than a readable
budget. The principal components of the end states estimate that basis only to O(1/sqrt(n)): with
120 trajectories of d = 16 a per-coordinate affine model still leaves 11-20% of the drift's variance
unexplained. The drift itself pins it down exactly: per step k the least-squares affine fit
v = A_k z + b_k recovers A_k (exactly when the drift is affine), and the eigenvectors of
W = sum_k S_k^2 / |S_k|_F^2, S_k the traceless symmetric part of A_k, are the shared eigenvectors.
For a learned denoiser A_k is the drift's best linear approximation at step k, and the modes are the
directions that approximation leaves (nearly) uncoupled. sindy.coordinates=auto fits in both the
latent's own coordinates and the modes and keeps the sparser at equal held-out fit (coordinate_choice.py).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from configs.errors import UserError


class Coordinates:
    """An affine change of coordinates u = C (z - m) of the flattened latent z.

    The latent itself (vae16, external files), its first k principal components (conv; PCA fitted on
    the final states z_0 of training trajectories: the data manifold the dynamics converge to, where
    the latent has structure; at large t the states are isotropic noise), or a rotation to the linear
    modes of the dynamics (module docstring), possibly after the PCA.

    Attributes:
        kind: "latent" | "pca" | "modes".
        mean: (D,) centre m (zeros for "latent" and for modes of the latent itself).
        components: (k, D) orthonormal rows C (identity for "latent").
        explained: (k,) PCA explained variance ratio, or None.
        base: "latent" | "pca": what the modes rotate (for describe()).
    """

    def __init__(
        self,
        kind: str,
        mean: np.ndarray,
        components: np.ndarray,
        explained: np.ndarray | None = None,
        base: str = "latent",
    ):
        self.kind, self.mean, self.components = kind, mean.astype(np.float64), components.astype(np.float64)
        self.explained, self.base = explained, base

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    @property
    def is_rotation(self) -> bool:
        """u = C z with C square orthonormal and no centre: the forward noising a x + s eps keeps its form."""
        return self.components.shape[0] == self.components.shape[1] and not np.any(self.mean)

    @classmethod
    def identity(cls, D: int) -> Coordinates:
        return cls("latent", np.zeros(D), np.eye(D))

    @classmethod
    def fit_pca(cls, z0: np.ndarray, k: int) -> Coordinates:
        """PCA of (n, D) final states; k <= min(n, D)."""
        z0 = np.asarray(z0, dtype=np.float64)
        if k > min(z0.shape):
            raise UserError(
                f"sindy.pca_components={k} exceeds what {z0.shape[0]} training samples of "
                f"dimension {z0.shape[1]} support; lower it or raise sindy.n_trajectories"
            )
        mean = z0.mean(axis=0)
        _, s, vt = np.linalg.svd(z0 - mean, full_matrices=False)
        var = s**2
        return cls("pca", mean, vt[:k], var[:k] / var.sum())

    def then_modes(self, modes: np.ndarray) -> Coordinates:
        """These coordinates followed by the rotation u' = M u, M (k, k) orthonormal rows (linear_modes)."""
        return Coordinates(
            "modes",
            self.mean,
            modes @ self.components,
            self.explained,
            base="latent" if self.kind == "latent" else "pca",
        )

    def states(self, z: np.ndarray) -> np.ndarray:
        """(..., D) -> (..., k)."""
        return (np.asarray(z, dtype=np.float64) - self.mean) @ self.components.T

    def velocities(self, v: np.ndarray) -> np.ndarray:
        """(..., D) velocities -> (..., k) (the map is affine, so no centring)."""
        return np.asarray(v, dtype=np.float64) @ self.components.T

    def inverse(self, c: np.ndarray) -> np.ndarray:
        """(..., k) -> (..., D) (the PCA reconstruction; exact for rotations)."""
        return np.asarray(c, dtype=np.float64) @ self.components + self.mean

    def tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """(tensors, metadata) of C and m as the job saves them (safetensors, beside the report)."""
        t = {"mean": torch.from_numpy(self.mean), "components": torch.from_numpy(self.components)}
        if self.explained is not None:
            t["explained_variance_ratio"] = torch.from_numpy(np.asarray(self.explained, dtype=np.float64))
        return {k: v.contiguous() for k, v in t.items()}, {"kind": self.kind}

    def fingerprint(self) -> str:
        """sha256 of C and m: names these coordinates in fit folders and caches."""
        return hashlib.sha256(self.components.tobytes() + self.mean.tobytes()).hexdigest()

    @property
    def file_name(self) -> str | None:
        """Where the job saves C and m beside the report (None for the latent itself)."""
        return {"latent": None, "pca": "pca.safetensors", "modes": "coordinates.safetensors"}[self.kind]

    def describe(self) -> str:
        if self.kind == "latent":
            return f"the {self.dim} latent coordinates themselves (normalised: (z - mean) / std)"
        pca = (
            (
                f"the first {self.dim} principal components of the {self.components.shape[1]}-D normalised "
                f"latent (fitted on training end states z_0; {100 * float(np.sum(self.explained)):.1f}% of "
                "their variance"
            )
            if self.explained is not None
            else ""
        )
        if self.kind == "pca":
            return pca + "; loadings in pca.safetensors)"
        return (
            f"the {self.dim} linear modes of the dynamics (the equations' z0..z{self.dim - 1} are these modes u = C z)"
            + (f" after {pca})" if pca else " of the normalised latent")
            + ", C orthonormal: the eigenvectors of the per-step least-squares linear drift, along which it is "
            "(nearly) uncoupled (analysis/sindy/coordinates.py); z = C^T u"
            + ("" if not pca else " + m")
            + "; C (rows) and m in coordinates.safetensors"
        )


def linear_modes(z: np.ndarray, v: np.ndarray) -> np.ndarray | None:
    """The rotation to the dynamics' linear modes (module docstring).

    Args:
        z: (T, n, k) states at steps 0..T-1 in the base coordinates.
        v: (T, n, k) the fit target (velocity or eps) at those states.

    Returns:
        (k, k) orthonormal rows M (u' = M u), ordered by how strongly the linear drift couples along them
        (W's eigenvalues, largest first), each row's largest entry positive; None when n <= k + 1
        (the per-step affine fit is not determined).
    """
    T, n, k = z.shape
    if n <= k + 1:
        return None
    w = np.zeros((k, k))
    for zk, vk in zip(np.asarray(z, np.float64), np.asarray(v, np.float64)):
        x = np.concatenate([np.ones((n, 1)), zk], axis=1)
        a = np.linalg.lstsq(x, vk, rcond=None)[0][1:].T  # (k, k): v = A z + b
        s = 0.5 * (a + a.T)
        s -= np.trace(s) / k * np.eye(k)
        norm2 = float(np.sum(s * s))
        if norm2 > 1e-24:
            w += s @ s / norm2
    vals, vecs = np.linalg.eigh(w)
    rows = vecs[:, np.argsort(-vals, kind="stable")].T
    signs = np.sign(rows[np.arange(k), np.argmax(np.abs(rows), axis=1)])
    return rows * signs[:, None]
