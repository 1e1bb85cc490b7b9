"""Gradients at large logits, for every registered implementation that runs on CPU.

The flash backward recomputes each tile's softmax weights. Recomputed as ``exp(logit - lse)``
they lose the exact 1 of the row's largest logit once ``lse`` rounds (``|logit|`` around 1e4 in
float32), and the gradients drift; this file holds every implementation to the float64 oracle of
tests/harness.py (NumPy, its gradients written by hand) at logit magnitudes from 1 to 1e30,
eagerly and under ``jit``, and checks that every gradient stays finite.

The inputs make every float32 dot product exact, so float32 and float64 see the same logits and
the same ties (docs/semantics.md's masks on a packed layout of several documents):

- ``ties``: ``q = s * a``, ``k = b`` with ``a, b`` in {-1, 0, 1} and ``s`` a power of two from 1
  to about 1e30 (logits up to ``8 s``). Above ``s`` of about 10 each row's weight is on its
  tied largest logits, and the gradients come from those ties and from ``lse``;
- ``offset``: ``q = [L, a]``, ``k = [1, b]``: logits ``L + a . b``, O(1) apart, at ``L`` up to
  1e7 (the largest integers float32 still holds exactly).

The magnitude travels in the inputs (``scale`` stays 1), so each implementation compiles once
per mode for every magnitude; the ``scale`` argument itself (large, negative) is tested too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from thdkit._src.kernels.partial import attention_partial, partial_implementations
from thdkit._src.mask_types import MaskType
from thdkit._src.segments import Segments

from . import harness

# B = 2 rows of T = 24 tokens in tiles of 8: documents that span tiles, tail padding, a padding
# hole between documents, a one-token document.
IDS = np.array(
    [
        [1] * 5 + [2] * 9 + [0] * 2 + [3] * 7 + [0],
        [1] * 11 + [2] + [3] * 12,
    ]
)
POS = np.array(
    [
        [*range(5), *range(11), *range(8)],
        [*range(11), 0, *range(12)],
    ]
)
H_Q, H_KV, D, D_V = 2, 1, 8, 4  # two query heads read one key/value head
BLOCK = 8
MASK = MaskType.PADDING_CAUSAL
# Powers of two from 1 to about 1.3e30 (exact multiples in float32): the ``ties`` magnitudes.
POWERS = (0, 4, 7, 10, 14, 17, 20, 23, 27, 30, 33, 40, 50, 66, 83, 100)
OFFSETS = (1.0, 1e2, 1e4, 1e6, 1e7)
TOL = 1e-3


IMPLEMENTATIONS = tuple(n for n in partial_implementations() if harness.refusal(n) is None)
"""The registered implementations that can run on this machine."""


LAYOUT = dict(ids_q=IDS, pos_q=POS, ids_kv=IDS, pos_kv=POS)


def segments() -> Segments:
    return Segments.from_ids(jnp.asarray(IDS, jnp.int32), jnp.asarray(POS, jnp.int32))


def ties_inputs(seed: int, power: int) -> tuple[np.ndarray, ...]:
    """``(q, k, v, w_out, w_lse)``, float32: ``q = 2**power * a``, entries of a, k in {-1, 0,
    1}."""
    rng = np.random.default_rng(seed)
    batch, seq = IDS.shape
    q = rng.integers(-1, 2, (batch, seq, H_Q, D)) * 2.0**power
    k = rng.integers(-1, 2, (batch, seq, H_KV, D))
    v = rng.standard_normal((batch, seq, H_KV, D_V))
    w_out = rng.standard_normal((batch, seq, H_Q, D_V))
    w_lse = rng.standard_normal((batch, seq, H_Q))
    return tuple(np.asarray(x, np.float32) for x in (q, k, v, w_out, w_lse))


def offset_inputs(seed: int, offset: float) -> tuple[np.ndarray, ...]:
    """As :func:`ties_inputs`, with ``q = [offset, a]`` and ``k = [1, b]``: logits
    ``offset + a . b``, exact in float32 up to 2**24."""
    q, k, v, w_out, w_lse = ties_inputs(seed, 0)
    q[..., 0], k[..., 0] = offset, 1.0
    return q, k, v, w_out, w_lse


def partial_of(implementation: str, scale: float = 1.0):
    """``(q, k, v) -> (out, lse)`` of one implementation on the layout."""

    def partial(q, k, v):
        return attention_partial(
            q, k, v, q_segments=segments(), kv_segments=segments(), mask_type=MASK,
            window_size=None, scale=scale, implementation=implementation, block_q=BLOCK,
            block_kv=BLOCK,
        )  # fmt: skip

    return partial


@functools.cache
def gradient(implementation: str, jit: bool, scale: float = 1.0):
    """``(q, k, v, w_out, w_lse) -> (dq, dk)`` of the loss of ``harness.partial_grads`` (the
    output and the finite log-sum-exps), eagerly or under ``jit``."""

    def grads(q, k, v, w_out, w_lse):
        partial = partial_of(implementation, scale)
        _, _, (dq, dk, _) = harness.partial_grads(partial, q, k, v, w_out, w_lse)
        return dq, dk

    return jax.jit(grads) if jit else grads


def oracle(inputs: tuple[np.ndarray, ...], scale: float = 1.0) -> tuple[np.ndarray, ...]:
    """``(dq, dk)`` of the same loss in float64 (``harness.partial_oracle``)."""
    q, k, v, w_out, w_lse = inputs
    _, _, (dq, dk, _) = harness.partial_oracle(
        q, k, v, LAYOUT, MASK, None, w_out=w_out, w_lse=w_lse, scale=scale
    )
    return dq, dk


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """Largest error of any feature column, relative to that column's largest oracle value (or
    to 1e-3 of the whole array's, for a column whose exact values cancel to about 0): a large
    column of ``dk`` does not hide the error of a small one."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if not np.isfinite(got).all():
        return float("inf")
    floor = 1e-3 * np.abs(want).max()
    worst = 0.0
    for col in range(want.shape[-1]):
        size = max(np.abs(want[..., col]).max(), floor)
        worst = max(worst, np.abs(got[..., col] - want[..., col]).max() / size)
    return worst


