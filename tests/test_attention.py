"""Packed attention: blockwise (and cuDNN) against the dense reference, the reference against a
brute-force softmax, is_representable against an emulated varlen kernel, and argument errors.

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

from thdkit import reorder, synth
from thdkit.attention import (
    _reproduces,
    attention,
    attention_partial,
    is_representable,
    tile_ranges,
)
from thdkit.layout import run_lengths
from thdkit.masks import MaskType
from thdkit.metadata import seqlens_and_offsets
from thdkit.reference import pair_mask, reference_attention

from .strategies import ALL_MASKS, batches, kernel_reading, np_allowed

B, T, T_KV, H_Q, H_KV, D, D_V = 2, 40, 56, 8, 2, 8, 4
S = 4
BLOCKS = {"block_q": 16, "block_kv": 8}  # T = 40 is 2.5 query tiles: the last one is padded
SCALE = 0.3
TOL = {"atol": 1e-5, "rtol": 1e-5}
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")


# --- Layouts -----------------------------------------------------------------------------------


def _self(seed: int) -> dict[str, np.ndarray]:
    """A self-attention batch: the kv layout is the query's, rl the run lengths."""
    ids, pos = synth.packed_segments(
        np.random.default_rng(seed), batch=B, seq_len=T, max_segments=S
    )
    rl = np.asarray(run_lengths(ids))
    return dict(ids_q=ids, pos_q=pos, rl_q=rl, ids_kv=ids, pos_kv=pos, rl_kv=rl)


def _missing(seed: int) -> dict[str, np.ndarray]:
    """Cross-attention with segment 2 absent from the keys: its query rows attend nothing."""
    layout = _self(seed)
    ids_kv = np.where(layout["ids_q"] == 2, 0, layout["ids_q"])
    return layout | dict(ids_kv=ids_kv, rl_kv=np.asarray(run_lengths(ids_kv)))


def _cross(seed: int) -> dict[str, np.ndarray]:
    """Cross-attention whose key documents are at least as long as the query ones (T_kv = 56)."""
    ids_q, pos_q, ids_kv, pos_kv = synth.cross_segments(
        np.random.default_rng(seed), batch=B, seq_len_q=T, seq_len_kv=T_KV, max_segments=S
    )
    return dict(
        ids_q=ids_q,
        pos_q=pos_q,
        rl_q=np.asarray(run_lengths(ids_q)),
        ids_kv=ids_kv,
        pos_kv=pos_kv,
        rl_kv=np.asarray(run_lengths(ids_kv)),
    )


def _ring_step(seed: int, order: str, q_rank: int, kv_rank: int) -> dict[str, np.ndarray]:
    """Ring step (q_rank, kv_rank) of a reordered 2T-token row on 2 ranks.

    rl holds the global document lengths, as ring attention passes them to the bottom-right rule.
    """
    ids, pos = synth.packed_segments(
        np.random.default_rng(seed), batch=B, seq_len=2 * T, max_segments=S
    )
    rl = np.asarray(run_lengths(ids))
    if order == "striped2":
        ids, pos, rl = (reorder.striped(x, cp=2, stripe_size=2) for x in (ids, pos, rl))
    else:
        ids, pos, rl = (reorder.dual_chunk_swap(x, cp=2) for x in (ids, pos, rl))
    ids_q, pos_q, ids_kv, pos_kv = reorder.ring_step(ids, pos, cp=2, q_rank=q_rank, kv_rank=kv_rank)
    return dict(
        ids_q=ids_q,
        pos_q=pos_q,
        rl_q=reorder.shard(rl, cp=2, rank=q_rank),
        ids_kv=ids_kv,
        pos_kv=pos_kv,
        rl_kv=reorder.shard(rl, cp=2, rank=kv_rank),
    )


# Layouts of one shape (T_q = T_kv = 40): they share every compilation.
SQUARE_LAYOUTS = {
    "self": lambda: _self(0),
    "self_other_seed": lambda: _self(1),
    "missing_segment": lambda: _missing(2),
    "striped2_step_01": lambda: _ring_step(3, "striped2", 0, 1),
    "striped2_step_10": lambda: _ring_step(3, "striped2", 1, 0),
    "dual_chunk_swap_step_01": lambda: _ring_step(4, "dual_chunk_swap", 0, 1),
    "dual_chunk_swap_step_10": lambda: _ring_step(4, "dual_chunk_swap", 1, 0),
}


