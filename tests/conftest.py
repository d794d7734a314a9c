"""Test setup: 8 fake CPU devices (before jax is imported) for the sharded code paths; the
trained tiny workdirs several test files read (each trained once per session, per xdist worker).

pytest-xdist hands out whole files (`--dist loadfile` in setup.cfg): a module's expensive
fixtures are built once, and the programs its tests share are traced and lowered by one worker.
"""

import contextlib
import gc
import os
import tempfile

import pytest

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Every program goes into XLA's persistent compilation cache (see pytest_configure), however quick
# to compile: the tests build the same small programs again and again.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# A size limit turns on the cache's file lock around each read and write (jax's LRUCache), which
# lets every xdist worker and every train.py or analyze.py they start share one cache: without it
# an entry is written in place, and a process reading it meanwhile warns on stderr, which the
# tests of one-line errors would see.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 * 2**30))


def pytest_configure(config):
    """XLA's persistent compilation cache, used by every test and the train.py runs they start
    (set before the test modules import jax): most of the fast loop's time is compiling each
    test's shapes, which a second run reads back, and a program one worker compiled is read
    back by the others."""
    default = os.path.join(tempfile.gettempdir(), "cka_jax_tests_xla")
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ.get("CKA_JAX_TEST_XLA_CACHE", default))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """The session is over: the interpreter's last garbage collections skip the objects that jax,
    flax and the tests left (as train.py does at its end), about 2 s of each worker's exit."""
    gc.freeze()


# Fixtures that train a population (or run analyze.py over trained ones): every test that uses one
# is slow, as the marker in setup.cfg says, without a mark of its own to forget.
TRAINING_FIXTURES = {
    "analysed",  # test_analyze_cli: analyze.py over `workdirs`
    "imagenet_runs",  # test_analyze_predictions
    "one_process_run",  # test_multihost
    "params_by_chunk_size",  # test_strategy_tuning
    "runs",  # test_population
    "trained",  # test_bad_inputs_checkpoints, test_bad_inputs_train
    "two_process_run",  # test_multihost
    "uninterrupted",  # test_training
    "workdirs",  # this file
}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by mark
def pytest_collection_modifyitems(config, items):
    """Marks slow each test that uses a fixture of TRAINING_FIXTURES."""
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per CPU this process may use, at most 4 (each worker holds 8 fake
    devices and trains populations: about 1-3 GB of memory)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cpus, 4))


@pytest.fixture
def x64():
    """Runs the test with jax_enable_x64 on, then restores the previous setting."""
    import jax

    with jax.enable_x64(True):
        yield


@pytest.fixture
def jax_events():
    """`jax_events(event)`: a context manager that collects, while open, the function names of the
    jax.monitoring duration `event` (e.g. "/jax/core/compile/jaxpr_trace_duration": top-level traces
    for jit, the ones an eager call would repeat; ".../backend_compile_duration": compilations)."""
    import jax

    @contextlib.contextmanager
    def record(event):
        names = []

        def listener(name, duration, **kwargs):
            if name == event:
                names.append(kwargs.get("fun_name", "?"))

        jax.monitoring.register_event_duration_secs_listener(listener)
        try:
            yield names
        finally:
            jax.monitoring.unregister_event_duration_listener(listener)

    return record


@pytest.fixture(scope="session")
def workdirs(tmp_path_factory):
    """Two trained tiny digits populations for the analysis tests: "narrow", 3 × ResNet-8 (0.25×),
    and "wide", 2 × ResNet-8 (0.5×), 1 epoch each, checkpoints kept at 0, 50% and 100%. Trained
    once per session; tests must never modify them (copy them first, e.g. shutil.copytree)."""
    import jax
    import tiny

    from cka_jax.train import loop
    from cka_jax.workdir import Workdir

    root = tmp_path_factory.getbasetemp() / "analysis_runs"
    paths = []
    for name, size, width in (("narrow", 3, 0.25), ("wide", 2, 0.5)):
        path = str(root / name)
        if not os.path.exists(Workdir(path).predictions):
            config = tiny.tiny_config(size, 1, width=width, milestones=(0.0, 0.5, 1.0))
            loop.train_and_evaluate(config, path, devices=jax.devices()[:1])
        paths.append(path)
    return paths
