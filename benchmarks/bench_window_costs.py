"""Where in t a closed form loses the DiT's digit: each window of t swapped out on its own (issue 22):

    python -m benchmarks.bench_window_costs --run runs/local [--train 2000] [--heldout 400] [--queries 4000]
        [--dense-degrees 1,2,3] [--empirical-bandwidths 0] [--peers runs/local-seed1,...]

The DiT samples every step but those of one window of t, where a closed-form eps takes over; from the same
held-out noise, its decoded sample is classified and held against the DiT's own. Per window and generator the
table gives the generator's eps R^2 there (median over dimensions), same digit with its 95% interval, same digit on
confident samples and the final error. Generators:

    distilled   EM's mixture of the training latents with its constants refitted to the DiT's eps on training
                trajectories and forward-noised queries (analysis/sindy/mixture.py distill_mixture)
    Gaussian    the closed-form eps of one Gaussian of the training latents (no fit to the DiT)
    iid peer    the DiT's own eps plus iid noise with the distilled mixture's R^2 in that window
                (analysis/quality/agreement.py noise_sigma): the same eps R^2 with unstructured errors
    empirical   the exact eps* of the training latents' own distribution, the posterior mean of the DiT's training
                data: eps*(z, t) = (z - a E[x0 | z]) / s with E[x0 | z] a softmax-weighted mean of the N training
                latents, each smoothed by N(0, h^2 I) (--empirical-bandwidths h; h = 0 is the data itself). What the
                DiT would be were it the optimal denoiser of what it was trained on (no fit to the DiT)
    dense       per step k, least squares of the DiT's eps on every monomial of z up to degree 1, 2, 3
                (--dense-degrees; d + 1, (d + 1)(d + 2)/2 and (d + 1)(d + 2)(d + 3)/6 columns per dimension and
                step, no sparsity, no shared time law), fitted on the same labelled states as the distillation:
                how far a model class far larger than 30 terms per dimension goes with the same data
    peer        the EMA DiT of another run folder trained with the same recipe on the same autoencoder and
                another seed (--peers; `make peer` trains one): an equally good model of the data, and what its
                errors cost per window

and, as yardsticks: the DiT's raw weights instead of its EMA weights everywhere (the ceiling), each generator at
every step (the floor of this table: what the swap costs when nothing is left to the DiT), and the distilled
mixture for the windows above t with the DiT below (the digit is decided early or late).

It answers which window a better equation must fix first, and whether a model's eps R^2 translates into
agreement as the sensitivity curve of the report says (iid errors) or worse (errors that point the same way at
neighbouring steps add up). Writes results/window_costs.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.preprocessing import PolynomialFeatures

from analysis.job.queries import forward_block
from analysis.job.validation import r2_per_dim
from analysis.quality import scoring as quality
from analysis.quality.agreement import CONFIDENT, end_state_errors, noise_sigma, same_digit
from analysis.sindy.mixture import distill_mixture, fit_mixture
from analysis.sindy.theory import linear_part, noise_levels
from benchmarks.common import RESULTS
from configs.io import file_sha256
from models.artifacts import (
    load_autoencoder,
    load_denoiser,
    load_latent_data,
    load_latent_stats,
    read_ae_meta,
    read_dit_meta,
)
from models.classifier import load_classifier


class Setup:
    """The run's EMA DiT, its sampler's linear part, and the eps of the DiT at any state."""

    def __init__(self, run: Path):
        self.model, schedule, meta = load_denoiser(run, "cpu", ema=True)
        self.schedule = schedule
        self.shape = tuple(meta["latent_shape"])
        self.T = schedule.T
        self.D = int(np.prod(self.shape))
        self.p, self.q = linear_part(schedule, "ddim")
        self.a, self.s = noise_levels(schedule)

    @torch.no_grad()
    def dit_eps(self, z: np.ndarray, k: int, model=None) -> np.ndarray:
        """eps at states z (n, D) of state k (t = 1 - k/T)."""
        x = torch.from_numpy(np.ascontiguousarray(z, np.float32)).reshape(-1, *self.shape)
        tt = torch.full((len(x),), self.T - 1 - k, dtype=torch.long)
        return (model or self.model)(x, tt).reshape(len(x), -1).double().numpy()

    def rollout(self, z_T: np.ndarray, eps_fn) -> tuple[np.ndarray, np.ndarray]:
        """The DDIM (eta = 0) states (T + 1, n, D) from z_T with eps_fn(z, k), and the eps (T, n, D) it used: Euler
        on the sampler's grid with drift p z + q eps, which is DDIM exactly (analysis/sindy/theory.py). By hand
        rather than analysis/sindy/integration.py integrate, whose rhs sees t and not the eps it used."""
        z, eps = [np.asarray(z_T, np.float64)], []
        for k in range(self.T):
            eps.append(eps_fn(z[-1], k))
            z.append(z[-1] - (self.p[k] * z[-1] + self.q[k] * eps[-1]) / self.T)
        return np.stack(z), np.stack(eps)


class DensePerStep:
    """Per-step ridge least squares eps_k = W_k phi(z_k), phi every monomial of z up to ``degree`` (scikit-learn's
    PolynomialFeatures, the constant included).

    The ridge is lam x diag(Gram) (scale-free across monomials), lam chosen per step from ``ridges`` by the squared
    error on a held-out tenth of the rows, then refitted on all rows: a peer as good as its data allows, not one
    that overfits (a cubic has 969 columns for d = 16). States that are no longer finite or beyond 1e6 in some
    coordinate (a diverging rollout, whose monomials would overflow) get NaN, which the agreement counts as diverged.

    Args:
        z, eps: (T, n, d) labelled states per step and the eps there.
    """

    def __init__(
        self, z: np.ndarray, eps: np.ndarray, degree: int, ridges: tuple[float, ...] = (1e-8, 1e-6, 1e-4, 1e-2)
    ):
        T, n, _ = z.shape
        self.features = PolynomialFeatures(int(degree)).fit(z[0])
        val = np.random.default_rng(0).permutation(n)[: max(1, n // 10)]
        fit = np.setdiff1d(np.arange(n), val)
        W, self.ridge = [], []
        for k in range(T):
            X = self.features.transform(z[k])
            lam = ridges[0]
            if len(ridges) > 1:
                Gf, bf = X[fit].T @ X[fit], X[fit].T @ eps[k][fit]
                err = [((X[val] @ self._solve(Gf, bf, r) - eps[k][val]) ** 2).sum() for r in ridges]
                lam = ridges[int(np.argmin(err))]
            W.append(self._solve(X.T @ X, X.T @ eps[k], lam))
            self.ridge.append(lam)
        self.W = np.stack(W)  # (T, columns, d)

    @staticmethod
    def _solve(G: np.ndarray, b: np.ndarray, lam: float) -> np.ndarray:
        return np.linalg.solve(G + lam * np.diag(np.diag(G)) + 1e-12 * np.eye(len(G)), b)

    @property
    def columns(self) -> int:
        """Columns per dimension and step."""
        return self.W.shape[1]

    def __call__(self, z: np.ndarray, k: int) -> np.ndarray:
        out = np.full((len(z), self.W.shape[2]), np.nan)
        ok = np.isfinite(z).all(axis=1) & (np.abs(z).max(axis=1, initial=0.0) < 1e6)
        if ok.any():
            out[ok] = self.features.transform(z[ok]) @ self.W[k]
        return out


class EmpiricalDenoiser:
    """eps*(z, t) of the training latents' own distribution, each latent smoothed by N(0, h^2 I).

    Given component i, z = a x0 + s e with x0 ~ N(x_i, h^2 I) is N(a x_i, (a^2 h^2 + s^2) I), and
    E[x0 | z, i] = x_i + c (z - a x_i) with c = a h^2 / (a^2 h^2 + s^2); the responsibilities are a softmax over i
    of -||z - a x_i||^2 / (2 (a^2 h^2 + s^2)). With h = 0 this is the posterior mean of the N training points, the
    denoiser a model that minimised its training loss exactly would be.

    The same family as analysis/sindy/mixture.py GaussianMixtureEps with K = N, equal weights and covariances
    h^2 I (tests/benchmarks check the two agree). Written apart because that class turns every state into each
    component's own eigenbasis, K d^2 work and (n, K, d) memory per batch: for N = 60,000 components a 16x
    larger cost than the isotropic form here, which needs one (n, N) product.

    Args:
        latents: (N, d) the normalised training latents.
        a, s: (T,) noise levels of the sampler's states (analysis/sindy/theory.py noise_levels).
        bandwidth: h.
    """

    def __init__(self, latents: np.ndarray, a: np.ndarray, s: np.ndarray, bandwidth: float = 0.0):
        if bandwidth < 0 or not np.isfinite(bandwidth):
            raise ValueError(f"the bandwidth must be finite and at least 0; got {bandwidth}")
        self.x = torch.from_numpy(np.ascontiguousarray(latents, np.float64))
        self.x_sq = (self.x**2).sum(dim=1)
        self.a, self.s, self.h = np.asarray(a, np.float64), np.asarray(s, np.float64), float(bandwidth)

    def __call__(self, z: np.ndarray, k: int, chunk_bytes: int = 2**28) -> np.ndarray:
        a, s, h2 = self.a[k], self.s[k], self.h**2
        var = s**2 + a**2 * h2
        zt = torch.from_numpy(np.ascontiguousarray(z, np.float64))
        rows = max(1, chunk_bytes // (8 * len(self.x)))  # the (rows, N) responsibilities stay under chunk_bytes
        centre = torch.cat(
            [
                # -||z - a x_i||^2 / (2 var) without the term in ||z||^2, which the softmax over i cancels
                torch.softmax((2.0 * a * part @ self.x.T - a**2 * self.x_sq) / (2.0 * var), dim=1) @ self.x
                for part in zt.split(rows)
            ]
        )
        x0 = centre + (a * h2 / var) * (zt - a * centre)
        return ((zt - a * x0) / s).numpy()


def labeller(run: Path, shape: tuple, classifier: Path | None):
    """end states (n, D) -> (labels, confidence), through the run's autoencoder and the MNIST classifier;
    None without a classifier."""
    if classifier is None or not classifier.is_file():
        return None
    ae, _ = load_autoencoder(run, "cpu")
    mean, std = load_latent_stats(run)
    clf = load_classifier(classifier, "cpu")

    def look(end: np.ndarray):
        x = torch.from_numpy(np.nan_to_num(end)).float().reshape(-1, *shape)
        with torch.no_grad():
            img = torch.sigmoid(ae.decode(x * std + mean)).numpy()[:, 0]
        _, probs = quality.features(clf, np.clip(img, 0.0, 1.0).astype(np.float32))
        return probs.argmax(axis=1), probs.max(axis=1)

    return look


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=Path("runs/local"), help="a finished make run folder")
    ap.add_argument("--classifier", type=Path, default=Path("data/classifier/mnist_cnn.safetensors"))
    ap.add_argument("--train", type=int, default=2000, help="training trajectories of the distillation")
    ap.add_argument("--heldout", type=int, default=400, help="held-out noises")
    ap.add_argument("--queries", type=int, default=4000, help="forward-noised training latents per step")
    ap.add_argument("--components", type=int, default=20, help="K of the mixture")
    ap.add_argument("--iterations", type=int, default=600, help="Adam steps of the distillation")
    ap.add_argument("--windows", type=int, default=5)
    ap.add_argument(
        "--dense-degrees",
        default="1,2,3",
        help="degrees of the dense per-step polynomial peers, comma-separated ('' for none)",
    )
    ap.add_argument(
        "--empirical-bandwidths",
        default="0",
        help="h of the empirical denoiser of the training latents, comma-separated ('' for none)",
    )
    ap.add_argument(
        "--peers",
        default="",
        help="run folders of DiTs trained like --run's with another seed (make peer), comma-separated",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "window_costs.json")
    args = ap.parse_args(argv)
    for name in ("train", "heldout", "components", "iterations", "windows"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1")
    if args.queries < 0:
        ap.error("--queries must be at least 0")
    try:
        degrees = [int(x) for x in args.dense_degrees.split(",") if x.strip()]
    except ValueError:
        degrees = None
    if degrees is None or any(not 1 <= g <= 4 for g in degrees):
        ap.error(f"--dense-degrees takes integers from 1 to 4, comma-separated; got {args.dense_degrees!r}")
    try:
        bandwidths = [float(x) for x in args.empirical_bandwidths.split(",") if x.strip()]
    except ValueError:
        bandwidths = None
    if bandwidths is None or any(not (np.isfinite(h) and h >= 0) for h in bandwidths):
        ap.error(
            f"--empirical-bandwidths takes numbers of at least 0, comma-separated; got {args.empirical_bandwidths!r}"
        )
    if not (args.run / "dit_ema.safetensors").is_file():
        ap.error(f"{args.run} has no trained DiT (dit_ema.safetensors): run `make run` first")
    peers = [Path(x.strip()) for x in args.peers.split(",") if x.strip()]
    for peer in peers:
        if not (peer / "dit_ema.safetensors").is_file():
            ap.error(f"--peers: {peer} has no trained DiT (dit_ema.safetensors): run `make peer` first")
        if read_dit_meta(peer).get("ae_sha256") != file_sha256(args.run / "ae.safetensors"):
            ap.error(f"--peers: {peer} was not trained on {args.run}'s autoencoder (`make peer` copies it)")

    t0 = time.time()
    torch.manual_seed(args.seed)
    su = Setup(args.run)
    T, D, a, s = su.T, su.D, su.a, su.s
    if args.windows > T:
        ap.error(f"--windows must be at most the sampler's {T} steps")
    win_of = np.minimum(np.arange(T) * args.windows // T, args.windows - 1)  # state k -> window, 0 = highest t
    ks = [np.flatnonzero(win_of == w) for w in range(args.windows)]
    t_edges = [1.0 - k[0] / T for k in ks] + [0.0]  # window w holds t in (t_edges[w + 1], t_edges[w]]
    rng = np.random.default_rng(args.seed)
    tr, eps_tr = su.rollout(rng.standard_normal((args.train, D)), su.dit_eps)
    ho, eps_ho = su.rollout(rng.standard_normal((args.heldout, D)), su.dit_eps)
    Z, E = tr[:-1], eps_tr
    kind = read_ae_meta(args.run)["kind"]
    train = load_latent_data(args.run, kind).train
    if args.queries:
        fb = forward_block(su.model, su.schedule, train, "ddim", args.seed, 0, args.queries)
        Z = np.concatenate([Z, fb["z"][:-1].double().numpy()], axis=1)
        E = np.concatenate([E, fb["eps"].double().numpy()], axis=1)
    lat = train.reshape(len(train), -1).double().numpy()
    lat = lat[rng.permutation(len(lat))[:20000]]
    cut = max(1, len(lat) // 10)
    _, _, mixtures = fit_mixture(lat[cut:], lat[:cut], (1, args.components), seed=args.seed, max_iter=100)
    gauss = mixtures[0]
    cols = rng.permutation(Z.shape[1])[:4000]
    distilled, info = distill_mixture(
        mixtures[-1],
        Z[:, cols].reshape(-1, D),
        E[:, cols].reshape(-1, D),
        np.repeat(np.arange(T), len(cols)),
        a,
        s,
        iterations=args.iterations,
        seed=args.seed,
    )
    dense = {g: DensePerStep(Z, E, g) for g in degrees}
    prep_s = time.time() - t0

    look = labeller(args.run, su.shape, args.classifier)
    ref_end = ho[-1]
    ref = look(ref_end) if look else None
    rows: list[dict] = []

    def add(generator: str, swapped: str, eps_fn, r2: float | None) -> None:
        end = su.rollout(ho[0], eps_fn)[0][-1]
        row = {"generator": generator, "swapped": swapped, "eps_r2": r2, **end_state_errors(end, ref_end)}
        if ref is not None:
            labels, _ = look(end)
            agree = same_digit(labels, ref[0], ref[1])
            row.update(same_digit=agree["same_digit"], ci95=agree["ci95"], confident=agree["confident"]["same_digit"])
        rows.append(row)
        print(_line(row), flush=True)

    def mix_eps(mix):
        return lambda z, k: mix.eps(z, a[k], s[k])

    def r2_of(fn, sel) -> float:
        pred = np.stack([fn(ho[k], k) for k in np.flatnonzero(sel)])
        return float(np.nanmedian(r2_per_dim(eps_ho[sel], pred)))

    raw_file = args.run / "dit.safetensors"
    if raw_file.is_file():
        raw, _, _ = load_denoiser(args.run, "cpu", ema=False)
        raw_fn = lambda z, k: su.dit_eps(z, k, raw)  # noqa: E731
        add("DiT, raw weights (ceiling)", "all steps", raw_fn, r2_of(raw_fn, np.ones(T, bool)))
    gens = {"distilled mixture": mix_eps(distilled), "Gaussian": mix_eps(gauss)}
    for g, model in dense.items():
        gens[f"dense degree {g} ({model.columns} col/dim/step)"] = model
    for peer in peers:
        other, _, _ = load_denoiser(peer, "cpu", ema=True)
        gens[f"peer DiT {peer}"] = lambda z, k, other=other: su.dit_eps(z, k, other)
    all_latents = train.reshape(len(train), -1).double().numpy()
    for h in bandwidths:
        gens[f"empirical, h = {h:g} ({len(all_latents)} latents)"] = EmpiricalDenoiser(all_latents, a, s, h)
    for name, fn in gens.items():
        add(name, "all steps", fn, r2_of(fn, np.ones(T, bool)))
    for w in range(args.windows):
        sel = win_of == w
        span = f"t in ({t_edges[w + 1]:.2f}, {t_edges[w]:.2f}]"
        r2s = {name: r2_of(fn, sel) for name, fn in gens.items()}
        for name, fn in gens.items():
            add(name, span, lambda z, k, fn=fn, w=w: fn(z, k) if win_of[k] == w else su.dit_eps(z, k), r2s[name])
        r2 = r2s["distilled mixture"]
        sig = noise_sigma(eps_ho[sel], min(max(r2, 1e-6), 1.0))
        noise = np.random.default_rng(args.seed + 1 + w)

        def peer(z, k, w=w, sig=sig, noise=noise):
            e = su.dit_eps(z, k)
            return e + sig * noise.standard_normal(e.shape) if win_of[k] == w else e

        add("DiT + iid noise (the distilled R^2)", span, peer, r2)
    for w in range(1, args.windows):
        fn = gens["distilled mixture"]
        add(
            "distilled mixture above, DiT below",
            f"t > {t_edges[w]:.2f}",
            lambda z, k, fn=fn, w=w: fn(z, k) if win_of[k] < w else su.dit_eps(z, k),
            r2_of(fn, win_of < w),
        )
    payload = {
        "benchmark": "window_costs",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "run": str(args.run),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "classified": ref is not None,
        "dit_confident_share": float(np.mean(ref[1] >= CONFIDENT)) if ref is not None else None,
        "distillation": info,
        "dense_ridges": {str(g): m.ridge for g, m in dense.items()},  # lam per step, chosen on held-out rows
        "prepare_seconds": round(prep_s, 1),
        "seconds": round(time.time() - t0, 1),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1))
    print(f"wrote {args.out} ({payload['seconds']} s)")
    return payload


def _line(r: dict) -> str:
    agree = (
        f"same {r['same_digit']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] confident "
        + (f"{r['confident']:.3f}" if r["confident"] is not None else "-")
        if "same_digit" in r
        else "same digit: no classifier"
    )
    r2 = f"{r['eps_r2']:.4f}" if r["eps_r2"] is not None else "-"
    return f"{r['generator']:38s} {r['swapped']:24s} eps R2 {r2}  {agree}  final error {r['final_error']:.3f}"


if __name__ == "__main__":
    main(sys.argv[1:])
