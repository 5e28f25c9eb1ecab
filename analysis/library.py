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

import abc
import dataclasses
import itertools
import math
from typing import Any, ClassVar, Sequence

import numpy as np

try:  # torch is optional for the numpy path; the project always has it installed
    import torch
except ImportError:  # pragma: no cover
    torch = None

try:
    from pysindy.feature_library.base import BaseFeatureLibrary, x_sequence_or_item
    from pysindy.utils import AxesArray, comprehend_axes
except ImportError:  # pragma: no cover - the adapter needs pysindy, the rest does not
    BaseFeatureLibrary = object
    x_sequence_or_item = None

__all__ = [
    "TermFamily",
    "Polynomial",
    "TimePolynomial",
    "TimeTimesState",
    "ExpNegTimeState",
    "ExpNegSquare",
    "Library",
    "PysindyLibrary",
    "MemoryEstimate",
    "estimate_memory",
    "require_memory",
    "reference_n_terms",
    "reference_families",
    "FAMILIES",
    "TimeSpline",
    "TimeProduct",
    "Tanh",
    "CustomTerms",
    "register_family",
    "LIBRARY_FAMILIES",
    "build_library",
    "principal_directions",
]

SPEC_FORMAT = "latent-sindy.library/1"
_STYLES = ("text", "latex")


# ----------------------------------------------------------------------------- arrays


def _is_torch(x: Any) -> bool:
    return torch is not None and isinstance(x, torch.Tensor)


def _cat(cols: Sequence[Any], like: Any) -> Any:
    if _is_torch(like):
        return torch.cat(list(cols), dim=1)
    return np.concatenate(list(cols), axis=1)


def _exp(x: Any) -> Any:
    return torch.exp(x) if _is_torch(x) else np.exp(x)


def _ones(n: int, like: Any) -> Any:
    if _is_torch(like):
        return torch.ones((n, 1), dtype=torch.float64, device=like.device)
    return np.ones((n, 1), dtype=np.float64)


def _index(idx: np.ndarray, like: Any) -> Any:
    if _is_torch(like):
        return torch.as_tensor(idx, dtype=torch.long, device=like.device)
    return idx


def _prepare(z: Any, t: Any, needs_time: bool) -> tuple[Any, Any]:
    """Validate and cast (z, t) to float64 of z's kind.

    Args:
        z: (n, d) numpy array or torch tensor.
        t: None, a scalar, (n,) or (n, 1); converted to z's kind (and device).
        needs_time: whether a family of the library uses t.

    Returns:
        z as (n, d) float64 and t as (n, 1) float64 (or None when not needed).
    """
    if _is_torch(z):
        z = z.to(torch.float64)
    else:
        z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(
            f"z must have shape (n_samples, d); got shape {tuple(z.shape)}. "
            "Reshape a single sample to (1, d) or flatten extra axes into the sample axis."
        )
    n = z.shape[0]
    if t is None:
        if needs_time:
            raise ValueError(
                "this library has time-dependent terms but t=None; pass t as a scalar, "
                "(n_samples,) or (n_samples, 1) array."
            )
        return z, None
    if _is_torch(z):
        t = torch.as_tensor(t, dtype=torch.float64, device=z.device)
    else:
        t = np.asarray(t.detach().cpu() if _is_torch(t) else t, dtype=np.float64)
    if t.ndim == 0:
        t = t.reshape(1, 1).expand(n, 1) if _is_torch(t) else np.full((n, 1), float(t))
    elif t.ndim == 1 and t.shape[0] == n:
        t = t.reshape(n, 1)
    elif not (t.ndim == 2 and tuple(t.shape) == (n, 1)):
        raise ValueError(
            f"t must be a scalar, ({n},) or ({n}, 1) to match z of shape "
            f"{tuple(z.shape)}; got shape {tuple(t.shape)}."
        )
    return z, t


def _check_style(style: str) -> None:
    if style not in _STYLES:
        raise ValueError(f"style must be one of {_STYLES}; got {style!r}.")


def _state_names(d: int, style: str, state_names: Sequence[str] | None) -> list[str]:
    if state_names is None:
        return [f"z{i}" if style == "text" else f"z_{{{i}}}" for i in range(d)]
    if len(state_names) != d:
        raise ValueError(
            f"state_names has {len(state_names)} entries but the state has d={d}; "
            "pass one name per state dimension."
        )
    return list(state_names)


