"""Every config key with its one-line doc and the file that defines it.

The schema's documentation is the attribute docstring under each dataclass field (PEP 257's
"attribute docstrings"). Python keeps no such docstrings at runtime, so they are read from the
source with ``ast``; dataclasses and OmegaConf offer no other place for a per-field doc.

Used by ``python -m configs show`` (the resolved config, each key with its doc) and by the
unknown-key error (which names the section's file and suggests the closest key, via difflib).
This module imports nothing of the project: the root dataclass is passed in.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import re
import textwrap
import typing
from functools import cache
from pathlib import Path
from typing import Any

import yaml

__all__ = ["KeyDoc", "key_docs", "section_file", "unknown_key_message", "render_config"]

_REPO = Path(__file__).resolve().parents[1]
# The first sentence: up to a full stop followed by a space, not the one of "e.g." / "i.e.".
_SENTENCE_END = re.compile(r"(?<!e\.g)(?<!i\.e)(?<!etc)\.\s")
_MAX_DOC = 110


@dataclasses.dataclass(frozen=True)
class KeyDoc:
    key: str
    """Dotted key, e.g. ``sindy.library.poly_degree``."""
    doc: str
    """The field's docstring, first sentence, on one line ('' if the field has none)."""
    file: str
    """The file that defines the field, relative to the repository (e.g. configs/sindy.py)."""


def _one_line(doc: str) -> str:
    text = " ".join(doc.split())
    m = _SENTENCE_END.search(text)
    if m:
        text = text[: m.start() + 1]
    return text if len(text) <= _MAX_DOC else text[: _MAX_DOC - 3].rstrip() + "..."


@cache
def _own_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings written in ``cls``'s own body (not its bases)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = nxt.value.value
    return docs


def _field_doc(cls: type, name: str) -> tuple[str, type]:
    """(doc, defining class): the nearest class in the MRO that documents the field (a subclass
    may change a default without repeating the doc)."""
    for klass in cls.__mro__:
        doc = _own_docs(klass).get(name)
        if doc is not None:
            return doc, klass
    return "", cls


def _relpath(cls: type) -> str:
    path = Path(inspect.getsourcefile(cls) or "")
    try:
        return path.resolve().relative_to(_REPO).as_posix()
    except ValueError:
        return path.name


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


@cache
def key_docs(root: type) -> dict[str, KeyDoc]:
    """Every leaf key of the config dataclass ``root`` (depth first, in field order)."""
    out: dict[str, KeyDoc] = {}

    def walk(cls: type, prefix: str) -> None:
        hints = {f.name: f.type for f in dataclasses.fields(cls)}
        resolved = _resolve_types(cls)
        for name in hints:
            tp = resolved.get(name)
            key = f"{prefix}{name}"
            if _is_section(tp):
                walk(tp, key + ".")
            else:
                doc, owner = _field_doc(cls, name)
                out[key] = KeyDoc(key, _one_line(doc), _relpath(owner))

    walk(root, "")
    return out


def _resolve_types(cls: type) -> dict[str, Any]:

    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that does not evaluate: no nested sections from it
        return {}


def section_file(root: type, key: str) -> str:
    """The file that defines the section of ``key`` (its first component), e.g. configs/sindy.py
    for ``sindy.anything``; the root's own file for unknown sections and top-level keys."""
    first = key.split(".")[0]
    hints = _resolve_types(root)
    tp = hints.get(first)
    return _relpath(tp) if _is_section(tp) and "." in key else _relpath(root)


def unknown_key_message(root: type, key: str) -> str:
    """``unknown config key 'sindy.n_trajectorie' (the sindy section is in configs/sindy.py;
    did you mean 'sindy.n_trajectories'?)``: the file to read and difflib's closest key."""
    keys = list(key_docs(root))
    sections = sorted({k.split(".")[0] for k in keys if "." in k})
    first = key.split(".")[0]
    leaf = key.split(".")[-1]
    in_section = [k for k in keys if k.startswith(first + ".")]
    if "." in key and first in sections:
        where = f"the {first} section is in {section_file(root, key)}"
    else:
        where = f"sections and top-level keys are in {_relpath(root)}"
    close = (
        [k for k in keys if k.split(".")[-1] == leaf][:1]  # the right name in another section
        or [k for k in in_section if len(leaf) >= 3 and leaf in k.split(".")[-1]][:1]  # slurm.gpus -> gpus_per_node
        or difflib.get_close_matches(key, in_section, n=1, cutoff=0.6)  # a typo within the section
        or difflib.get_close_matches(key, keys + sections, n=1, cutoff=0.6)
    )
    hint = f"; did you mean '{close[0]}'?" if close else ";"
    return f"unknown config key '{key}' ({where}{hint} `python -m configs show --config FILE` lists every key)"


def _yaml_value(value: Any) -> str:

    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, allow_unicode=True).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def render_config(root: type, cfg: Any, header: str = "") -> str:
    """The resolved config ``cfg`` (an instance of ``root``) as YAML, each key with its one-line doc
    as a comment and each section with the file that defines it. The output loads back as a config."""
    docs = key_docs(root)
    lines = [f"# {line}" for line in header.splitlines()]

    def walk(obj: Any, prefix: str, indent: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(value):
                lines.append(f"{indent}{f.name}:  # {_relpath(type(value))} ({type(value).__name__})")
                walk(value, key + ".", indent + "  ")
            else:
                doc = docs[key].doc if key in docs else ""
                lines.append(f"{indent}{f.name}: {_yaml_value(value)}" + (f"  # {doc}" if doc else ""))

    walk(cfg, "", "")
    return "\n".join(lines) + "\n"
