"""Every registered attention implementation against the float64 oracle of tests/harness.py:
every mask type in float32 under ``jit`` (forward and gradients), and the pairwise extra cases
(window, GQA or not, self or cross, float32 or bfloat16, jit or eager).

The implementations are those of ``thdkit.kernels.names()`` at collection time; one that cannot
run on this machine at all (cuDNN without a GPU) is GPU-marked and skipped with its reason. An
implementation registered later is checked with :func:`tests.harness.check_implementation`, as
the last test here does for one registered at run time.
"""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from thdkit import kernels
from thdkit._src.kernels.base import get

from . import harness
from .harness import CASES, B, Case, D, T, check_case, check_implementation, machine_marks


def _params() -> list:
    params = []
    for name in kernels.names():
        marks = machine_marks(name)
        params += [pytest.param(name, case, id=f"{name}-{case.id}", marks=marks) for case in CASES]
    return params


def _restricted(name: str) -> bool:
    """Whether ``name`` refuses float32 arrays: a GPU kernel of a few configurations (cuDNN),
    which may refuse a case; every other implementation must run every case."""
    x = jnp.zeros((B, T, 2, D), jnp.float32)
    try:
        get(name).check_arrays(x, x, x)
    except NotImplementedError:
        return True
    return False


@pytest.mark.parametrize(("name", "case"), _params())
def test_matches_float64_oracle(name: str, case: Case) -> None:
    reason = check_case(name, case)
    if reason is not None:
        if _restricted(name):
            pytest.skip(f"{name} refuses {case.id}: {reason}")
        raise AssertionError(f"{name} refuses {case.id}: {reason}")


def test_the_extra_cases_cover_every_pair_and_every_mask_type() -> None:
    assert harness.covers_every_pair(harness._pairwise_rows())
    assert {c.mask for c in harness.EXTRA_CASES} == {c.mask for c in harness.CORE_CASES}
    assert len(set(CASES)) == len(CASES)


class _Delegating(kernels.Implementation):
    """A user's implementation: the built-in reference behind another name."""

    name = "delegating_in_a_test"

    def check_config(self, config):
        get("reference").check_config(config)

    def check_segments(self, q, kv, config):
        get("reference").check_segments(q, kv, config)

    def prepare(self, q, kv, config, **kwargs):
        return get("reference").prepare(q, kv, config, **kwargs)

    def forward(self, query, key, value, q, kv, aux, config, *, scale):
        return get("reference").forward(query, key, value, q, kv, aux, config, scale=scale)


def test_an_implementation_registered_at_run_time_runs_the_whole_matrix() -> None:
    implementation = _Delegating()
    kernels.register(implementation)
    try:
        assert implementation.name in kernels.names()
        assert check_implementation(implementation.name) == {}
    finally:
        kernels.unregister(implementation.name)
    assert implementation.name not in kernels.names()


def test_a_wrong_implementation_is_caught() -> None:
    """The harness is not vacuous: an implementation off by a small factor fails it."""

    class OffByOnePercent(_Delegating):
        name = "off_by_one_percent_in_a_test"

        def forward(self, *args, **kwargs):
            out, lse = super().forward(*args, **kwargs)
            return out * 1.01, lse

    kernels.register(OffByOnePercent())
    try:
        with pytest.raises(AssertionError, match="out"):
            check_implementation(OffByOnePercent.name, harness.CORE_CASES[:1])
    finally:
        kernels.unregister(OffByOnePercent.name)
