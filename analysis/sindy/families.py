"""The concrete term families of the SINDy library: polynomials in z, time functions (powers or
B-splines), their products with state monomials, the reference study's exponentials, and tanh
of coordinates or projections. Names and column order: see analysis/sindy/library.py's module doc.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import ClassVar

import numpy as np
from scipy.interpolate import BSpline

from analysis.sindy.terms import (
    TermFamily,
    _cat,
    _check_d,
    _check_style,
    _exp,
    _index,
    _like,
    _num,
    _ones,
    _power,
    _prepare,
    _state_names,
    _tanh,
    _to_numpy,
)

__all__ = [
    "Polynomial",
    "TimePolynomial",
    "TimeTimesState",
    "ExpNegTimeState",
    "ExpNegSquare",
    "TimeSpline",
    "TimeProduct",
    "Tanh",
    "time_functions",
]


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
        return [c for k in range(start, self.degree + 1) for c in itertools.combinations_with_replacement(range(d), k)]

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
            raise ValueError(f"TimePolynomial degree must be an int >= 1; got {self.degree!r}.")

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
        if not self.powers or any(not isinstance(k, (int, np.integer)) or k < 1 for k in self.powers):
            raise ValueError(f"TimeTimesState powers must be a non-empty list of ints >= 1; got {self.powers!r}.")
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


def time_functions(time_basis: str, degree: int, n_basis: int, t_min: float, t_max: float) -> TermFamily:
    """The time basis of sindy.library.time_basis: t..t^degree ("poly") or n_basis - 1 B-splines on [t_min, t_max]."""
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
        return time_functions(self.time_basis, self.degree, self.n_basis, self.t_min, self.t_max)

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
        return {
            "scales": list(self.scales),
            "projections": [list(u) for u in self.projections],
            "time_degree": self.time_degree,
        }

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
