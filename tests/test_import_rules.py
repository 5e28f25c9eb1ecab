"""The import rules, enforced: every module's imports (top-level and inside functions) read with ``ast``.

Between packages:

    cluster/                      -> configs
    training/     analysis/       -> models, data_pipeline, configs   (siblings: never each other)
    models/       data_pipeline/  -> configs
    configs/                      -> nothing of ours

Inside analysis/ (one way: an arrow points down only):

    analysis/sindy_job.py, score_samples.py  (entry scripts)  -> job, quality
    analysis/job/                                             -> sindy, report, quality
    analysis/report/                                          -> sindy
    analysis/sindy/   analysis/quality/                       -> nothing else of analysis

The engine (analysis/sindy/) uses numpy, torch, scipy, scikit-learn, pysindy and the standard library, and of
ours only configs.errors (UserError) and configs.io.resolve_device (the device choice); it writes no files.

No module of ours is part of an import circle (imports inside functions and under TYPE_CHECKING count: a circle
that only works because one side imports late is still a circle). An import inside a function, in any of our
packages, carries a comment (on its line or the line above) saying why it is there: an optional or heavy
dependency (ray, matplotlib, tensorboard, pysindy, deepspeed, PIL, torch where a command must start fast without
it) or a Ray worker's pickling. An import circle is never a reason: there are none.

docs/ARCHITECTURE.md explains the rooms; a new package must be added to ALLOWED here.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ALLOWED = {
    "configs": set(),
    "models": {"configs"},
    "data_pipeline": {"configs"},
    "training": {"models", "data_pipeline", "configs"},
    "analysis": {"models", "data_pipeline", "configs"},
    "cluster": {"configs"},
}
# Packages whose modules take part in the cycle test (benchmarks import the others; none imports them).
OURS = (*ALLOWED, "benchmarks")
# The rooms of analysis/ and the rooms each may import ("entry": the scripts directly in analysis/).
ANALYSIS_ROOMS = {
    "sindy": set(),
    "quality": set(),
    "report": {"sindy"},
    "job": {"sindy", "report", "quality"},
    "entry": {"job", "quality"},
}
ENGINE_THIRD_PARTY = {"numpy", "torch", "scipy", "sklearn", "pysindy"}
ENGINE_OURS = {"configs.errors": None, "configs.io": {"resolve_device"}}  # module -> names allowed (None: any)
# An import inside a function must name its reason in a comment (its line or the line above).
REASON = re.compile(r"#.*\b(optional|heavy|pickl|Ray worker|worker|start fast)", re.IGNORECASE)


# ----------------------------------------------------------------------------- reading imports


def module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts) if path.is_relative_to(root) else [path.stem]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute(node: ast.ImportFrom, this: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = this.split(".") if is_package else this.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def read_imports(path: Path, root: Path = REPO) -> list[dict]:
    """Every import statement of the file at any depth: {line, module, names, in_function, comment}.

    ``from a.b import c`` gives module "a.b" and names ["c"] (the cycle test also follows a.b.c when that is a
    module); relative imports are made absolute.
    """
    text = path.read_text()
    lines = text.splitlines()
    tree = ast.parse(text, filename=str(path))
    this = module_name(path, root)
    in_function: set[int] = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_function |= {id(n) for n in ast.walk(fn) if n is not fn}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            entries = [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            entries = [(_absolute(node, this, path.name == "__init__.py"), [a.name for a in node.names])]
        else:
            continue
        above = lines[node.lineno - 2] if node.lineno >= 2 else ""
        comment = lines[node.lineno - 1] + ("\n" + above if above.strip().startswith("#") else "")
        for mod, names in entries:
            out.append(
                {
                    "line": node.lineno,
                    "module": mod,
                    "names": names,
                    "in_function": id(node) in in_function,
                    "comment": comment,
                }
            )
    return out


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package of ours) for every import statement in the file, at any depth."""
    return [(i["line"], i["module"].split(".")[0]) for i in read_imports(path) if i["module"].split(".")[0] in ALLOWED]


def modules(packages=ALLOWED, root: Path = REPO) -> list[Path]:
    return sorted(p for pkg in packages for p in (root / pkg).rglob("*.py"))


# ----------------------------------------------------------------------------- between packages


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_module_imports_only_the_layers_below(path):
    own = path.relative_to(REPO).parts[0]
    bad = [
        f"line {line}: imports {pkg}" for line, pkg in imported_packages(path) if pkg != own and pkg not in ALLOWED[own]
    ]
    assert not bad, f"{path.relative_to(REPO)} ({own} may import {sorted(ALLOWED[own]) or 'nothing of ours'}): {bad}"


def test_the_rule_reader_sees_function_level_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\n\ndef f():\n    from analysis.fit import x\n    import training.loop as t\n")
    assert sorted(imported_packages(f)) == [(4, "analysis"), (5, "training")]


# ----------------------------------------------------------------------------- inside analysis/


def analysis_room(path: Path, root: Path = REPO) -> str:
    parts = path.relative_to(root / "analysis").parts
    return "entry" if len(parts) == 1 else parts[0]


