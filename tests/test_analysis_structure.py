"""How the analysis layer is put together: light imports, one registry entry per analysis, figures
that need no matplotlib backend, and the public names of `cka_jax.analysis`."""

import json
import os

import numpy as np
import pytest
from fresh_interpreter import run_fresh
from matplotlib.figure import Figure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINING_STACK = ("orbax", "optax", "tensorflow_datasets", "grain")


def imported_after(statement: str) -> dict:
    """Runs `statement` in a fresh interpreter whose environment names the svg backend; returns
    the heavy modules it loaded, whether it imported pyplot, and the backend then in effect (a
    `matplotlib.use(...)` at import would replace svg)."""
    code = (
        f"import json, sys\n{statement}\nimport matplotlib\n"
        f"print(json.dumps({{'loaded': [m for m in {TRAINING_STACK + ('seaborn',)!r} if m in sys.modules], "
        "'pyplot': 'matplotlib.pyplot' in sys.modules, 'backend': matplotlib.rcParams['backend']}))"
    )
    env = {**os.environ, "MPLBACKEND": "svg", "JAX_PLATFORMS": "cpu"}
    result = run_fresh(code, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # fresh interpreters
@pytest.mark.parametrize(
    "statement",
    [
        "import cka_jax.analysis",
        "from cka_jax.analysis.blocks import detect_block",
        "import cka_jax.analysis.disagreement",
        "from cka_jax.analysis import registry",  # every analysis module, with its section and figure
    ],
)
def test_importing_analyses_loads_neither_the_training_stack_nor_seaborn_nor_a_backend(statement):
    found = imported_after(statement)
    assert found == {"loaded": [], "pyplot": False, "backend": "svg"}


@pytest.mark.slow  # a fresh interpreter
def test_the_runner_leaves_the_backend_alone():
    found = imported_after("from cka_jax.analysis import runner")
    assert found["backend"] == "svg" and not found["pyplot"]


def test_every_analysis_has_one_registry_entry_in_report_order():
    from cka_jax.analysis import registry, runner

    names = [a.name for a in registry.REPORT_ORDER]
    assert len(set(names)) == len(names) and list(registry.ANALYSES) == names
    assert runner.ANALYSES is registry.ANALYSES
    assert names[0] == "training" and registry.ANALYSES["training"].always
    for analysis in registry.REPORT_ORDER:
        assert analysis.description and callable(analysis.run), analysis.name


def test_the_package_exports_its_public_names_lazily():
    import cka_jax.analysis as analysis
    from cka_jax.analysis import inputs

    for name in analysis.__all__:
        assert getattr(analysis, name) is not None, name
    assert analysis.TrainedPopulation is inputs.TrainedPopulation and "Population" not in analysis.__all__
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        analysis.nothing  # noqa: B018  (the attribute access is what is tested)


def test_figures_need_no_backend_and_save_as_png_and_pdf(tmp_path):
    from cka_jax.analysis.blocks import BlockStructure, plot_block_grid
    from cka_jax.analysis.outputs import save_figure

    heatmap = np.eye(4) * 0.5 + 0.5
    fig = plot_block_grid(
        [heatmap], [("stem", "a", "b", "c")], [BlockStructure(1, 4, 0.9)], ["row"], ["col"], [(0, 0)], "title", "a note"
    )
    assert isinstance(fig, Figure) and fig.canvas.manager is None  # not pyplot's: nothing to close
    paths = save_figure(fig, str(tmp_path / "grid"))
    assert [os.path.basename(p) for p in paths] == ["grid.png", "grid.pdf"]
    assert all(os.path.getsize(p) > 1000 for p in paths)
