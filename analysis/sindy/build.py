"""The library a ``sindy.library`` config describes, and the principal directions its tanh family may use."""

from __future__ import annotations

from typing import Any

import numpy as np

from analysis.sindy.custom_terms import CustomTerms
from analysis.sindy.families import ExpNegSquare, ExpNegTimeState, Polynomial, Tanh, TimeProduct, time_functions
from analysis.sindy.library import Library
from analysis.sindy.registry import LIBRARY_FAMILIES
from analysis.sindy.terms import TermFamily

__all__ = ["build_library", "principal_directions"]


def build_library(
    cfg: Any,
    d: int,
    t_range: tuple[float, float] = (0.0, 1.0),
    projections: np.ndarray | None = None,
    mixture: TermFamily | None = None,
) -> Library:
    """The library a ``sindy.library`` config describes (configs/schema.py, SindyLibraryConfig).

    Args:
        cfg: an object with the fields of SindyLibraryConfig (preset, families, poly_degree,
            time_basis, time_degree, spline_basis, time_state_degree, tanh_on, tanh_projections,
            tanh_scales, tanh_time_degree, terms).
        d: state dimension.
        t_range: (t_min, t_max) of the data, the span of a spline time basis.
        projections: (r, d) unit rows for ``tanh_on="principal"`` (the job passes the principal
            directions of the training end states); None with tanh_on="principal" raises.
        mixture: the ``mixture`` family, built from a Gaussian mixture fitted to the training latents
            (analysis/sindy/mixture.py, MixtureEps; the job fits it); None with "mixture" listed raises.

    Returns:
        Library bound to d, families in the order of ``LIBRARY_FAMILIES``.
    """
    if cfg.preset == "reference":
        return Library.reference(d)
    unknown = [f for f in cfg.families if f not in LIBRARY_FAMILIES]
    if unknown:
        raise ValueError(f"unknown library families {unknown}; known: {list(LIBRARY_FAMILIES)}.")
    want, fams = set(cfg.families), []
    t_min, t_max = float(t_range[0]), float(t_range[1])
    if "polynomial" in want:
        fams.append(Polynomial(degree=cfg.poly_degree, include_bias=True))
    if "time" in want:
        fams.append(time_functions(cfg.time_basis, cfg.time_degree, cfg.spline_basis, t_min, t_max))
    if "time_state" in want:
        fams.append(
            TimeProduct(
                time_basis=cfg.time_basis,
                degree=cfg.time_degree,
                state_degree=cfg.time_state_degree,
                n_basis=cfg.spline_basis,
                t_min=t_min,
                t_max=t_max,
            )
        )
    if "exp" in want:
        fams += [ExpNegTimeState(), ExpNegSquare()]
    if "tanh" in want:
        if cfg.tanh_on == "principal":
            if projections is None:
                raise ValueError("tanh_on='principal' needs the principal directions (projections=...).")
            proj = tuple(tuple(float(x) for x in u) for u in np.asarray(projections)[: cfg.tanh_projections])
        else:
            proj = ()
        fams.append(Tanh(scales=tuple(cfg.tanh_scales), projections=proj, time_degree=cfg.tanh_time_degree))
    if "terms" in want:
        fams.append(CustomTerms(terms=tuple(cfg.terms)))
    if "mixture" in want:
        if mixture is None:
            raise ValueError(
                "the mixture family needs a fitted mixture (mixture=...; the SINDy job fits one to the "
                "run's training latents)."
            )
        fams.append(mixture)
    if not fams:
        raise ValueError("sindy.library.families is empty; list at least one family.")
    return Library(fams, n_state=d)


def principal_directions(z: np.ndarray, k: int) -> np.ndarray:
    """The k leading principal directions of (n, d) samples, (k, d) unit rows, sign fixed so that
    each row's largest entry is positive (the same data give the same library)."""
    z = np.asarray(z, dtype=np.float64)
    _, _, vt = np.linalg.svd(z - z.mean(axis=0), full_matrices=False)
    vt = vt[: min(k, vt.shape[0])]
    sign = np.sign(vt[np.arange(vt.shape[0]), np.argmax(np.abs(vt), axis=1)])
    return vt * sign[:, None]
