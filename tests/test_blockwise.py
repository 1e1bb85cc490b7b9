"""The blockwise method against the float64 oracle of tests/harness.py (forward, log-sum-exp and
gradients through both, every mask type, windows, cross-attention, ring steps, GQA), and the
reference on ring-step lengths and open windows.

Shapes are fixed per test so that each (mask type, window) compiles once for all its layouts.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from thdkit._src.kernels import blockwise
from thdkit._src.kernels.partial import attention_partial
from thdkit._src.kernels.tiles import tile_ranges
from thdkit._src.mask_types import MaskType
from thdkit._src.masks import pair_mask
from thdkit._src.reference import reference_attention
from thdkit._src.segments import Segments, run_lengths
from thdkit.kernels import attention

from . import harness
from .harness import SCALE
from .strategies import (
    ALL_MASKS,
    ATTN_S,
    batches,
    cross_layout,
    missing_layout,
    ring_layout,
    segments_of,
    self_layout,
)

S = ATTN_S
BLOCKS = {"block_q": 16, "block_kv": 8}  # T = 40 is 2.5 query tiles: the last one is padded

# Layouts of one shape (T_q = T_kv = 40): they share every compilation.
SQUARE_LAYOUTS = {
    "self": lambda: self_layout(0),
    "self_other_seed": lambda: self_layout(1),
    "missing_segment": lambda: missing_layout(2),
    "striped2_step_01": lambda: ring_layout(3, "striped2", 0, 1),
    "striped2_step_10": lambda: ring_layout(3, "striped2", 1, 0),
    "dual_chunk_swap_step_01": lambda: ring_layout(4, "dual_chunk_swap", 0, 1),
    "dual_chunk_swap_step_10": lambda: ring_layout(4, "dual_chunk_swap", 1, 0),
}


@functools.partial(jax.jit, static_argnames=("mask", "window"))
def _blockwise(q, k, v, w_out, w_lse, layout, *, mask, window):
    """(out, lse, (dq, dk, dv)) of the blockwise method (harness.partial_grads)."""

    def partial(q, k, v):
        return attention_partial(
            q, k, v, **segments_of(layout), mask_type=mask, window_size=window, scale=SCALE,
            implementation="blockwise", **BLOCKS,
        )  # fmt: skip

    return harness.partial_grads(partial, q, k, v, w_out, w_lse)


# Every mask type; windows on one type of each family (the types within a family differ only in
# name), among them left-only windows (a negative bound is unbounded).
CASES = [(mask, None) for mask in ALL_MASKS] + [
    (MaskType.PADDING, (2, 1)),
    (MaskType.PADDING_CAUSAL, (2, 1)),
    (MaskType.CAUSAL_BOTTOM_RIGHT, (2, 1)),
    (MaskType.NO_MASK, (0, -1)),
    (MaskType.PADDING_CAUSAL_BOTTOM_RIGHT, (0, -1)),
]


def _ids(cases):
    return [f"{m.value}-{w}" for m, w in cases]


@pytest.mark.parametrize(("mask", "window"), CASES, ids=_ids(CASES))
def test_blockwise_matches_float64_oracle(mask, window):
    saw_masked_rows = False
    for name, make in SQUARE_LAYOUTS.items():
        layout = make()
        inputs = harness.layout_inputs(layout, len(name))
        got = _blockwise(*inputs, layout, mask=mask, window=window)
        empty = harness.check_partial(got, inputs, layout, mask, window, what=name)
        saw_masked_rows |= bool(empty.any())
    assert saw_masked_rows


CROSS_CASES = [
    (MaskType.PADDING, None),
    (MaskType.CAUSAL, (3, 0)),
    (MaskType.CAUSAL_BOTTOM_RIGHT, None),
]


@pytest.mark.parametrize(("mask", "window"), CROSS_CASES, ids=_ids(CROSS_CASES))
def test_blockwise_matches_float64_oracle_cross_attention(mask, window):
    layout = cross_layout(5)
    inputs = harness.layout_inputs(layout, 5)
    got = _blockwise(*inputs, layout, mask=mask, window=window)
    harness.check_partial(got, inputs, layout, mask, window, what="cross")


SCHEDULE_CASES = [
    (MaskType.PADDING_CAUSAL, None),
    (MaskType.CAUSAL_BOTTOM_RIGHT, (2, 1)),
    (MaskType.NO_MASK, None),
]


@pytest.mark.parametrize("tiles_per_step", [1, 2, 5, 64])
@pytest.mark.parametrize(("mask", "window"), SCHEDULE_CASES, ids=_ids(SCHEDULE_CASES))
def test_every_chunk_size_matches_float64_oracle(monkeypatch, tiles_per_step, mask, window):
    """The parallel schedule visiting 1, 2, 5 or all tiles per step (chunks that end inside a
    query tile, span several, and a last step that runs past the work) matches the oracle
    forward and backward on every layout of the shared shape, ring steps included."""
    monkeypatch.setitem(blockwise.PAIRS_PER_STEP, "cpu", tiles_per_step * 16 * 8)

    @jax.jit
    def run(q, k, v, w_out, w_lse, layout):
        segments = segments_of(layout)
        ranges = tile_ranges(
            segments["q_segments"], segments["kv_segments"], mask_type=mask,
            window_size=window, **BLOCKS,
        )  # fmt: skip

        def partial(q, k, v):
            return blockwise.blockwise_attention(
                q, k, v, *segments.values(), ranges, mask_type=mask, window_size=window,
                scale=SCALE, schedule="parallel",
            )  # fmt: skip

        return harness.partial_grads(partial, q, k, v, w_out, w_lse)

    for name, make in SQUARE_LAYOUTS.items():
        layout = make()
        inputs = harness.layout_inputs(layout, len(name))
        harness.check_partial(run(*inputs, layout), inputs, layout, mask, window, what=name)


@pytest.mark.parametrize("schedule", ["serial", "parallel"])
def test_a_non_finite_key_poisons_only_the_rows_that_read_it(monkeypatch, schedule):
    """One NaN key: the rows allowed to read it are NaN, every other row is bit-equal to the
    clean run, whatever the number of tiles per step."""
    monkeypatch.setitem(blockwise.PAIRS_PER_STEP, "cpu", 3 * 16 * 8)
    layout = self_layout(7)
    segments = segments_of(layout)
    q_seg, kv_seg = segments["q_segments"], segments["kv_segments"]
    mask = MaskType.PADDING_CAUSAL
    ranges = tile_ranges(q_seg, kv_seg, mask_type=mask, window_size=None, **BLOCKS)
    q, k, v, _, _ = harness.layout_inputs(layout, 7)
    run = jax.jit(
        lambda q, k, v: blockwise.blockwise_attention(
            q, k, v, q_seg, kv_seg, ranges, mask_type=mask, window_size=None, scale=SCALE,
            schedule=schedule,
        )[0]
    )  # fmt: skip
    token = int(np.flatnonzero(layout["ids_kv"][0] != 0)[3])
    clean, poisoned = run(q, k, v), run(q, jnp.asarray(k).at[0, token, 0, 1].set(jnp.nan), v)
    reads = np.asarray(pair_mask(q_seg, kv_seg, mask_type=mask, window_size=None))[0, :, token]
    assert reads.sum() >= 2
    heads_kv, group = k.shape[2], q.shape[2] // k.shape[2]
    hit = np.zeros(poisoned.shape[:3], bool)
    hit[0, reads, :group] = True  # the query heads of kv head 0
    assert np.all(np.isnan(np.asarray(poisoned)[hit]))
    np.testing.assert_array_equal(np.asarray(poisoned)[~hit], np.asarray(clean)[~hit])
    assert heads_kv >= 1


def test_fully_masked_rows_give_zeros_and_zero_gradients():
    """A row of padding, and a segment absent from the keys: zeros, -inf, zero gradients."""
    layout = missing_layout(7)
    inputs = harness.layout_inputs(layout, 7)
    out, lse, (dq, _, _) = _blockwise(*inputs, layout, mask=MaskType.PADDING_CAUSAL, window=None)
    rows = (layout["ids_q"] == 0) | (layout["ids_q"] == 2)
    assert rows.any()
    assert np.all(np.asarray(out)[rows] == 0)
    assert np.all(np.asarray(lse)[rows] == -np.inf)
    assert np.all(np.asarray(dq)[rows] == 0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_matches_float64_oracle(dtype):
    """Inputs, output and gradients in ``dtype`` (float32 accumulation), against the oracle on
    the inputs as rounded, within ``harness.TOLERANCES[dtype]``."""
    layout, mask, window = self_layout(8), MaskType.PADDING_CAUSAL, (5, 0)
    q, k, v, w_out, _ = harness.layout_inputs(layout, 8, dtype=dtype)

    @jax.jit
    def run(q, k, v):
        def loss(q, k, v):
            out = attention(
                q, k, v, segment_ids_q=layout["ids_q"], segment_pos_q=layout["pos_q"],
                mask_type=mask, window_size=window, max_segments_per_seq=S, scale=SCALE,
                implementation="blockwise", **BLOCKS,
            )  # fmt: skip
            return jnp.sum(out.astype(jnp.float32) * w_out), out

        (_, out), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
        return out, None, grads

    want = harness.partial_oracle(q, k, v, layout, mask, window, w_out=w_out)
    harness.check_outputs(run(q, k, v), want, dtype=dtype, what=dtype)


def test_blockwise_memory_is_linear_in_length():
    """The compiled forward + backward of the blockwise method needs scratch linear in T (the
    per-step tiles are a constant): far less than one [T, T] float32 matrix, growing about 4x
    from T = 4096 to 16384; the reference needs more than the matrix."""

    def grads(implementation, seq):
        q = jax.ShapeDtypeStruct((1, seq, 1, 16), jnp.float32)
        ids = jax.ShapeDtypeStruct((1, seq), jnp.int32)

        def loss(q, k, v, ids, pos):
            rl = run_lengths(ids)
            out, _ = attention_partial(
                q,
                k,
                v,
                q_segments=Segments(ids, pos, rl),
                kv_segments=Segments(ids, pos, rl),
                mask_type=MaskType.PADDING_CAUSAL,
                window_size=None,
                scale=0.25,
                implementation=implementation,
            )
            return jnp.sum(out)

        compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(q, q, q, ids, ids).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    small, large = grads("blockwise", 4096), grads("blockwise", 16384)
    assert large < 16384 * 16384 * 4 / 64
    assert large < 5 * small
    assert grads("reference", 4096) > 4096 * 4096 * 4


# --- reference vs brute force ------------------------------------------------------------------


def test_reference_matches_float64_oracle_on_ring_lengths_and_open_windows():
    """Tiny cross-attention rows with tail padding, ring-style explicit lengths, GQA, windows
    open on one side (None or a negative bound)."""
    layout = dict(
        ids_q=np.array([[1, 1, 1, 0, 2, 2], [0, 3, 3, 3, 3, 0]]),
        pos_q=np.array([[0, 2, 4, 6, 1, 3], [0, 0, 1, 2, 3, 0]]),
        rl_q=np.array([[6, 6, 6, 0, 4, 4], [0, 4, 4, 4, 4, 0]]),
        ids_kv=np.array([[1, 1, 1, 2, 2, 2, 0], [1, 1, 3, 3, 3, 3, 3]]),
        pos_kv=np.array([[1, 3, 5, 0, 2, 4, 5], [0, 1, 0, 1, 2, 3, 4]]),
        rl_kv=np.array([[6, 6, 6, 5, 5, 5, 0], [2, 2, 5, 5, 5, 5, 5]]),
    )
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 6, 4, 3))
    k = rng.normal(size=(2, 7, 2, 3))
    v = rng.normal(size=(2, 7, 2, 2))
    for mask in ALL_MASKS:
        for window in (None, (1, 1), (0, None), (2, -5)):
            out, lse = reference_attention(
                jnp.asarray(q, jnp.float32),
                jnp.asarray(k, jnp.float32),
                jnp.asarray(v, jnp.float32),
                **segments_of(layout),
                mask_type=mask,
                window_size=window,
                scale=0.7,
            )
            want_out, want_lse, _ = harness.partial_oracle(q, k, v, layout, mask, window, scale=0.7)
            np.testing.assert_allclose(out, want_out, atol=1e-5, err_msg=f"{mask} {window}")
            np.testing.assert_allclose(lse, want_lse, atol=1e-5, err_msg=f"{mask} {window}")


# --- int32 ranges ------------------------------------------------------------------------------

MAX_POSITION = 2**30 - 1
RANGE_SHAPE = (harness.B, harness.T)


@functools.partial(jax.jit, static_argnames=("mask", "window"))
def _forward(q, k, v, layout, *, mask, window):
    return attention_partial(
        q, k, v, **segments_of(layout), mask_type=mask, window_size=window, scale=SCALE,
        implementation="blockwise", **BLOCKS,
    )  # fmt: skip


@pytest.mark.parametrize("mask", ALL_MASKS, ids=lambda m: m.value)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    q_side=batches(shape=RANGE_SHAPE, max_segments=3),
    kv_side=batches(shape=RANGE_SHAPE, max_segments=3),
    cross=st.booleans(),
    window=st.sampled_from([None, (2, 1), (2**31 - 2, 2**31 - 2), (2**31 - 1, 0)]),
)
def test_shifting_positions_to_the_largest_leaves_outputs_unchanged(
    mask, q_side, kv_side, cross, window
):
    """Positions shifted so the largest is 2**30 - 1, window bounds near 2**31 - 1: the blockwise
    output is bit-equal to the unshifted one and matches the float64 oracle."""
    ids_q, pos_q = q_side
    ids_kv, pos_kv = kv_side if cross else q_side
    shift = MAX_POSITION - int(max(pos_q.max(), pos_kv.max()))
    rl_q, rl_kv = (np.asarray(run_lengths(x)) for x in (ids_q, ids_kv))
    q, k, v, _, _ = harness.random_inputs(dim_v=4)

    def layout(offset):
        return dict(
            ids_q=ids_q, pos_q=pos_q + offset, rl_q=rl_q,
            ids_kv=ids_kv, pos_kv=pos_kv + offset, rl_kv=rl_kv,
        )  # fmt: skip

    out, lse = _forward(q, k, v, layout(0), mask=mask, window=window)
    out_s, lse_s = _forward(q, k, v, layout(shift), mask=mask, window=window)
    np.testing.assert_array_equal(out_s, out)
    np.testing.assert_array_equal(lse_s, lse)
    want, _, _ = harness.partial_oracle(q, k, v, layout(shift), mask, window)
    harness.assert_close(out_s, want, harness.TOLERANCES["float32"]["forward"], "shifted")