def _inputs(seed: int, seq_kv: int, dtype=jnp.float32) -> tuple[jax.Array, ...]:
    rng = np.random.default_rng(100 + seed)
    shapes = ((B, T, H_Q, D), (B, seq_kv, H_KV, D), (B, seq_kv, H_KV, D_V), (B, T, H_Q, D_V))
    q, k, v, w_out = (jnp.asarray(rng.normal(size=s), dtype) for s in shapes)
    w_lse = jnp.asarray(rng.normal(size=(B, T, H_Q)), jnp.float32)
    return q, k, v, w_out, w_lse


# --- blockwise vs reference --------------------------------------------------------------------


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
                **layout,
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
        q, k, v, w_out, w_lse = _inputs(len(name), T)
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
    layout = {key: jnp.asarray(value) for key, value in _cross(5).items()}
    q, k, v, w_out, w_lse = _inputs(5, T_KV)
    _assert_blockwise_matches(*_both(q, k, v, w_out, w_lse, layout, mask=mask, window=window))


def test_fully_masked_rows_give_zeros_and_zero_gradients():
    """A row of padding, and a segment absent from the keys: zeros, -inf, zero gradients."""
    layout = {key: jnp.asarray(value) for key, value in _missing(7).items()}
    ids_q = np.asarray(layout["ids_q"])
    q, k, v, w_out, w_lse = _inputs(7, T)
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
    layout = _self(8)
    q, k, v, w_out, _ = _inputs(8, T, dtype)
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


def test_attention_self_attention_defaults_and_automatic_choice():
    """kv defaults to the query layout; on CPU the automatic choice is blockwise; jit and eager
    agree."""
    layout = _self(9)
    q, k, v, _, _ = _inputs(9, T)
    common = dict(
        segment_ids_q=layout["ids_q"],
        segment_pos_q=layout["pos_q"],
        mask_type="causal_padding",
        max_segments_per_seq=S,
        **BLOCKS,
    )
    out = attention(q, k, v, **common)
    explicit = jax.jit(
        lambda q, k, v, ids, pos: attention(
            q,
            k,
            v,
            **(common | dict(segment_ids_q=ids, segment_pos_q=pos)),
            segment_ids_kv=ids,
            segment_pos_kv=pos,
            implementation="reference",
        )
    )(q, k, v, layout["ids_q"], layout["pos_q"])
    np.testing.assert_allclose(out, explicit, **TOL)


