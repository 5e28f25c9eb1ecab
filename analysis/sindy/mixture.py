"""A Gaussian-mixture view of the denoiser: the exact eps*(z, t) of a mixture fitted to the training latents.

References:
    A. P. Dempster, N. M. Laird, D. B. Rubin, "Maximum likelihood from incomplete data via the EM
    algorithm", JRSS B 39(1), 1977 (the mixture is fitted with scikit-learn's GaussianMixture, EM).
    P. Vincent, "A connection between score matching and denoising autoencoders", Neural Comput. 23(7),
    2011 and Y. Song et al., ICLR 2021 (the optimal noise prediction is a scaled score:
    eps*(z, t) = -s grad log p_t(z)). B. Efron, "Tweedie's formula and selection bias", JASA 106, 2011.

If the data (normalised latents, as the DiT sees them) were x0 ~ sum_k w_k N(mu_k, S_k), the noisy
state z = a x0 + s e (a = sqrt(ab), s = sqrt(1 - ab), e ~ N(0, I)) would have the density
    p_t(z) = sum_k w_k N(z; a mu_k, C_k),   C_k = a^2 S_k + s^2 I,
and the best possible eps-prediction (the minimiser of the DiT's training loss) is, in closed form,
    eps*(z, t) = -s grad log p_t(z) = s sum_k r_k(z, t) C_k^{-1} (z - a mu_k),
    r_k(z, t) = w_k N(z; a mu_k, C_k) / sum_j w_j N(z; a mu_j, C_j)      (posterior weights).
With S_k = U_k diag(lam_k) U_k^T (one eigendecomposition per component, done once), C_k^{-1} and
log det C_k are diagonal in U_k at every t, so eps* costs O(n K d^2) and needs no fitting to the DiT.
The responsibilities are normalised in log space (logsumexp): at small s the components are sharp
and the raw densities underflow.

What it tells a reader: how much of the DiT's eps (and, through analysis/sindy/theory.py, of its drift) a
mixture of K Gaussians explains with no regression at all, where in t it fails, and (its own ODE
integrated from the same noise) whether it generates the same digits. ``MixtureEps`` offers eps* and
r_k as candidate library terms (a ``TermFamily``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from scipy.special import logsumexp
from sklearn.mixture import GaussianMixture

from analysis.sindy.terms import TermFamily, _check_style, _state_names
from analysis.sindy.theory import state_index

DEFAULT_GRID = (1, 2, 5, 10, 20)


class GaussianMixtureEps:
    """The exact eps* of a Gaussian mixture data distribution under the VP forward process.

    Args:
        weights: (K,) mixture weights (sum 1).
        means: (K, d).
        covariances: (K, d, d) symmetric positive semi-definite.
    """

    def __init__(self, weights: np.ndarray, means: np.ndarray, covariances: np.ndarray):
        self.weights = np.asarray(weights, np.float64)
        self.means = np.atleast_2d(np.asarray(means, np.float64))
        K, d = self.means.shape
        self.covariances = np.asarray(covariances, np.float64).reshape(-1, d, d)
        if self.weights.shape != (K,) or self.covariances.shape != (K, d, d):
            raise ValueError(
                f"weights (K,), means (K, d), covariances (K, d, d); got {self.weights.shape}, "
                f"{self.means.shape}, {self.covariances.shape}"
            )
        lam, U = np.linalg.eigh((self.covariances + self.covariances.transpose(0, 2, 1)) / 2)
        self.lam = np.clip(lam, 0.0, None)  # (K, d)
        self.U = U  # (K, d, d), columns eigenvectors
        self.log_w = np.log(np.clip(self.weights, 1e-300, None))

    @property
    def K(self) -> int:
        return len(self.weights)

    @property
    def d(self) -> int:
        return self.means.shape[1]

    @classmethod
    def from_sklearn(cls, gm) -> GaussianMixtureEps:
        """From a fitted ``sklearn.mixture.GaussianMixture`` (any covariance_type)."""
        K, d = gm.means_.shape
        cov = gm.covariances_
        if gm.covariance_type == "full":
            full = cov
        elif gm.covariance_type == "tied":
            full = np.broadcast_to(cov, (K, d, d))
        elif gm.covariance_type == "diag":
            full = np.stack([np.diag(c) for c in cov])
        else:  # spherical
            full = np.stack([c * np.eye(d) for c in cov])
        return cls(gm.weights_, gm.means_, np.array(full))

    def rotated(self, C: np.ndarray) -> GaussianMixtureEps:
        """The same mixture in coordinates u = C x (C (d, d) orthonormal): means C mu_k, covariances C S_k C^T.

        The noising a x + s e keeps its form under a rotation (C e is again N(0, I)), so this mixture's eps* is
        C eps*(C^T u, t): the exact closed form in u, with the same weights and held-out likelihood (|det C| = 1).
        """
        C = np.asarray(C, np.float64)
        if C.shape != (self.d, self.d) or not np.allclose(C @ C.T, np.eye(self.d), atol=1e-8):
            raise ValueError(f"rotated: C must be a ({self.d}, {self.d}) orthonormal matrix, got shape {C.shape}")
        return GaussianMixtureEps(self.weights, self.means @ C.T, C @ self.covariances @ C.T)

    def posterior_and_eps(
        self, z: np.ndarray, a: np.ndarray | float, s: np.ndarray | float, chunk: int = 4096
    ) -> tuple[np.ndarray, np.ndarray]:
        """Responsibilities r (n, K) and eps* (n, d) at states z (n, d) with noise levels a, s (scalars or (n,))."""
        z = np.asarray(z, np.float64)
        n = z.shape[0]
        a = np.broadcast_to(np.asarray(a, np.float64), (n,))
        s = np.broadcast_to(np.asarray(s, np.float64), (n,))
        resp, eps = np.empty((n, self.K)), np.empty((n, self.d))
        for i in range(0, n, chunk):
            sl = slice(i, i + chunk)
            resp[sl], eps[sl] = self._chunk(z[sl], a[sl], s[sl])
        return resp, eps

    def _chunk(self, z, a, s):
        v = z[:, None, :] - a[:, None, None] * self.means[None]  # (c, K, d)
        w = np.einsum("kij,cki->ckj", self.U, v)  # coordinates in each component's eigenbasis
        var = a[:, None, None] ** 2 * self.lam[None] + s[:, None, None] ** 2  # (c, K, d) eigenvalues of C_k
        inv = 1.0 / var
        maha = np.sum(w * w * inv, axis=2)  # (c, K)
        logdet = np.sum(np.log(var), axis=2)
        logp = self.log_w[None] - 0.5 * (self.d * math.log(2 * math.pi) + logdet + maha)
        logr = logp - logsumexp(logp, axis=1, keepdims=True)
        r = np.exp(logr)  # (c, K)
        cinv_v = np.einsum("kij,ckj->cki", self.U, inv * w)  # C_k^{-1} (z - a mu_k), (c, K, d)
        eps = s[:, None] * np.einsum("ck,cki->ci", r, cinv_v)
        return r, eps

    def eps(self, z: np.ndarray, a, s) -> np.ndarray:
        """eps* (n, d); see ``posterior_and_eps``."""
        return self.posterior_and_eps(z, a, s)[1]

    def spec(self) -> dict:
        return {
            "weights": self.weights.tolist(),
            "means": self.means.tolist(),
            "covariances": self.covariances.tolist(),
        }


# ----------------------------------------------------------------------------- fitting


def fit_mixture(
    train: np.ndarray, heldout: np.ndarray, ks: Sequence[int] = DEFAULT_GRID, seed: int = 0, max_iter: int = 200
) -> tuple[GaussianMixtureEps, list[dict], list[GaussianMixtureEps]]:
    """Fit full-covariance mixtures for every K in ``ks`` (EM, scikit-learn) and keep the best held-out one.

    Args:
        train: (n, d) normalised training latents.
        heldout: (m, d) normalised held-out latents (e.g. the encoded test split).
        ks: components to try.
        seed: EM initialisation (k-means) seed.
        max_iter: EM iterations at most.

    Returns:
        (the mixture with the highest mean held-out log-likelihood, one row per K: k,
        loglik_train, loglik_heldout (per sample, nats), seconds, converged, chosen; every K's mixture).
    """

    rows, models = [], []
    for k in ks:
        t0 = time.time()
        gm = GaussianMixture(
            n_components=int(k), covariance_type="full", reg_covar=1e-6, max_iter=max_iter, random_state=seed
        ).fit(train)
        rows.append(
            {
                "k": int(k),
                "loglik_train": float(gm.score(train)),
                "loglik_heldout": float(gm.score(heldout)),
                "seconds": round(time.time() - t0, 2),
                "converged": bool(gm.converged_),
            }
        )
        models.append(gm)
    best = int(np.argmax([r["loglik_heldout"] for r in rows]))
    for i, r in enumerate(rows):
        r["chosen"] = i == best
    mixtures = [GaussianMixtureEps.from_sklearn(m) for m in models]
    return mixtures[best], rows, mixtures


def distill_mixture(
    mix0: GaussianMixtureEps,
    z: np.ndarray,
    eps: np.ndarray,
    state: np.ndarray,
    a: np.ndarray,
    s: np.ndarray,
    iterations: int = 300,
    lr: float = 3e-3,
    rows_per_state: int = 600,
    states_per_iteration: int = 10,
    seed: int = 0,
) -> tuple[GaussianMixtureEps, dict]:
    """Refit a mixture's constants so that its closed-form eps* matches a denoiser's eps (distillation).

    EM fits the mixture to the training latents and never sees the denoiser, whose eps is not the eps* of any
    small mixture of the data: on the make-run DiT, EM's K = 10 mixture explains less of the DiT's eps than one
    Gaussian. Here the same closed form (module docstring) is kept and its constants (the weights' logits, the
    means, a Cholesky factor L_k of each covariance S_k = L_k L_k^T) are moved by Adam to minimise
    mean ||eps*(z, t) - eps_DiT(z, t)||^2 over labelled states. The result is still a mixture of K Gaussians with
    listed constants; only what they were chosen for changes. scikit-learn and pysindy have no such fit (EM only,
    and linear-in-coefficients models), hence by hand; torch gives the gradients.

    Args:
        mix0: the starting mixture (EM's).
        z, eps: (n, d) labelled states and the denoiser's eps there.
        state: (n,) state index k of each row (t = 1 - k/T); a, s: (T,) noise levels per state.
        iterations: Adam steps; each averages ``states_per_iteration`` random states with ``rows_per_state``
            random rows of each (drawn with replacement).
        seed: the draws' seed; the fit is deterministic given it.

    Returns:
        (the distilled GaussianMixtureEps, {"iterations", "rows", "loss_start", "loss_end", "seconds"}), losses
        the mean squared eps error per coordinate over one fixed evaluation draw.
    """

    t0 = time.time()
    z, eps = np.asarray(z, np.float64), np.asarray(eps, np.float64)
    state = np.asarray(state, np.int64)
    if z.shape != eps.shape or z.ndim != 2 or state.shape != (len(z),):
        raise ValueError(f"z, eps (n, d) and state (n,) expected; got {z.shape}, {eps.shape}, {state.shape}")
    if z.shape[1] != mix0.d:
        raise ValueError(f"the mixture is {mix0.d}-D but the states are {z.shape[1]}-D")
    if len(z) == 0 or iterations < 0:
        raise ValueError(f"distillation needs labelled rows and iterations >= 0; got {len(z)} rows, {iterations}")
    if state.min() < 0 or state.max() >= len(a) or len(a) != len(s):
        raise ValueError(
            f"state indices must lie in [0, {len(a)}) with a and s of equal length; got {state.min()}..{state.max()}"
        )
    d = mix0.d
    by_state = [np.flatnonzero(state == k) for k in range(len(a))]
    present = np.array([k for k, ix in enumerate(by_state) if len(ix)])
    g = torch.Generator().manual_seed(int(seed))
    zt, et = torch.from_numpy(z), torch.from_numpy(eps)
    at, st = torch.as_tensor(np.asarray(a, np.float64)), torch.as_tensor(np.asarray(s, np.float64))
    eye = torch.eye(d, dtype=torch.float64)
    chol0 = np.linalg.cholesky(mix0.covariances + 1e-6 * np.eye(d))
    logit = torch.tensor(mix0.log_w, requires_grad=True)
    mu = torch.tensor(mix0.means, requires_grad=True)
    L = torch.tensor(chol0, requires_grad=True)

    def draw(gen):
        ks = present[torch.randperm(len(present), generator=gen)[: min(states_per_iteration, len(present))].numpy()]
        rows = np.stack(
            [by_state[k][torch.randint(0, len(by_state[k]), (rows_per_state,), generator=gen).numpy()] for k in ks]
        )
        return torch.from_numpy(ks), torch.from_numpy(rows)

    def predict(ks, rows):  # eps* at rows (m, n) of states ks (m,)
        lk = torch.tril(L)
        S = lk @ lk.transpose(1, 2) + 1e-6 * eye
        ak, sk = at[ks].view(-1, 1, 1, 1), st[ks].view(-1, 1, 1, 1)
        Lc = torch.linalg.cholesky(ak**2 * S[None] + sk**2 * eye)  # (m, K, d, d) factors of C_k
        Linv = torch.linalg.solve_triangular(Lc, eye.expand_as(Lc), upper=False)
        v = zt[rows][:, :, None, :] - at[ks].view(-1, 1, 1, 1) * mu[None, None]  # (m, n, K, d)
        y = torch.einsum("mkij,mnkj->mnki", Linv, v)
        logdet = 2 * torch.log(torch.diagonal(Lc, dim1=2, dim2=3)).sum(-1)  # (m, K)
        logp = torch.log_softmax(logit, 0) - 0.5 * (logdet[:, None] + (y * y).sum(-1))
        r = torch.softmax(logp, dim=2)
        cinv_v = torch.einsum("mkji,mnkj->mnki", Linv, y)  # C_k^-1 (z - a mu_k)
        return st[ks].view(-1, 1, 1) * (r[..., None] * cinv_v).sum(2)

    check = draw(torch.Generator().manual_seed(int(seed) + 1))

    def loss_on(ks, rows):
        return ((predict(ks, rows) - et[rows]) ** 2).mean()

    with torch.no_grad():
        start = float(loss_on(*check))
    opt = torch.optim.Adam([logit, mu, L], lr=lr)
    for _ in range(iterations):
        loss = loss_on(*draw(g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = float(loss_on(*check))
        lk = torch.tril(L)
        cov = (lk @ lk.transpose(1, 2) + 1e-6 * eye).numpy()
        out = GaussianMixtureEps(torch.softmax(logit, 0).numpy(), mu.numpy().copy(), cov)
    info = {
        "iterations": int(iterations),
        "rows": int(len(z)),
        "loss_start": start,
        "loss_end": end,
        "seconds": round(time.time() - t0, 2),
    }
    return out, info


# ----------------------------------------------------------------------------- library family


def _nested_tuple(x: Any) -> Any:
    if isinstance(x, (list, tuple, np.ndarray)):
        return tuple(_nested_tuple(v) for v in x)
    return float(x)


def moment_matched(mix: GaussianMixtureEps) -> GaussianMixtureEps:
    """The Gaussian with the mixture's mean and covariance (K = 1): sum_k w_k mu_k and
    sum_k w_k (Sigma_k + mu_k mu_k^T) - mu mu^T."""
    w = mix.weights / mix.weights.sum()
    mu = w @ mix.means
    cov = np.einsum("k,kij->ij", w, mix.covariances + np.einsum("ki,kj->kij", mix.means, mix.means)) - np.outer(mu, mu)
    return GaussianMixtureEps(np.ones(1), mu[None], cov[None])


MIXTURE_FEATURES = ("eps", "drift", "posterior", "regimes", "gaussian")


@dataclasses.dataclass(frozen=True, eq=False)
class MixtureEps(TermFamily):
    """Candidate terms from a fitted mixture: its eps*_j(z, t) or its drift p z_j + q eps*_j (d columns each),
    its posteriors r_k(z, t) (K columns), its regime terms r_k(z, t) z_j (K d columns: inside component k's
    region a term linear in z, so each component is a linear regime a reader can name by its decoded mean) and/or
    the closed-form eps of the mixture's moment-matched Gaussian (d columns: s (a^2 Sigma + s^2 I)^-1 (z - a mu),
    the schedule's exact time factors a(t), s(t) instead of polynomials in t; mu and Sigma are the mixture's
    overall mean and covariance, listed with its other constants).

    With these columns a sparse model can write the DiT's eps (or drift) as the mixture's closed form
    plus a few corrections. Time enters through the noise level: ``alpha_bars`` holds ab of every state
    k = 0..T-1 (t = 1 - k/T, as analysis/sindy/theory.py's state order), piecewise constant in between; the
    drift feature also needs the sampler's p and q per state (analysis/sindy/theory.py, linear_part).

    Attributes:
        weights: (K,) mixture weights; means (K, d); covariances (K, d, d).
        alpha_bars: (T,) ab per state.
        features: subset of ("eps", "drift", "posterior", "regimes"), column order.
        p, q: (T,) the sampler's linear part per state (only for the "drift" feature).
    """

    weights: tuple = ()
    means: tuple = ()
    covariances: tuple = ()
    alpha_bars: tuple = ()
    features: tuple = ("eps",)
    p: tuple = ()
    q: tuple = ()
    kind: ClassVar[str] = "MixtureEps"
    uses_time: ClassVar[bool] = True

    def __post_init__(self):
        for f in ("weights", "means", "covariances", "alpha_bars", "p", "q"):
            object.__setattr__(self, f, _nested_tuple(getattr(self, f)))
        object.__setattr__(self, "features", tuple(self.features))
        if not self.features or any(f not in MIXTURE_FEATURES for f in self.features):
            raise ValueError(
                f"MixtureEps features must be a non-empty subset of {MIXTURE_FEATURES}; got {self.features!r}"
            )
        if not self.weights or not self.alpha_bars:
            raise ValueError("MixtureEps needs the mixture (weights, means, covariances) and alpha_bars per state")
        if "drift" in self.features and not (len(self.p) == len(self.q) == len(self.alpha_bars)):
            raise ValueError("MixtureEps feature 'drift' needs the sampler's p and q for every state (as alpha_bars)")
        mix = GaussianMixtureEps(np.array(self.weights), np.array(self.means), np.array(self.covariances))
        object.__setattr__(self, "_mix", mix)
        object.__setattr__(self, "_gauss", moment_matched(mix))

    @classmethod
    def from_mixture(
        cls,
        mix: GaussianMixtureEps,
        alpha_bars: np.ndarray,
        features=("eps",),
        p: np.ndarray | None = None,
        q: np.ndarray | None = None,
    ) -> MixtureEps:
        lin = {} if p is None else {"p": tuple(np.asarray(p, np.float64)), "q": tuple(np.asarray(q, np.float64))}
        return cls(
            mix.weights, mix.means, mix.covariances, tuple(np.asarray(alpha_bars, np.float64)), tuple(features), **lin
        )

    def params(self) -> dict:
        out = {
            "weights": list(self.weights),
            "means": [list(m) for m in self.means],
            "covariances": [[list(r) for r in c] for c in self.covariances],
            "alpha_bars": list(self.alpha_bars),
            "features": list(self.features),
        }
        if self.p:
            out.update(p=list(self.p), q=list(self.q))
        return out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MixtureEps) and self.params() == other.params()

    def n_output_features(self, d: int) -> int:
        K = len(self.weights)
        return sum({"posterior": K, "regimes": K * d}.get(f, d) for f in self.features)

    def names(self, d, style="text", state_names=None, time_name="t"):
        _check_style(style)
        _state_names(d, style, state_names)
        out = []
        for f in self.features:
            if f == "eps":
                out += [f"eps_mix{j}" if style == "text" else rf"\epsilon^{{mix}}_{{{j}}}" for j in range(d)]
            elif f == "drift":
                out += [f"drift_mix{j}" if style == "text" else rf"f^{{mix}}_{{{j}}}" for j in range(d)]
            elif f == "gaussian":
                out += [f"eps_gauss{j}" if style == "text" else rf"\epsilon^{{G}}_{{{j}}}" for j in range(d)]
            elif f == "posterior":
                out += [f"r_mix{k}" if style == "text" else rf"r_{{{k}}}" for k in range(len(self.weights))]
            else:
                zn = _state_names(d, style, state_names)
                out += [
                    f"r_mix{k} {zn[j]}" if style == "text" else rf"r_{{{k}}} {zn[j]}"
                    for k in range(len(self.weights))
                    for j in range(d)
                ]
        return out

    def _columns(self, z, t):
        is_torch = not isinstance(z, np.ndarray)
        zn = z.detach().cpu().numpy() if is_torch else z
        tn = (t.detach().cpu().numpy() if is_torch else t).reshape(-1)
        k = state_index(tn, len(self.alpha_bars))
        ab = np.asarray(self.alpha_bars)[k]
        r, eps = self._mix.posterior_and_eps(zn, np.sqrt(ab), np.sqrt(1.0 - ab))
        drift = (
            (np.asarray(self.p)[k, None] * zn + np.asarray(self.q)[k, None] * eps) if "drift" in self.features else None
        )
        regimes = (r[:, :, None] * zn[:, None, :]).reshape(len(zn), -1) if "regimes" in self.features else None
        gauss = self._gauss.eps(zn, np.sqrt(ab), np.sqrt(1.0 - ab)) if "gaussian" in self.features else None
        cols = np.concatenate(
            [
                {"eps": eps, "drift": drift, "posterior": r, "regimes": regimes, "gaussian": gauss}[f]
                for f in self.features
            ],
            axis=1,
        )
        if is_torch:
            return torch.as_tensor(cols, dtype=torch.float64, device=z.device)
        return cols
