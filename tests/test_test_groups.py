"""The suite's own set-up: under the options of setup.cfg, pytest-xdist keeps the tests of one file
on one worker, which builds the file's expensive module fixtures once; a test on a fixture that
trains a population is slow."""

import configparser
import os
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _suite_options():
    """setup.cfg's pytest addopts, with two workers for `-n auto`."""
    config = configparser.ConfigParser()
    config.read(os.path.join(ROOT, "setup.cfg"))
    options = shlex.split(config["tool:pytest"]["addopts"])
    return [("2" if option == "auto" and options[i - 1] == "-n" else option) for i, option in enumerate(options)]


@pytest.mark.slow
def test_tests_sharing_a_module_fixture_run_on_one_worker(tmp_path):
    """Two workers, two files of eight tests on a module fixture: each fixture is built once (with
    tests handed out one by one, both workers would build it)."""
    for name in ("a", "b"):
        (tmp_path / f"test_{name}.py").write_text(
            "import os\nimport pytest\n\n"
            "@pytest.fixture(scope='module')\n"
            "def trained():\n"
            f"    mark = '{name}_built_on_' + os.environ['PYTEST_XDIST_WORKER']\n"
            f"    with open(os.path.join({str(tmp_path)!r}, mark), 'a') as f:\n"
            "        f.write('x')\n\n"
            "@pytest.mark.parametrize('i', range(8))\n"
            "def test_one(trained, i):\n"
            "    import time; time.sleep(0.05)\n"
        )
    options = _suite_options()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *options],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, (options, done.stdout[-2000:])
    built = sorted(name for name in os.listdir(tmp_path) if "_built_on_" in name)
    assert [name.split("_built_on_")[0] for name in built] == ["a", "b"], (options, built)
    assert all((tmp_path / name).read_text() == "x" for name in built), built


class _Item:
    """The part of a collected test that conftest's hook reads and writes."""

    def __init__(self, *fixturenames):
        self.fixturenames, self.marks = fixturenames, []

    def add_marker(self, mark):
        self.marks.append(mark.name)


def test_a_test_on_a_fixture_that_trains_is_slow():
    import conftest

    on_training, on_tmp_path = _Item("trained", "tmp_path"), _Item("tmp_path")
    conftest.pytest_collection_modifyitems(None, [on_training, on_tmp_path])
    assert on_training.marks == ["slow"] and on_tmp_path.marks == []
