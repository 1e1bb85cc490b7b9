"""Property tests: linear == one_hot == dense (the reference), raw and compact, on random layouts.

Layouts are drawn inside a few fixed shapes so that hundreds of examples share a handful of
compilations: one jitted program per (shape, mask type) computes all methods at once.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import thdkit
from thdkit._src.limits import MAX_POSITION
from thdkit._src.mask_types import MaskType
from thdkit._src.reorder import dual_chunk_swap, ring_step, striped
from thdkit._src.synth import cross_segments, packed_segments

from .strategies import ALL_MASKS, batches, kernel_reading, np_allowed

PROPERTY_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
S = 6  # max_segments_per_seq of the property tests; layouts use ids up to S


METHODS = ("linear", "one_hot", "dense")


@functools.cache
def _all_methods(mask: MaskType, num_segments: int, self_attention: bool):
    """A jitted function giving the raw SeqMeta of every method, and linear's compact one."""

    def run(ids_q, pos_q, ids_kv=None, pos_kv=None):
        kv = {} if self_attention else dict(segment_ids_kv=ids_kv, segment_pos_kv=pos_kv)
        call = functools.partial(
            thdkit.seqlens_and_offsets,
            segment_ids_q=ids_q,
            segment_pos_q=pos_q,
            **kv,
            mask_type=mask,
            max_segments_per_seq=num_segments,
        )
        raw = {method: call(method=method, compact=False) for method in METHODS}
        return raw, call(method="linear", compact=True)

    return jax.jit(run)


def _compact_by_hand(raw: thdkit.SeqMeta) -> tuple[np.ndarray, ...]:
    """The compact format from the raw one, by its definition (positive seqlens to the front)."""

    def to_front(seqlens):
        out = np.zeros_like(seqlens)
        for src, dst in zip(
            seqlens.reshape(-1, seqlens.shape[-1]), out.reshape(-1, out.shape[-1]), strict=True
        ):
            kept = src[src > 0]
            dst[: len(kept)] = kept
        return out

    return to_front(np.asarray(raw.q_seqlens)), to_front(np.asarray(raw.kv_seqlens))


def assert_methods_agree(mask, num_segments, ids_q, pos_q, ids_kv=None, pos_kv=None):
    """All methods equal dense (raw), and compact metadata is the raw one compacted.

    The three methods share the compaction step, so the compact format is checked on one of
    them. Returns the compact metadata.
    """
    self_attention = ids_kv is None
    args = (ids_q, pos_q) if self_attention else (ids_q, pos_q, ids_kv, pos_kv)
    raw, compact = _all_methods(mask, num_segments, self_attention)(*args)
    want = raw["dense"]
    for method in ("linear", "one_hot"):
        for field, g, w in zip(want._fields, raw[method], want, strict=True):
            np.testing.assert_array_equal(g, w, err_msg=f"{method} {field} {mask.value}")
    q_seqlens, kv_seqlens = _compact_by_hand(want)
    np.testing.assert_array_equal(compact.q_seqlens, q_seqlens)
    np.testing.assert_array_equal(compact.kv_seqlens, kv_seqlens)
    np.testing.assert_array_equal(compact.q_offsets, want.q_offsets)
    np.testing.assert_array_equal(compact.kv_offsets, want.kv_offsets)
    return compact


# --- positions at the top of the accepted range ---------------------------------------------


def _shift_to_max_position(*positions):
    """Every position plus one constant, so that the largest becomes MAX_POSITION."""
    shift = MAX_POSITION - max(int(p.max()) for p in positions)
    return [p.astype(np.int64) + shift for p in positions]


