"""The README's example runs as printed and gives the heatmap it promises."""

import pathlib
import re

import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_starts_with_the_two_commands():
    text = README.read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1).strip().splitlines()
    assert first_block == ['pip install -e ".[test]" && python train.py && python analyze.py', "pytest"]


@pytest.mark.slow  # a ResNet-20 over 512 images: a few seconds
def test_heatmap_example_runs():
    section = README.read_text().split("## A CKA heatmap, start to finish", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len([line for line in code.splitlines() if line.strip()]) <= 12
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    heatmap = np.asarray(namespace["heatmap"])
    assert heatmap.shape == (10, 10)
    np.testing.assert_allclose(np.diag(heatmap), 1.0, rtol=1e-5)
    np.testing.assert_allclose(heatmap, heatmap.T, rtol=1e-5)


def test_every_function_in_the_readme_table_is_exported():
    import cka_jax

    table = README.read_text().split("## Similarity measures", 1)[1].split("###", 1)[0]
    names = set(re.findall(r"`([a-z_]+)(?:\(|`)", table)) | {"MinibatchCKA"}
    assert names and names <= set(cka_jax.__all__), names - set(cka_jax.__all__)
    assert all(hasattr(cka_jax, name) for name in cka_jax.__all__)
