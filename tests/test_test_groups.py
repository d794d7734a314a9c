"""The suite's own set-up: under pytest-xdist, the tests that share an expensive fixture of
conftest.SHARED_FIXTURES run on one worker, which builds the fixture once."""

import os
import subprocess
import sys
import textwrap

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.slow
def test_tests_sharing_an_expensive_fixture_run_on_one_worker(tmp_path):
    """Two workers, eight tests on `trained`: one worker builds it (xdist reads the groups as it
    collects, so conftest.py must add them first)."""
    (tmp_path / "conftest.py").write_text(
        textwrap.dedent(
            f"""
            import importlib.util, os
            import pytest

            spec = importlib.util.spec_from_file_location("suite_conftest", {os.path.join(TESTS, "conftest.py")!r})
            suite = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(suite)
            pytest_collection_modifyitems = suite.pytest_collection_modifyitems

            @pytest.fixture(scope="module")
            def trained():
                with open(os.path.join({str(tmp_path)!r}, "built_on_" + os.environ["PYTEST_XDIST_WORKER"]), "a") as f:
                    f.write("x")
            """
        )
    )
    (tmp_path / "test_shared.py").write_text(
        "import pytest\n\n@pytest.mark.parametrize('i', range(8))\ndef test_one(trained, i):\n    pass\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadgroup"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-2000:]
    built = sorted(name for name in os.listdir(tmp_path) if name.startswith("built_on_"))
    assert len(built) == 1 and (tmp_path / built[0]).read_text() == "x", built
