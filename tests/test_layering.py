"""The package's layering holds: subpackages import only the layers below them, no module imports itself back
through any chain (package ``__init__`` re-exports included), and inference loads without the training code."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import volcnn

PACKAGE = Path(volcnn.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path) -> set[str]:
    """volcnn modules ``name`` imports (module level and inside functions), as module names of :data:`MODULES`."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(anchor[: len(anchor) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES] or [base]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # volcnn.io.Volume -> volcnn.io
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> int:
    """Index of the module's subpackage in :data:`volcnn.SUBPACKAGES`; the top modules (``cli``, ``__main__``)
    come last, the root package first."""
    parts = module.split(".")
    if len(parts) == 1:
        return -1
    if parts[1] in volcnn.SUBPACKAGES:
        return volcnn.SUBPACKAGES.index(parts[1])
    return len(volcnn.SUBPACKAGES)


def test_every_subpackage_is_listed():
    found = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert found == set(volcnn.SUBPACKAGES)


def test_subpackages_import_only_lower_layers():
    wrong = [
        f"{source} imports {target}"
        for source, targets in GRAPH.items()
        for target in targets
        if _layer(source) >= 0 and _layer(target) > _layer(source)
    ]
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles():
    """Tarjan's strongly connected components over every import, ``__init__`` re-exports and imports inside
    functions included (an import put inside a function to dodge a cycle is still a cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in GRAPH:
        if module not in index:
            visit(module)
    assert not cycles, cycles


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(m for m in sys.modules if m.startswith('volcnn')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return set(result.stdout.split())


def test_inference_loads_without_training_or_evaluation_code():
    loaded = _loaded_after("import volcnn.inference")
    unwanted = {m for m in loaded if m.split(".")[1:2] in (["engines"], ["evaluation"], ["data"], ["bundle"])}
    assert not unwanted, sorted(unwanted)
    assert "volcnn.explain" in loaded and "volcnn.models" in loaded


def test_bare_import_reaches_every_subpackage():
    """A bundle config's ``$import volcnn`` then ``volcnn.explain...`` (it failed unless something else had
    imported volcnn.explain first)."""
    loaded = _loaded_after("import volcnn; volcnn.explain.EXPLAIN_METHODS; volcnn.models.load_weights")
    assert {"volcnn.explain", "volcnn.models"} <= loaded


def test_the_command_line_parser_loads_no_torch():
    """``volcnn --help`` and argument errors answer at once: building the parser imports neither torch nor MONAI."""
    code = "import sys, volcnn.cli; volcnn.cli.build_parser(); print(sorted({'torch', 'monai'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert result.stdout.strip() == "[]"


def test_core_names_resolve_lazily():
    import volcnn.core as core

    assert sorted(core.__all__) == sorted(core._MODULE_OF)
    assert all(getattr(core, name) is not None for name in core.__all__)
