"""Tile ranges and key spans: every allowed pair lies in a visited tile, short documents visit few
tiles, and huge positions and window bounds stay inside int32."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from thdkit._src import synth
from thdkit._src.host import NUMPY
from thdkit._src.kernels.tiles import kv_spans
from thdkit._src.mask_types import MaskType
from thdkit._src.masks import pair_mask
from thdkit._src.segments import Segments, run_lengths
from thdkit.kernels import tile_ranges

from .strategies import ALL_MASKS, batches


def test_tile_ranges_cover_every_allowed_pair_and_track_document_sizes():
    """Visited tiles hold every allowed pair; packing many short documents visits few tiles."""
    seq, block = 512, 32

    @functools.partial(jax.jit, static_argnames=("mask", "window"))
    def ranges_and_mask(ids, pos, mask, window):
        seg = Segments(ids, pos, run_lengths(ids))
        blocks = dict(block_q=block, block_kv=block)
        ranges = tile_ranges(seg, seg, mask_type=mask, window_size=window, **blocks)
        allowed = pair_mask(seg, seg, mask_type=mask, window_size=window)
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


SPAN_SHAPE = (2, 24)
MAX_POSITION = 2**30 - 1


@functools.partial(jax.jit, static_argnames=("mask", "window"))
def _spans_and_mask(ids_q, pos_q, ids_kv, pos_kv, *, mask, window):
    q = Segments(ids_q, pos_q, run_lengths(ids_q))
    kv = Segments(ids_kv, pos_kv, run_lengths(ids_kv))
    tokens = jax.numpy.broadcast_to(jax.numpy.arange(ids_q.shape[-1]), ids_q.shape)
    lo, hi = kv_spans(tokens, q, kv, mask_type=mask, window_size=window)
    return lo, hi, pair_mask(q, kv, mask_type=mask, window_size=window)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mask=st.sampled_from([m for m in ALL_MASKS if m.uses_positions]),
    window=st.sampled_from([None, (2, None), (2**31 - 2, None), (2**30, 0)]),
    q=batches(shape=SPAN_SHAPE, max_segments=3),
    kv=batches(shape=SPAN_SHAPE, max_segments=3),
    shift=st.sampled_from([0, None]),
)
def test_kv_spans_are_the_allowed_keys_even_at_the_largest_positions(mask, window, q, kv, shift):
    """For causal and bottom-right types the span of each query token is exactly its allowed
    keys; shifting every position so the largest is 2**30 - 1 changes nothing."""
    (ids_q, pos_q), (ids_kv, pos_kv) = q, kv
    if shift is None:
        shift = MAX_POSITION - int(max(pos_q.max(), pos_kv.max()))
    lo, hi, allowed = _spans_and_mask(
        ids_q, pos_q + shift, ids_kv, pos_kv + shift, mask=mask, window=window
    )
    lo, hi, allowed = (np.asarray(x) for x in (lo, hi, allowed))
    keys = np.arange(SPAN_SHAPE[1])
    spans = (keys >= lo[..., None]) & (keys < hi[..., None])
    np.testing.assert_array_equal(spans, allowed)


@functools.partial(jax.jit, static_argnames=("mask", "window", "block_q", "block_kv"))
def _device_ranges(ids_q, pos_q, ids_kv, pos_kv, *, mask, window, block_q, block_kv):
    q = Segments(ids_q, pos_q, run_lengths(ids_q))
    kv = Segments(ids_kv, pos_kv, run_lengths(ids_kv))
    ranges = tile_ranges(q, kv, mask_type=mask, window_size=window, block_q=block_q,
                         block_kv=block_kv)  # fmt: skip
    return ranges.lo, ranges.hi


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mask=st.sampled_from(ALL_MASKS),
    window=st.sampled_from([None, (2, None), (5, 0), (2**30, 0)]),
    blocks=st.sampled_from([(4, 4), (8, 4), (32, 32)]),
    q=batches(shape=SPAN_SHAPE, max_segments=4),
    kv=batches(shape=SPAN_SHAPE, max_segments=4),
    same=st.booleans(),
)
def test_tile_ranges_on_the_host_equal_the_device_ones(mask, window, blocks, q, kv, same):
    """NumPy tile ranges (what eager calls and plans compute on host layouts) are the device's,
    bit for bit, for every mask type, window and tile size, self- and cross-attention."""
    window = window if mask.uses_positions else None
    kv = q if same else kv
    block_q, block_kv = blocks
    host = tile_ranges(
        Segments(*q, run_lengths(q[0])),
        Segments(*kv, run_lengths(kv[0])),
        mask_type=mask,
        window_size=window,
        block_q=block_q,
        block_kv=block_kv,
        ops=NUMPY,
    )
    assert isinstance(host.lo, np.ndarray) and host.lo.dtype == np.int32
    lo, hi = _device_ranges(*q, *kv, mask=mask, window=window, block_q=block_q, block_kv=block_kv)
    np.testing.assert_array_equal(host.lo, np.asarray(lo))
    np.testing.assert_array_equal(host.hi, np.asarray(hi))
    assert (host.num_kv_tiles, host.block_q, host.block_kv) == (
        -(-SPAN_SHAPE[1] // block_kv),
        block_q,
        block_kv,
    )
