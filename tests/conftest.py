"""Test setup: 8 fake CPU devices (before jax is imported) for the sharded code paths."""

import os

import pytest

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture
def x64():
    """Runs the test with jax_enable_x64 on, then restores the previous setting."""
    import jax

    with jax.enable_x64(True):
        yield