def test_tile_ranges_cover_every_allowed_pair_and_track_document_sizes():
    """Visited tiles hold every allowed pair; packing many short documents visits few tiles."""
    seq, block = 512, 32

    @functools.partial(jax.jit, static_argnames=("mask", "window"))
    def ranges_and_mask(ids, pos, mask, window):
        rl = run_lengths(ids)
        blocks = dict(block_q=block, block_kv=block)
        ranges = tile_ranges(
            ids, pos, rl, ids, pos, rl, mask_type=mask, window_size=window, **blocks
        )
        allowed = pair_mask(ids, pos, rl, ids, pos, rl, mask_type=mask, window_size=window)
        return ranges.lo, ranges.hi, ranges.visited_fraction(), allowed

    def visited_and_needed(ids, pos, mask, window):
        lo, hi, fraction, allowed = ranges_and_mask(ids, pos, mask, window)
        allowed = np.asarray(allowed)
        needed = allowed.reshape(1, seq // block, block, seq // block, block).any(axis=(2, 4))
        tiles = np.arange(seq // block)
        visited = (tiles >= np.asarray(lo)[..., None]) & (tiles < np.asarray(hi)[..., None])
        return visited, needed, float(fraction)

    one_doc = (np.ones((1, seq), np.int32), np.arange(seq, dtype=np.int32)[None])
    many = (np.repeat(np.arange(1, 17, dtype=np.int32), 32)[None], np.tile(np.arange(32), 16)[None])
    for ids, pos in (
        one_doc,
        many,
        synth.packed_segments(np.random.default_rng(0), batch=1, seq_len=seq, max_segments=16),
    ):
        for mask in (MaskType.PADDING, MaskType.CAUSAL, MaskType.PADDING_CAUSAL_BOTTOM_RIGHT):
            for window in (None, (40, 0)) if mask.uses_positions else (None,):
                visited, needed, _ = visited_and_needed(ids, pos, mask, window)
                assert np.all(visited >= needed), (mask, window)
    _, _, long_fraction = visited_and_needed(*one_doc, MaskType.CAUSAL, None)
    _, _, short_fraction = visited_and_needed(*many, MaskType.CAUSAL, None)
    assert long_fraction == pytest.approx(136 / 256)  # 16 query tiles, causal: 16 * 17 / 2
    assert short_fraction == pytest.approx(16 / 256)  # one tile per 32-token document


def test_blockwise_memory_is_linear_in_length():
    """The compiled forward + backward of the blockwise method needs far less scratch than one
    [T, T] float32 matrix; the reference needs more than that."""
    seq = 4096
    q = jax.ShapeDtypeStruct((1, seq, 1, 16), jnp.float32)
    ids = jax.ShapeDtypeStruct((1, seq), jnp.int32)

    def grads(implementation):
        def loss(q, k, v, ids, pos):
            rl = run_lengths(ids)
            out, _ = attention_partial(
                q,
                k,
                v,
                ids_q=ids,
                pos_q=pos,
                rl_q=rl,
                ids_kv=ids,
                pos_kv=pos,
                rl_kv=rl,
                mask_type=MaskType.PADDING_CAUSAL,
                window_size=None,
                scale=0.25,
                implementation=implementation,
            )
            return jnp.sum(out)

        compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(q, q, q, ids, ids).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    dense_matrix = seq * seq * 4
    assert grads("blockwise") < dense_matrix / 16
    assert grads("reference") > dense_matrix


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
                **{key: jnp.asarray(a) for key, a in layout.items()},
                mask_type=mask,
                window_size=window,
                scale=0.7,
            )
            want_out, want_lse = _brute_force(q, k, v, layout, mask, window, 0.7)
            np.testing.assert_allclose(out, want_out, atol=1e-5, err_msg=f"{mask} {window}")
            np.testing.assert_allclose(lse, want_lse, atol=1e-5, err_msg=f"{mask} {window}")


# --- is_representable --------------------------------------------------------------------------

REPR_SHAPE = (4, T)  # the shape of the generated layouts: shared compilations
REPR_SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@functools.cache
def _compact(mask: MaskType):
    return jax.jit(
        lambda ids_q, pos_q, ids_kv, pos_kv: seqlens_and_offsets(
            segment_ids_q=ids_q,
            segment_pos_q=pos_q,
            segment_ids_kv=ids_kv,
            segment_pos_kv=pos_kv,
            mask_type=mask,
            max_segments_per_seq=S,
            method="dense",
        )
    )


def _emulated(ids_q, pos_q, ids_kv, pos_kv, mask: MaskType, window_left=None) -> np.ndarray:
    """Per row: does the varlen kernel's reading of compact metadata reproduce allowed[] (with
    the index window ``c >= a - left`` against the position window, and no empty kernel row)?"""
    meta = [np.asarray(m) for m in _compact(mask)(ids_q, pos_q, ids_kv, pos_kv)]
    result = []
    for b in range(ids_q.shape[0]):
        rows = [m[b] for m in meta]
        read = kernel_reading(rows, ids_q.shape[-1], ids_kv.shape[-1], mask)
        allowed = np_allowed(ids_q[b], pos_q[b], ids_kv[b], pos_kv[b], mask)
        nonempty = True
        if window_left is not None:
            band = np.zeros_like(read)
            for lq, lk, qo, ko in zip(*rows[:2], rows[2][:-1], rows[3][:-1], strict=True):
                if lq > 0:
                    a = np.arange(lq)[:, None]
                    c = np.arange(lk)[None, :]
                    band[qo : qo + lq, ko : ko + lk] = c >= a - window_left
                    nonempty &= bool(np.all((read & band)[qo : qo + lq].any(axis=1)))
            read = read & band
            allowed = allowed & (pos_kv[b][None, :] >= pos_q[b][:, None] - window_left)
        result.append(bool(np.array_equal(read, allowed)) and nonempty)
    return np.array(result)


@REPR_SETTINGS
@given(
    mask=st.sampled_from(ALL_MASKS),
    q=batches(shape=REPR_SHAPE, max_segments=S),
    kv=batches(shape=REPR_SHAPE, max_segments=S),
)
def test_is_representable_matches_emulated_kernel(mask, q, kv):
    got = is_representable(
        segment_ids_q=q[0],
        segment_pos_q=q[1],
        segment_ids_kv=kv[0],
        segment_pos_kv=kv[1],
        mask_type=mask,
        max_segments_per_seq=S,
    )
    np.testing.assert_array_equal(got, _emulated(*q, *kv, mask))


@REPR_SETTINGS
@given(
    mask=st.sampled_from([MaskType.CAUSAL, MaskType.PADDING_CAUSAL]),
    left=st.sampled_from([0, 2]),
    q=batches(shape=REPR_SHAPE, max_segments=S),
    kv=batches(shape=REPR_SHAPE, max_segments=S),
)
def test_windowed_representability_matches_emulated_kernel(mask, left, q, kv):
    """The check behind the automatic cuDNN choice with a sliding window."""
    got = _reproduces(
        (jnp.asarray(q[0]), jnp.asarray(q[1])),
        (jnp.asarray(kv[0]), jnp.asarray(kv[1])),
        mask=mask,
        num_segments=S,
        window_left=left,
    )
    np.testing.assert_array_equal(got, _emulated(*q, *kv, mask, window_left=left))


@pytest.mark.parametrize("mask", ALL_MASKS, ids=lambda m: m.value)
def test_is_representable_on_generated_layouts(mask):
    """True for self-attention, long-enough cross-attention and stripe-1 ring steps; some causal
    stripe-2 and dual_chunk_swap steps are not representable."""

    def check(ids_q, pos_q, ids_kv, pos_kv):
        got = is_representable(
            segment_ids_q=ids_q,
            segment_pos_q=pos_q,
            segment_ids_kv=ids_kv,
            segment_pos_kv=pos_kv,
            mask_type=mask,
            max_segments_per_seq=S,
        )
        np.testing.assert_array_equal(got, _emulated(ids_q, pos_q, ids_kv, pos_kv, mask))
        return np.asarray(got)

    # Every layout is [4, 40] x [4, 40], so each mask type compiles once.
    rng = np.random.default_rng(11)
    ids, pos = synth.packed_segments(rng, batch=4, seq_len=T, max_segments=S)
    assert check(ids, pos, ids, pos).all()
    assert check(
        *synth.cross_segments(rng, batch=4, seq_len_q=T, seq_len_kv=T, max_segments=S)
    ).all()
    ids, pos = synth.packed_segments(rng, batch=4, seq_len=2 * T, max_segments=S)
    stripe1 = [reorder.striped(x, cp=2) for x in (ids, pos)]
    for ranks in ((0, 0), (0, 1), (1, 0)):
        assert check(*reorder.ring_step(*stripe1, cp=2, q_rank=ranks[0], kv_rank=ranks[1])).all()
    broken = []
    for order in ("striped2", "dual_chunk_swap"):
        shuffled = [
            reorder.striped(x, cp=2, stripe_size=2)
            if order == "striped2"
            else reorder.dual_chunk_swap(x, cp=2)
            for x in (ids, pos)
        ]
        for q_rank, kv_rank in ((0, 1), (1, 0)):
            broken.append(
                ~check(*reorder.ring_step(*shuffled, cp=2, q_rank=q_rank, kv_rank=kv_rank))
            )
    if mask.uses_positions:
        assert np.concatenate(broken).any()
    else:
        assert not np.concatenate(broken).any()


def test_is_representable_under_jit():
    ids, pos = synth.packed_segments(np.random.default_rng(12), batch=4, seq_len=T, max_segments=S)
    under_jit = jax.jit(
        functools.partial(is_representable, mask_type="padding_causal", max_segments_per_seq=S)
    )
    got = under_jit(segment_ids_q=ids, segment_pos_q=pos)
    assert got.shape == (4,) and bool(got.all())


# --- errors ------------------------------------------------------------------------------------


def _call(**changes):
    ids = jnp.array([[1, 1, 1, 0, 2, 2, 2, 2]])
    pos = jnp.array([[0, 1, 2, 3, 0, 1, 2, 3]])
    x = jnp.zeros((1, 8, 2, 4))
    kwargs = dict(
        query=x,
        key=x,
        value=x,
        segment_ids_q=ids,
        segment_pos_q=pos,
        max_segments_per_seq=2,
        implementation="reference",
    )
    kwargs.update(changes)
    return attention(kwargs.pop("query"), kwargs.pop("key"), kwargs.pop("value"), **kwargs)


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"query": jnp.zeros((1, 8, 2, 4), jnp.int32)}, TypeError, "query must be float32"),
        ({"key": jnp.zeros((1, 8, 2, 4), jnp.bfloat16)}, TypeError, "share one dtype"),
        ({"value": jnp.zeros((8, 2, 4))}, ValueError, "value must have rank 4"),
        ({"key": jnp.zeros((2, 8, 2, 4))}, ValueError, "same batch size"),
        ({"value": jnp.zeros((1, 7, 2, 4))}, ValueError, "key and value must agree"),
        ({"key": jnp.zeros((1, 8, 2, 3))}, ValueError, "same head dim"),
        (
            {"key": jnp.zeros((1, 8, 3, 4)), "value": jnp.zeros((1, 8, 3, 4))},
            ValueError,
            "multiple of the key/value heads",
        ),
        (
            {"key": jnp.zeros((1, 9, 2, 4)), "value": jnp.zeros((1, 9, 2, 4))},
            ValueError,
            "needs T_kv == T_q",
        ),
        (
            {
                "segment_ids_q": jnp.ones((1, 7), jnp.int32),
                "segment_pos_q": jnp.ones((1, 7), jnp.int32),
            },
            ValueError,
            r"segment_ids_q must have shape \[B, T\] = \(1, 8\)",
        ),
        ({"segment_ids_q": jnp.ones((1, 8))}, TypeError, "segment_ids_q must be an integer"),
        ({"segment_ids_kv": jnp.ones((1, 8), jnp.int32)}, ValueError, "only segment_ids_kv"),
        ({"window_size": (1, 2, 3)}, ValueError, r"window_size must be None or a pair"),
        ({"window_size": (1.5, 0)}, TypeError, "window_size left bound must be a Python int"),
        ({"implementation": "flash"}, ValueError, "unknown implementation 'flash'.*'blockwise'"),
        ({"mask_type": "diagonal"}, ValueError, "unknown mask_type 'diagonal'"),
        ({"max_segments_per_seq": 1}, ValueError, "exceeds max_segments_per_seq=1"),
        (
            {"segment_pos_q": jnp.array([[0, 1, 1, 3, 0, 1, 2, 3]])},
            ValueError,
            r"segment_pos_q row 0, token 2: position 1 does not increase",
        ),
        ({"block_q": 0}, ValueError, "block_q must be a positive int"),
        ({"scale": jnp.float32(2.0)}, TypeError, "scale must be a Python float"),
    ],
)
def test_errors_name_the_parameter(changes, error, match):
    with pytest.raises(error, match=match):
        _call(**changes)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the error without a GPU")
