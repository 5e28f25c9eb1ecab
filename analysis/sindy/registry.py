"""The one registry of library families: every TermFamily kind (for ``Library.from_spec``, in Ray workers and
the pysindy export), the config's family names with the kinds they build, and the reference study's families.

The config (configs/sindy.py checks the names; tests/analysis/test_library_config.py holds it to this table),
the plan (job/plan.py) and the job (job/fits.py) read the names from here. A new family: its class in
families.py (or its own module), one entry in FAMILIES and, for a config name, one in LIBRARY_FAMILIES and a
branch in build.build_library.
"""

from __future__ import annotations

from analysis.sindy.custom_terms import CustomTerms
from analysis.sindy.families import (
    ExpNegSquare,
    ExpNegTimeState,
    Polynomial,
    Tanh,
    TimePolynomial,
    TimeProduct,
    TimeSpline,
    TimeTimesState,
)
from analysis.sindy.mixture import MixtureEps
from analysis.sindy.terms import TermFamily

__all__ = ["FAMILIES", "register_family", "reference_families", "LIBRARY_FAMILIES"]


FAMILIES: dict[str, type[TermFamily]] = {
    cls.kind: cls
    for cls in (
        Polynomial,
        TimePolynomial,
        TimeTimesState,
        ExpNegTimeState,
        ExpNegSquare,
        TimeSpline,
        TimeProduct,
        Tanh,
        CustomTerms,
        MixtureEps,
    )
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


# The family names of the config (``sindy.library.families``), in column order, and the TermFamily kinds each
# builds (build.build_library; ``sindy.library.gated`` names families by these names).
LIBRARY_FAMILIES: dict[str, tuple[str, ...]] = {
    "polynomial": ("Polynomial",),
    "time": ("TimePolynomial", "TimeSpline"),
    "time_state": ("TimeProduct",),
    "exp": ("ExpNegTimeState", "ExpNegSquare"),
    "tanh": ("Tanh",),
    "terms": ("CustomTerms",),
    "mixture": ("MixtureEps",),
}