def _power(name: str, k: int, style: str) -> str:
    if k == 1:
        return name
    return f"{name}^{k}" if style == "text" else f"{name}^{{{k}}}"


def _check_d(d: int) -> int:
    if not isinstance(d, (int, np.integer)) or isinstance(d, bool) or d < 1:
        raise ValueError(f"d (state dimension) must be a positive int; got {d!r}.")
    return int(d)


# ---------------------------------------------------------------------------- families


class TermFamily(abc.ABC):
    """One family of candidate terms (a block of library columns).

    Subclasses are frozen dataclasses whose fields are their whole configuration, so
    ``params()`` / ``from_params`` round-trip them through JSON.
    """

    kind: ClassVar[str]
    uses_time: ClassVar[bool] = False

    @abc.abstractmethod
    def n_output_features(self, d: int) -> int:
        """Number of columns this family produces for a state of dimension d."""

    @abc.abstractmethod
    def names(
        self,
        d: int,
        style: str = "text",
        state_names: Sequence[str] | None = None,
        time_name: str = "t",
    ) -> list[str]:
        """Column names, length ``n_output_features(d)``.

        Args:
            d: state dimension.
            style: "text" ("z3^2 t") or "latex" ("z_{3}^{2} t").
            state_names: optional names for z_0..z_{d-1} (already in ``style``).
            time_name: name of the time variable.
        """

    @abc.abstractmethod
    def _columns(self, z: Any, t: Any) -> Any:
        """Evaluate on validated inputs: z (n, d) float64, t (n, 1) float64 of z's kind
        (None if ``uses_time`` is False) -> (n, n_output_features(d))."""

    def transform(self, z: Any, t: Any = None) -> Any:
        """Evaluate the family.

        Args:
            z: (n, d) numpy array or torch tensor (any device).
            t: scalar, (n,) or (n, 1); needed when ``uses_time``.

        Returns:
            (n, n_output_features(d)) float64 of the same kind (and device) as z.
        """
        z, t = _prepare(z, t, self.uses_time)
        return self._columns(z, t)

    def params(self) -> dict:
        """JSON-able constructor arguments."""
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def __call__(self, z: Any, t: Any = None) -> Any:
        return self.transform(z, t)


@dataclasses.dataclass(frozen=True)
class Polynomial(TermFamily):
    """All monomials in z of total degree <= ``degree`` (time-free).

    Count: C(d + degree, degree), minus 1 without the bias. Order: by degree, then
    lexicographic index tuples i1 <= i2 <= ... (as pysindy's PolynomialLibrary).

    Attributes:
        degree: maximal total degree (>= 1).
        include_bias: include the constant term "1".
    """

    degree: int = 3
    include_bias: bool = True
    kind: ClassVar[str] = "Polynomial"

    def __post_init__(self):
        if not isinstance(self.degree, (int, np.integer)) or self.degree < 1:
            raise ValueError(f"Polynomial degree must be an int >= 1; got {self.degree!r}.")

    def combinations(self, d: int) -> list[tuple[int, ...]]:
        """Index tuples of the monomials, () for the bias, in column order."""
        _check_d(d)
        start = 0 if self.include_bias else 1
        return [
            c
            for k in range(start, self.degree + 1)
            for c in itertools.combinations_with_replacement(range(d), k)
        ]

    def n_output_features(self, d: int) -> int:
        _check_d(d)
        return math.comb(d + self.degree, self.degree) - (0 if self.include_bias else 1)

    def names(self, d, style="text", state_names=None, time_name="t"):
        _check_style(style)
        sn = _state_names(d, style, state_names)
        out = []
        for c in self.combinations(d):
            if not c:
                out.append("1")
                continue
            # group repeated indices into powers, keeping index order
            parts = [_power(sn[i], len(list(g)), style) for i, g in itertools.groupby(c)]
            out.append(" ".join(parts))
        return out

    def _columns(self, z, t):
        n, d = z.shape
        # Build degree k from degree k-1: monomial (i1..ik) = monomial (i1..i{k-1}) * z_ik.
        by_degree = [_ones(n, z)]
        prev_combos = [()]
        for k in range(1, self.degree + 1):
            combos = list(itertools.combinations_with_replacement(range(d), k))
            pos = {c: j for j, c in enumerate(prev_combos)}
            parent = np.array([pos[c[:-1]] for c in combos], dtype=np.int64)
            var = np.array([c[-1] for c in combos], dtype=np.int64)
            by_degree.append(by_degree[-1][:, _index(parent, z)] * z[:, _index(var, z)])
            prev_combos = combos
        if not self.include_bias:
            by_degree = by_degree[1:]
        return _cat(by_degree, z)


