"""User-listed library terms (``sindy.library.terms``): a small expression grammar, checked, never eval'd."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

try:  # torch is optional for the numpy path; the project always has it installed
    import torch
except ImportError:  # pragma: no cover
    torch = None

import ast

from analysis.sindy.terms import TermFamily, _cat, _check_d, _check_style, _is_torch, _ones, _prepare

__all__ = ["CustomTerms"]


# A small expression grammar for user-listed terms. Expressions are parsed with Python's ``ast``
# and walked node by node against this whitelist, never compiled or eval'd: only numbers, the
# names z0..z{d-1} and t, + - * / ** (integer or float powers), unary minus and these functions.
_FUNCS = {
    "exp": (np.exp, torch.exp if torch else None),
    "log": (np.log, torch.log if torch else None),
    "tanh": (np.tanh, torch.tanh if torch else None),
    "sin": (np.sin, torch.sin if torch else None),
    "cos": (np.cos, torch.cos if torch else None),
    "sqrt": (np.sqrt, torch.sqrt if torch else None),
    "abs": (np.abs, torch.abs if torch else None),
}


def _parse_term(expr: str):

    if not isinstance(expr, str) or not expr.strip() or len(expr) > 200:
        raise ValueError(f"a user term must be a non-empty expression of at most 200 characters; got {expr!r}.")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(
            f"user term {expr!r} is not a valid expression (grammar: numbers, z0..z{{d-1}}, t, "
            f"+ - * / **, {', '.join(sorted(_FUNCS))})."
        ) from None
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
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in _FUNCS
            and len(node.args) == 1
            and not node.keywords
        ):
            return check(node.args[0])
        raise ValueError(
            f"user term {expr!r}: {ast.dump(node)[:60]} is outside the grammar (numbers, "
            f"z0..z{{d-1}}, t, + - * / **, {', '.join(sorted(_FUNCS))})."
        )

    return tree, check(tree)


def _eval_term(node, z, t):

    if isinstance(node, ast.Expression):
        return _eval_term(node.body, z, t)
    if isinstance(node, ast.BinOp):
        a, b = _eval_term(node.left, z, t), _eval_term(node.right, z, t)
        op = type(node.op)
        return {
            ast.Add: lambda: a + b,
            ast.Sub: lambda: a - b,
            ast.Mult: lambda: a * b,
            ast.Div: lambda: a / b,
            ast.Pow: lambda: a**b,
        }[op]()
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
