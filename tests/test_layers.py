"""The package's layers and the one direction of their imports.

    cka_jax/            similarity library (jax, numpy, scipy only at import)
    cka_jax/models/     Flax ResNets              -> library
    cka_jax/data/       the data sets             -> library
    cka_jax/workdir/    the run directory: its config, files and checkpoints -> library, models, data
    cka_jax/train/      population training       -> everything below
    cka_jax/analysis/   analyses and the report   -> library, models, data, workdir (never train)

Each module's imports (module level and inside functions) are read with `ast`, so a lazy import in
the wrong direction is caught too; then each layer is imported in a fresh interpreter to check the
third-party packages it loads.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

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
    name = module_name(path)
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found |= {f"{target}.{alias.name}" for alias in node.names}
    return {m for m in found if m == "cka_jax" or m.startswith("cka_jax.")}


MODULES = sorted(PACKAGE.rglob("*.py"))


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


@pytest.mark.parametrize("package", sorted(NOT_LOADED))
def test_importing_a_layer_loads_no_heavy_dependency(package):
    code = (
        "import sys, importlib\n"
        f"importlib.import_module({package!r})\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({NOT_LOADED[package]!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"import {package} loads {out.strip()}"


def test_no_module_is_too_long_to_read():
    """One job per module: none over 400 lines (a reader can hold it in mind)."""
    long = {module_name(p): n for p in MODULES if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long
