"""The balanced reorder: a permutation per row, valid shards, whole documents, balanced work, and
context-parallel attention on balanced rows equal to single-device attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh

import thdkit
from thdkit import Segments
from thdkit.context_parallel import ring_schedule
from thdkit.reorder import balance, permute, striped, token_work, unpermute

T, CP = 64, 4


def _row(lengths: list[int], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """One packed row of documents of ``lengths`` (then padding): ids and positions."""
    ids = np.concatenate([np.full(n, d + 1) for d, n in enumerate(lengths)] + [np.zeros(0)])
    pos = np.concatenate([np.arange(n) for n in lengths] + [np.zeros(0)])
    pad = seq_len - ids.size
    return (
        np.concatenate([ids, np.zeros(pad)]).astype(np.int32),
        np.concatenate([pos, np.zeros(pad)]).astype(np.int32),
    )


@st.composite
def rows(draw, seq_len: int = T, batch: int = 2):
    """Rows of documents of random lengths filling part or all of T."""
    ids, pos = [], []
    for _ in range(batch):
        lengths, room = [], seq_len
        while (room and draw(st.booleans())) or not lengths:
            n = draw(st.integers(1, room))
            lengths.append(n)
            room -= n
            if not room:
                break
        row_ids, row_pos = _row(lengths, seq_len)
        ids.append(row_ids)
        pos.append(row_pos)
    return np.stack(ids), np.stack(pos)


def _rank_of(order: np.ndarray, cp: int) -> np.ndarray:
    """int[B, T]: the rank each original token goes to."""
    rank = np.empty_like(order)
    n = order.shape[1] // cp
    for b in range(order.shape[0]):
        rank[b, order[b]] = np.arange(order.shape[1]) // n
    return rank


@settings(max_examples=60, deadline=None)
@given(rows(), st.sampled_from(["padding_causal", "padding", "causal"]))
def test_permutation_valid_shards_and_inverse(layout, mask_type):
    ids, pos = layout
    result = balance(ids, pos, cp=CP, mask_type=mask_type)
    order = result.order
    assert order.dtype == np.int32 and order.shape == ids.shape
    for row in order:
        assert sorted(row.tolist()) == list(range(T))
    shard_ids, shard_pos = result.segment_ids, result.segment_pos
    np.testing.assert_array_equal(shard_pos, permute(pos, order))
    # The same documents, relabelled: equal old ids <=> equal new ids, padding stays padding.
    old_ids = permute(ids, order)
    np.testing.assert_array_equal(shard_ids == 0, old_ids == 0)
    for b in range(ids.shape[0]):
        pairs = {(int(o), int(n)) for o, n in zip(old_ids[b], shard_ids[b], strict=True) if o}
        assert len({o for o, _ in pairs}) == len({n for _, n in pairs}) == len(pairs)
    for rank in range(CP):
        part = slice(rank * T // CP, (rank + 1) * T // CP)
        # Each shard is a valid layout on its own (positions increasing in each document).
        thdkit.validate_layout(
            np.ascontiguousarray(shard_ids[:, part]), np.ascontiguousarray(shard_pos[:, part]),
            max_segments_per_seq=None, mask_type=mask_type,
        )  # fmt: skip
    np.testing.assert_array_equal(unpermute(old_ids, order), ids)
    np.testing.assert_array_equal(unpermute(shard_pos, order), pos)


def test_short_documents_stay_whole_and_balanced():
    """Many short documents: none is cut, and the ranks' work is within 10% of the mean."""
    rng = np.random.default_rng(0)
    seq_len, cp = 4096, 4
    lengths = []
    while sum(lengths) < seq_len - 256:
        lengths.append(int(rng.integers(16, 200)))
    ids, pos = _row(lengths, seq_len)
    ids, pos = ids[None], pos[None]
    order = balance(ids, pos, cp=cp).order
    rank = _rank_of(order, cp)
    for doc in range(1, ids.max() + 1):
        assert np.unique(rank[ids == doc]).size == 1, f"document {doc} was cut"
    work = permute(token_work(ids, pos), order).reshape(cp, -1).sum(-1)
    assert work.max() <= 1.10 * work.mean()