@dataclasses.dataclass(frozen=True)
class TimePolynomial(TermFamily):
    """Pure time powers t, t^2, ..., t^degree (no constant; put that in Polynomial).

    Attributes:
        degree: highest power of t (>= 1).
    """

    degree: int = 2
    kind: ClassVar[str] = "TimePolynomial"
    uses_time: ClassVar[bool] = True

    def __post_init__(self):
        if not isinstance(self.degree, (int, np.integer)) or self.degree < 1:
            raise ValueError(
                f"TimePolynomial degree must be an int >= 1; got {self.degree!r}."
            )

    def n_output_features(self, d):
        _check_d(d)
        return int(self.degree)

    def names(self, d, style="text", state_names=None, time_name="t"):
        _check_style(style)
        _check_d(d)
        return [_power(time_name, k, style) for k in range(1, self.degree + 1)]

    def _columns(self, z, t):
        return _cat([t**k for k in range(1, self.degree + 1)], z)


@dataclasses.dataclass(frozen=True)
class TimeTimesState(TermFamily):
    """t^k z_i for every k in ``powers`` and every i (k-major order).

    Count: len(powers) * d.

    Attributes:
        powers: positive powers of t, e.g. (1, 2) -> t z_i, t^2 z_i.
    """

    powers: tuple[int, ...] = (1, 2)
    kind: ClassVar[str] = "TimeTimesState"
    uses_time: ClassVar[bool] = True

    def __post_init__(self):
        object.__setattr__(self, "powers", tuple(self.powers))
        if not self.powers or any(
            not isinstance(k, (int, np.integer)) or k < 1 for k in self.powers
        ):
            raise ValueError(
                f"TimeTimesState powers must be a non-empty list of ints >= 1; "
                f"got {self.powers!r}."
            )
        if len(set(self.powers)) != len(self.powers):
            raise ValueError(f"TimeTimesState powers repeat a value: {self.powers!r}.")

    def n_output_features(self, d):
        return len(self.powers) * _check_d(d)

    def names(self, d, style="text", state_names=None, time_name="t"):
        _check_style(style)
        sn = _state_names(d, style, state_names)
        return [f"{s} {_power(time_name, k, style)}" for k in self.powers for s in sn]

    def _columns(self, z, t):
        return _cat([(t**k) * z for k in self.powers], z)


@dataclasses.dataclass(frozen=True)
class ExpNegTimeState(TermFamily):
    """exp(-t z_i) for every i. Count: d."""

    kind: ClassVar[str] = "ExpNegTimeState"
    uses_time: ClassVar[bool] = True

    def n_output_features(self, d):
        return _check_d(d)

    def names(self, d, style="text", state_names=None, time_name="t"):
        _check_style(style)
        sn = _state_names(d, style, state_names)
        if style == "text":
            return [f"exp(-{time_name} {s})" for s in sn]
        return [f"e^{{-{time_name} {s}}}" for s in sn]

    def _columns(self, z, t):
        return _exp(-t * z)


@dataclasses.dataclass(frozen=True)
class ExpNegSquare(TermFamily):
    """exp(-z_i^2) for every i (time-free). Count: d."""

    kind: ClassVar[str] = "ExpNegSquare"

    def n_output_features(self, d):
        return _check_d(d)

    def names(self, d, style="text", state_names=None, time_name="t"):
        _check_style(style)
        sn = _state_names(d, style, state_names)
        if style == "text":
            return [f"exp(-{s}^2)" for s in sn]
        return [f"e^{{-{s}^{{2}}}}" for s in sn]

    def _columns(self, z, t):
        return _exp(-(z * z))