def analysis_violations(path: Path, root: Path = REPO) -> list[str]:
    """The imports of an analysis/ module that break the one-way rule between its rooms."""
    own = analysis_room(path, root)
    if own == "entry" and path.name == "__init__.py":
        return []
    bad = []
    for i in read_imports(path, root):
        parts = i["module"].split(".")
        if parts[0] != "analysis":
            continue
        rooms = [parts[1]] if len(parts) > 1 else [n for n in i["names"]]
        for room in rooms:
            if room != own and room not in ANALYSIS_ROOMS[own]:
                where = "inside a function" if i["in_function"] else "at top level"
                bad.append(f"line {i['line']} ({where}): imports analysis.{room} ({i['module']})")
    return bad


@pytest.mark.parametrize("path", modules(["analysis"]), ids=lambda p: str(p.relative_to(REPO)))
def test_analysis_rooms_import_one_way(path):
    own = analysis_room(path)
    bad = analysis_violations(path)
    allowed = sorted(ANALYSIS_ROOMS[own]) or "nothing else of analysis"
    assert not bad, f"{path.relative_to(REPO)} (analysis/{own} may import {allowed}): {bad}"


def test_nothing_loose_in_analysis():
    loose = sorted(p.name for p in (REPO / "analysis").glob("*.py"))
    assert loose == ["__init__.py", "score_samples.py", "sindy_job.py"], loose
    assert set(p.name for p in (REPO / "analysis").iterdir() if p.is_dir() and p.name != "__pycache__") <= {
        *ANALYSIS_ROOMS,
        "reference",
    }


@pytest.mark.parametrize("path", modules(["analysis/sindy"]), ids=lambda p: str(p.relative_to(REPO)))
def test_the_engine_uses_only_its_libraries_and_writes_no_files(path):
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    bad = []
    for i in read_imports(path):
        mod, top = i["module"], i["module"].split(".")[0]
        if top in stdlib or top in ENGINE_THIRD_PARTY or mod == "analysis.sindy" or mod.startswith("analysis.sindy."):
            continue
        names = ENGINE_OURS.get(mod, set())
        if mod in ENGINE_OURS and (names is None or set(i["names"]) <= names):
            continue
        bad.append(f"line {i['line']}: imports {mod} {i['names'] or ''}")
    writes = re.compile(
        r"\b(atomic_\w+|write_text|write_bytes|np\.save\w*|torch\.save|save_file|SummaryWriter)\b|open\([^)]*['\"][wa]"
    )
    bad += [
        f"line {n}: writes a file: {ln.strip()}"
        for n, ln in enumerate(path.read_text().splitlines(), 1)
        if writes.search(ln)
    ]
    assert not bad, f"{path.relative_to(REPO)} (the engine: numpy/torch/scipy/sklearn/pysindy, no file writes): {bad}"


# ----------------------------------------------------------------------------- circles


def module_graph(packages=OURS, root: Path = REPO) -> dict[str, set[str]]:
    """Module -> the modules of ours it imports (at any depth; ``from pkg import mod`` goes to pkg.mod)."""
    paths = {module_name(p, root): p for p in modules(packages, root)}
    graph: dict[str, set[str]] = {m: set() for m in paths}
    for m, p in paths.items():
        for i in read_imports(p, root):
            targets = [f"{i['module']}.{n}" for n in i["names"] if f"{i['module']}.{n}" in paths]
            if not targets and i["module"] in paths:
                targets = [i["module"]]
            graph[m] |= {t for t in targets if t != m}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected component of more than one module (Tarjan), as a closed path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_closed_path(graph, set(c), c[0]) for c in comps]


def _closed_path(graph: dict[str, set[str]], comp: set[str], start: str) -> list[str]:
    """A shortest path start -> ... -> start inside one component (breadth first)."""
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start] if v != start else [start, start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return [start]


def test_no_import_circles():
    cycles = find_cycles(module_graph())
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_cycle_finder_names_a_circle(tmp_path):
    pkg = tmp_path / "configs"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from configs.b import x\n")
    (pkg / "b.py").write_text("def f():\n    from configs import c  # optional heavy dependency\n")
    (pkg / "c.py").write_text("import configs.a\n")
    (pkg / "d.py").write_text("import configs.a\n")
    cycles = find_cycles(module_graph(["configs"], tmp_path))
    assert cycles == [["configs.a", "configs.b", "configs.c", "configs.a"]]


# ----------------------------------------------------------------------------- imports inside functions


@pytest.mark.parametrize("path", modules(OURS), ids=lambda p: str(p.relative_to(REPO)))
def test_imports_inside_functions_say_why(path):
    bad = [
        f"line {i['line']}: {i['module']}"
        for i in read_imports(path)
        if i["in_function"] and not REASON.search(i["comment"])
    ]
    assert not bad, (
        f"{path.relative_to(REPO)}: imports inside a function without a comment naming why (an optional heavy "
        f"dependency, a command that must start fast, or a Ray worker's pickling); import at the top instead: {bad}"
    )