def errors(implementation: str, jit: bool, inputs: tuple[np.ndarray, ...]) -> dict[str, float]:
    """Relative errors of ``dq`` and ``dk`` against the float64 oracle."""
    got = gradient(implementation, jit)(*inputs)
    want = oracle(inputs)
    return {name: relative_error(g, w) for name, g, w in zip(("dq", "dk"), got, want, strict=True)}


def test_the_inputs_have_ties_and_every_kind_of_row():
    q, k, *_ = ties_inputs(0, 0)
    dots = np.einsum("bqhd,bkd->bhqk", q, k[:, :, 0])
    allowed = (IDS[:, :, None] == IDS[:, None, :]) & (IDS[:, :, None] != 0)
    allowed &= POS[:, :, None] >= POS[:, None, :]
    masked = np.where(allowed[:, None], dots, -np.inf)
    top = masked.max(-1, keepdims=True)
    ties = (masked == top).sum(-1)
    assert (ties[allowed.any(-1)[:, None].repeat(H_Q, 1)] > 1).sum() >= 8
    assert (~allowed.any(-1)).any()  # padding rows: no key
    assert set(IMPLEMENTATIONS) >= {"blockwise", "pallas", "reference"}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_gradients_match_float64_at_every_magnitude(implementation, jit):
    for power in POWERS:
        got = errors(implementation, jit, ties_inputs(power, power))
        assert max(got.values()) <= TOL, f"{implementation} 2**{power}: {got}"
    for offset in OFFSETS:
        got = errors(implementation, jit, offset_inputs(1, offset))
        assert max(got.values()) <= TOL, f"{implementation} offset {offset:g}: {got}"


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_forward_matches_float64_and_gradients_stay_finite(implementation):
    """At every magnitude the output is right and nothing of the gradients is inf or NaN."""
    forward = jax.jit(partial_of(implementation))
    grad = jax.jit(lambda *inputs: harness.partial_grads(partial_of(implementation), *inputs)[2])
    for power in POWERS:
        inputs = ties_inputs(power, power)
        for g in grad(*inputs):
            assert np.isfinite(np.asarray(g)).all(), (implementation, power)
        out, _ = forward(*inputs[:3])
        want, _, _ = harness.partial_oracle(*inputs[:3], LAYOUT, MASK, None, scale=1.0)
        harness.assert_close(out, want, harness.TOLERANCES["float32"]["forward"], str(power))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_large_and_negative_scale_arguments(implementation):
    """The ``scale`` argument itself, large and negative, on normal inputs (no exact dots, no
    ties): each row's weight is on one key, and the gradients come from ``lse``."""
    rng = np.random.default_rng(6)
    inputs = tuple(np.asarray(rng.standard_normal(x.shape), np.float32) for x in ties_inputs(0, 0))
    for scale in (1e7, 3e8, 1e30, -1e30):
        got = gradient(implementation, True, scale)(*inputs)
        want = oracle(inputs, scale)
        for name, g, w in zip(("dq", "dk"), got, want, strict=True):
            assert relative_error(g, w) <= TOL, (implementation, name, scale)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), power=st.integers(0, 100))
def test_blockwise_gradients_at_any_magnitude(seed, power):
    got = errors("blockwise", True, ties_inputs(seed, power))
    assert max(got.values()) <= TOL, (power, got)
