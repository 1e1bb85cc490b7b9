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


# Cross-attention rows: queries and keys/values of the same documents, of other lengths.
TQ, TKV = 32, 64
MASK_TYPES = [
    "no_mask", "padding", "causal", "padding_causal", "causal_bottom_right",
    "padding_causal_bottom_right",
]  # fmt: skip


@st.composite
def cross_rows(draw, batch: int = 2):
    """Rows of documents (up to a row or up to a shard long) with tokens on both sides or on
    one side only (lengths 0 there), then padding, part of it moved to the front of the row."""
    sides = [[], [], [], []]
    for _ in range(batch):
        room_q, room_kv, lq, lkv = TQ, TKV, [], []
        scale = draw(st.sampled_from([1, CP]))
        for _ in range(draw(st.integers(1, 8))):
            n_q = draw(st.integers(0, min(room_q, TQ // scale)))
            n_kv = draw(st.integers(0 if n_q else 1, min(room_kv, TKV // scale))) if room_kv else 0
            if not n_q + n_kv:
                break
            lq.append(n_q)
            lkv.append(n_kv)
            room_q, room_kv = room_q - n_q, room_kv - n_kv
        for side, (lengths, seq_len) in enumerate(((lq, TQ), (lkv, TKV))):
            ids, pos = _row(lengths, seq_len)
            lead = draw(st.integers(0, seq_len - int(np.count_nonzero(ids))))
            sides[2 * side].append(np.roll(ids, lead))
            sides[2 * side + 1].append(np.roll(pos, lead))
    return tuple(np.stack(s) for s in sides)


def _check_side(ids, pos, side, cp, mask_type, tile):
    """One side of a cross balance: a permutation per row, valid shards, the inverse, and each
    document whole or on consecutive ranks in position order (or the row's striped order)."""
    seq_len = ids.shape[1]
    for row in side.order:
        assert sorted(row.tolist()) == list(range(seq_len))
    np.testing.assert_array_equal(side.segment_pos, permute(pos, side.order))
    np.testing.assert_array_equal(side.segment_ids == 0, permute(ids, side.order) == 0)
    for rank in range(cp):
        part = slice(rank * seq_len // cp, (rank + 1) * seq_len // cp)
        thdkit.validate_layout(
            np.ascontiguousarray(side.segment_ids[:, part]),
            np.ascontiguousarray(side.segment_pos[:, part]),
            max_segments_per_seq=None, mask_type=mask_type,
        )  # fmt: skip
    np.testing.assert_array_equal(unpermute(permute(ids, side.order), side.order), ids)
    np.testing.assert_array_equal(unpermute(side.segment_pos, side.order), pos)
    rank = _rank_of(side.order, cp)
    stripes = _striped_order(ids, cp, tile)
    for b in range(ids.shape[0]):
        if np.array_equal(side.order[b], stripes[b]):
            continue
        for doc in np.unique(ids[b][ids[b] != 0]):
            ranks = rank[b, ids[b] == doc]  # in position order
            assert set(np.diff(ranks).tolist()) <= {0, 1}, f"row {b} document {doc}: {ranks}"


@settings(max_examples=60, deadline=None)
@given(
    cross_rows(),
    st.sampled_from(["padding_causal", "padding", "padding_causal_bottom_right"]),
    st.sampled_from([1, 4, 128]),
)
def test_cross_rows_valid_shards_one_label_per_document(layout, mask_type, tile):
    ids_q, pos_q, ids_kv, pos_kv = layout
    q_side, kv_side = balance(
        ids_q, pos_q, cp=CP, mask_type=mask_type, tile=tile, kv_segment_ids=ids_kv,
        kv_segment_pos=pos_kv,
    )  # fmt: skip
    for side in (q_side, kv_side):
        assert isinstance(side, thdkit.reorder.Balanced) and side.order.dtype == np.int32
    _check_side(ids_q, pos_q, q_side, CP, mask_type, tile)
    _check_side(ids_kv, pos_kv, kv_side, CP, mask_type, tile)
    # One label per document, the same on both sides: equal old ids <=> equal new ids.
    work = token_work(ids_q, pos_q, mask_type=mask_type, kv_segment_ids=ids_kv,
                      kv_segment_pos=pos_kv)  # fmt: skip
    stripes = _striped_order(ids_q, CP, tile)
    for b in range(ids_q.shape[0]):
        pairs = set()
        for ids, side in ((ids_q, q_side), (ids_kv, kv_side)):
            old = permute(ids, side.order)[b]
            pairs |= {(int(o), int(n)) for o, n in zip(old, side.segment_ids[b], strict=True) if o}
        assert len({o for o, _ in pairs}) == len({n for _, n in pairs}) == len(pairs)
        # Never heavier than the striped order by more than the excess (10%).
        busiest = work[b, q_side.order[b]].reshape(CP, -1).sum(-1).max()
        assert busiest <= 1.1 * work[b, stripes[b]].reshape(CP, -1).sum(-1).max()


def _allowed_keys(ids_q, pos_q, ids_kv, pos_kv, mask_type, window):
    """The float64-free oracle: count the allowed pairs of the [T_q, T_kv] matrix of each row,
    written from the rules of docs/semantics.md (run lengths, rel, the window)."""

    def run_length(ids):
        return np.array([[np.count_nonzero(row == x) if x else 0 for x in row] for row in ids])

    rl_q, rl_kv = run_length(ids_q)[..., :, None], run_length(ids_kv)[..., None, :]
    iq, pq = ids_q[..., :, None], pos_q[..., :, None]
    ikv, pkv = ids_kv[..., None, :], pos_kv[..., None, :]
    allowed = (iq == ikv) & (iq != 0)
    left, right = window if window is not None else (None, None)
    if "bottom_right" in mask_type:
        allowed &= rl_q - pq <= rl_kv - pkv
        if left is not None:
            allowed &= (rl_kv - pkv) - (rl_q - pq) <= left
    else:
        if "causal" in mask_type:
            allowed &= pq >= pkv
        if left is not None:
            allowed &= pkv - pq >= -left
        if right is not None:
            allowed &= pkv - pq <= right
    return allowed.sum(-1)


@pytest.mark.parametrize("window", [None, (3, None), (2, 1), (0, 0), (None, 2)])
@pytest.mark.parametrize("mask_type", MASK_TYPES)
def test_cross_work_equals_the_counted_pairs(mask_type, window):
    rng = np.random.default_rng(7)
    for _ in range(5):
        lq = rng.integers(0, 9, 5).tolist()
        lkv = rng.integers(0, 15, 5).tolist()
        ids_q, pos_q = _row(lq, TQ)
        ids_kv, pos_kv = _row(lkv, TKV)
        ids_q, pos_q, ids_kv, pos_kv = (x[None] for x in (ids_q, pos_q, ids_kv, pos_kv))
        got = token_work(ids_q, pos_q, mask_type=mask_type, window_size=window,
                         kv_segment_ids=ids_kv, kv_segment_pos=pos_kv)  # fmt: skip
        want = _allowed_keys(ids_q, pos_q, ids_kv, pos_kv, mask_type, window)
        np.testing.assert_array_equal(got, want)
        # Self-attention rows: the cross count with the row as its own keys is the self model.
        self_work = token_work(ids_q, pos_q, mask_type=mask_type, window_size=window)
        cross = token_work(ids_q, pos_q, mask_type=mask_type, window_size=window,
                           kv_segment_ids=ids_q)  # fmt: skip
        np.testing.assert_array_equal(cross, self_work)


def _cross_layout():
    """Two rows of cross documents: (q lengths, kv lengths), document 2 with keys only and
    document 4 with queries only; one document per row."""
    rows_ = [
        (_row([10, 0, 12, 6], TQ), _row([20, 8, 16, 0], TKV)),
        (_row([30], TQ), _row([40], TKV)),
    ]
    return tuple(np.stack([r[s][i] for r in rows_]) for s in range(2) for i in range(2))


@pytest.mark.parametrize("mask_type", ["padding", "padding_causal_bottom_right"])
@pytest.mark.parametrize("strategy", ["ring", "all_gather"])
def test_context_parallel_on_balanced_cross_rows_equals_single_device(strategy, mask_type):
    """Outputs (and, for the ring, gradients) on balanced cross rows, unpermuted, equal
    single-device attention on the original rows."""
    cp = 4
    ids_q, pos_q, ids_kv, pos_kv = _cross_layout()
    rng = np.random.default_rng(2)
    q, w = (rng.standard_normal((2, TQ, 4, 8)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((2, TKV, 2, 8)).astype(np.float32) for _ in range(2))
    q_side, kv_side = balance(ids_q, pos_q, cp=cp, mask_type=mask_type, tile=4,
                              kv_segment_ids=ids_kv, kv_segment_pos=pos_kv)  # fmt: skip
    mesh = Mesh(np.array(jax.devices()[:cp]), ("cp",))

    def single(q, k, v):
        out = thdkit.attention(
            q, k, v, segment_ids_q=ids_q, segment_pos_q=pos_q, segment_ids_kv=ids_kv,
            segment_pos_kv=pos_kv, mask_type=mask_type, max_segments_per_seq=4,
        )  # fmt: skip
        return jnp.sum(out * w), out

    def balanced(q, k, v):
        q_seg, kv_seg = (
            Segments(s.segment_ids, s.segment_pos, np.zeros_like(s.segment_ids))
            for s in (q_side, kv_side)
        )
        out = thdkit.context_parallel_attention(
            permute(q, q_side.order), permute(k, kv_side.order), permute(v, kv_side.order),
            q_segments=q_seg, kv_segments=kv_seg, mask_type=mask_type, max_segments_per_seq=4,
            mesh=mesh, axis_name="cp", strategy=strategy,
        )  # fmt: skip
        out = unpermute(out, q_side.order)
        return jnp.sum(out * w), out

    if strategy == "ring":
        (_, want), want_grads = jax.value_and_grad(single, (0, 1, 2), has_aux=True)(q, k, v)
        (_, got), got_grads = jax.value_and_grad(balanced, (0, 1, 2), has_aux=True)(q, k, v)
        for g, h in zip(got_grads, want_grads, strict=True):
            np.testing.assert_allclose(g, h, atol=1e-5, rtol=1e-5)
    else:
        want, got = single(q, k, v)[1], balanced(q, k, v)[1]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_cross_errors():
    ids_q, pos_q, ids_kv, pos_kv = _cross_layout()
    # Key positions left out: each key document numbered 0, 1, 2, ...
    numbered = balance(ids_q, pos_q, cp=4, kv_segment_ids=ids_kv)
    given = balance(ids_q, pos_q, cp=4, kv_segment_ids=ids_kv, kv_segment_pos=pos_kv)
    for a, b in zip(numbered, given, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="T_kv to be a multiple of cp=4"):
        balance(ids_q, pos_q, cp=4, kv_segment_ids=ids_kv[:, :62])
    with pytest.raises(ValueError, match="T_q to be a multiple of cp=4"):
        balance(ids_q[:, :30], cp=4, kv_segment_ids=ids_kv)
    with pytest.raises(ValueError, match="batch size"):
        balance(ids_q, pos_q, cp=4, kv_segment_ids=ids_kv[:1])
    broken = ids_kv.copy()
    broken[0, 40] = 1  # document 1 in a second run
    with pytest.raises(ValueError, match="kv_segment_ids row 0"):
        balance(ids_q, pos_q, cp=4, kv_segment_ids=broken)
    with pytest.raises(ValueError, match="kv_segment_pos"):
        balance(ids_q, pos_q, cp=4, kv_segment_pos=pos_kv)


def test_cross_rows_of_padding_or_of_one_side():
    """A row of padding keeps its order; a document with keys only (and no work) fills a gap
    in the key side's sequence, and its label follows the sequence on both sides."""
    ids_q = np.array([[0] * 8, [1, 1, 0, 0, 3, 3, 0, 0]])
    ids_kv = np.array([[0] * 4, [1, 2, 2, 3]])
    q_side, kv_side = balance(ids_q, cp=2, mask_type="padding", kv_segment_ids=ids_kv)
    np.testing.assert_array_equal(q_side.order[0], np.arange(8))
    np.testing.assert_array_equal(kv_side.order[0], np.arange(4))
    np.testing.assert_array_equal(q_side.segment_ids[0], 0)
    work = token_work(ids_q, np.zeros_like(ids_q), mask_type="padding", kv_segment_ids=ids_kv)
    assert work[1].tolist() == [1, 1, 0, 0, 1, 1, 0, 0]
    assert q_side.segment_ids[1].tolist() == [1, 1, 0, 0, 3, 3, 0, 0]
    assert kv_side.segment_ids[1].tolist() == [1, 2, 2, 3]  # document 2 cut at the bound