def _striped_order(ids: np.ndarray, cp: int, tile: int) -> np.ndarray:
    """Each row's documents in order, then its padding, striped in stripes of a tile (or of the
    largest divisor of the shard's length below it)."""
    seq_len = ids.shape[1]
    stripe = int(np.gcd(tile, seq_len // cp))
    rows = []
    for row in ids:
        tokens = np.r_[np.flatnonzero(row != 0), np.flatnonzero(row == 0)]
        rows.append(striped(tokens, cp=cp, stripe_size=stripe))
    return np.stack(rows)


@settings(max_examples=60, deadline=None)
@given(rows(), st.sampled_from([1, 2, 4]), st.sampled_from([0.0, 0.05, 0.5]))
def test_documents_whole_cut_at_a_bound_or_spread(layout, tile, spread_tolerance):
    """Per row, the order is the striped one, or each document is whole on one rank, cut at
    the bounds of consecutive ranks in position order (its first part on the lower rank;
    skipping only ranks that spread documents fill), or spread over every rank; and the busiest
    rank's work is never more than the excess over the striped order's."""
    ids, pos = layout
    result = balance(ids, pos, cp=CP, tile=tile, spread_tolerance=spread_tolerance)
    rank = _rank_of(result.order, CP)
    stripes = _striped_order(ids, CP, tile)
    work = token_work(ids, pos)
    for b in range(ids.shape[0]):
        busiest = work[b, result.order[b]].reshape(CP, -1).sum(-1).max()
        # The excess is at most the larger of the two tolerances (0.05 and spread_tolerance).
        excess = max(0.05, spread_tolerance)
        assert busiest <= (1 + excess) * work[b, stripes[b]].reshape(CP, -1).sum(-1).max()
        if np.array_equal(result.order[b], stripes[b]):
            continue
        docs = range(1, ids[b].max() + 1)
        spread = {d for d in docs if np.unique(rank[b, ids[b] == d]).size == CP}
        # Ranks that the spread documents' shares fill hold no other token: skipped by a cut.
        full = {r for r in range(CP) if np.isin(ids[b, rank[b] == r], list(spread)).all()}
        for doc in set(docs) - spread:
            ranks = rank[b, ids[b] == doc]  # in position order
            assert np.all(np.diff(ranks) >= 0), f"row {b} document {doc}: {ranks}"
            between = set(range(ranks[0], ranks[-1] + 1)) - set(ranks.tolist())
            assert between <= full, f"row {b} document {doc}: {ranks}"


def _unchecked(ids: np.ndarray, pos: np.ndarray) -> Segments:
    """A reordered layout as the ring reads it (shard by shard; the lengths are recomputed)."""
    return Segments(ids, pos, np.zeros_like(ids))


@pytest.mark.parametrize("cp", [4, 8])
def test_rows_of_short_documents_need_one_ring_step(cp):
    """Full rows of documents up to T / (2 cp) long: whole or cut at a bound, so that a causal
    ring needs step 1 at most (a striped order needs every step)."""
    rng = np.random.default_rng(cp)
    seq_len = 4096
    rows_ = []
    for _ in range(3):
        lengths = []
        while sum(lengths) < seq_len:
            lengths.append(int(rng.integers(1, seq_len // (2 * cp) + 1)))
        lengths[-1] -= sum(lengths) - seq_len
        rows_.append(_row([n for n in lengths if n], seq_len))
    ids, pos = np.stack([r[0] for r in rows_]), np.stack([r[1] for r in rows_])
    result = balance(ids, pos, cp=cp)
    steps = np.asarray(
        ring_schedule(q_segments=_unchecked(result.segment_ids, result.segment_pos), cp=cp,
                      max_segments_per_seq=int(result.segment_ids.max()))
    ).any(axis=(0, 1))  # fmt: skip
    assert steps[1] and not steps[2:].any(), steps
    plain = np.asarray(
        ring_schedule(q_segments=_unchecked(*(striped(x, cp=cp) for x in (ids, pos))),
                      cp=cp, max_segments_per_seq=int(ids.max()))
    ).any(axis=(0, 1))  # fmt: skip
    assert plain.all()


@pytest.mark.parametrize("mask_type", ["padding_causal", "padding"])
def test_one_long_document_is_spread_evenly(mask_type):
    ids, pos = _row([1024], 1024)
    order = balance(ids[None], pos[None], cp=4, mask_type=mask_type).order
    work = permute(token_work(ids[None], pos[None], mask_type=mask_type), order)
    per_rank = work.reshape(4, -1).sum(-1)
    assert per_rank.max() <= 1.01 * per_rank.mean()


def test_permute_any_feature_numpy_and_jax():
    ids, pos = _row([5, 7, 3], 16)
    order = balance(ids[None], pos[None], cp=2).order
    x = np.arange(16 * 3 * 2, dtype=np.float32).reshape(1, 16, 3, 2)
    for arr in (x, jnp.asarray(x)):
        back = unpermute(permute(arr, order), order)
        np.testing.assert_array_equal(np.asarray(back), x)
    heads_first = np.moveaxis(x, 1, 2)  # [B, H, T, D]
    np.testing.assert_array_equal(
        permute(heads_first, order, axis=2), np.moveaxis(permute(x, order), 1, 2)
    )


def test_errors():
    ids, _ = _row([5, 7], 12)
    with pytest.raises(ValueError, match="multiple of cp=5"):
        balance(ids[None], cp=5)
    with pytest.raises(TypeError, match="cp"):
        balance(ids[None], cp=2.0)
    with pytest.raises(ValueError, match="tolerance"):
        balance(ids[None], cp=2, tolerance=-1)
    broken = np.array([[1, 1, 2, 1]])  # document 1 in two runs
    with pytest.raises(ValueError, match="segment_ids"):
        balance(broken, cp=2)


@pytest.mark.parametrize("strategy", ["ring", "all_gather", "all_to_all"])
def test_context_parallel_on_balanced_rows_equals_single_device(strategy):
    """Outputs and gradients on balanced rows, unpermuted, equal single-device attention."""
    cp = 4
    ids = np.stack([_row([20, 9, 30, 5], 64)[0], _row([64], 64)[0]])
    pos = np.stack([_row([20, 9, 30, 5], 64)[1], _row([64], 64)[1]])
    rng = np.random.default_rng(1)
    q, k, v, w = (rng.standard_normal((2, 64, 4, 8)).astype(np.float32) for _ in range(4))
    result = balance(ids, pos, cp=cp)
    order = result.order
    mesh = Mesh(np.array(jax.devices()[:cp]), ("cp",))

    def single(q, k, v):
        out = thdkit.attention(
            q, k, v, segment_ids_q=ids, segment_pos_q=pos, max_segments_per_seq=4
        )
        return jnp.sum(out * w), out

    def balanced(q, k, v):
        seg = Segments(result.segment_ids, result.segment_pos, np.zeros_like(ids))
        out = thdkit.context_parallel_attention(
            *(permute(x, order) for x in (q, k, v)), q_segments=seg, mask_type="padding_causal",
            max_segments_per_seq=4, mesh=mesh, axis_name="cp", strategy=strategy,
        )  # fmt: skip
        out = unpermute(out, order)
        return jnp.sum(out * w), out

    (_, want), want_grads = jax.value_and_grad(single, (0, 1, 2), has_aux=True)(q, k, v)
    (_, got), got_grads = jax.value_and_grad(balanced, (0, 1, 2), has_aux=True)(q, k, v)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    for g, h in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, h, atol=1e-5, rtol=1e-5)
