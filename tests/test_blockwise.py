"""The blockwise method against the dense reference (forward and gradients, every mask type,
windows, cross-attention, ring steps, GQA), and the reference against a brute-force softmax.

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

from thdkit.kernels import attention
from thdkit._src.kernels import blockwise
from thdkit._src.kernels.partial import attention_partial
from thdkit._src.kernels.tiles import tile_ranges
from thdkit._src.mask_types import MaskType
from thdkit._src.masks import pair_mask
from thdkit._src.reference import reference_attention
from thdkit._src.segments import Segments, run_lengths

from .strategies import (
    ALL_MASKS,
    ATTN_S,
    ATTN_T,
    ATTN_T_KV,
    attention_inputs,
    batches,
    cross_layout,
    missing_layout,
    ring_layout,
    segments_of,
    self_layout,
)

S, T, T_KV = ATTN_S, ATTN_T, ATTN_T_KV
BLOCKS = {"block_q": 16, "block_kv": 8}  # T = 40 is 2.5 query tiles: the last one is padded
SCALE = 0.3
TOL = {"atol": 1e-5, "rtol": 1e-5}

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
def _both(q, k, v, w_out, w_lse, layout, *, mask, window):
    """(out, lse, (dq, dk, dv)) of the blockwise and the reference method, for a loss that reads
    the output and the log-sum-exp (as the ring merge does)."""

    def run(implementation):
        def loss(q, k, v):
            out, lse = attention_partial(
                q,
                k,
                v,
                **segments_of(layout),
                mask_type=mask,
                window_size=window,
                scale=SCALE,
                implementation=implementation,
                **BLOCKS,
            )
            finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
            return jnp.sum(out * w_out) + jnp.sum(finite_lse * w_lse), (out, lse)

        (_, (out, lse)), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
        return out, lse, grads

    return run("blockwise"), run("reference")


def _assert_blockwise_matches(blockwise, reference, tol=TOL):
    (out_b, lse_b, grads_b), (out_r, lse_r, grads_r) = blockwise, reference
    np.testing.assert_allclose(out_b, out_r, **tol)
    masked = ~np.isfinite(np.asarray(lse_r))
    np.testing.assert_array_equal(~np.isfinite(np.asarray(lse_b)), masked)
    np.testing.assert_allclose(np.where(masked, 0, lse_b), np.where(masked, 0, lse_r), **tol)
    for name, g_b, g_r in zip(("dq", "dk", "dv"), grads_b, grads_r, strict=True):
        assert np.all(np.isfinite(np.asarray(g_b, np.float32))), name
        np.testing.assert_allclose(
            np.asarray(g_b, np.float32), np.asarray(g_r, np.float32), err_msg=name, **tol
        )
    # Rows with no allowed key: zero output and zero query gradient.
    assert np.all(np.asarray(out_b)[masked] == 0)
    assert np.all(np.asarray(grads_b[0], np.float32)[masked] == 0)


# Every mask type with and without a window; a negative bound means unbounded.
# Every mask type; windows on one type of each family (the types within a family differ only in
# name), among them left-only windows (a negative bound is unbounded).
CASES = [(mask, None) for mask in ALL_MASKS] + [
    (MaskType.PADDING, (2, 1)),
    (MaskType.PADDING_CAUSAL, (2, 1)),
    (MaskType.CAUSAL_BOTTOM_RIGHT, (2, 1)),
    (MaskType.NO_MASK, (0, -1)),
    (MaskType.PADDING_CAUSAL_BOTTOM_RIGHT, (0, -1)),
]


@pytest.mark.parametrize(("mask", "window"), CASES, ids=[f"{m.value}-{w}" for m, w in CASES])
def test_blockwise_matches_reference(mask, window):
    saw_masked_rows = False
    for name, make in SQUARE_LAYOUTS.items():
        layout = {key: jnp.asarray(value) for key, value in make().items()}
        q, k, v, w_out, w_lse = attention_inputs(len(name), T)
        blockwise, reference = _both(q, k, v, w_out, w_lse, layout, mask=mask, window=window)
        _assert_blockwise_matches(blockwise, reference)
        saw_masked_rows |= bool(np.any(~np.isfinite(np.asarray(reference[1]))))
    assert saw_masked_rows


CROSS_CASES = [
    (MaskType.PADDING, None),
    (MaskType.CAUSAL, (3, 0)),
    (MaskType.CAUSAL_BOTTOM_RIGHT, None),
]


@pytest.mark.parametrize(
    ("mask", "window"), CROSS_CASES, ids=[f"{m.value}-{w}" for m, w in CROSS_CASES]
)
def test_blockwise_matches_reference_cross_attention(mask, window):
    layout = {key: jnp.asarray(value) for key, value in cross_layout(5).items()}
    q, k, v, w_out, w_lse = attention_inputs(5, T_KV)
    _assert_blockwise_matches(*_both(q, k, v, w_out, w_lse, layout, mask=mask, window=window))


SCHEDULE_CASES = [
    (MaskType.PADDING_CAUSAL, None),
    (MaskType.CAUSAL_BOTTOM_RIGHT, (2, 1)),
    (MaskType.NO_MASK, None),
]


@pytest.mark.parametrize("tiles_per_step", [1, 2, 5, 64])
@pytest.mark.parametrize(
    ("mask", "window"), SCHEDULE_CASES, ids=[f"{m.value}-{w}" for m, w in SCHEDULE_CASES]
)
def test_every_chunk_size_matches_reference(monkeypatch, tiles_per_step, mask, window):
    """The parallel schedule visiting 1, 2, 5 or all tiles per step (chunks that end inside a
    query tile, span several, and a last step that runs past the work) matches the reference
    forward and backward on every layout of the shared shape, ring steps included."""
    monkeypatch.setitem(blockwise.PAIRS_PER_STEP, "cpu", tiles_per_step * 16 * 8)

    @jax.jit
    def run(q, k, v, w_out, w_lse, layout):
        segments = segments_of(layout)
        ranges = tile_ranges(
            segments["q_segments"], segments["kv_segments"], mask_type=mask,
            window_size=window, **BLOCKS,
        )  # fmt: skip

        def loss(q, k, v):
            out, lse = blockwise.blockwise_attention(
                q, k, v, *segments.values(), ranges, mask_type=mask, window_size=window,
                scale=SCALE, schedule="parallel",
            )  # fmt: skip
            finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
            return jnp.sum(out * w_out) + jnp.sum(finite_lse * w_lse), (out, lse)

        (_, (out, lse)), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
        return out, lse, grads

    for name, make in SQUARE_LAYOUTS.items():
        layout = {key: jnp.asarray(value) for key, value in make().items()}
        q, k, v, w_out, w_lse = attention_inputs(len(name), T)
        _, reference = _both(q, k, v, w_out, w_lse, layout, mask=mask, window=window)
        _assert_blockwise_matches(run(q, k, v, w_out, w_lse, layout), reference)


@pytest.mark.parametrize("schedule", ["serial", "parallel"])
def test_a_non_finite_key_poisons_only_the_rows_that_read_it(monkeypatch, schedule):
    """One NaN key: the rows allowed to read it are NaN, every other row is bit-equal to the
    clean run, whatever the number of tiles per step."""
    monkeypatch.setitem(blockwise.PAIRS_PER_STEP, "cpu", 3 * 16 * 8)
    layout = {key: jnp.asarray(value) for key, value in self_layout(7).items()}
    segments = segments_of(layout)
    q_seg, kv_seg = segments["q_segments"], segments["kv_segments"]
    mask = MaskType.PADDING_CAUSAL
    ranges = tile_ranges(q_seg, kv_seg, mask_type=mask, window_size=None, **BLOCKS)
    q, k, v, _, _ = attention_inputs(7, T)
    run = jax.jit(
        lambda q, k, v: blockwise.blockwise_attention(
            q, k, v, q_seg, kv_seg, ranges, mask_type=mask, window_size=None, scale=SCALE,
            schedule=schedule,
        )[0]
    )  # fmt: skip
    token = int(np.flatnonzero(np.asarray(layout["ids_kv"][0]) != 0)[3])
    clean, poisoned = run(q, k, v), run(q, k.at[0, token, 0, 1].set(jnp.nan), v)
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
    layout = {key: jnp.asarray(value) for key, value in missing_layout(7).items()}
    ids_q = np.asarray(layout["ids_q"])
    q, k, v, w_out, w_lse = attention_inputs(7, T)
    (out, lse, (dq, _, _)), _ = _both(
        q, k, v, w_out, w_lse, layout, mask=MaskType.PADDING_CAUSAL, window=None
    )
    rows = (ids_q == 0) | (ids_q == 2)
    assert rows.any()
    assert np.all(np.asarray(out)[rows] == 0)
    assert np.all(np.asarray(lse)[rows] == -np.inf)
    assert np.all(np.asarray(dq)[rows] == 0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=lambda d: jnp.dtype(d).name)
def test_low_precision_matches_reference(dtype):
    layout = self_layout(8)
    q, k, v, w_out, _ = attention_inputs(8, T, dtype)
    kwargs = dict(
        segment_ids_q=layout["ids_q"],
        segment_pos_q=layout["pos_q"],
        mask_type="padding_causal",
        window_size=(5, 0),
        max_segments_per_seq=S,
        **BLOCKS,
    )

    @jax.jit
    def run(q, k, v):
        def grads(implementation):
            def loss(q, k, v):
                out = attention(q, k, v, **kwargs, implementation=implementation)
                return jnp.sum(out.astype(jnp.float32) * w_out.astype(jnp.float32)), out

            (_, out), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
            return out, grads

        return grads("blockwise"), grads("reference")

    (out_b, grads_b), (out_r, grads_r) = run(q, k, v)
    assert out_b.dtype == dtype and all(g.dtype == dtype for g in grads_b)
    tol = {"atol": 2e-2, "rtol": 2e-2}
    np.testing.assert_allclose(np.asarray(out_b, np.float32), np.asarray(out_r, np.float32), **tol)
    for g_b, g_r in zip(grads_b, grads_r, strict=True):
        np.testing.assert_allclose(np.asarray(g_b, np.float32), np.asarray(g_r, np.float32), **tol)


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


def _brute_force(q, k, v, layout, mask: MaskType, window, scale):
    """Loops over rows, heads and pairs, float64 softmax; conditions written from the spec."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    lay = {key: np.asarray(a) for key, a in layout.items()}
    batch, seq_q, heads_q, _ = q.shape
    group = heads_q // k.shape[2]
    left, right = (None, None) if window is None else window
    left = None if left is None or left < 0 else left
    right = None if right is None or right < 0 else right
    out = np.zeros((batch, seq_q, heads_q, v.shape[-1]))
    lse = np.full((batch, seq_q, heads_q), -np.inf)
    for b in range(batch):
        for i in range(seq_q):
            keys = []
            for j in range(k.shape[1]):
                idq, idk = lay["ids_q"][b, i], lay["ids_kv"][b, j]
                pq, pk = lay["pos_q"][b, i], lay["pos_kv"][b, j]
                rq, rk = lay["rl_q"][b, i], lay["rl_kv"][b, j]
                ok = idq != 0 and idq == idk
                if mask.is_causal:
                    ok = ok and pq >= pk
                if mask.is_bottom_right:
                    ok = ok and rq - pq <= rk - pk
                    ok = ok and (left is None or rq - pq + left >= rk - pk)
                else:
                    ok = ok and (left is None or pq - left <= pk)
                    ok = ok and (right is None or pk <= pq + right)
                if ok:
                    keys.append(j)
            for h in range(heads_q):
                if not keys:
                    continue
                logits = scale * k[b, keys, h // group] @ q[b, i, h]
                top = logits.max()
                weights = np.exp(logits - top)
                out[b, i, h] = weights @ v[b, keys, h // group] / weights.sum()
                lse[b, i, h] = top + np.log(weights.sum())
    return out, lse


def test_reference_matches_brute_force():
    """Tiny cross-attention rows with tail padding, ring-style explicit lengths, GQA."""
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
            want_out, want_lse = _brute_force(q, k, v, layout, mask, window, 0.7)
            np.testing.assert_allclose(out, want_out, atol=1e-5, err_msg=f"{mask} {window}")
            np.testing.assert_allclose(lse, want_lse, atol=1e-5, err_msg=f"{mask} {window}")


# --- int32 ranges ------------------------------------------------------------------------------

MAX_POSITION = 2**30 - 1
RANGE_SHAPE = (2, 32)


@functools.partial(jax.jit, static_argnames=("mask", "window", "implementation"))
def _forward(q, k, v, layout, *, mask, window, implementation):
    return attention_partial(
        q,
        k,
        v,
        **segments_of(layout),
        mask_type=mask,
        window_size=window,
        scale=SCALE,
        implementation=implementation,
        **BLOCKS,
    )


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
    output is bit-equal to the unshifted one and matches the reference."""
    ids_q, pos_q = q_side
    ids_kv, pos_kv = kv_side if cross else q_side
    shift = MAX_POSITION - int(max(pos_q.max(), pos_kv.max()))
    rl_q, rl_kv = (np.asarray(run_lengths(x)) for x in (ids_q, ids_kv))
    rng = np.random.default_rng(0)
    q, k, v = (
        jnp.asarray(rng.normal(size=(2, 32, h, d)), jnp.float32)
        for h, d in ((4, 8), (2, 8), (2, 4))
    )

    def layout(offset):
        return dict(
            ids_q=ids_q, pos_q=pos_q + offset, rl_q=rl_q,
            ids_kv=ids_kv, pos_kv=pos_kv + offset, rl_kv=rl_kv,
        )  # fmt: skip

    options = dict(mask=mask, window=window)
    out, lse = _forward(q, k, v, layout(0), **options, implementation="blockwise")
    out_s, lse_s = _forward(q, k, v, layout(shift), **options, implementation="blockwise")
    np.testing.assert_array_equal(out_s, out)
    np.testing.assert_array_equal(lse_s, lse)
    want, _ = _forward(q, k, v, layout(shift), **options, implementation="reference")
    np.testing.assert_allclose(out_s, want, **TOL)
