"""Candidate-function library Theta(z, t) for SINDy on latent denoising trajectories.

References:
    S. L. Brunton, J. L. Proctor, J. N. Kutz, "Discovering governing equations from data
    by sparse identification of nonlinear dynamical systems", PNAS 113(15):3932-3937, 2016
    (the library matrix Theta(X), eq. 5).
    B. de Silva et al., "PySINDy: a Python package for the sparse identification of
    nonlinear dynamical systems from data", JOSS 5(49):2104, 2020 (the fit/transform/
    get_feature_names interface of feature libraries, which we follow).

A SINDy model writes each latent velocity as a sparse combination of candidate terms,
    dz_i/dt = sum_k Xi[i, k] * theta_k(z, t),
with Xi of shape (d, p), one row per state dimension (as ``pysindy.SINDy.coefficients()`` and
the job's equations.json), and this module builds the columns theta_k. The state is z in R^d (d = 16 for the VAE
latent), the diffusion time is t in [0, 1].

Reference library (``Library.reference(d)``), per target dimension:

    ========================  ======================================  ================
    family                    terms                                   count
    ========================  ======================================  ================
    Polynomial(3, bias)       every monomial in z of degree <= 3:     C(d + 3, 3)
                              1, z_i, z_i z_j (i <= j), z_i z_j z_k
                              (i <= j <= k) -- includes z_i^2, z_i^3,
                              z_i^2 z_j
    TimePolynomial(2)         t, t^2                                  2
    TimeTimesState((1, 2))    t z_i, t^2 z_i                          2 d
    ExpNegTimeState           exp(-t z_i)                             d
    ExpNegSquare              exp(-z_i^2)                             d
    ========================  ======================================  ================

    n_terms(d) = C(d + 3, 3) + 2 + 4 d  ->  d = 16: 969 + 2 + 64 = 1035.

About "1,259 terms": the reference study (the SINDy study in docs/REFERENCES.md, phase 4)
states 1,259 candidates for d = 16 but lists only the families above.
No combination of those families and of their natural extensions reproduces 1,259 (1259
is prime): the families exactly as listed (1, z_i, z_i^2, z_i^3, z_i z_j with i < j, t,
t^2, t z_i, t^2 z_i, exp(-t z_i), exp(-z_i^2)) give 1 + 3d + C(d, 2) + 2 + 4d = 235;
completing the polynomial to all monomials of degree <= 3 gives 1035; a degree-3
polynomial in the 17 variables (z, t) gives C(20, 3) = 1140, and 1172 with the two
exponential families. An exhaustive search over subsets of further natural families
(t^3, t z_i^2, t z_i z_j, t^2 z_i^2, t^2 z_i z_j, t z_i^3, exp(-z_i z_j), exp(-z_i),
exp(-t^2 z_i), exp(-t z_i^2), exp(-t), ordered duplicates of z_i z_j) added to the listed
235 finds no total of 1259. We therefore do not try to hit that number: our library is
the listed families with the polynomial completed to degree 3, and its size is the
formula above (``Library.n_output_features(d)``).

Conventions:
    * State indices are 0-based everywhere and match array columns: "z3" is ``z[:, 3]``.
    * Text names: "1", "z3", "z3^2 z5", "t^2", "z3 t", "z3 t^2", "exp(-t z3)",
      "exp(-z3^2)". LaTeX names: "1", "z_{3}", "z_{3}^{2} z_{5}", "t^{2}", "z_{3} t",
      "z_{3} t^{2}", "e^{-t z_{3}}", "e^{-z_{3}^{2}}".
    * Columns are ordered family by family in the order given; within ``Polynomial`` by
      degree, then lexicographically in the indices (the order of pysindy's
      ``PolynomialLibrary``).
    * Everything is computed in float64. ``transform`` accepts numpy arrays or torch
      tensors (any device) and returns the same kind as ``z``; t follows z.

The pysindy adapter ``PysindyLibrary`` lets ``pysindy.SINDy`` use a ``Library``; pysindy
only knows a state x, so time travels as the last input column, x = [z, t] (see its
docstring).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

try:
    from pysindy.feature_library.base import BaseFeatureLibrary, x_sequence_or_item
    from pysindy.utils import AxesArray, comprehend_axes
except ImportError:  # pragma: no cover - the adapter needs pysindy, the rest does not
    BaseFeatureLibrary = object
    x_sequence_or_item = None

from analysis.sindy.registry import FAMILIES, reference_families
from analysis.sindy.terms import TermFamily, _cat, _check_d, _prepare

__all__ = ["Library", "PysindyLibrary", "reference_n_terms"]

SPEC_FORMAT = "latent-sindy.library/1"


def reference_n_terms(d: int) -> int:
    """C(d + 3, 3) + 2 + 4 d: the size of ``Library.reference(d)`` (1035 for d = 16)."""
    d = _check_d(d)
    return math.comb(d + 3, 3) + 2 + 4 * d


# ----------------------------------------------------------------------------- library


class Library:
    """Concatenation of term families: Theta(z, t) = [F_1(z, t) | F_2(z, t) | ...].

    scikit-learn style: ``fit`` learns the state dimension d from z (or checks it against
    the d given at construction), ``transform`` evaluates Theta.

    Args:
        families: the term families, in column order.
        n_state: the state dimension d if known up front (then ``fit`` checks it).

    Example:
        >>> lib = Library.reference(16)
        >>> lib.n_terms
        1035
        >>> theta = lib.transform(z, t)  # z: (n, 16), t: (n,) -> theta: (n, 1035)
    """

    def __init__(self, families: Sequence[TermFamily], n_state: int | None = None):
        families = list(families)
        if not families:
            raise ValueError("Library needs at least one term family; got an empty list.")
        for f in families:
            if not isinstance(f, TermFamily):
                raise TypeError(
                    f"Library families must be TermFamily instances; got {f!r} "
                    f"({type(f).__name__}). Use e.g. Polynomial(3) or ExpNegSquare()."
                )
        self.families = families
        self.n_state = None if n_state is None else _check_d(n_state)

    @classmethod
    def reference(cls, d: int | None = None) -> Library:
        """The reference library (module docstring), optionally bound to dimension d."""
        return cls(reference_families(), n_state=d)

    # -- sizes and names

    @property
    def uses_time(self) -> bool:
        return any(f.uses_time for f in self.families)

    def _require_d(self) -> int:
        if self.n_state is None:
            raise RuntimeError(
                "Library does not know the state dimension yet; call fit(z, t) or build "
                "it with n_state=d (e.g. Library.reference(16))."
            )
        return self.n_state

    def n_output_features(self, d: int) -> int:
        """Number of columns for a state of dimension d."""
        return sum(f.n_output_features(d) for f in self.families)

    @property
    def n_terms(self) -> int:
        """Number of columns p of Theta (needs the state dimension)."""
        return self.n_output_features(self._require_d())

    def family_slices(self) -> list[tuple[TermFamily, slice]]:
        """Each family with its column slice in Theta."""
        d, start, out = self._require_d(), 0, []
        for f in self.families:
            k = f.n_output_features(d)
            out.append((f, slice(start, start + k)))
            start += k
        return out

    def get_feature_names(
        self,
        style: str = "text",
        state_names: Sequence[str] | None = None,
        time_name: str = "t",
    ) -> list[str]:
        """Names of the p columns ("z3 t", "exp(-t z3)"; LaTeX "z_{3} t", "e^{-t z_{3}}").

        Args:
            style: "text" or "latex".
            state_names: optional names of z_0..z_{d-1}, in the given style.
            time_name: name of the time variable.

        Returns:
            list of p unique strings.
        """
        d = self._require_d()
        return [
            name
            for f in self.families
            for name in f.names(d, style=style, state_names=state_names, time_name=time_name)
        ]

    # -- fit / transform

    def fit(self, z: Any, t: Any = None) -> Library:
        """Learn (or check) the state dimension from z of shape (n, d); returns self."""
        shape = tuple(z.shape) if hasattr(z, "shape") else np.shape(z)
        if len(shape) != 2:
            raise ValueError(f"z must have shape (n_samples, d); got shape {shape}.")
        d = int(shape[1])
        if self.n_state is not None and self.n_state != d:
            raise ValueError(
                f"this Library was built for d={self.n_state} but z has d={d} columns; "
                f"build a new Library (e.g. Library.reference({d}))."
            )
        self.n_state = _check_d(d)
        return self

    def transform(self, z: Any, t: Any = None) -> Any:
        """Evaluate Theta.

        Args:
            z: (n, d) numpy array or torch tensor (any device).
            t: scalar, (n,) or (n, 1); required when a family uses time.

        Returns:
            Theta: (n, p) float64, numpy if z is numpy, else a torch tensor on z's device.
        """
        d = self._require_d()
        z, t = _prepare(z, t, self.uses_time)
        if z.shape[1] != d:
            raise ValueError(
                f"z has {z.shape[1]} columns but the library was fit for d={d}; "
                "transform data of the same dimension or refit a new Library."
            )
        return _cat([f._columns(z, t) for f in self.families], z)

    def fit_transform(self, z: Any, t: Any = None) -> Any:
        """``fit(z, t)`` then ``transform(z, t)``: (n, d) -> (n, p)."""
        return self.fit(z, t).transform(z, t)

    # -- serialization

    def spec(self) -> dict:
        """JSON-able description; ``Library.from_spec(lib.spec())`` rebuilds it."""
        return {
            "format": SPEC_FORMAT,
            "n_state": self.n_state,
            "families": [{"kind": f.kind, **f.params()} for f in self.families],
        }

    @classmethod
    def from_spec(cls, spec: dict) -> Library:
        """Rebuild a Library from ``spec()`` output."""
        if not isinstance(spec, dict) or spec.get("format") != SPEC_FORMAT:
            raise ValueError(
                f"not a library spec of format {SPEC_FORMAT!r}: "
                f"{spec.get('format') if isinstance(spec, dict) else type(spec).__name__!r}. "
                "Produce it with Library.spec()."
            )
        families = []
        for entry in spec["families"]:
            entry = dict(entry)
            kind = entry.pop("kind", None)
            if kind not in FAMILIES:
                raise ValueError(f"unknown term family kind {kind!r} in spec; known: {sorted(FAMILIES)}.")
            families.append(FAMILIES[kind](**entry))
        return cls(families, n_state=spec.get("n_state"))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Library) and self.families == other.families and self.n_state == other.n_state

    def __repr__(self) -> str:
        fams = ", ".join(repr(f) for f in self.families)
        return f"Library([{fams}], n_state={self.n_state})"


# ----------------------------------------------------------------------------- pysindy


class PysindyLibrary(BaseFeatureLibrary):
    """Adapter so ``pysindy.SINDy(feature_library=PysindyLibrary(lib))`` uses a Library.

    pysindy feeds a feature library one array x of shape (n, n_in). With
    ``time_column=True`` (default) the last column of x is t and the others are z:
    x = [z, t], n_in = d + 1. Two ways to get t there:

    * as a control input (recommended): ``SINDy(...).fit(z, t=t, x_dot=zdot, u=t)``;
      pysindy appends u to x, and the model has only the d equations for z.
    * as a state: ``fit(np.c_[z, t], t=t, x_dot=np.c_[zdot, np.ones(n)])``; this adds a
      (d+1)-th equation t' = 1 that the library reproduces with its constant term.

    With ``time_column=False`` x = z and the library must not use time.

    pysindy names the inputs x0.., u0 unless ``fit(..., feature_names=[...])`` is given
    (one name per column of [z, t], e.g. ["z0", ..., "z15", "t"] for our default names);
    ``SINDy.fit`` also insists on increasing t when t is an array, so pass samples of one
    trajectory in time order (or a list of trajectories).

    Args:
        library: the Library to evaluate (its ``n_state`` is set by ``fit`` if unset).
        time_column: whether the last input column of x is t.
    """

    def __init__(self, library: Library, time_column: bool = True):
        self.library = library
        self.time_column = time_column

    def _split(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        x = np.asarray(x, dtype=np.float64).reshape(-1, x.shape[-1])
        if self.time_column:
            return x[:, :-1], x[:, -1]
        return x, None

    def _check_time(self) -> None:
        if self.library.uses_time and not self.time_column:
            raise ValueError(
                "the library has time-dependent terms but time_column=False; use "
                "PysindyLibrary(library, time_column=True) and pass x = [z, t]."
            )

    @x_sequence_or_item
    def fit(self, x_full, y=None):
        """Learn n_features_in_ and n_output_features_ from x of shape (..., n_in)."""
        self._check_time()
        n_in = int(x_full[0].shape[-1])
        d = n_in - 1 if self.time_column else n_in
        if d < 1:
            raise ValueError(
                f"x has {n_in} column(s); with time_column={self.time_column} that leaves "
                f"no state columns. Pass x = [z, t] with z of shape (n, d >= 1)."
            )
        z, t = self._split(np.asarray(x_full[0][:1]))
        self.library.fit(z, t)
        self.n_features_in_ = n_in
        self.n_output_features_ = self.library.n_terms
        return self

    @x_sequence_or_item
    def transform(self, x_full):
        """Theta for each x: (..., n_in) -> (..., n_output_features_)."""
        out = []
        for x in x_full:
            if x.shape[-1] != self.n_features_in_:
                raise ValueError(
                    f"x has {x.shape[-1]} columns but the library was fit with "
                    f"{self.n_features_in_}; pass x = [z, t] as during fit."
                )
            z, t = self._split(np.asarray(x))
            theta = self.library.transform(z, t).reshape(*x.shape[:-1], -1)
            out.append(AxesArray(theta, comprehend_axes(theta)))
        return out

    def get_feature_names(self, input_features=None):
        """Text names; ``input_features`` (pysindy's x names) rename z_i and t."""
        if input_features is None:
            return self.library.get_feature_names("text")
        names = list(input_features)
        if len(names) != self.n_features_in_:
            raise ValueError(f"input_features has {len(names)} names for {self.n_features_in_} inputs.")
        if self.time_column:
            return self.library.get_feature_names("text", state_names=names[:-1], time_name=names[-1])
        return self.library.get_feature_names("text", state_names=names)