def test_cudnn_without_gpu_raises_clearly():
    with pytest.raises(RuntimeError, match=r"needs a CUDA GPU.*use implementation='blockwise'"):
        _call(
            implementation="cudnn",
            query=jnp.zeros((1, 8, 2, 8), jnp.bfloat16),
            key=jnp.zeros((1, 8, 2, 8), jnp.bfloat16),
            value=jnp.zeros((1, 8, 2, 8), jnp.bfloat16),
        )


# --- GPU: cuDNN against the reference ----------------------------------------------------------


def _gpu_inputs(seq: int, seed: int):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=(2, seq, 4, 64)), jnp.bfloat16) for _ in range(3))
    return q, k, v


@gpu
@needs_gpu
@pytest.mark.parametrize("mask", ["padding", "padding_causal", "causal_bottom_right"])
@pytest.mark.parametrize("window", [None, (16, 0)], ids=str)
def test_cudnn_matches_reference_self_attention(mask, window):
    if window is not None and mask == "padding":
        pytest.skip("cuDNN applies windows with causal masks only")
    ids, pos = synth.packed_segments(np.random.default_rng(0), batch=2, seq_len=256, max_segments=S)
    q, k, v = _gpu_inputs(256, 0)
    common = dict(
        segment_ids_q=ids,
        segment_pos_q=pos,
        mask_type=mask,
        window_size=window,
        max_segments_per_seq=S,
    )

    def loss(q, k, v, implementation):
        out = attention(q, k, v, **common, implementation=implementation)
        return jnp.sum(out.astype(jnp.float32) ** 2), out

    grad = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True), static_argnums=3)
    (_, out_c), grads_c = grad(q, k, v, "cudnn")
    (_, out_r), grads_r = grad(q, k, v, "reference")
    tol = {"atol": 3e-2, "rtol": 3e-2}
    np.testing.assert_allclose(np.asarray(out_c, np.float32), np.asarray(out_r, np.float32), **tol)
    for g_c, g_r in zip(grads_c, grads_r, strict=True):
        np.testing.assert_allclose(np.asarray(g_c, np.float32), np.asarray(g_r, np.float32), **tol)


