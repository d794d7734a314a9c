"""Test setup: 8 fake CPU devices (before jax is imported) for the sharded code paths, and the
trained tiny workdirs several test files read (each trained once per session, per xdist worker)."""

import contextlib
import os
import tempfile

import pytest

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA's persistent compilation cache, shared by every test and the train.py runs they start: most
# of the fast loop's time is compiling each test's shapes, which a second run reads back.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "cka_jax_test_xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")


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
