"""The report's equations as pysindy objects, and the one formatter of equation text.

References:
    B. de Silva et al., "PySINDy", JOSS 5(49):2104, 2020; A. A. Kaptanoglu et al., JOSS 7(69):3994,
    2022 (``pysindy.SINDy``: ``print``, ``predict``, ``simulate``).

    >>> from analysis.sindy.export import load_pysindy
    >>> model = load_pysindy("runs/local/report")        # reads equations.json (JSON, no pickle)
    >>> model.print()                                     # (z0)' = ... the report's own text
    >>> zdot = model.predict(z, u=t)                      # == Theta(z, t) Xi^T of the report
    >>> traj = model.simulate(z0, t=np.linspace(1, 0, 51), u=lambda s: np.array([s]))

The model's states are the report's fit coordinates u = C (z - m) of the normalised latent z (C (rows) and m
in coordinates.safetensors or pca.safetensors beside equations.json; C = I and m = 0 when the fit was in the
latent's own coordinates). ``analysis.report.usage.load_coordinates`` gives them as a ``Coordinates``, so
a user with latents z simulates from ``coords.states(z_T)`` and maps the result back with ``coords.inverse``
(exact for rotations, the PCA reconstruction otherwise):

    >>> from analysis.report.usage import load_coordinates
    >>> coords = load_coordinates("runs/local/report")
    >>> z = coords.inverse(model.simulate(coords.states(z_T), t=np.linspace(1, 0, 51), u=lambda s: np.array([s])))

Time is pysindy's control input u (the library's last input column, ``PysindyLibrary``); a library
without time terms takes no u. Equation text is written in one place, ``rhs_text``: the report's
text and LaTeX equations and ``SINDy.print`` (through ``ReportSINDy.equations``) all call it.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from analysis.sindy.library import Library, PysindyLibrary
from configs.errors import UserError

__all__ = [
    "number_text",
    "rhs_text",
    "equation_text",
    "equation_latex",
    "ReportSINDy",
    "to_pysindy",
    "xi_from_report",
    "load_pysindy",
    "read_equations",
]


def number_text(c: float, style: str = "text") -> str:
    """|c| with 4 significant digits; LaTeX writes 1.2e-05 as 1.2 \\cdot 10^{-5}."""
    s = f"{abs(c):.4g}"
    if style == "latex" and "e" in s:
        mant, exp = s.split("e")
        s = rf"{mant} \cdot 10^{{{int(exp)}}}"
    return s


def rhs_text(coefs: Sequence[float], names: Sequence[str], style: str = "text") -> str:
    """The right-hand side sum_k c_k name_k over the nonzero c_k, e.g. "-10 z0 + 10 z1".

    Args:
        coefs: (p,) coefficients (zeros are skipped).
        names: (p,) term names in ``style`` ("1" is the constant).
        style: "text" or "latex" (names must be of the same style).

    Returns:
        the sum, or "0" when every coefficient is 0.
    """
    out = ""
    for c, name in zip(coefs, names):
        if c == 0:
            continue
        num = number_text(c, style)
        body = num if name == "1" else (f"{num} {name}" if style == "text" else rf"{num}\, {name}")
        out += (("-" if c < 0 else "") if not out else (" - " if c < 0 else " + ")) + body
    return out or "0"


def _terms_row(terms: list[dict], names: Sequence[str]) -> tuple[list[float], list[str]]:
    return [t["coef"] for t in terms], [names[t["index"]] if names else t["name"] for t in terms]


def equation_text(j: int, terms: list[dict]) -> str:
    """ "dz{j}/dt = ..." from the report's term list [{"index", "name", "coef"}]."""
    return f"dz{j}/dt = " + rhs_text(*_terms_row(terms, []))


def equation_latex(j: int, terms: list[dict], latex_names: Sequence[str]) -> str:
    """ "\\dot z_{j} &= ..." for an align environment."""
    return rf"\dot z_{{{j}}} &= " + rhs_text(*_terms_row(terms, latex_names), style="latex")


try:
    import pysindy

    class ReportSINDy(pysindy.SINDy):
        """``pysindy.SINDy`` whose ``equations`` (and so ``print``) are the report's text (``rhs_text``)."""

        def equations(self, precision: int = 3) -> list[str]:  # noqa: ARG002 - one formatter, fixed digits
            names = self.feature_library.get_feature_names(self.feature_names)
            return [rhs_text(row, names) for row in self.optimizer.coef_]
except ImportError:  # pragma: no cover - pysindy is a dependency of the project
    ReportSINDy = None


def to_pysindy(library: Library, xi: np.ndarray, state_names: Sequence[str] | None = None) -> ReportSINDy:
    """A fitted ``pysindy.SINDy`` whose coefficients are exactly ``xi``.

    pysindy builds its pipeline only in ``fit``, so the model is fitted once on a few synthetic rows
    (states drawn around 0, t in [0, 1], targets Theta Xi^T) and its coefficients are then set to xi
    exactly; nothing of the synthetic rows remains in the model.

    Args:
        library: the report's Library (bound to d).
        xi: (d, p) coefficients, one row per state dimension.
        state_names: names of z_0..z_{d-1} (default "z0".."z{d-1}", the library's own).

    Returns:
        ReportSINDy with time as the control input u when the library uses t.
    """
    d, p = xi.shape
    if library.n_state != d or library.n_terms != p:
        raise ValueError(f"xi has shape {xi.shape} but the library has d={library.n_state}, p={library.n_terms}.")
    timed = library.uses_time
    names = list(state_names or [f"z{i}" for i in range(d)]) + (["t"] if timed else [])
    rng = np.random.default_rng(0)
    n = max(3 * p, 20)
    z = rng.normal(size=(n, d)) * 0.1
    t = np.linspace(0.0, 1.0, n)
    theta = library.transform(z, t if timed else None)
    model = ReportSINDy(
        feature_library=PysindyLibrary(library, time_column=timed), optimizer=pysindy.STLSQ(threshold=0.0, alpha=0.0)
    )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(z, t=1.0, x_dot=theta @ xi.T, u=t[:, None] if timed else None, feature_names=names)
    model.optimizer.coef_ = np.array(xi, dtype=np.float64, copy=True)
    model.optimizer.ind_ = model.optimizer.coef_ != 0
    return model