def _to_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if _is_torch(x) else np.asarray(x)


def _like(a: np.ndarray, like: Any) -> Any:
    if _is_torch(like):
        return torch.as_tensor(a, dtype=torch.float64, device=like.device)
    return a


def _tanh(x: Any) -> Any:
    return torch.tanh(x) if _is_torch(x) else np.tanh(x)


def _num(x: float) -> str:
    return f"{x:g}"


@dataclasses.dataclass(frozen=True)
class TimeSpline(TermFamily):
    """B-spline basis in t on [t_min, t_max] (scipy.interpolate.BSpline), the first function dropped.

    The ``n_basis`` B-splines of degree ``degree`` on uniform knots sum to 1 (the constant term of
    ``Polynomial``), so the first is dropped to keep Theta free of that exact collinearity.
    Count: n_basis - 1. Outside [t_min, t_max] the basis is 0 (extrapolation is not offered).

    Attributes:
        n_basis: number of B-splines before the drop (>= degree + 1, >= 2).
        degree: spline degree (0 = piecewise constant, 1 = hat functions, 3 = cubic).
        t_min, t_max: the time range the knots cover.
    """

    n_basis: int = 6
    degree: int = 3
    t_min: float = 0.0
    t_max: float = 1.0
    kind: ClassVar[str] = "TimeSpline"
    uses_time: ClassVar[bool] = True

    def __post_init__(self):
        if not isinstance(self.degree, (int, np.integer)) or not 0 <= self.degree <= 5:
            raise ValueError(f"TimeSpline degree must be an int in 0..5; got {self.degree!r}.")
        if not isinstance(self.n_basis, (int, np.integer)) or self.n_basis < max(2, self.degree + 1):
            raise ValueError(f"TimeSpline n_basis must be an int >= max(2, degree + 1); got {self.n_basis!r}.")
        if not self.t_max > self.t_min:
            raise ValueError(f"TimeSpline needs t_max > t_min; got {self.t_min}, {self.t_max}.")

    def knots(self) -> np.ndarray:
        """Clamped uniform knot vector, (n_basis + degree + 1,)."""
        k, inner = self.degree, self.n_basis - self.degree + 1
        mid = np.linspace(self.t_min, self.t_max, inner)
        return np.concatenate([np.full(k, self.t_min), mid, np.full(k, self.t_max)])

    def basis(self, t: np.ndarray) -> np.ndarray:
        """All n_basis functions at t (n,) -> (n, n_basis)."""
        from scipy.interpolate import BSpline

        t = np.asarray(t, dtype=np.float64).reshape(-1)
        inside = (t >= self.t_min) & (t <= self.t_max)
        out = np.zeros((t.size, self.n_basis))
        if inside.any():
            out[inside] = BSpline.design_matrix(t[inside], self.knots(), self.degree).toarray()
        return out

    def n_output_features(self, d):
        _check_d(d)
        return int(self.n_basis) - 1

    def names(self, d, style="text", state_names=None, time_name="t"):
        _check_style(style)
        _check_d(d)
        if style == "text":
            return [f"B{j}({time_name})" for j in range(1, self.n_basis)]
        return [f"B_{{{j}}}({time_name})" for j in range(1, self.n_basis)]

    def _columns(self, z, t):
        return _like(self.basis(_to_numpy(t))[:, 1:], z)


def _time_functions(time_basis: str, degree: int, n_basis: int, t_min: float, t_max: float) -> TermFamily:
    if time_basis == "poly":
        return TimePolynomial(degree=degree)
    if time_basis == "spline":
        return TimeSpline(n_basis=n_basis, degree=min(degree, n_basis - 1), t_min=t_min, t_max=t_max)
    raise ValueError(f"time_basis must be 'poly' or 'spline'; got {time_basis!r}.")


