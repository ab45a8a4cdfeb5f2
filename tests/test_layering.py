"""Structure checks over the source, with `ast` (nothing is imported):

- every import of a facebce module, at module level or inside a function, obeys the layering table
  below (the same table is in README.md, section Layout);
- no import cycle among facebce modules (imports under `if TYPE_CHECKING:` are not run, so they
  do not count for cycles; they must still obey the table);
- no module over 450 lines unless its docstring says why, in a sentence containing "over 450 lines".
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "facebce"

# Layer -> the facebce layers it may import (besides itself and the shared ones).
SHARED = {"facebce", "errors", "fileio", "lazy", "resources"}  # root (__version__), errors, I/O, lazy names, resources
LAYERS = {
    "data": set(),
    "models": set(),
    "heads": {"models"},
    "eval": {"data", "models", "heads"},
    "train": {"data", "models", "heads", "eval"},
    "deploy": {"data", "models", "eval"},
    "serve": {"deploy", "eval", "data", "models", "heads"},
    "cli": {"data", "models", "heads", "eval", "train", "deploy", "serve"},
}
SHARED_MAY_IMPORT = {"facebce": set(), "errors": set(), "fileio": {"errors"}, "lazy": set(),
                     "resources": {"errors", "fileio"}}
MAX_LINES = 450


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    return "facebce" if len(parts) == 1 else parts[1]


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(module: str) -> list[tuple[str, int, bool]]:
    """(imported facebce module, line, runs at import or call time) for every import in the module."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, int, bool]] = []

    def resolve(target: str) -> str:
        """The longest facebce module `target` names (an attribute of a module resolves to the module)."""
        while target and target not in MODULES:
            target = target.rpartition(".")[0]
        return target

    def visit(node: ast.AST, runs: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, False)
            for child in node.orelse:
                visit(child, runs)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "facebce" or alias.name.startswith("facebce."):
                    found.append((resolve(alias.name), node.lineno, runs))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source == "facebce" or source.startswith("facebce."):
                for alias in node.names:  # `from facebce.train import checkpoint` imports a module
                    full = f"{source}.{alias.name}"
                    found.append((full if full in MODULES else resolve(source), node.lineno, runs))
        for child in ast.iter_child_nodes(node):
            visit(child, runs)

    visit(tree, True)
    return found


def allowed(importer: str, imported: str) -> bool:
    a, b = layer_of(importer), layer_of(imported)
    if a == b:
        return True
    if a in SHARED:
        return b in SHARED_MAY_IMPORT[a]
    if b in SHARED:
        return True
    return b in LAYERS[a]


def test_every_module_has_a_layer():
    unknown = sorted(m for m in MODULES if layer_of(m) not in LAYERS and layer_of(m) not in SHARED)
    assert not unknown, f"modules outside the layering table (add them to it here and in README Layout): {unknown}"
    assert len(MODULES) > 40  # the walk found the package


def test_imports_follow_the_layering_table():
    bad = [f"{MODULES[m].relative_to(PACKAGE.parent)}:{line}: {layer_of(m)} -> {target}"
           for m in MODULES for target, line, _ in imports_of(m) if not allowed(m, target)]
    assert not bad, "imports the layering table forbids:\n" + "\n".join(bad)


def test_nothing_imports_the_cli():
    users = [m for m in MODULES for target, _, _ in imports_of(m) if target == "facebce.cli" and m != "facebce.cli"]
    assert not users


def test_no_import_cycles():
    graph = {m: sorted({t for t, _, runs in imports_of(m) if runs and t != m}) for m in MODULES}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []
    cycles: list[list[str]] = []

    def dfs(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in graph[m]:
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                dfs(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_long_modules_say_why():
    unexplained = []
    for m, path in MODULES.items():
        n = len(path.read_text(encoding="utf-8").splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        if n > MAX_LINES and "over 450 lines" not in doc:
            unexplained.append(f"{path.relative_to(PACKAGE.parent)} ({n} lines)")
    assert not unexplained, ("modules over 450 lines whose docstring does not say why (a sentence with "
                             "'over 450 lines'): " + ", ".join(unexplained))


def test_the_checks_catch_what_they_should():
    """The rules themselves: a few forbidden and allowed pairs, and the resolver on this package."""
    assert not allowed("facebce.eval.runner", "facebce.train.engine")
    assert not allowed("facebce.eval.ijb", "facebce.deploy.align")
    assert not allowed("facebce.deploy.export", "facebce.train.checkpoint")
    assert not allowed("facebce.data.recordio", "facebce.models")
    assert not allowed("facebce.heads.base", "facebce.data.synthetic")
    assert not allowed("facebce.fileio", "facebce.models")
    assert allowed("facebce.models.embedder", "facebce.fileio") and allowed("facebce.serve", "facebce.deploy.gallery")
    assert allowed("facebce.cli", "facebce.train") and allowed("facebce.heads.bce", "facebce.models")
    assert any(t == "facebce.heads.registry" and runs for t, _, runs in imports_of("facebce.heads.bce"))
    assert ("facebce.train.engine", False) in {(t, runs) for t, _, runs in imports_of("facebce.train.callbacks")}
    assert ("facebce.train.checkpoint", True) in {(t, runs) for t, _, runs in imports_of("facebce.train.engine")}
