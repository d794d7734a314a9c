"""Test setup: 8 fake CPU devices (before jax is imported) for the sharded code paths."""

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
