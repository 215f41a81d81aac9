"""The serving package's layout keeps its promises: each rule of ARCHITECTURE.md's "Import rules", read
from the source with ``ast`` (imports inside functions included), so a move that breaks one fails here.

- ``front/`` and ``supervisor/`` (the front process) never import torch, ``handlers`` or ``worker/``;
- ``protocols/`` (used by every host) imports no aiohttp, no torch and no other serving folder;
- no import circle among our modules (module-level imports: those that run when a module is imported);
- no module imports another module's private (``_name``) names;
- no module is over 400 lines.

Where today's code still breaks a rule, the offenders are named below, each to be removed by step 4 of
issue 20; the rule holds for everything else, and a named offender that no longer offends fails too, so
the lists only shrink.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("archiver", "handlers")
SERVING = "archiver.serving"
FOLDERS = ("protocols", "front", "supervisor", "worker")
MAX_LINES = 400

# Modules over 400 lines today.
LONG_MODULES: set[str] = set()
# (importer, imported module, private name) imported today.
PRIVATE_IMPORTS: set[tuple[str, str, str]] = set()
# Import circles (module-level) today, each as the set of modules in it.
CIRCLES: set[frozenset[str]] = set()


def source_files() -> Iterator[tuple[str, Path]]:
    """(dotted module name, path) for every module of our packages."""
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join(parts), path


MODULES = dict(source_files())


def resolve(importer: str, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` names (relative imports resolved against the importer)."""
    if not node.level:
        return node.module or ""
    is_package = MODULES[importer].name == "__init__.py"
    base = importer.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join([*base, node.module] if node.module else base)


def imports(module: str, *, module_level_only: bool = False) -> Iterator[tuple[str, str | None, int]]:
    """(imported module, name taken from it or None, line) for each import ``module`` makes.

    ``from pkg import sub`` where ``sub`` is a module of ours counts as importing ``pkg.sub``. With
    ``module_level_only``, imports inside functions and under ``if TYPE_CHECKING:`` are left out: they do
    not run when the module is imported, so they cannot close a circle.
    """
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    for node in _nodes(tree.body) if module_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            source = resolve(module, node)
            for alias in node.names:
                if f"{source}.{alias.name}" in MODULES:
                    yield f"{source}.{alias.name}", None, node.lineno
                else:
                    yield source, alias.name, node.lineno


def _nodes(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """The statements that run at import: the body, into ``if``/``try``/``with``, not into functions,
    classes' methods or ``if TYPE_CHECKING:``."""
    for node in body:
        yield node
        if isinstance(node, ast.If):
            if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                yield from _nodes(node.body)
            yield from _nodes(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _nodes(block)
        elif isinstance(node, (ast.With, ast.ClassDef)):
            yield from _nodes(node.body)


def in_folder(module: str, *folders: str) -> bool:
    return any(module == f"{SERVING}.{f}" or module.startswith(f"{SERVING}.{f}.") for f in folders)


def names(module: str, top: str) -> bool:
    return module == top or module.startswith(top + ".")


def test_the_front_process_never_imports_torch_handlers_or_the_worker():
    broken = [
        f"{module}:{line} imports {imported}"
        for module in MODULES
        if in_folder(module, "front", "supervisor")
        for imported, _, line in imports(module)
        if names(imported, "torch") or names(imported, "handlers") or in_folder(imported, "worker")
    ]
    assert broken == []


def test_protocols_import_no_aiohttp_no_torch_and_no_other_serving_folder():
    broken = [
        f"{module}:{line} imports {imported}"
        for module in MODULES
        if in_folder(module, "protocols")
        for imported, _, line in imports(module)
        if names(imported, "aiohttp")
        or names(imported, "torch")
        or in_folder(imported, "front", "supervisor", "worker")
    ]
    assert broken == []


def test_each_serving_module_lives_in_one_of_the_four_folders():
    loose = [m for m in MODULES if m.startswith(SERVING + ".") and not in_folder(m, *FOLDERS)]
    assert loose == []


def test_no_module_imports_another_modules_private_names():
    found = {
        (module, imported, name)
        for module in MODULES
        for imported, name, _ in imports(module)
        if name and name.startswith("_") and not name.startswith("__") and imported.split(".")[0] in PACKAGES
    }
    assert found - PRIVATE_IMPORTS == set(), "new imports of private names"
    assert PRIVATE_IMPORTS - found == set(), "gone: take them off PRIVATE_IMPORTS"


def test_no_module_is_over_400_lines():
    long = {module for module, path in MODULES.items() if len(path.read_text().splitlines()) > MAX_LINES}
    assert long - LONG_MODULES == set(), "split these by meaning"
    assert LONG_MODULES - long == set(), "now short: take them off LONG_MODULES"


def circles() -> set[frozenset[str]]:
    """Each strongly connected set of our modules (of more than one) under module-level imports."""
    graph = {
        module: {
            imported for imported, _, _ in imports(module, module_level_only=True) if imported in MODULES
        }
        for module in MODULES
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: set[frozenset[str]] = set()

    def visit(module: str) -> None:  # Tarjan's algorithm; the graph is small, recursion is fine
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in graph[module]:
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == module:
                    break
            if len(component) > 1:
                found.add(frozenset(component))

    for module in graph:
        if module not in index:
            visit(module)
    return found


def test_no_import_circle_among_our_modules():
    found = circles()
    assert found - CIRCLES == set(), "new import circles"
    assert CIRCLES - found == set(), "gone: take them off CIRCLES"