def _assert_shift_changes_nothing(mask, num_segments, ids_q, pos_q, ids_kv=None, pos_kv=None):
    """Shifting every position of both sides by one constant, so that the largest becomes
    MAX_POSITION, changes no method's metadata, and every method still equals the reference."""
    if ids_kv is None:
        (shifted_q,) = _shift_to_max_position(pos_q)
        shifted = (ids_q, shifted_q)
    else:
        shifted_q, shifted_kv = _shift_to_max_position(pos_q, pos_kv)
        shifted = (ids_q, shifted_q, ids_kv, shifted_kv)
    # Shifted layouts stay inside the accepted range: eager validation passes.
    for ids, pos in zip(shifted[::2], shifted[1::2], strict=True):
        thdkit.validate_layout(ids, pos, max_segments_per_seq=num_segments, mask_type=mask)
    shifted = [a.astype(np.int32) for a in shifted]
    assert_methods_agree(mask, num_segments, *shifted)  # every method equals the reference
    args = (ids_q, pos_q) if ids_kv is None else (ids_q, pos_q, ids_kv, pos_kv)
    before, _ = _all_methods(mask, num_segments, ids_kv is None)(*args)
    after, _ = _all_methods(mask, num_segments, ids_kv is None)(*shifted)
    for method in METHODS:
        for field, a, b in zip(before[method]._fields, before[method], after[method], strict=True):
            np.testing.assert_array_equal(a, b, err_msg=f"{method} {field} {mask.value}")


SELF_SHAPE = (2, 2, 24)  # two batch dims: B > 1 and extra leading dims in every example
Q_SHAPE, KV_SHAPE = (2, 16), (2, 28)


@PROPERTY_SETTINGS
@given(
    mask=st.sampled_from(ALL_MASKS),
    layout=batches(shape=SELF_SHAPE, max_segments=S),
    shift=st.booleans(),
)
def test_self_attention(mask, layout, shift):
    # shift: also with positions moved to the top of the accepted range.
    check = _assert_shift_changes_nothing if shift else assert_methods_agree
    check(mask, S, *layout)


@PROPERTY_SETTINGS
@given(
    mask=st.sampled_from(ALL_MASKS),
    q=batches(shape=Q_SHAPE, max_segments=4),
    kv=batches(shape=KV_SHAPE, max_segments=4),
    shift=st.booleans(),
)
def test_cross_attention_with_loose_max_segments(mask, q, kv, shift):
    # T_q != T_kv, and S above the largest id (S = 6 with ids <= 4).
    check = _assert_shift_changes_nothing if shift else assert_methods_agree
    check(mask, S, *q, *kv)


@settings(PROPERTY_SETTINGS, max_examples=100)
@given(
    mask=st.sampled_from(ALL_MASKS),
    seed=st.integers(0, 2**32 - 1),
    reorder=st.sampled_from(
        [("striped", 2, 1), ("striped", 4, 1), ("striped", 2, 2), ("striped", 2, 4),
         ("striped", 4, 2), ("dual_chunk_swap", 2, 0), ("dual_chunk_swap", 4, 0)]
    ),
)  # fmt: skip
def test_every_ring_step(mask, seed, reorder):
    kind, cp, stripe = reorder
    rng = np.random.default_rng(seed)
    ids, pos = packed_segments(rng, batch=2, seq_len=32, max_segments=int(rng.integers(1, 5)))
    if kind == "striped":
        ids, pos = striped(ids, cp=cp, stripe_size=stripe), striped(pos, cp=cp, stripe_size=stripe)
    else:
        ids, pos = dual_chunk_swap(ids, cp=cp), dual_chunk_swap(pos, cp=cp)
    assert_methods_agree(mask, 4, *_all_ring_steps(ids, pos, cp=cp))


def _all_ring_steps(ids, pos, *, cp):
    """All cp x cp ring steps (ids_q, pos_q, ids_kv, pos_kv), stacked as leading dims [cp, cp]."""
    steps = [ring_step(ids, pos, cp=cp, q_rank=i, kv_rank=j) for i in range(cp) for j in range(cp)]
    return [np.stack(parts).reshape(cp, cp, *parts[0].shape) for parts in zip(*steps, strict=True)]


