"""Test setup, applied before jax is imported anywhere in the process.

- 8 fake CPU devices, so sharding tests run anywhere.
- One persistent XLA compilation cache for the whole run (and the CLI
  subprocesses the tests start, which inherit the environment): the tiny test
  models are compiled by many tests, and on a 2-core CPU compilation, not
  computation, dominates the suite's time. Entries are keyed by the program
  and the jax version, so a stale cache cannot change results.
"""

import os
import tempfile

import pytest

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"bsf_jax_test_xla_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


@pytest.fixture
def fast_compile():
  """XLA's optimisation passes off for one test, as in the flax example tests:
  they dominate the run time of small programs on a CPU."""
  import jax  # pylint: disable=g-import-not-at-top
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)
