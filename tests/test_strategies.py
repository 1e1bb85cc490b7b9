"""Every context-parallel strategy of ``STRATEGIES``, on 2 simulated CPU devices, against
single-device ``thdkit.attention`` (forward and gradients), for the token orders plain, striped
and dual-chunk-swap and a few mask types, on the layouts of tests/harness.py.

The ids are traced, so each (strategy, mask case) compiles once for every order.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import thdkit
from thdkit._src.mask_types import MaskType
from thdkit.context_parallel import STRATEGIES

from .harness import SCALE, WINDOW, Case, S, inputs, layout
from .strategies import reorder_pair

CP = 2
ORDERS = ("none", "striped2", "dual_chunk_swap")
TOL = dict(atol=2e-5, rtol=2e-5)
# (mask type, window, cross-attention), each with GQA (4 query heads over 2 key/value heads).
MASK_CASES = {
    "padding_causal": (MaskType.PADDING_CAUSAL, None, False),
    "padding_window": (MaskType.PADDING, WINDOW, False),
    "causal_bottom_right_cross": (MaskType.CAUSAL_BOTTOM_RIGHT, None, True),
}


def _loss_and_grads(attend, q, k, v, w):
    def loss(q, k, v):
        return jnp.sum(attend(q, k, v) * w)

    out = attend(q, k, v)
    return out, jax.grad(loss, (0, 1, 2))(q, k, v)


@functools.cache
def _single_device(mask: MaskType, window: Any) -> Any:
    def run(q, k, v, w, ids_q, pos_q, ids_kv, pos_kv):
        attend = functools.partial(
            thdkit.attention, segment_ids_q=ids_q, segment_pos_q=pos_q, segment_ids_kv=ids_kv,
            segment_pos_kv=pos_kv, mask_type=mask, window_size=window, max_segments_per_seq=S,
            scale=SCALE, implementation="reference",
        )  # fmt: skip
        return _loss_and_grads(attend, q, k, v, w)

    return jax.jit(run)


@functools.cache
def _context_parallel(strategy: str, mask: MaskType, window: Any, cross: bool) -> Any:
    mesh = Mesh(np.array(jax.devices()[:CP]), ("cp",))

    def run(q, k, v, w, ids_q, pos_q, ids_kv, pos_kv):
        # Segments in any token order (the bare constructor checks nothing; lengths unread).
        kv = thdkit.Segments(ids_kv, pos_kv, 0 * ids_kv) if cross else None
        attend = functools.partial(
            thdkit.context_parallel_attention, q_segments=thdkit.Segments(ids_q, pos_q, 0 * ids_q),
            kv_segments=kv, mask_type=mask, window_size=window, max_segments_per_seq=S,
            scale=SCALE, mesh=mesh, axis_name="cp", strategy=strategy,
        )  # fmt: skip
        return _loss_and_grads(attend, q, k, v, w)

    return jax.jit(run)


def check_strategy(strategy: str, case: str, orders: tuple[str, ...] = ORDERS) -> None:
    """Output and gradients of ``strategy`` equal single-device attention for each order."""
    mask, window, cross = MASK_CASES[case]
    q, k, v, w = inputs(Case(mask, window=window, cross=cross), seed=1)
    lay = layout(cross)
    ids = tuple(lay[key] for key in ("ids_q", "pos_q", "ids_kv", "pos_kv"))
    out_ref, grads_ref = _single_device(mask, window)(q, k, v, w, *ids)
    run = _context_parallel(strategy, mask, window, cross)
    for order in orders:
        forward, inverse = reorder_pair(order, CP)
        tokens = functools.partial(forward, axis=1)
        out, grads = run(*(tokens(x) for x in (q, k, v, w)), *(forward(x) for x in ids))
        np.testing.assert_allclose(inverse(out, axis=1), out_ref, err_msg=order, **TOL)
        for label, grad, grad_ref in zip("qkv", grads, grads_ref, strict=True):
            np.testing.assert_allclose(
                inverse(grad, axis=1), grad_ref, err_msg=f"{order} d{label}", **TOL
            )


@pytest.mark.parametrize("case", MASK_CASES)
@pytest.mark.parametrize("strategy", tuple(STRATEGIES))
def test_matches_single_device_attention(strategy: str, case: str) -> None:
    check_strategy(strategy, case)


def test_the_simulated_devices_are_there() -> None:
    assert len(jax.devices()) >= CP
