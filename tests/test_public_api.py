"""The public API: each name exported once from `cka_jax`, implementations in private modules, and no
public name that is also a module (`cka_jax.cka` and `cka_jax.compare` are the functions)."""

import ast
import pathlib
import types

import numpy as np

import cka_jax

PUBLIC_SUBPACKAGES = {"models", "data", "workdir", "train", "analysis"}


def test_every_exported_name_is_listed_and_defined_once():
    assert len(cka_jax.__all__) == len(set(cka_jax.__all__))
    assert all(hasattr(cka_jax, name) for name in cka_jax.__all__)
    tree = ast.parse(pathlib.Path(cka_jax.__file__).read_text())
    imports = [node for node in tree.body if isinstance(node, ast.ImportFrom)]
    bound = [alias.asname or alias.name for node in imports for alias in node.names]
    assert sorted(bound) == sorted(cka_jax.__all__), "imported in __init__ but not exported, or exported twice"


def test_no_public_name_is_a_module():
    modules = {
        name
        for name in dir(cka_jax)
        if not name.startswith("_") and isinstance(getattr(cka_jax, name), types.ModuleType)
    }
    assert modules <= PUBLIC_SUBPACKAGES, modules - PUBLIC_SUBPACKAGES
    assert not any(isinstance(getattr(cka_jax, name), types.ModuleType) for name in cka_jax.__all__)


def test_implementations_are_private_modules():
    package = pathlib.Path(cka_jax.__file__).parent
    public = {p.stem for p in package.glob("*.py") if not p.name.startswith("_")}
    public |= {p.name for p in package.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    public -= PUBLIC_SUBPACKAGES | {p.name for p in package.iterdir() if p.name.startswith("_")}
    assert not public, f"public modules beside the public subpackages: {sorted(public)}"


def test_cka_and_compare_are_the_functions():
    for name in ("cka", "compare", "load_comparison"):
        value = getattr(cka_jax, name)
        assert callable(value) and not isinstance(value, types.ModuleType), name
    assert not hasattr(cka_jax.compare, "load")  # no attributes hung on the function


def test_load_comparison_round_trips_a_saved_result(tmp_path):
    rng = np.random.default_rng(0)
    stream = [{"a": rng.normal(size=(9, 3)), "b": rng.normal(size=(9, 4))} for _ in range(2)]
    result = cka_jax.compare(None, batches=stream, names=("mine", "mine"), progress=False)
    path = tmp_path / "cka.npz"
    result.save(path)
    back = cka_jax.load_comparison(path)
    assert isinstance(back, cka_jax.CKAComparison) and repr(back) == repr(result)
    np.testing.assert_array_equal(back.heatmap, result.heatmap)
    assert back.layers_a == result.layers_a == ("a", "b")
    assert repr(cka_jax.CKAComparison.load(path)) == repr(result)  # the classmethod is the same reader
