"""Segments: the converters against plain NumPy loops, the pytree through transforms, errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from thdkit import reorder
from thdkit.segments import Segments, segment_counts

from .strategies import batches, np_run_lengths

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SHAPE = (2, 16)


def np_positions_in_runs(ids: np.ndarray) -> np.ndarray:
    """Index of each token inside its run of equal non-zero ids, 0 on padding (a loop)."""
    out = np.zeros_like(ids)
    for t in range(1, len(ids)):
        if ids[t] != 0 and ids[t] == ids[t - 1]:
            out[t] = out[t - 1] + 1
    return out


@st.composite
def document_lengths(draw, *, seq_len: int):
    """Lengths (>= 0, empty documents included) of documents that fit in ``seq_len`` tokens."""
    lengths = draw(st.lists(st.integers(0, 5), min_size=1, max_size=6))
    kept, total = [], 0
    for n in lengths:
        if total + n > seq_len:
            break
        kept.append(n)
        total += n
    return kept


@SETTINGS
@given(layout=batches(shape=SHAPE, max_segments=5))
def test_from_ids_keeps_the_layout_and_adds_run_lengths(layout):
    ids, pos = layout
    seg = Segments.from_ids(ids, pos)
    np.testing.assert_array_equal(seg.ids, ids)
    np.testing.assert_array_equal(seg.positions, pos)
    np.testing.assert_array_equal(seg.lengths, np.stack([np_run_lengths(r) for r in ids]))
    assert seg.seq_len == SHAPE[-1] and seg.batch_shape == SHAPE[:-1]


@SETTINGS
@given(layout=batches(shape=SHAPE, max_segments=5))
def test_default_positions_count_inside_each_document(layout):
    ids, _ = layout
    seg = Segments.from_ids(ids)
    np.testing.assert_array_equal(seg.positions, np.stack([np_positions_in_runs(r) for r in ids]))


@SETTINGS
@given(layout=batches(shape=SHAPE, max_segments=5))
def test_padding_id_minus_one_is_a_shift(layout):
    ids, pos = layout
    shifted = Segments.from_ids(ids - 1, pos, padding_id=-1)
    plain = Segments.from_ids(ids, pos)
    for a, b in zip(jax.tree.leaves(shifted), jax.tree.leaves(plain), strict=True):
        np.testing.assert_array_equal(a, b)


@SETTINGS
@given(lengths=document_lengths(seq_len=16))
def test_from_cu_seqlens_matches_a_loop(lengths):
    total_len = 18  # One shape for every example: cu_seqlens padded with empty documents.
    lengths = lengths + [0] * (6 - len(lengths))
    cu = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32)
    ids = np.zeros(total_len, np.int32)
    pos = np.zeros(total_len, np.int32)
    for k, n in enumerate(lengths):
        ids[cu[k] : cu[k] + n] = k + 1
        pos[cu[k] : cu[k] + n] = np.arange(n)
    seg = Segments.from_cu_seqlens(cu, total_len=total_len)
    np.testing.assert_array_equal(seg.ids, ids[None])
    np.testing.assert_array_equal(seg.positions, pos[None])
    np.testing.assert_array_equal(seg.lengths, np_run_lengths(ids)[None])


def test_from_cu_seqlens_batched_and_under_jit():
    cu = jnp.array([[0, 2, 2, 5], [0, 1, 3, 3]])
    eager = Segments.from_cu_seqlens(cu, total_len=6)
    traced = jax.jit(Segments.from_cu_seqlens, static_argnames="total_len")(cu, total_len=6)
    np.testing.assert_array_equal(eager.ids, [[1, 1, 3, 3, 3, 0], [1, 2, 2, 0, 0, 0]])
    np.testing.assert_array_equal(eager.positions, [[0, 1, 0, 1, 2, 0], [0, 0, 1, 0, 0, 0]])
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(traced), strict=True):
        np.testing.assert_array_equal(a, b)


@SETTINGS
@given(lengths=document_lengths(seq_len=16))
def test_from_positions_inverts_numbering(lengths):
    lengths = [n for n in lengths if n > 0]
    lengths.append(16 - sum(lengths))  # One shape (T = 16) for every example.
    position_ids = np.concatenate([np.arange(n) for n in lengths]).astype(np.int32)
    seg = Segments.from_positions(position_ids)
    expected = np.concatenate([np.full(n, k + 1) for k, n in enumerate(lengths)])
    np.testing.assert_array_equal(seg.ids, expected)
    np.testing.assert_array_equal(seg.positions, position_ids)
    np.testing.assert_array_equal(seg.lengths, np_run_lengths(expected))


def test_from_positions_starts_a_document_wherever_positions_do_not_increase():
    seg = Segments.from_positions(jnp.array([[3, 4, 2, 3, 3]]))
    np.testing.assert_array_equal(seg.ids, [[1, 1, 2, 2, 3]])


def test_a_pytree_through_jit_scan_and_tree_map():
    seg = Segments.from_ids(jnp.array([[1, 1, 1, 2, 2, 0, 3, 3]]))
    out = jax.jit(lambda s: jax.tree.map(lambda a: a + 1, s))(seg)
    assert isinstance(out, Segments)
    np.testing.assert_array_equal(out.lengths, seg.lengths + 1)

    def layer(carry, _):
        return carry + jnp.sum(seg.lengths), None

    total, _ = jax.lax.scan(layer, jnp.int32(0), None, length=3)
    assert int(total) == 3 * int(np.sum(seg.lengths))
    striped = jax.tree.map(lambda a: reorder.striped(a, cp=2), seg)
    np.testing.assert_array_equal(striped.lengths, reorder.striped(seg.lengths, cp=2))


@pytest.mark.parametrize("cp", [2, 4])
@settings(SETTINGS, max_examples=15)
@given(layout=batches(shape=(2, 16), max_segments=5, strides=(1,)))
def test_global_lengths_in_shards_are_the_document_lengths(cp, layout):
    ids, pos = layout
    seg = Segments.from_ids(ids, pos)
    shards = jax.tree.map(lambda a: reorder.striped(a, cp=cp, stripe_size=2), seg)
    np.testing.assert_array_equal(_global_lengths_fn(cp)(shards).lengths, shards.lengths)


@functools.cache
def _global_lengths_fn(cp: int):
    """Each shard's lengths zeroed, then rebuilt across the shards; jitted once per cp."""
    fn = jax.shard_map(
        lambda s: Segments(s.ids, s.positions, jnp.zeros_like(s.ids)).with_global_lengths(
            axis_name="cp", max_segments_per_seq=5
        ),
        mesh=Mesh(np.array(jax.devices()[:cp]), ("cp",)),
        in_specs=P(None, "cp"),
        out_specs=P(None, "cp"),
    )
    return jax.jit(fn)


