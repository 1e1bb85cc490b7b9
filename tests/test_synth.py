"""Layout generators."""

from __future__ import annotations

import numpy as np
import pytest

import thdkit
from thdkit._src import reorder, synth
from thdkit._src.synth import cross_segments, filled_segments, packed_segments


@pytest.mark.parametrize("seed", range(5))
def test_packed_segments_follow_the_generator_distribution(seed):
    ids, pos = packed_segments(
        np.random.default_rng(seed), batch=4, seq_len=256, max_segments=8, min_len=2
    )
    assert ids.shape == pos.shape == (4, 256) and ids.dtype == np.int32
    thdkit.validate_layout(ids, pos, max_segments_per_seq=8, mask_type="causal")
    for row_ids, row_pos in zip(ids, pos, strict=True):
        lengths = np.bincount(row_ids, minlength=9)[1:]
        assert np.all((lengths == 0) | (lengths >= 2))
        assert np.all(lengths <= 256 // 8)
        # Document tokens count up from 0; trailing padding has position 0.
        for doc in np.unique(row_ids[row_ids > 0]):
            np.testing.assert_array_equal(row_pos[row_ids == doc], np.arange(lengths[doc - 1]))
        # After the last document: its tail padding keeps counting, then position 0 to the end.
        last = np.flatnonzero(row_ids)[-1]
        after = row_pos[last + 1 :]
        counting = after == row_pos[last] + 1 + np.arange(len(after))
        tail = len(after) if counting.all() else int(np.argmin(counting))
        assert np.all(after[tail:] == 0)


def test_tail_padding_keeps_counting_positions():
    ids, pos = packed_segments(np.random.default_rng(1), batch=8, seq_len=64, max_segments=4)
    # A tail token: padding right after a document, or after another tail token.
    tails = (ids[:, 1:] == 0) & (pos[:, 1:] > 0)
    assert tails.sum() > 10
    np.testing.assert_array_equal(pos[:, 1:][tails], pos[:, :-1][tails] + 1)


def test_cross_segments_kv_documents_at_least_as_long():
    ids_q, pos_q, ids_kv, pos_kv = cross_segments(
        np.random.default_rng(2), batch=4, seq_len_q=64, seq_len_kv=160, max_segments=4
    )
    thdkit.validate_layout(ids_q, pos_q, max_segments_per_seq=4)
    thdkit.validate_layout(ids_kv, pos_kv, max_segments_per_seq=4)
    for b in range(4):
        q_len = np.bincount(ids_q[b], minlength=5)[1:]
        kv_len = np.bincount(ids_kv[b], minlength=5)[1:]
        assert np.all(kv_len >= q_len)
        assert np.all((q_len > 0) == (kv_len > 0))


def test_generator_argument_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="min_len=9 exceeds seq_len // max_segments = 8"):
        packed_segments(rng, batch=1, seq_len=16, max_segments=2, min_len=9)
    with pytest.raises(ValueError, match="seq_len_kv must be >= seq_len_q"):
        cross_segments(rng, batch=1, seq_len_q=16, seq_len_kv=8, max_segments=2)


@pytest.mark.parametrize(
    ("call", "error", "pattern"),
    [
        (
            lambda rng: packed_segments(rng, batch=-1, seq_len=8, max_segments=2),
            ValueError,
            r"batch must be >= 0, got -1",
        ),
        (
            lambda rng: packed_segments(rng, batch=1, seq_len=8.0, max_segments=2),
            TypeError,
            r"seq_len must be an int, got float",
        ),
        (
            lambda rng: packed_segments(rng, batch=True, seq_len=8, max_segments=2),
            TypeError,
            r"batch must be an int, got bool",
        ),
        (
            lambda rng: packed_segments(rng, batch=1, seq_len=8, max_segments=0),
            ValueError,
            r"max_segments and min_len must be >= 1",
        ),
        (
            lambda rng: cross_segments(rng, batch=1, seq_len_q=8, seq_len_kv=None, max_segments=2),
            TypeError,
            r"seq_len_kv must be an int, got NoneType",
        ),
        (
            lambda rng: filled_segments(rng, batch=1, seq_len=8, segments=9),
            ValueError,
            r"segments must be in \[1, seq_len=8\], got 9",
        ),
        (
            lambda rng: filled_segments(rng, batch=1, seq_len=8, segments=0),
            ValueError,
            r"segments must be in \[1, seq_len=8\], got 0",
        ),
        (
            lambda rng: filled_segments(rng, batch=-2, seq_len=8, segments=2),
            ValueError,
            r"batch must be >= 0, got -2",
        ),
    ],
)
def test_generator_argument_types_and_ranges(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call(np.random.default_rng(0))


def test_generators_accept_numpy_ints_and_empty_batches():
    rng = np.random.default_rng(0)
    ids, pos = packed_segments(rng, batch=np.int64(0), seq_len=np.int32(8), max_segments=2)
    assert ids.shape == pos.shape == (0, 8)
    ids, pos = filled_segments(rng, batch=np.int64(2), seq_len=8, segments=np.int8(3))
    assert ids.shape == (2, 8) and set(np.unique(ids)) == {1, 2, 3}


def test_synth_does_not_reexport_the_reorders():
    """The reorders live in thdkit._src.reorder only (one name per idea)."""
    for name in (
        "striped",
        "unstriped",
        "dual_chunk_swap",
        "undo_dual_chunk_swap",
        "shard",
        "ring_step",
    ):
        assert not hasattr(synth, name) and callable(getattr(reorder, name))