@gpu
@needs_gpu
def test_cudnn_cross_attention_and_automatic_choice():
    ids_q, pos_q, ids_kv, pos_kv = synth.cross_segments(
        np.random.default_rng(1), batch=2, seq_len_q=128, seq_len_kv=256, max_segments=S
    )
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(2, 128, 4, 64)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.normal(size=(2, 256, 2, 64)), jnp.bfloat16) for _ in range(2))
    common = dict(
        segment_ids_q=ids_q,
        segment_pos_q=pos_q,
        segment_ids_kv=ids_kv,
        segment_pos_kv=pos_kv,
        mask_type="padding_causal",
        max_segments_per_seq=S,
    )
    want = attention(q, k, v, **common, implementation="reference")
    for implementation in ("cudnn", None):
        got = jax.jit(functools.partial(attention, **common, implementation=implementation))(
            q, k, v
        )
        np.testing.assert_allclose(
            np.asarray(got, np.float32), np.asarray(want, np.float32), atol=3e-2, rtol=3e-2
        )


@gpu
@needs_gpu
def test_cudnn_refuses_what_it_cannot_express():
    ids, pos = synth.packed_segments(np.random.default_rng(2), batch=1, seq_len=128, max_segments=S)
    shuffled = [reorder.striped(x, cp=2, stripe_size=4) for x in (ids, pos)]
    ids_q, pos_q, ids_kv, pos_kv = reorder.ring_step(*shuffled, cp=2, q_rank=1, kv_rank=0)
    assert not bool(
        is_representable(
            segment_ids_q=ids_q,
            segment_pos_q=pos_q,
            segment_ids_kv=ids_kv,
            segment_pos_kv=pos_kv,
            mask_type="padding_causal",
            max_segments_per_seq=S,
        )
    ), "choose a layout the kernel cannot read"
    q, k, v = (jnp.zeros((1, 64, 2, 64), jnp.bfloat16) for _ in range(3))
    common = dict(
        segment_ids_q=ids_q,
        segment_pos_q=pos_q,
        segment_ids_kv=ids_kv,
        segment_pos_kv=pos_kv,
        mask_type="padding_causal",
        max_segments_per_seq=S,
    )
    with pytest.raises(NotImplementedError, match="use implementation='blockwise'"):
        attention(q, k, v, **common, implementation="cudnn")
    with pytest.raises(NotImplementedError, match="float32"):
        attention(
            q.astype(jnp.float32),
            k.astype(jnp.float32),
            v.astype(jnp.float32),
            **common,
            implementation="cudnn",
        )
    automatic = attention(q, k, v, **common)
    blockwise = attention(q, k, v, **common, implementation="blockwise")
    np.testing.assert_array_equal(np.asarray(automatic), np.asarray(blockwise))
