"""The floors of docs/architecture.md hold: no import of `longvila.*` runs up a floor, and no two files
import each other in a circle.

The graph is built from the source with `ast` (module-level, function-level and `TYPE_CHECKING` imports
alike; relative imports resolved), one node per file, so a lazy import inside a function counts: it still
ties the two files together.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = "longvila"

# Top to bottom. A file belongs to the first entry whose prefix matches its dotted module name; an entry
# ending in "." is a folder. `longvila` itself (the package's `__init__.py`) is a facade of public
# re-exports above everything: nothing inside the package may import it.
FLOORS: tuple[tuple[str, ...], ...] = (
    ("longvila",),
    ("longvila.cli",),
    ("longvila.commands.",),
    ("longvila.train.", "longvila.eval.", "longvila.serve.", "longvila.build."),
    ("longvila.model.", "longvila.data.", "longvila.processor", "longvila.chat"),
    (
        "longvila.parallel.",
        "longvila.kernels.",
        "longvila.plan.",
        "longvila.text.",
        "longvila.config",
        "longvila.devices",
        "longvila.files",
        "longvila.version",
    ),
)


def module_name(path: Path, root: Path) -> str:
    """`root/longvila/model/vlm.py` → `longvila.model.vlm`; a package's `__init__.py` → the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def floor_of(module: str) -> int:
    """Index of the module's floor in FLOORS (0 is the top)."""
    for index, prefixes in enumerate(FLOORS):
        for prefix in prefixes:
            if prefix.endswith("."):
                if module == prefix[:-1] or module.startswith(prefix):
                    return index
            elif module == prefix:
                return index
    raise AssertionError(f"{module} is on no floor: add it to FLOORS in {Path(__file__).name}")


def imported_modules(tree: ast.Module, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules of `known` that an import statement anywhere in `tree` refers to: `from a import b` is
    `a.b` when that is a module (a submodule), else `a`; relative imports are resolved against `module`."""
    here = module.split(".") if is_package else module.split(".")[:-1]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                names.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target)
    return names & known


def import_graph(root: Path) -> dict[str, set[str]]:
    """File-level graph: module → the modules (files) of the package it imports."""
    files = {module_name(p, root): p for p in sorted((root / PACKAGE).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        targets = imported_modules(tree, module, path.name == "__init__.py", set(files))
        graph[module] = targets - {module}
    return graph


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """`a → b` where b sits on a higher floor than a (importing the top facade counts)."""
    return sorted(
        f"{a} (floor {floor_of(a)}) → {b} (floor {floor_of(b)})"
        for a, targets in graph.items()
        for b in targets
        if floor_of(b) < floor_of(a) or b == PACKAGE
    )


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one file (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_every_file_has_a_floor():
    graph = import_graph(SRC)
    assert len(graph) > 50
    for module in graph:
        floor_of(module)


def test_no_import_runs_up_a_floor():
    bad = upward_imports(import_graph(SRC))
    assert not bad, "imports running up the floors (docs/architecture.md):\n" + "\n".join(bad)


def test_no_circles_between_files():
    found = cycles(import_graph(SRC))
    assert not found, "import circles:\n" + "\n".join(" ↔ ".join(c) for c in found)


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_the_check_sees_an_upward_import_a_circle_and_the_facade(tmp_path):
    _write(tmp_path, "longvila/__init__.py", "from longvila.config import X\n")
    _write(tmp_path, "longvila/config.py", "def f():\n    from .model import vlm, checkpoint\n")
    _write(tmp_path, "longvila/model/__init__.py", "")
    _write(tmp_path, "longvila/model/vlm.py", "from . import checkpoint\nfrom longvila import LongVILA\n")
    _write(tmp_path, "longvila/model/checkpoint.py", "import longvila.model.vlm\n")
    graph = import_graph(tmp_path)
    assert graph["longvila.config"] == {"longvila.model.checkpoint", "longvila.model.vlm"}
    assert upward_imports(graph) == [
        "longvila.config (floor 5) → longvila.model.checkpoint (floor 4)",
        "longvila.config (floor 5) → longvila.model.vlm (floor 4)",
        "longvila.model.vlm (floor 4) → longvila (floor 0)",
    ]
    # the facade → config → model.vlm → facade, and vlm ↔ checkpoint (through config's lazy import too)
    assert cycles(graph) == [
        ["longvila", "longvila.config", "longvila.model.checkpoint", "longvila.model.vlm"]
    ]
    del graph["longvila.config"], graph["longvila"]
    assert cycles(graph) == [["longvila.model.checkpoint", "longvila.model.vlm"]]


EVALUATION = ("longvila.eval.", "longvila.serve.", "longvila.commands.eval", "longvila.commands.ask")
"""Code that scores or serves a model: its needles, haystacks and questions come from `longvila.data`
(the same floor as the model), never from the training package beside it."""


def test_evaluation_takes_nothing_from_training():
    graph = import_graph(SRC)

    def evaluating(module: str) -> bool:
        return any(module == p.rstrip(".") or module.startswith(p) for p in EVALUATION)

    bad = sorted(
        f"{a} → {b}" for a, ts in graph.items() if evaluating(a) for b in ts if b.startswith("longvila.train")
    )
    assert not bad, "evaluation importing training code:\n" + "\n".join(bad)
