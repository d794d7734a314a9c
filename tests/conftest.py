"""Test setup: 8 fake CPU devices (before jax is imported) for the sharded code paths."""

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