@dataclasses.dataclass(frozen=True)
class TimeProduct(TermFamily):
    """Time functions times state monomials: f_j(t) m(z) for every f_j of the time basis and every
    monomial m of degree 1..state_degree (time-major order, monomials as ``Polynomial``).

    With the polynomial time basis t^1..t^degree and state_degree 1 this is t^j z_i: linear
    dynamics whose coefficients are polynomials in t (the exact form of DDIM on Gaussian data).
    Count: (time functions) x (C(d + state_degree, state_degree) - 1).

    Attributes:
        time_basis: "poly" (t^1..t^degree) or "spline" (``TimeSpline(n_basis, degree)``).
        degree: highest power of t, or the spline degree.
        state_degree: highest total degree of the state monomial (>= 1).
        n_basis, t_min, t_max: the spline basis (time_basis="spline" only).
    """

    time_basis: str = "poly"
    degree: int = 4
    state_degree: int = 1
    n_basis: int = 6
    t_min: float = 0.0
    t_max: float = 1.0
    kind: ClassVar[str] = "TimeProduct"
    uses_time: ClassVar[bool] = True

    def __post_init__(self):
        self.time_family()  # validates the time basis
        if not isinstance(self.state_degree, (int, np.integer)) or self.state_degree < 1:
            raise ValueError(f"TimeProduct state_degree must be an int >= 1; got {self.state_degree!r}.")

    def time_family(self) -> TermFamily:
        return _time_functions(self.time_basis, self.degree, self.n_basis, self.t_min, self.t_max)

    def _state(self) -> Polynomial:
        return Polynomial(degree=self.state_degree, include_bias=False)

    def n_output_features(self, d):
        return self.time_family().n_output_features(d) * self._state().n_output_features(d)

    def names(self, d, style="text", state_names=None, time_name="t"):
        tn = self.time_family().names(d, style, state_names, time_name)
        sn = self._state().names(d, style, state_names, time_name)
        return [f"{s} {f}" for f in tn for s in sn]

    def _columns(self, z, t):
        ft = self.time_family()._columns(z, t)  # (n, q)
        ms = self._state()._columns(z, t)  # (n, r)
        return _cat([ft[:, j : j + 1] * ms for j in range(ft.shape[1])], z)


@dataclasses.dataclass(frozen=True)
class Tanh(TermFamily):
    """Saturating terms tanh(p_k / c) for every projection p_k and scale c, optionally times t^j.

    p_k is the coordinate z_k (``projections`` empty) or u_k . z for the rows u_k of
    ``projections`` (e.g. the principal directions of the training end states, which the job
    computes). The posterior mean of a two-mode Gaussian mixture is exactly of this form
    (E[x0 | z] ~ tanh(a m u.z / v)), so these columns let a sparse model express a denoiser that
    pulls states to one of two modes. Count: (#projections) x len(scales) x (1 + time_degree).

    Attributes:
        scales: positive scales c (the tanh saturates for |p| >> c).
        projections: (r, d) rows u_k as nested tuples, or () for the d coordinates.
        time_degree: also tanh(p_k / c) t^j for j = 1..time_degree (0: time-free).
    """

    scales: tuple[float, ...] = (1.0,)
    projections: tuple[tuple[float, ...], ...] = ()
    time_degree: int = 0
    kind: ClassVar[str] = "Tanh"

    def __post_init__(self):
        object.__setattr__(self, "scales", tuple(float(c) for c in self.scales))
        object.__setattr__(self, "projections", tuple(tuple(float(x) for x in u) for u in self.projections))
        if not self.scales or any(not (c > 0 and math.isfinite(c)) for c in self.scales):
            raise ValueError(f"Tanh scales must be a non-empty list of finite numbers > 0; got {self.scales!r}.")
        if len({len(u) for u in self.projections}) > 1:
            raise ValueError("Tanh projections must all have the same length d.")
        if not isinstance(self.time_degree, (int, np.integer)) or self.time_degree < 0:
            raise ValueError(f"Tanh time_degree must be an int >= 0; got {self.time_degree!r}.")

    @property
    def uses_time(self) -> bool:  # type: ignore[override]
        return self.time_degree > 0

    def params(self) -> dict:
        return {"scales": list(self.scales), "projections": [list(u) for u in self.projections],
                "time_degree": self.time_degree}

    def _n_proj(self, d: int) -> int:
        _check_d(d)
        if self.projections and len(self.projections[0]) != d:
            raise ValueError(f"Tanh projections have length {len(self.projections[0])} but the state has d={d}.")
        return len(self.projections) or d

    def n_output_features(self, d):
        return self._n_proj(d) * len(self.scales) * (1 + self.time_degree)

    def names(self, d, style="text", state_names=None, time_name="t"):
        _check_style(style)
        r = self._n_proj(d)
        if self.projections:
            pn = [f"p{k}" if style == "text" else f"p_{{{k}}}" for k in range(r)]
        else:
            pn = _state_names(d, style, state_names)
        base = []
        for p in pn:
            for c in self.scales:
                arg = p if c == 1 else (f"{p}/{_num(c)}" if style == "text" else rf"{p}/{_num(c)}")
                base.append(f"tanh({arg})" if style == "text" else rf"\tanh({arg})")
        out = list(base)
        for j in range(1, self.time_degree + 1):
            out += [f"{b} {_power(time_name, j, style)}" for b in base]
        return out

    def _columns(self, z, t):
        r = self._n_proj(z.shape[1])
        p = z if not self.projections else z @ _like(np.asarray(self.projections).T, z)  # (n, r)
        base = _cat([_tanh(p[:, k : k + 1] / c) for k in range(r) for c in self.scales], z)
        return _cat([base] + [(t**j) * base for j in range(1, self.time_degree + 1)], z)

    def transform(self, z, t=None):
        z, t = _prepare(z, t, self.uses_time)
        return self._columns(z, t)


