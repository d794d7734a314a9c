"""The package users install: `python -m build` makes a wheel and an sdist of the one version, and
the wheel, installed into a fresh virtual environment, runs the README's compare example from a
directory outside the repository (the library needs no file of the repository)."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

import cka_jax

pytestmark = pytest.mark.slow  # a build, a virtual environment and a compiled comparison: about a minute

ROOT = pathlib.Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "_build", "workdir", "analysis", "__pycache__")


def readme_compare_example() -> str:
    text = (ROOT / "README.md").read_text()
    return re.search(r"<!-- compare-example-start -->\n```python\n(.*?)```", text, re.S).group(1)


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> pathlib.Path:
    pytest.importorskip("build")
    source = tmp_path_factory.mktemp("source") / "cka_jax"
    shutil.copytree(ROOT, source, ignore=SKIP)  # a clean copy: nothing built in the working tree
    out = tmp_path_factory.mktemp("dist")
    run = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir", str(out)],
        cwd=source, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out


def test_build_makes_a_wheel_and_an_sdist_of_the_version(dist):
    version = cka_jax.__version__
    assert [p.name for p in dist.glob("*.whl")] == [f"cka_jax-{version}-py3-none-any.whl"]
    assert [p.name for p in dist.glob("*.tar.gz")] == [f"cka_jax-{version}.tar.gz"]


def test_the_wheel_runs_the_readme_compare_example_outside_the_repository(dist, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    (wheel,) = dist.glob("*.whl")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(JAX_PLATFORMS="cpu", MPLBACKEND="Agg")
    install = subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "--force-reinstall", "--no-index", str(wheel)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    script = readme_compare_example() + (
        "\nimport cka_jax, importlib.metadata\n"
        "print(cka_jax.__file__)\n"
        "print(cka_jax.__version__, importlib.metadata.version('cka_jax'))\n"
        "print(result.heatmap.shape, cka_jax.load_comparison('cka.npz').layers_a == result.layers_a)\n"
    )
    run = subprocess.run(
        [python, "-c", script], cwd=work, capture_output=True, text=True, env=env, timeout=600
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    location, versions, outcome = run.stdout.strip().splitlines()[-3:]
    assert pathlib.Path(location).resolve().is_relative_to(venv.resolve()), location
    assert not pathlib.Path(location).resolve().is_relative_to(ROOT)
    assert versions == f"{cka_jax.__version__} {cka_jax.__version__}"
    assert outcome == "(3, 3) True"
    assert (work / "cka.npz").exists()
