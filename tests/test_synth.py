"""Layout generators, CP reorders and ring-step views."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import thdkit
from thdkit.reorder import (
    dual_chunk_swap,
    ring_step,
    shard,
    striped,
    undo_dual_chunk_swap,
    unstriped,
)
from thdkit.synth import cross_segments, packed_segments


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


@pytest.mark.parametrize("cp", [1, 2, 4])
@pytest.mark.parametrize("stripe", [1, 2, 4])
def test_striped_round_trip_and_ownership(cp, stripe):
    x = np.arange(2 * 32).reshape(2, 32)
    y = striped(x, cp=cp, stripe_size=stripe)
    np.testing.assert_array_equal(unstriped(y, cp=cp, stripe_size=stripe), x)
    for rank in range(cp):
        owned = shard(y, cp=cp, rank=rank)[0]
        assert np.all((owned // stripe) % cp == rank)
        assert np.all(np.diff(owned) > 0)
    # Works for JAX arrays and any axis too.
    z = striped(jnp.asarray(x.T), cp=cp, stripe_size=stripe, axis=0)
    np.testing.assert_array_equal(z, y.T)


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_dual_chunk_swap_round_trip_and_ownership(cp):
    x = np.arange(16 * cp)
    y = dual_chunk_swap(x, cp=cp)
    np.testing.assert_array_equal(undo_dual_chunk_swap(y, cp=cp), x)
    chunk = len(x) // (2 * cp)
    for rank in range(cp):
        chunks = set(shard(y, cp=cp, rank=rank) // chunk)
        assert chunks == {rank, 2 * cp - 1 - rank}


def test_reorder_argument_errors():
    with pytest.raises(ValueError, match=r"multiple of 8, got T=12"):
        striped(np.arange(12), cp=4, stripe_size=2)
    with pytest.raises(ValueError, match=r"multiple of 8, got T=12"):
        dual_chunk_swap(np.arange(12), cp=4)
    with pytest.raises(ValueError, match="rank must be in"):
        shard(np.arange(8), cp=2, rank=2)


@pytest.mark.parametrize(
    ("reorder", "cp"),
    [
        (lambda x: striped(x, cp=4), 4),
        (lambda x: striped(x, cp=2, stripe_size=4), 2),
        (lambda x: dual_chunk_swap(x, cp=4), 4),
    ],
)
def test_ring_steps_of_reordered_layouts_are_valid(reorder, cp):
    ids, pos = packed_segments(np.random.default_rng(5), batch=3, seq_len=64, max_segments=5)
    ids, pos = reorder(ids), reorder(pos)
    for i in range(cp):
        for j in range(cp):
            ids_q, pos_q, ids_kv, pos_kv = ring_step(ids, pos, cp=cp, q_rank=i, kv_rank=j)
            assert ids_q.shape == (3, 64 // cp)
            thdkit.validate_layout(ids_q, pos_q, max_segments_per_seq=5, mask_type="causal")
            thdkit.validate_layout(ids_kv, pos_kv, max_segments_per_seq=5, mask_type="causal")
