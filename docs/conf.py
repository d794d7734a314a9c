"""Sphinx configuration of the cka_jax documentation site.

Build (warnings are errors):

    python -m sphinx -W --keep-going -b html docs docs/_build/html

The notebooks in colab/ are copied into docs/notebooks/ and executed during the build, on their
small settings (CKA_JAX_NOTEBOOK_SMALL=1), so every page shows the outputs and figures of the code
it documents. CKA_JAX_DOCS_EXECUTE=off renders them without running them (a quick check of the
pages, the reference and the links).
"""

from __future__ import annotations

import atexit
import os
import pathlib
import shutil
import sys
import tempfile

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
# Document the tree this file sits in, not whichever copy of cka_jax is installed.
sys.path.insert(0, str(ROOT))

import cka_jax  # noqa: E402

project = "cka_jax"
author = "the cka_jax authors"
copyright = "the cka_jax authors"  # noqa: A001 - Sphinx's name
version = release = cka_jax.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints", "findings/**/*.md"]
templates_path = ["_templates"]

# The reference: one page per public name, from its docstring (Google style).
autosummary_generate = True
autosummary_imported_members = True
autodoc_default_options = {"members": True, "member-order": "bysource", "show-inheritance": False}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = True
napoleon_use_ivar = True  # Attributes: sections as fields, so NamedTuple fields are not described twice
default_role = "py:obj"  # `name` in a docstring links to that name when it is documented
add_module_names = False

# MyST: `x: (n, p)` shapes and formulas stay as written; headings get anchors for links across pages.
myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# The notebooks: copies of colab/*.ipynb, named so that they are read (and run) in this order (the
# workdir notebook analyses the population the quickstart trains).
NOTEBOOKS = ["quickstart", "analyze_workdir", "compare_your_model", "cka_api_tour"]
for number, name in enumerate(NOTEBOOKS, start=1):
    shutil.copyfile(ROOT / "colab" / f"{name}.ipynb", DOCS / "notebooks" / f"{number}_{name}.ipynb")
nb_execution_mode = os.environ.get("CKA_JAX_DOCS_EXECUTE", "force")
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_in_temp = True  # files a notebook writes (cka_seeds.npz) land in a temporary folder
nb_merge_streams = True
_workdir = tempfile.mkdtemp(prefix="cka_jax_docs_")
atexit.register(shutil.rmtree, _workdir, ignore_errors=True)
os.environ.setdefault("CKA_JAX_NOTEBOOK_SMALL", "1")
os.environ.setdefault("CKA_JAX_NOTEBOOK_WORKDIR", os.path.join(_workdir, "quickstart"))

html_theme = "sphinx_book_theme"
html_title = f"cka_jax {release}"
html_theme_options = {
    "show_toc_level": 2,
    "home_page_in_toc": True,
    "use_download_button": True,
}
