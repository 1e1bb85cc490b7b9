"""Repository-wide pytest setup: strict rank promotion and a doctest namespace."""

import os

# Set before JAX initialises its backends. Multi-device tests (context parallelism) run on
# simulated CPU devices. The tests' programs are tiny: XLA:CPU's backend (LLVM) optimisations
# cost them more compile time than they save at run time.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", "")]
    + [
        f"{flag}={value}"
        for flag, value in (
            ("--xla_force_host_platform_device_count", "8"),
            ("--xla_backend_optimization_level", "0"),
        )
        if flag not in os.environ.get("XLA_FLAGS", "")
    ]
).strip()

import jax
import jax.numpy as jnp
import numpy as np
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    doctest_namespace.update(jax=jax, jnp=jnp, np=np)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops JAX's compiled programs after each test module: every XLA:CPU executable holds
    memory mappings, and the whole suite's would exceed the kernel's per-process limit
    (``vm.max_map_count``, 65,530 by default), failing a later compilation."""
    yield
    jax.clear_caches()
