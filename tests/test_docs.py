"""The documentation is checked like code: docstring examples run, every public name has a
Google-style docstring and a reference page, the site builds without a warning (links included)
and its pages show their figures; the version is one number."""

from __future__ import annotations

import configparser
import doctest
import importlib
import inspect
import os
import pathlib
import re
import subprocess
import sys
import zlib

import pytest

import cka_jax
import cka_jax.models

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The modules that define the public names (their docstring examples run here).
PUBLIC_MODULES = [
    "cka_jax._hsic",
    "cka_jax._cka",
    "cka_jax._cca",
    "cka_jax._pca",
    "cka_jax._matching",
    "cka_jax._minibatch",
    "cka_jax._layer_grams",
    "cka_jax._compare.driver",
    "cka_jax._compare.result",
    "cka_jax.models",
    "cka_jax.models.cifar_resnet",
    "cka_jax.models.imagenet_resnet",
    "cka_jax.models.resnet",
]


def public_names() -> list[str]:
    """Every public name, as the reference names it."""
    names = [f"cka_jax.{name}" for name in cka_jax.__all__]
    return names + [f"cka_jax.models.{name}" for name in cka_jax.models.__all__]


def test_docstring_examples_run():
    attempted = 0
    for name in PUBLIC_MODULES:
        result = doctest.testmod(
            importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
        )
        assert result.failed == 0, name
        attempted += result.attempted
    assert attempted >= 40  # the examples are there, not only passing


def _documented_callables():
    for name in cka_jax.__all__:
        value = getattr(cka_jax, name)
        if inspect.isfunction(value):
            yield name, value
        elif inspect.isclass(value) and not issubclass(value, tuple):
            for attr, member in vars(value).items():
                member = member.__func__ if isinstance(member, classmethod) else member
                if not attr.startswith("_") and inspect.isfunction(member) and inspect.signature(member).parameters:
                    yield f"{name}.{attr}", member
    for name in ("create_model", "from_config", "representation_names", "representation_shapes"):
        yield f"models.{name}", getattr(cka_jax.models, name)


def test_public_functions_have_google_style_sections():
    missing = []
    for name, function in _documented_callables():
        doc = inspect.getdoc(function) or ""
        takes = [p for p in inspect.signature(function).parameters if p not in ("self", "cls")]
        if takes and "Args:" not in doc:
            missing.append(f"{name}: Args")
        if "Returns:" not in doc and inspect.signature(function).return_annotation not in (None, "None"):
            missing.append(f"{name}: Returns")
    for name in cka_jax.__all__:
        if not (inspect.getdoc(getattr(cka_jax, name)) or "").strip():
            missing.append(f"{name}: docstring")
    assert not missing, missing


def test_measures_cite_their_papers():
    for name in ("cka", "linear_cka", "rbf_cka", "hsic", "svcca", "pwcca", "match_units", "MinibatchCKA", "compare"):
        assert "References:" in inspect.getdoc(getattr(cka_jax, name)), name


def missing_from_inventory(inventory: pathlib.Path) -> list[str]:
    """Public names without an entry in a built site's objects.inv."""
    from sphinx.util.inventory import InventoryFile

    with open(inventory, "rb") as f:
        inv = InventoryFile.load(f, "", os.path.join)
    entries = {name for kind in inv.data.values() for name in kind} if hasattr(inv, "data") else set()
    if not entries:  # Sphinx before 8.2: a dict of role -> {name: item}
        entries = {name for kind in inv.values() for name in kind}
    return [name for name in public_names() if name not in entries]


def test_one_version_number():
    assert re.fullmatch(r"\d+\.\d+\.\d+", cka_jax.__version__)
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    assert setup["metadata"]["version"] == "attr: cka_jax.__version__"
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.findall(r"^## (\S+)", changelog, re.M)[0] == cka_jax.__version__


@pytest.fixture(scope="module")
def built_site(tmp_path_factory):
    """The site built as the README says (warnings are errors), the notebooks rendered unexecuted."""
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_nb")
    out = tmp_path_factory.mktemp("site")
    # The notebooks are rendered without running them: test_notebooks.py runs them (and checks their
    # figures); the full build (README) runs them too.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "CKA_JAX_DOCS_EXECUTE": "off"}
    run = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-d", str(out / "doctrees"),
         "docs", str(out / "html")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-5000:]
    return out / "html"


@pytest.mark.slow
def test_site_has_a_reference_entry_for_every_public_name(built_site):
    assert not missing_from_inventory(built_site / "objects.inv")


@pytest.mark.slow
def test_site_pages_show_their_figures(built_site):
    landing = (built_site / "index.html").read_text()
    assert re.search(r'<img[^>]+src="_images/blocks_grid\.png"', landing)
    assert (built_site / "_images" / "blocks_grid.png").exists()
    for notebook in ("1_quickstart", "2_analyze_workdir", "3_compare_your_model", "4_cka_api_tour"):
        assert (built_site / "notebooks" / f"{notebook}.html").exists(), notebook


def test_inventory_check_reports_a_missing_name(tmp_path):
    pytest.importorskip("sphinx")
    inventory = tmp_path / "objects.inv"
    lines = "".join(f"{name} py:function 1 api/{name}.html -\n" for name in public_names() if name != "cka_jax.pwcca")
    header = (
        "# Sphinx inventory version 2\n# Project: cka_jax\n# Version: 0\n"
        "# The remainder of this file is compressed using zlib.\n"
    )
    inventory.write_bytes(header.encode() + zlib.compress(lines.encode()))
    assert missing_from_inventory(inventory) == ["cka_jax.pwcca"]