def test_segment_counts():
    counts = segment_counts(jnp.array([[1, 1, 0, 2, 7], [0, 0, 0, 0, 0]]), num_segments=2)
    np.testing.assert_array_equal(counts, [[1, 2, 1], [5, 0, 0]])


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (
            lambda: Segments.from_ids(jnp.array([1, 1, 0, 1])),
            ValueError,
            "segment_ids row 0, token 3",
        ),
        (lambda: Segments.from_ids(jnp.array([2, 1])), ValueError, "segment_ids row 0, token 1"),
        (lambda: Segments.from_ids(jnp.array([1.0, 1.0])), TypeError, "segment_ids"),
        (lambda: Segments.from_ids(jnp.array([1, 1]), jnp.array([0])), ValueError, "segment_pos"),
        (lambda: Segments.from_ids(jnp.array([1, 1]), padding_id=3), ValueError, "padding_id"),
        (lambda: Segments.from_ids(jnp.array([1, 1]), padding_id=True), TypeError, "padding_id"),
        (
            lambda: Segments.from_ids(jnp.array([0, -2]), padding_id=-1),
            ValueError,
            "segment_ids row 0, token 1",
        ),
        (
            lambda: Segments.from_cu_seqlens(jnp.array([1, 3]), total_len=4),
            ValueError,
            "cu_seqlens row 0, entry 0",
        ),
        (
            lambda: Segments.from_cu_seqlens(jnp.array([0, 3, 2]), total_len=4),
            ValueError,
            "cu_seqlens row 0, entry 2",
        ),
        (
            lambda: Segments.from_cu_seqlens(jnp.array([0, 5]), total_len=4),
            ValueError,
            "total_len=4",
        ),
        (lambda: Segments.from_cu_seqlens(jnp.array([0]), total_len=4), ValueError, "cu_seqlens"),
        (lambda: Segments.from_cu_seqlens(jnp.array([0, 2]), total_len=0), ValueError, "total_len"),
        (
            lambda: Segments.from_cu_seqlens(jnp.array([0, 2]), total_len=2.0),
            TypeError,
            "total_len",
        ),
        (
            lambda: Segments.from_cu_seqlens(np.array([0, 2**33]), total_len=4),
            ValueError,
            "cu_seqlens",
        ),
        (lambda: Segments.from_positions(jnp.array([0, -1])), ValueError, "position_ids"),
    ],
)
def test_errors_name_the_parameter(call, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(")):
        call()
