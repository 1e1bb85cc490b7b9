"""is_representable against an emulated varlen kernel reading compact metadata."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from thdkit._src import reorder, synth
from thdkit._src.kernels.representable import representable_rows
from thdkit._src.mask_types import MaskType
from thdkit._src.metadata import seqlens_and_offsets
from thdkit._src.segments import Segments
from thdkit.kernels import is_representable

from .strategies import ALL_MASKS, ATTN_S, ATTN_T, batches, kernel_reading, np_allowed

S, T = ATTN_S, ATTN_T

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
    got = representable_rows(
        Segments.from_ids(jnp.asarray(q[0]), jnp.asarray(q[1])),
        Segments.from_ids(jnp.asarray(kv[0]), jnp.asarray(kv[1])),
        mask_type=mask,
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
