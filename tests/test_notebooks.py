"""The colab/ notebooks run top to bottom (nbclient) on small settings: the quickstart trains a tiny
population, the workdir notebook analyses it, the API tour needs no training."""

import os

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_notebook(name: str):
    """Executes colab/<name>; returns the executed notebook (no cell may raise)."""
    notebook = nbformat.read(os.path.join(ROOT, "colab", name), as_version=4)
    nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": ROOT}}
    ).execute()
    errors = [o for cell in notebook.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    return notebook


def shown_images(notebook) -> int:
    """How many PNG images the executed cells display."""
    return sum("image/png" in o.get("data", {}) for cell in notebook.cells for o in cell.get("outputs", []))


@pytest.fixture
def small_kernel_env(tmp_path, monkeypatch):
    """Kernels inherit this environment: small settings, one CPU device, outputs under tmp_path."""
    monkeypatch.setenv("CKA_JAX_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("CKA_JAX_NOTEBOOK_WORKDIR", str(tmp_path / "quickstart"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "")
    return tmp_path


@pytest.mark.slow
def test_quickstart_then_workdir_notebook(small_kernel_env):
    run_notebook("quickstart.ipynb")
    analysis = small_kernel_env / "quickstart" / "analysis"
    assert (analysis / "cka_within.npz").exists() and (analysis / "report.html").exists()
    notebook = run_notebook("analyze_workdir.ipynb")
    assert (analysis / "cka_seeds.npz").exists()
    assert shown_images(notebook) >= 1  # the within-model heatmaps drawn in the notebook itself


@pytest.mark.slow
def test_cka_api_tour(small_kernel_env):
    run_notebook("cka_api_tour.ipynb")
