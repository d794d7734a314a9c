"""The package's layers and the one direction of their imports.

    cka_jax/            similarity library (jax, numpy, scipy only at import)
    cka_jax/models/     Flax ResNets              -> library
    cka_jax/data/       the data sets             -> library
    cka_jax/workdir/    the run directory: its config, files and checkpoints -> library, models, data
    cka_jax/train/      population training       -> everything below
    cka_jax/analysis/   analyses and the report   -> library, models, data, workdir (never train)

Each module's imports (module level, inside functions and under TYPE_CHECKING) are read with `ast`,
so a lazy import in the wrong direction is caught too, and so is a loop of imports between modules
of any layer; then each layer is imported in a fresh interpreter to check the third-party packages
it loads.
"""

from __future__ import annotations

import ast
import pathlib

import pytest
from fresh_interpreter import run_fresh

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "cka_jax"

# What each layer may import from the package (its own layer is always allowed).
ALLOWED = {
    "library": {"library"},
    "models": {"library"},
    "data": {"library"},
    "workdir": {"library", "models", "data"},
    "train": {"library", "models", "data", "workdir"},
    "analysis": {"library", "models", "data", "workdir"},
}
SUBPACKAGE_LAYERS = {"models", "data", "workdir", "train", "analysis"}

HEAVY = ("flax", "optax", "orbax", "tensorflow_datasets", "tensorflow", "grain", "sklearn", "seaborn", "matplotlib")
# Third-party packages a layer must not load when imported (checked in a fresh interpreter).
NOT_LOADED = {
    "cka_jax": HEAVY,
    "cka_jax.models": (
        "optax",
        "orbax",
        "tensorflow_datasets",
        "tensorflow",
        "grain",
        "sklearn",
        "seaborn",
        "matplotlib",
    ),
    "cka_jax.data": HEAVY,
    "cka_jax.workdir": HEAVY,
    # reading a trained workdir back needs orbax and flax, not the training stack
    "cka_jax.workdir.trained": tuple(p for p in HEAVY if p not in ("flax", "orbax")),
}


def layer_of(module: str) -> str:
    """'cka_jax.train.loop' -> 'train'; 'cka_jax._minibatch' or 'cka_jax' -> 'library'."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in SUBPACKAGE_LAYERS:
        return parts[1]
    return "library"


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports(path: pathlib.Path) -> set[str]:
    """Every cka_jax module `path` imports, at any depth of its code."""
    return imports_in(path.read_text(), module_name(path), path.name == "__init__.py")


def imports_in(source: str, name: str, is_package: bool = False) -> set[str]:
    """Every cka_jax module (or module.name) the code `source` of module `name` imports."""
    found = set()
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            submodules = {f"{target}.{alias.name}" for alias in node.names}
            found |= submodules
            if not submodules <= MODULE_NAMES:  # names the module `target` defines
                found.add(target)
    return {m for m in found if m == "cka_jax" or m.startswith("cka_jax.")}


MODULES = sorted(PACKAGE.rglob("*.py"))
MODULE_NAMES = {module_name(p) for p in MODULES}


def test_the_package_has_its_layers():
    assert {layer_of(module_name(p)) for p in MODULES} == {"library", "models", "data", "workdir", "train", "analysis"}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_point_down_the_layers(path):
    layer = layer_of(module_name(path))
    wrong = sorted(m for m in package_imports(path) if m != "cka_jax" and layer_of(m) not in ALLOWED[layer] | {layer})
    assert not wrong, f"{module_name(path)} ({layer} layer) imports {wrong}"


def test_the_library_does_not_import_its_package_init_layers():
    """`import cka_jax` (the package __init__) may only pull in library modules."""
    imported = package_imports(PACKAGE / "__init__.py")
    assert {layer_of(m) for m in imported} <= {"library"}, imported


@pytest.mark.slow  # fresh interpreters
@pytest.mark.parametrize("package", sorted(NOT_LOADED))
def test_importing_a_layer_loads_no_heavy_dependency(package):
    code = (
        "import sys, importlib\n"
        f"importlib.import_module({package!r})\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({NOT_LOADED[package]!r})))\n"
    )
    result = run_fresh(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", f"import {package} loads {result.stdout.strip()}"


MODULE_NAMES = {module_name(p) for p in MODULES}


def imported_modules(imports: set[str], name: str) -> set[str]:
    """The cka_jax modules among `imports` (of module `name`, from :func:`package_imports`):
    ``from p import n`` imports module ``p.n`` when there is one, else (a name ``p`` defines)
    module ``p``."""
    found = set()
    for imported in imports:
        while imported not in MODULE_NAMES and "." in imported:
            imported = imported.rsplit(".", 1)[0]
        if imported in MODULE_NAMES and imported != name:
            found.add(imported)
    return found


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every group of modules of `graph` (module -> modules it imports) that import each other in
    a loop: its strongly connected components of more than one module, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group: list[str] = []
            while not group or group[-1] != v:
                group.append(stack.pop())
            if len(group) > 1:
                cycles.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_modules_import_each_other_in_a_loop():
    graph = {module_name(p): imported_modules(package_imports(p), module_name(p)) for p in MODULES}
    loops = import_cycles(graph)
    assert not loops, f"modules that import each other in a loop: {loops}"


def test_a_loop_through_a_lazy_or_type_checking_import_is_found():
    sources = {
        "cka_jax.analysis.context": "def within():\n    from cka_jax.analysis import within\n",
        "cka_jax.analysis.within": (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from cka_jax.analysis.context import X\n"
        ),
        "cka_jax.analysis.inputs": "from cka_jax.analysis.errors import AnalysisInputError\n",
    }
    graph = {name: imported_modules(imports_in(code, name), name) for name, code in sources.items()}
    assert import_cycles(graph) == [["cka_jax.analysis.context", "cka_jax.analysis.within"]]


def test_no_module_is_too_long_to_read():
    """One job per module: none over 400 lines (a reader can hold it in mind)."""
    long = {module_name(p): n for p in MODULES if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long