# A small expression grammar for user-listed terms. Expressions are parsed with Python's ``ast``
# and walked node by node against this whitelist, never compiled or eval'd: only numbers, the
# names z0..z{d-1} and t, + - * / ** (integer or float powers), unary minus and these functions.
_FUNCS = {"exp": (np.exp, torch.exp if torch else None), "log": (np.log, torch.log if torch else None),
          "tanh": (np.tanh, torch.tanh if torch else None), "sin": (np.sin, torch.sin if torch else None),
          "cos": (np.cos, torch.cos if torch else None), "sqrt": (np.sqrt, torch.sqrt if torch else None),
          "abs": (np.abs, torch.abs if torch else None)}


def _parse_term(expr: str):
    import ast

    if not isinstance(expr, str) or not expr.strip() or len(expr) > 200:
        raise ValueError(f"a user term must be a non-empty expression of at most 200 characters; got {expr!r}.")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"user term {expr!r} is not a valid expression (grammar: numbers, z0..z{{d-1}}, t, "
                         f"+ - * / **, {', '.join(sorted(_FUNCS))}).") from None
    ops = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow)

    def check(node):
        if isinstance(node, ast.Expression):
            return check(node.body)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ops):
            return check(node.left) | check(node.right)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return check(node.operand)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return set()
        if isinstance(node, ast.Name) and (node.id == "t" or (node.id[:1] == "z" and node.id[1:].isdigit())):
            return {node.id}
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS
                and len(node.args) == 1 and not node.keywords):
            return check(node.args[0])
        raise ValueError(f"user term {expr!r}: {ast.dump(node)[:60]} is outside the grammar (numbers, "
                         f"z0..z{{d-1}}, t, + - * / **, {', '.join(sorted(_FUNCS))}).")

    return tree, check(tree)


def _eval_term(node, z, t):
    import ast

    if isinstance(node, ast.Expression):
        return _eval_term(node.body, z, t)
    if isinstance(node, ast.BinOp):
        a, b = _eval_term(node.left, z, t), _eval_term(node.right, z, t)
        op = type(node.op)
        return {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b,
                ast.Div: lambda: a / b, ast.Pow: lambda: a**b}[op]()
    if isinstance(node, ast.UnaryOp):
        v = _eval_term(node.operand, z, t)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.Constant):
        return float(node.value)
    if isinstance(node, ast.Name):
        return t[:, 0] if node.id == "t" else z[:, int(node.id[1:])]
    fn = _FUNCS[node.func.id][1 if _is_torch(z) else 0]
    return fn(_eval_term(node.args[0], z, t))


