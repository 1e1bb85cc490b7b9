"""Shared O(T) steps: per-id extrema, the threshold search, row gathers, compaction."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thdkit._src.counting import (
    compact,
    count_and_offsets,
    first_at_least,
    gather_rows,
    segment_extrema,
)
from thdkit._src.limits import MAX_POSITION

INT32 = np.iinfo(np.int32)
N, T, S = 3, 16, 5


def np_segment_extrema(ids, values, num_segments):
    """Per row and id 0..S, min and max of values by a loop; int32 max / min where absent."""
    low = np.full((ids.shape[0], num_segments + 1), INT32.max, np.int64)
    high = np.full((ids.shape[0], num_segments + 1), INT32.min, np.int64)
    for n in range(ids.shape[0]):
        for i, v in zip(ids[n], values[n], strict=True):
            if 0 <= i <= num_segments:
                low[n, i] = min(low[n, i], v)
                high[n, i] = max(high[n, i], v)
    return low, high


_extrema = jax.jit(segment_extrema, static_argnames="num_segments")


@settings(max_examples=60, deadline=None)
@given(
    ids=st.lists(st.integers(-2, S + 2), min_size=N * T, max_size=N * T),
    values=st.lists(st.integers(INT32.min + 1, INT32.max), min_size=N * T, max_size=N * T),
)
def test_segment_extrema_match_a_loop(ids, values):
    # Ids outside [0, S] (here -2..-1 and S+1..S+2) are dropped, never counted in another row.
    ids = np.array(ids, np.int32).reshape(N, T)
    values = np.array(values, np.int32).reshape(N, T)
    low, high = _extrema(jnp.asarray(ids), jnp.asarray(values), num_segments=S)
    want_low, want_high = np_segment_extrema(ids, values, S)
    assert low.dtype == high.dtype == jnp.int32
    np.testing.assert_array_equal(low, want_low)
    np.testing.assert_array_equal(high, want_high)


def test_segment_extrema_ids_beyond_s_do_not_spill_into_the_next_row():
    ids = jnp.array([[S + 1, 1], [0, 0]])
    low, high = segment_extrema(ids, jnp.array([[7, 3], [1, 2]]), num_segments=S)
    np.testing.assert_array_equal(low[1], [1] + [INT32.max] * S)
    np.testing.assert_array_equal(high[1], [2] + [INT32.min] * S)
    assert low[0, 1] == high[0, 1] == 3


def test_segment_extrema_is_one_scatter_over_the_flattened_rows():
    """One scatter-max, indexed by one bin per token: no vmapped scatter, no [N*T, 2] indices."""
    jaxpr = jax.make_jaxpr(lambda i, v: segment_extrema(i, v, num_segments=S))(
        jnp.zeros((N, T), jnp.int32), jnp.zeros((N, T), jnp.int32)
    )
    scatters = [e for e in jaxpr.eqns if e.primitive.name.startswith("scatter")]
    assert [e.primitive.name for e in scatters] == ["scatter-max"]
    assert scatters[0].invars[1].aval.shape == (N * T, 1)


def test_segment_extrema_empty_batch():
    low, high = segment_extrema(
        jnp.zeros((0, T), jnp.int32), jnp.zeros((0, T), jnp.int32), num_segments=S
    )
    assert low.shape == high.shape == (0, S + 1)


def np_first_at_least(pos, lo, hi, threshold):
    out = np.empty_like(lo)
    for n in range(lo.shape[0]):
        for k in range(lo.shape[1]):
            found = [i for i in range(lo[n, k], hi[n, k]) if pos[n, i] >= threshold[n, k]]
            out[n, k] = found[0] if found else max(hi[n, k], lo[n, k])
    return out


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    stride=st.integers(1, 4),
    start=st.sampled_from([0, 5, MAX_POSITION - 64]),
)
def test_first_at_least_far_thresholds_do_not_overflow(data, stride, start):
    # Positions up to MAX_POSITION and thresholds across the whole int32 range.
    pos = np.broadcast_to(start + stride * np.arange(T, dtype=np.int64), (N, T)).copy()
    if data.draw(st.booleans()):  # not affine: the exact search runs
        pos[:, T // 2 :] += 7
    pos = np.minimum(pos, MAX_POSITION).astype(np.int32)
    bounds = st.lists(st.integers(0, T), min_size=2, max_size=2).map(sorted)
    ranges = np.array([[data.draw(bounds) for _ in range(4)] for _ in range(N)])
    lo, hi = ranges[..., 0].astype(np.int32), ranges[..., 1].astype(np.int32)
    threshold = np.array(
        data.draw(
            st.lists(
                st.one_of(
                    st.integers(INT32.min + MAX_POSITION + 1, INT32.max),
                    st.integers(start - 8, start + stride * T + 8),
                ),
                min_size=N * 4,
                max_size=N * 4,
            )
        ),
        np.int32,
    ).reshape(N, 4)
    got = jax.jit(first_at_least)(pos, lo, hi, threshold)
    np.testing.assert_array_equal(got, np_first_at_least(pos, lo, hi, threshold))


def test_gather_rows():
    values = jnp.arange(12).reshape(3, 4)
    np.testing.assert_array_equal(
        gather_rows(values, jnp.array([[[3, 0]], [[1, 1]], [[0, 2]]])),
        [[[3, 0]], [[5, 5]], [[8, 10]]],
    )
    assert gather_rows(jnp.zeros((0, 4), jnp.int32), jnp.zeros((0, 2), jnp.int32)).shape == (0, 2)


@pytest.mark.parametrize("size", [1, 3, 6])
def test_compact_keeps_order_and_drops_beyond_size(size):
    values = jnp.array([4, 5, 6, 7, 8])
    keep = jnp.array([True, False, True, True, False])
    want = ([4, 6, 7] + [-1] * size)[:size]
    np.testing.assert_array_equal(compact(values, keep, size=size, fill=-1), want)


def test_count_and_offsets_ignores_padding_and_counts_every_run():
    seqlens, offsets = count_and_offsets(jnp.array([0, 2, 2, 0, 3, 3, 3, 1]), num_segments=3)
    np.testing.assert_array_equal(seqlens, [1, 2, 3])
    np.testing.assert_array_equal(offsets, [1, 4, 7, -1])
