"""What the report says about its coordinates: which were compared and kept (sindy.coordinates=auto), and the
"Use the equations" section: three lines that load and simulate the equations, and in which coordinates their
states are, and ``load_coordinates`` that reads C and m back. Its own module: markdown.py is at the line limit."""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError, safe_open

from analysis.sindy.coordinates import Coordinates
from analysis.sindy.export import read_equations, shorten
from configs.errors import UserError

__all__ = ["coordinate_choice_lines", "usage_lines", "load_coordinates"]


def coordinates_file(coordinates: str) -> str | None:
    """The file beside the report that holds C and m (``Coordinates.file_name``), read off the report's description
    of its coordinates (``Coordinates.describe``); None when the states are the latent's own."""
    return next((f for f in ("coordinates.safetensors", "pca.safetensors") if f in coordinates), None)


def usage_lines(report_dir: str, uses_time: bool, T: int, coordinates: str) -> list[str]:
    """Markdown: a three-line example that loads the equations and simulates them on the sampler's grid
    (t = 1 - k/T, from z_T at t = 1 to z_0 at t = 0), and which coordinates the model's states are in.

    Args:
        report_dir: the report folder as the user reaches it (``runs/<name>/reports/<fingerprint>``).
        uses_time: whether the library has time terms (time is then pysindy's control input u).
        T: the sampler's steps.
        coordinates: the report's description of the fit coordinates (``Coordinates.describe``).
    """
    control = ", u=lambda s: np.array([s])" if uses_time else ""
    code = [
        "import numpy as np; from analysis.sindy.export import load_pysindy",
        f'model = load_pysindy("{report_dir}")  # equations.json, no pickle',
        f"states = model.simulate(state_T, t=np.linspace(1, 0, {T + 1}){control})  # state_T: the state at t = 1",
    ]
    where = coordinates_file(coordinates)
    said = (
        "the states are the normalised latent's own coordinates: state_T is a latent z_T"
        if where is None
        else f"the states are u = C (z - m) of the normalised latent z, with C (rows) and m in {where} beside "
        f'equations.json: `coords = load_coordinates("{report_dir}")` (analysis.report.usage) reads them; start '
        "from `state_T = coords.states(z_T)` and map the simulated states back with `coords.inverse(states)`"
    )
    return ["", "## Use the equations", "", "```python", *code, "```", "", f"- {said}."]


def coordinate_choice_lines(choice: dict | None) -> list[str]:
    """One line saying which coordinates were compared and why these were kept (sindy.coordinates=auto)."""
    if not choice or len(choice["candidates"]) < 2:
        return (
            [f"- coordinates not compared: {choice['modes_skipped']}"] if choice and "modes_skipped" in choice else []
        )
    parts = [
        f"{c['kind']} {c['terms']} terms, 1-R^2 {c['unexplained_heldout']:.3g} pooled / "
        f"{c['worst_unexplained_heldout']:.3g} worst"
        for c in choice["candidates"]
    ]
    return [
        f"- coordinates compared (terms in all; held-out unexplained variance pooled over dimensions and of the "
        f"worst dimension): {'; '.join(parts)}; kept **{choice['chosen']}** ({choice['rule']})"
    ]


def load_coordinates(report_dir: str | Path) -> Coordinates:
    """The coordinates u = C (z - m) the report's equations are in, from the safetensors file beside equations.json.

    Args:
        report_dir: the report folder (``runs/<name>/report``).

    Returns:
        Coordinates of kind "modes" (coordinates.safetensors) or "pca" (pca.safetensors); the identity of the
        equations' dimension when neither file is there (the fit was in the latent's own coordinates).

    Raises:
        UserError: equations.json is missing or damaged (:func:`read_equations`), or the file is not
            safetensors holding "components" (k, D) and "mean" (D,) with k the equations' dimension.
    """
    folder = Path(report_dir)
    eq, _ = read_equations(folder / "equations.json")
    d = len(eq["dims"])
    path = next((folder / f for f in ("coordinates.safetensors", "pca.safetensors") if (folder / f).is_file()), None)
    if path is None:
        return Coordinates.identity(d)
    try:
        with safe_open(str(path), "np") as f:
            kind = (f.metadata() or {}).get("kind", "modes" if path.name.startswith("coordinates") else "pca")
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (OSError, SafetensorError) as e:
        raise UserError(f"{path} is not a safetensors file ({shorten(str(e), 120)})") from None
    c, m = t.get("components"), t.get("mean")
    if c is None or m is None or c.ndim != 2 or m.shape != (c.shape[1],) or c.shape[0] != d:
        raise UserError(
            f"{path}: needs 'components' (k, D) and 'mean' (D,) with k = {d} (the equations' dimension); "
            "the file was modified or damaged (rerun analysis/sindy_job.py to rewrite it)"
        )
    return Coordinates(kind, m, c, t.get("explained_variance_ratio"))
