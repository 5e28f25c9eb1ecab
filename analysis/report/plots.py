"""The report's plots (Pareto fronts, R^2, coefficients, rollouts, decoded samples, the views' plots) and its
TensorBoard record (the report text, every plot and the per-dimension scalars)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

__all__ = ["fit_plots", "theory_plots", "write_tensorboard"]


def fit_plots(
    out: Path, fits: list[dict], xi: np.ndarray, names: list[str], roll: dict, images: dict | None
) -> list[str]:
    """pareto.png, r2.png, coefficients.png, rollouts.png, rollout_error.png and samples_vs_sindy.png (with images);
    returns the names."""
    # optional heavy dependency: matplotlib, only when plots are drawn
    import matplotlib

    matplotlib.use("Agg")
    # optional heavy dependency: matplotlib, only when plots are drawn
    import matplotlib.pyplot as plt

    made = []
    d = len(fits)

    # Pareto fronts: terms vs held-out R^2 per dimension, chosen model marked.
    cols = min(4, d)
    rows = math.ceil(d / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, r in zip(axes.flat, fits):
        sw = r["sweep"]
        nt = [s["n_terms"] for s in sw]
        ho = [s["r2_heldout"] for s in sw]
        tr = [s["r2_train"] for s in sw]
        ax.plot(nt, tr, ".", color="0.6", label="train")
        ax.plot(nt, ho, "o", ms=3, label="held-out")
        pf = sorted((s["n_terms"], s["r2_heldout"]) for s in sw if s["pareto"])
        if pf:
            ax.plot(*zip(*pf), "-", lw=1)
        ch = [s for s in sw if s["chosen"]][0]
        ax.plot(ch["n_terms"], ch["r2_heldout"], "r*", ms=10, label="chosen")
        ax.set_xscale("symlog")
        ax.set_ylim(max(-0.5, min(ho + [0]) - 0.05), 1.02)
        ax.set_title(f"z{r['dim']}", fontsize=9)
    for ax in list(axes.flat)[d:]:
        ax.axis("off")
    axes[0, 0].legend(fontsize=6)
    fig.supxlabel("terms")
    fig.supylabel("R^2")
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=90)
    plt.close(fig)
    made.append("pareto.png")

    # Per-dimension R^2, training vs held-out.
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * d), 3))
    x = np.arange(d)
    ax.bar(x - 0.2, [r["r2_train"] for r in fits], 0.4, label="train")
    ax.bar(x + 0.2, [r["r2_heldout"] for r in fits], 0.4, label="held-out")
    ax.set_xticks(x, [f"z{i}" for i in x], fontsize=7)
    ax.set_ylim(min(0, min(r["r2_heldout"] for r in fits)) - 0.05, 1.05)
    ax.axhline(0, color="k", lw=0.5)
    ax.legend(fontsize=7)
    ax.set_title("R^2 per dimension")
    fig.tight_layout()
    fig.savefig(out / "r2.png", dpi=90)
    plt.close(fig)
    made.append("r2.png")

    # Coefficient heatmap over the union of selected terms.
    used = np.flatnonzero(np.any(xi != 0, axis=0))[:60]
    fig, ax = plt.subplots(figsize=(max(5, 0.22 * len(used) + 2), 0.3 * d + 1.5))
    if used.size:
        m = xi[:, used]
        v = np.max(np.abs(m)) or 1.0
        im = ax.imshow(m, cmap="RdBu_r", vmin=-v, vmax=v, aspect="auto")
        ax.set_xticks(range(len(used)), [names[k] for k in used], rotation=90, fontsize=6)
        fig.colorbar(im, ax=ax)
    ax.set_yticks(range(d), [f"dz{j}/dt" for j in range(d)], fontsize=6)
    ax.set_title("coefficients (union of selected terms)")
    fig.tight_layout()
    fig.savefig(out / "coefficients.png", dpi=90)
    plt.close(fig)
    made.append("coefficients.png")

    # Trajectories vs rollouts (first dims of the first held-out trajectories) and error per step.
    t, ref, sim = roll["t"], roll["reference"], roll["sindy"]
    n_show, d_show = min(3, ref.shape[1]), min(4, ref.shape[2])
    fig, axes = plt.subplots(n_show, d_show, figsize=(3 * d_show, 2.2 * n_show), squeeze=False)
    for i in range(n_show):
        for j in range(d_show):
            ax = axes[i, j]
            ax.plot(t, ref[:, i, j], "k-", lw=1, label="DiT")
            ax.plot(t, sim[:, i, j], "r--", lw=1, label="SINDy")
            ax.invert_xaxis()
            ax.set_title(f"traj {roll['index'][i]}, z{j}", fontsize=8)
    axes[0, 0].legend(fontsize=6)
    fig.supxlabel("t (1 = noise -> 0 = sample)")
    fig.tight_layout()
    fig.savefig(out / "rollouts.png", dpi=90)
    plt.close(fig)
    made.append("rollouts.png")

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.semilogy(t, roll["rmse_per_step"], "-")
    ax.invert_xaxis()
    ax.set_xlabel("t")
    ax.set_ylabel("RMSE SINDy vs DiT")
    ax.set_title("rollout error per step (held-out)")
    fig.tight_layout()
    fig.savefig(out / "rollout_error.png", dpi=90)
    plt.close(fig)
    made.append("rollout_error.png")

    if images is not None:
        dit, sin = images["dit"], images["sindy"]
        n = dit.shape[0]
        fig, axes = plt.subplots(2, n, figsize=(0.9 * n, 2.1), squeeze=False)
        for i in range(n):
            for r, imgs in enumerate((dit, sin)):
                axes[r, i].imshow(imgs[i], cmap="gray", vmin=0, vmax=1)
                axes[r, i].set_xticks([])
                axes[r, i].set_yticks([])
            if i == 0:
                axes[0, 0].set_ylabel("DiT", fontsize=7)
                axes[1, 0].set_ylabel("SINDy", fontsize=7)
        fig.suptitle("same initial noise: DiT sample (top) vs integrated equations (bottom)", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "samples_vs_sindy.png", dpi=90)
        plt.close(fig)
        made.append("samples_vs_sindy.png")
    return made


def theory_plots(out: Path, views: dict | None) -> list[str]:
    """validation_rmse.png (per-step latent error of the rollouts) and mixture_means.png; returns the names."""
    if not views:
        return []
    # optional heavy dependency: matplotlib, only when plots are drawn
    import matplotlib

    matplotlib.use("Agg")
    # optional heavy dependency: matplotlib, only when plots are drawn
    import matplotlib.pyplot as plt

    made = []
    val = views.get("validation", {})
    if "equations" in val:
        fig, ax = plt.subplots(figsize=(5, 3))
        T = len(val["equations"]["latent_rmse_per_step"]) - 1
        t = 1 - np.arange(T + 1) / T
        for name, label in (("equations", "equations"), ("mixture", "mixture ODE")):
            if name in val:
                ax.semilogy(t, val[name]["latent_rmse_per_step"], "-", label=label)
        ax.invert_xaxis()
        ax.set_xlabel("t (1 = noise -> 0 = sample)")
        ax.set_ylabel("latent RMSE vs DiT")
        ax.set_title(f"{val['equations']['n_noises']} held-out noises", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "validation_rmse.png", dpi=90)
        plt.close(fig)
        made.append("validation_rmse.png")
    mx = views.get("mixture", {})
    if "_mean_images" in mx:
        imgs, w = mx["_mean_images"], np.asarray(mx["weights"])
        order = np.argsort(-w)
        cols = min(10, len(order))
        rows = math.ceil(len(order) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(0.9 * cols, 1.05 * rows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, i in zip(axes.flat, order):
            ax.imshow(imgs[i], cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{w[i]:.2f}", fontsize=6)
        fig.suptitle(f"mixture component means (K = {len(w)}), decoded", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "mixture_means.png", dpi=90)
        plt.close(fig)
        made.append("mixture_means.png")
    return made


def write_tensorboard(tb_dir: Path, md: str, out: Path, pngs: list[str], fits: list[dict]) -> None:
    """The report text, every plot and per-dimension R^2 and terms as scalars, under sindy/ in tb_dir."""
    # optional heavy dependency: matplotlib, only when plots are drawn
    import matplotlib.image as mpimg

    # optional heavy dependency: tensorboard, only when its entries are written
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(tb_dir))
    w.add_text("sindy/report", md, 0)
    for name in pngs:
        img = mpimg.imread(out / name)[..., :3]  # (H, W, 3) float in [0, 1]
        w.add_image(f"sindy/{Path(name).stem}", img, 0, dataformats="HWC")
    for r in fits:
        w.add_scalar("sindy/r2_heldout", r["r2_heldout"], r["dim"])
        w.add_scalar("sindy/r2_train", r["r2_train"], r["dim"])
        w.add_scalar("sindy/n_terms", r["n_terms"], r["dim"])
    w.close()