@dataclasses.dataclass(frozen=True)
class CustomTerms(TermFamily):
    """User-listed terms, e.g. ("z0 * z1", "exp(-t) * z3", "tanh(2 * z0)").

    Grammar: numbers, z0..z{d-1}, t, + - * / ** , unary -, and exp log tanh sin cos sqrt abs of one
    argument. Expressions are checked against this grammar (a walk over Python's ``ast``), never
    eval'd. Names are the expressions as written (text) and ``\\mathrm{...}`` of them (LaTeX).

    Attributes:
        terms: the expressions, one column each.
    """

    terms: tuple[str, ...] = ()
    kind: ClassVar[str] = "CustomTerms"

    def __post_init__(self):
        object.__setattr__(self, "terms", tuple(self.terms))
        if not self.terms:
            raise ValueError("CustomTerms needs at least one expression.")
        for e in self.terms:
            _parse_term(e)

    @property
    def uses_time(self) -> bool:  # type: ignore[override]
        return any("t" in _parse_term(e)[1] for e in self.terms)

    def _max_index(self) -> int:
        idx = [int(n[1:]) for e in self.terms for n in _parse_term(e)[1] if n != "t"]
        return max(idx) if idx else -1

    def n_output_features(self, d):
        d = _check_d(d)
        if self._max_index() >= d:
            raise ValueError(f"a user term uses z{self._max_index()} but the state has d={d} (z0..z{d - 1}).")
        return len(self.terms)

    def names(self, d, style="text", state_names=None, time_name="t"):
        _check_style(style)
        self.n_output_features(d)
        if style == "text":
            return [" ".join(e.split()) for e in self.terms]
        return [r"\mathrm{" + " ".join(e.split()).replace("**", "^") + "}" for e in self.terms]

    def _columns(self, z, t):
        self.n_output_features(z.shape[1])
        cols = []
        for e in self.terms:
            v = _eval_term(_parse_term(e)[0], z, t)
            if not hasattr(v, "shape") or getattr(v, "ndim", 0) == 0:  # a constant expression
                v = _ones(z.shape[0], z)[:, 0] * float(v)
            cols.append(v.reshape(-1, 1))
        return _cat(cols, z)

    def transform(self, z, t=None):
        z, t = _prepare(z, t, self.uses_time)
        return self._columns(z, t)


FAMILIES: dict[str, type[TermFamily]] = {
    cls.kind: cls
    for cls in (Polynomial, TimePolynomial, TimeTimesState, ExpNegTimeState, ExpNegSquare, TimeSpline,
                TimeProduct, Tanh, CustomTerms)
}


def register_family(cls: type[TermFamily]) -> type[TermFamily]:
    """Make a TermFamily subclass known to ``Library.from_spec`` (usable as a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, TermFamily)):
        raise TypeError(f"register_family needs a TermFamily subclass; got {cls!r}.")
    FAMILIES[cls.kind] = cls
    return cls


def reference_families() -> list[TermFamily]:
    """The reference study's families, polynomial completed to degree 3 (see module doc)."""
    return [
        Polynomial(degree=3, include_bias=True),
        TimePolynomial(degree=2),
        TimeTimesState(powers=(1, 2)),
        ExpNegTimeState(),
        ExpNegSquare(),
    ]


# The family names of the config (``sindy.library.families``), in column order.
LIBRARY_FAMILIES = ("polynomial", "time", "time_state", "exp", "tanh", "terms", "mixture")


def build_library(cfg: Any, d: int, t_range: tuple[float, float] = (0.0, 1.0),
                  projections: np.ndarray | None = None, mixture: TermFamily | None = None) -> "Library":
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
            (analysis/mixture.py, MixtureEps; the job fits it); None with "mixture" listed raises.

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
        fams.append(_time_functions(cfg.time_basis, cfg.time_degree, cfg.spline_basis, t_min, t_max))
    if "time_state" in want:
        fams.append(TimeProduct(time_basis=cfg.time_basis, degree=cfg.time_degree, state_degree=cfg.time_state_degree,
                                n_basis=cfg.spline_basis, t_min=t_min, t_max=t_max))
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
            raise ValueError("the mixture family needs a fitted mixture (mixture=...; the SINDy job fits one to the "
                             "run's training latents).")
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
    def reference(cls, d: int | None = None) -> "Library":
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

    def fit(self, z: Any, t: Any = None) -> "Library":
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
    def from_spec(cls, spec: dict) -> "Library":
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
            if kind == "MixtureEps" and kind not in FAMILIES:  # registers itself; it imports this module
                import analysis.mixture  # noqa: F401
            if kind not in FAMILIES:
                raise ValueError(
                    f"unknown term family kind {kind!r} in spec; known: {sorted(FAMILIES)}."
                )
            families.append(FAMILIES[kind](**entry))
        return cls(families, n_state=spec.get("n_state"))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Library)
            and self.families == other.families
            and self.n_state == other.n_state
        )

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
            raise ValueError(
                f"input_features has {len(names)} names for {self.n_features_in_} inputs."
            )
        if self.time_column:
            return self.library.get_feature_names(
                "text", state_names=names[:-1], time_name=names[-1]
            )
        return self.library.get_feature_names("text", state_names=names)