@settings(PROPERTY_SETTINGS, max_examples=60)
@given(mask=st.sampled_from(ALL_MASKS), layout=batches(shape=SELF_SHAPE, max_segments=S))
def test_dense_equals_loop_reference(mask, layout):
    """The dense method itself against allowed[] computed by loops, straight from the spec."""
    ids, pos = (a.reshape(-1, SELF_SHAPE[-1]) for a in layout)
    raw, _ = _all_methods(mask, S, True)(*layout)
    q_seqlens = np.asarray(raw["dense"].q_seqlens).reshape(-1, S)
    q_offsets = np.asarray(raw["dense"].q_offsets).reshape(-1, S + 1)
    for b in range(ids.shape[0]):
        row_ids = np.where(np_allowed(ids[b], pos[b], ids[b], pos[b], mask).any(axis=1), ids[b], 0)
        np.testing.assert_array_equal(q_seqlens[b], [np.sum(row_ids == s) for s in range(1, S + 1)])
        starts = [i for i, v in enumerate(row_ids) if v and (i == 0 or v != row_ids[i - 1])]
        np.testing.assert_array_equal(q_offsets[b], starts + [-1] * (S + 1 - len(starts)))


# --- a varlen kernel reading compact metadata reproduces allowed[] -------------------------

KERNEL_MASKS = [MaskType.PADDING, MaskType.PADDING_CAUSAL, MaskType.PADDING_CAUSAL_BOTTOM_RIGHT]


def _assert_kernel_reproduces_allowed(mask, num_segments, ids_q, pos_q, ids_kv, pos_kv):
    meta = assert_methods_agree(mask, num_segments, ids_q, pos_q, ids_kv, pos_kv)
    for b in range(ids_q.shape[0]):
        allowed = np_allowed(ids_q[b], pos_q[b], ids_kv[b], pos_kv[b], mask)
        read = kernel_reading([m[b] for m in meta], ids_q.shape[-1], ids_kv.shape[-1], mask)
        np.testing.assert_array_equal(read, allowed)


@pytest.mark.parametrize("mask", KERNEL_MASKS, ids=lambda m: m.value)
@pytest.mark.parametrize("seed", range(12))
def test_kernel_reading_self_and_cross(mask, seed):
    rng = np.random.default_rng(seed)
    ids, pos = packed_segments(rng, batch=4, seq_len=SELF_SHAPE[-1], max_segments=S)
    meta = assert_methods_agree(mask, S, ids.reshape(SELF_SHAPE), pos.reshape(SELF_SHAPE))
    _assert_kernel_reading(mask, meta, ids, pos, ids, pos)
    cross = cross_segments(
        rng, batch=2, seq_len_q=Q_SHAPE[-1], seq_len_kv=KV_SHAPE[-1], max_segments=4
    )
    _assert_kernel_reading(mask, assert_methods_agree(mask, S, *cross), *cross)


@pytest.mark.parametrize("mask", KERNEL_MASKS, ids=lambda m: m.value)
@pytest.mark.parametrize("seed", range(6))
def test_kernel_reading_striped_stripe_one_ring_steps(mask, seed):
    rng = np.random.default_rng(seed)
    ids, pos = packed_segments(rng, batch=2, seq_len=32, max_segments=4)
    steps = _all_ring_steps(striped(ids, cp=4), striped(pos, cp=4), cp=4)
    meta = assert_methods_agree(mask, 4, *steps)
    flat = [a.reshape(-1, a.shape[-1]) for a in steps]
    _assert_kernel_reading(mask, meta, *flat)


def _assert_kernel_reading(mask, meta, ids_q, pos_q, ids_kv, pos_kv):
    """For each row of 2-D layouts, the kernel's reading of ``meta`` equals allowed[]."""
    rows = [np.asarray(m).reshape(ids_q.shape[0], -1) for m in meta]
    for b in range(ids_q.shape[0]):
        allowed = np_allowed(ids_q[b], pos_q[b], ids_kv[b], pos_kv[b], mask)
        read = kernel_reading([m[b] for m in rows], ids_q.shape[-1], ids_kv.shape[-1], mask)
        np.testing.assert_array_equal(read, allowed)
