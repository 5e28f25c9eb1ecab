"""The base of the SINDy library: ``TermFamily`` (one block of candidate columns) and the array helpers its
subclasses share (numpy or torch in, the same kind out; validation of z and t; term names).

The concrete families live in analysis/sindy/families.py and analysis/sindy/custom_terms.py (user-listed terms),
the Gaussian-mixture family in analysis/sindy/mixture.py; analysis/sindy/library.py puts families together.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

try:  # torch is optional for the numpy path; the project always has it installed
    import torch
except ImportError:  # pragma: no cover
    torch = None

__all__ = ["TermFamily"]

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
            f"t must be a scalar, ({n},) or ({n}, 1) to match z of shape {tuple(z.shape)}; got shape {tuple(t.shape)}."
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
            f"state_names has {len(state_names)} entries but the state has d={d}; pass one name per state dimension."
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


# ---------------------------------------------------------------------------- the base


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