# ------------------------------------------------------------------------------ memory


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes needed (float64) to regress n_samples on a library of n_terms columns.

    Attributes:
        n_samples: rows of Theta.
        n_terms: columns p of Theta.
        n_targets: regression targets m (usually d).
        theta_bytes: the full Theta, n * p * 8 (direct path).
        gram_bytes: Gram statistics G (p, p), b (p, m), Y^T Y (m, m), sum Y (m,).
        chunk_bytes: one streamed Theta chunk, chunk_size * p * 8 (Gram path).
    """

    n_samples: int
    n_terms: int
    n_targets: int
    theta_bytes: int
    gram_bytes: int
    chunk_bytes: int

    @property
    def direct_bytes(self) -> int:
        """Peak for the direct path: Theta plus its Gram-size working copies."""
        return self.theta_bytes + self.gram_bytes

    @property
    def gram_path_bytes(self) -> int:
        """Peak for the streamed Gram path: statistics plus one chunk."""
        return self.gram_bytes + self.chunk_bytes


def estimate_memory(
    n_samples: int,
    d: int,
    library: Library | None = None,
    n_targets: int | None = None,
    chunk_size: int = 65536,
) -> MemoryEstimate:
    """Memory for Theta and for the Gram statistics, in bytes (float64).

    Args:
        n_samples: number of (z, t, zdot) samples.
        d: state dimension.
        library: the library (default: ``Library.reference(d)``).
        n_targets: regression targets (default d).
        chunk_size: rows per streamed chunk on the Gram path.

    Returns:
        MemoryEstimate. E.g. reference library, d=16, 10^6 samples: Theta 8.3 GB,
        Gram statistics 8.7 MB.
    """
    d = _check_d(d)
    if n_samples < 0:
        raise ValueError(f"n_samples must be >= 0; got {n_samples}.")
    lib = Library.reference() if library is None else library
    p = lib.n_output_features(d)
    m = d if n_targets is None else int(n_targets)
    b = 8
    return MemoryEstimate(
        n_samples=int(n_samples),
        n_terms=p,
        n_targets=m,
        theta_bytes=int(n_samples) * p * b,
        gram_bytes=(p * p + p * m + m * m + m) * b,
        chunk_bytes=min(int(n_samples), int(chunk_size)) * p * b,
    )


def require_memory(estimate: MemoryEstimate, available_bytes: int, path: str = "direct") -> None:
    """Raise MemoryError, saying how much is needed, if ``path`` does not fit.

    Args:
        estimate: from ``estimate_memory``.
        available_bytes: memory budget.
        path: "direct" (whole Theta in memory) or "gram" (streamed statistics).
    """
    if path not in ("direct", "gram"):
        raise ValueError(f"path must be 'direct' or 'gram'; got {path!r}.")
    need = estimate.direct_bytes if path == "direct" else estimate.gram_path_bytes
    if need > available_bytes:
        hint = (
            f"use the Gram path (needs {estimate.gram_path_bytes / 2**30:.3f} GiB)"
            if path == "direct"
            else "use a smaller library (lower polynomial degree or fewer families) or a "
            "smaller chunk_size"
        )
        raise MemoryError(
            f"the {path} path needs {need / 2**30:.3f} GiB for n_samples="
            f"{estimate.n_samples}, p={estimate.n_terms} terms, m={estimate.n_targets} "
            f"targets, but only {available_bytes / 2**30:.3f} GiB is available; {hint}."
        )
