"""The package layers import downward only, and no modules import each other in a circle.

Reads every module's imports (function-level ones too: a lazy import that points upward is still
a dependency) with ``ast``, so nothing is imported to check. A failure names the file and the line.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from tests.processes import REPO

PACKAGE = "f5worker"
# Lowest first. A module may import its own layer and those before it, never one after it.
LAYERS = (
    ("base", ("f5worker.errors", "f5worker.env_values", "f5worker.settings")),
    ("storage", ("s3_utils",)),
    ("model", ("f5worker.model",)),
    ("inference", ("f5worker.inference",)),
    ("jobs", ("f5worker.jobs",)),
    ("faces", ("f5worker.service", "f5worker.validation", "f5worker.preload", "f5worker.local_job", "f5worker")),
)


@dataclass(frozen=True)
class Import:
    source: str  # importing module's dotted name
    target: str  # imported module's dotted name
    path: Path
    line: int

    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def module_files() -> dict[str, Path]:
    found = {"s3_utils": REPO / "s3_utils.py"}
    for path in sorted((REPO / PACKAGE).rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def layer_of(module: str) -> int:
    """The index of the layer ``module`` belongs to: the longest prefix that names one."""
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS"
    return best


def resolve(name: str, known: dict[str, Path]) -> str | None:
    """The project module ``name`` (or the package holding ``name``, a module attribute) refers to."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(source: str, path: Path, known: dict[str, Path]) -> list[Import]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from f5worker.jobs import audio` names a module; `from x import Name`, an attribute.
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            raise AssertionError(f"{path.relative_to(REPO)}:{node.lineno}: relative import; spell the module out")
        else:
            continue
        for name in names:
            target = resolve(name, known)
            if target is not None and target != source:
                found.append(Import(source, target, path, node.lineno))
    return list(dict.fromkeys(found))  # one per module and line


def all_imports() -> list[Import]:
    known = module_files()
    return [imp for module, path in known.items() for imp in imports_of(module, path, known)]


def upward(imports: list[Import]) -> list[str]:
    return [f"{imp.where()}: {imp.source} ({LAYERS[layer_of(imp.source)][0]}) imports {imp.target} "
            f"({LAYERS[layer_of(imp.target)][0]}), a higher layer"
            for imp in imports if layer_of(imp.target) > layer_of(imp.source)]


def cycles(imports: list[Import]) -> list[str]:
    """One line per import circle, each as the chain of imports that closes it."""
    edges: dict[str, list[Import]] = {}
    for imp in imports:
        edges.setdefault(imp.source, []).append(imp)
    found, done = [], set()

    def visit(module: str, chain: list[Import]) -> None:
        if module in done:
            return
        for imp in edges.get(module, []):
            on_chain = [step.source for step in chain]
            if imp.target in on_chain:
                circle = chain[on_chain.index(imp.target):] + [imp]
                found.append(" -> ".join(f"{step.source} ({step.where()})" for step in circle) + f" -> {imp.target}")
            else:
                visit(imp.target, chain + [imp])
        done.add(module)

    for module in sorted(edges):
        visit(module, [])
    return found


def test_every_module_belongs_to_a_layer():
    for module in module_files():
        layer_of(module)


def test_no_module_imports_a_higher_layer():
    assert upward(all_imports()) == []


def test_no_import_circles():
    assert cycles(all_imports()) == []


def test_the_check_catches_an_upward_import_and_a_circle(tmp_path):
    # The checks run on imports made up here, so a check that could never fail is caught.
    here = REPO / "f5worker" / "model" / "dit.py"
    up = Import("f5worker.model.dit", "f5worker.jobs.plan", here, 3)
    assert upward([up]) == ["f5worker/model/dit.py:3: f5worker.model.dit (model) imports f5worker.jobs.plan (jobs), "
                            "a higher layer"]
    back = Import("f5worker.jobs.plan", "f5worker.model.dit", REPO / "f5worker" / "jobs" / "plan.py", 9)
    assert len(cycles([up, back])) == 1 and "f5worker/jobs/plan.py:9" in cycles([up, back])[0]
    assert upward([back]) == [] and cycles([back]) == []
