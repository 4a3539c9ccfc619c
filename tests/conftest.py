"""Test configuration shared by the whole suite.

Eight CPU devices are simulated for every test so that data-parallel and
sharding tests run in-process; single-device code is unaffected (it runs on
device 0). The flag must be set before jax is imported anywhere.
"""
import os

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture
def x64():
    """JAX in float64 for one test (the previous setting restored after it)."""
    import jax

    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)