def xi_from_report(eq: dict, which: str = "chosen") -> np.ndarray:
    """(d, p) coefficients of equations.json: the chosen model (within the term budget) or the
    "unrestricted" one (the rule without the budget)."""
    if which not in ("chosen", "unrestricted"):
        raise ValueError(f"which must be 'chosen' or 'unrestricted'; got {which!r}.")
    dims = eq["dims"]
    xi = np.zeros((len(dims), int(eq["n_terms"])))
    for r in dims:
        terms = r["terms"] if which == "chosen" else r["unrestricted"]["terms"]
        for t in terms:
            xi[r["dim"], t["index"]] = t["coef"]
    return xi


def load_pysindy(report_dir: str | Path, which: str = "chosen") -> ReportSINDy:
    """The report's equations as one ``pysindy.SINDy`` for all dimensions, from equations.json.

    Args:
        report_dir: the report folder (``runs/<name>/report``) or its equations.json.
        which: "chosen" (the report's equations) or "unrestricted".

    Raises:
        UserError: the file is missing, truncated or tampered with (one line naming it and the field;
            :func:`read_equations`).
    """
    path = Path(report_dir)
    path = path / "equations.json" if path.is_dir() else path
    eq, lib = read_equations(path)
    return to_pysindy(lib, xi_from_report(eq, which))


def shorten(value: object, limit: int) -> str:
    """repr cut to ``limit`` characters (a tampered file may hold huge values; the engine imports no CLI helpers)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _bad(path: Path, field: str, why: str) -> UserError:
    return UserError(
        f"{path}: field {field} {why}; the file was modified or damaged (rerun analysis/sindy_job.py to rewrite it)"
    )


def read_equations(path: str | Path) -> tuple[dict, Library]:
    """equations.json, every field the equations are rebuilt from checked, and its library bound to the state.

    Raises:
        UserError: one line naming the file and the field: not JSON, another format, a library that does not
            rebuild, ``n_terms`` or ``term_names`` that differ from the library's, a term whose index is not an
            int in 0..n_terms-1, whose name is not the library's name at that index, or whose coefficient is
            not a finite number.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found: run analysis/sindy_job.py for this run first")
    try:
        eq = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise UserError(f"{path} is truncated or not valid JSON ({shorten(str(e), 120)})") from None
    if not isinstance(eq, dict):
        raise UserError(f"{path} must hold a JSON object, found {type(eq).__name__}")
    if eq.get("format") != "latent-sindy.equations/1":
        raise _bad(path, "'format'", f"is {shorten(eq.get('format'), 60)}, not 'latent-sindy.equations/1'")
    dims = eq.get("dims")
    if not isinstance(dims, list) or not dims:
        raise _bad(path, "'dims'", "must be a non-empty list")
    try:
        lib = Library.from_spec(eq["library"])
        lib.n_state = len(dims)
        names = lib.get_feature_names("text")
    except Exception as e:  # the spec's own checks: unknown family, bad parameters, ...
        raise _bad(
            path, "'library'", f"does not rebuild a library ({type(e).__name__}: {shorten(str(e), 200)})"
        ) from None
    n_terms = eq.get("n_terms")
    if isinstance(n_terms, bool) or not isinstance(n_terms, int) or n_terms != len(names):
        raise _bad(path, "'n_terms'", f"is {shorten(n_terms, 40)}, but the library has {len(names)} terms")
    recorded = eq.get("term_names", names)
    if recorded != names:
        k = next((i for i in range(len(names)) if i >= len(recorded) or recorded[i] != names[i]), len(names))
        got = recorded[k] if isinstance(recorded, list) and k < len(recorded) else None
        raise _bad(path, f"'term_names[{k}]'", f"is {shorten(got, 60)}, the library's term is {names[k]!r}")
    for i, r in enumerate(dims):
        if not isinstance(r, dict) or r.get("dim") != i:
            raise _bad(path, f"'dims[{i}].dim'", f"must be {i}")
        for which, terms in (
            ("terms", r.get("terms")),
            ("unrestricted.terms", (r.get("unrestricted") or {}).get("terms", [])),
        ):
            if not isinstance(terms, list):
                raise _bad(path, f"'dims[{i}].{which}'", "must be a list")
            for j, t in enumerate(terms):
                where = f"'dims[{i}].{which}[{j}]"
                if not isinstance(t, dict):
                    raise _bad(path, where + "'", "must be an object with index, name and coef")
                index, coef = t.get("index"), t.get("coef")
                if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n_terms:
                    raise _bad(path, where + ".index'", f"is {shorten(index, 40)}, not an int in 0..{n_terms - 1}")
                if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not math.isfinite(coef):
                    raise _bad(path, where + ".coef'", f"is {shorten(coef, 40)}, not a finite number")
                if "name" in t and t["name"] != names[index]:
                    raise _bad(
                        path,
                        where + ".name'",
                        f"is {shorten(t['name'], 60)}, but term {index} of the library is {names[index]!r}",
                    )
    return eq, lib
