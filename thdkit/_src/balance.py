"""The balanced reorder: per row, whole documents where they fit, long ones spread over the ranks.

Every static reorder trades one cost for another on packed rows (docs/context-parallel.md,
"Which reorder to use"). :func:`balance` reads each row's documents and computes a permutation
of its own, so that the contiguous shard ``r`` of ``T / cp`` tokens holds:

- whole documents, each on one rank, where they fit: none of their pairs crosses ranks, so a
  ring step whose keys hold none of the rank's documents has nothing to compute;
- at most one document cut at each bound between ranks r and r + 1, which ends rank r and
  starts rank r + 1: under a causal mask only ring step 1 carries its pairs, so a row with no
  spread document needs one rotation of the ring, not ``cp - 1``;
- the few documents too costly to keep whole spread over every rank in ``2 * cp`` chunks, rank
  r holding chunks r and ``2 * cp - 1 - r`` (the dual-chunk swap of one document), which splits
  a causal triangle evenly (and makes the ring run every step);
- as near the same attention work as the documents allow.

The work of a query token is the number of keys the mask type and window allow it (its pairs):
``pos + 1`` under a causal type (the window's left bound caps it), the document's length (or the
window's band) under no_mask and padding. Algorithm, per row: documents are taken by decreasing
work and each is given to the rank with the least work that has room for all of it (greedy
longest-processing-time, with the token budget ``T / cp`` per rank as a second constraint).
The ranks' documents are then laid end to end, rank after rank (each rank's largest first),
the gap up to each rank's bound filled with padding, else with the documents that found no
room (the smallest that reaches the bound, else the largest), and the sequence is cut at the
bounds. Documents longer than ``T / cp`` are spread from the start; if the busiest rank then
carries more than ``spread_tolerance`` over the mean, the costliest documents still whole (of
at least ``2 * cp`` tiles, so that no chunk is smaller than a tile) are spread, one, then two,
four, ... per repacking, down to ``tolerance`` once one is spread (or at cp = 2, where step 1
is the whole ring). Inside each shard the documents are renumbered (spread ones first, padding
last), so every shard is a valid layout on its own (each document one run, ids increasing,
positions increasing; docs/semantics.md). Deterministic; O(T log T) per row, plus O(T + S log
cp) per repacking.

Guarantees: each rank holds exactly ``T / cp`` tokens; a document is cut only when it is spread
or at a bound between two ranks (then in position order, its first part on the lower rank);
the shards are valid layouts. Limits: the work model counts allowed pairs, which the blockwise
kernel's visited tiles follow for documents longer than a tile (``thdkit bench ring`` reports
both); under a non-causal mask a cut document's first part also needs its second's keys (ring
step ``cp - 1``).

Cross-attention rows (``kv_segment_ids``: queries and keys/values of the same documents, matched
by id, of other lengths; a document may have tokens on one side only) get a permutation per
side. A query token's work is then the keys of its document the mask type and window allow
(:func:`token_work`). Each document goes whole to the least-loaded rank with room on both sides
(``T_q / cp`` and ``T_kv / cp`` tokens); each side is then laid end to end in the same document
order, rank after rank, and cut at that side's bounds (padding fills a rank's gap first, then
the documents without room). No document is spread; the striped order (stripes of
``gcd(tile, T / cp)`` on each side) replaces the packing where it is lighter by more than the
same excess. Guarantees: each rank holds ``T_q / cp`` queries and ``T_kv / cp`` keys; on each
side a document is whole on one rank or cut between consecutive ranks in position order; each
document has one label on both sides, increasing along the order, so every shard of either side
is a valid layout. Limits: the two sides are cut independently, so a rank's queries may need
keys of the next or previous rank (or further, past a document longer than a shard); the keys'
side is balanced by its token budget only; positions of a key document count as consecutive.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from jaxtyping import Int

from thdkit._src.context_parallel.schedule import difference_bounds
from thdkit._src.host import NUMPY
from thdkit._src.kernels.tiles import DEFAULT_BLOCK
from thdkit._src.limits import check_int
from thdkit._src.mask_types import MaskType, Window, check_window, window_bound
from thdkit._src.packing import RowDocuments, compose, first_met_labels, pack, spread_chunks
from thdkit._src.reorder import permute, striped
from thdkit._src.segments import run_lengths
from thdkit._src.validate.inputs import as_layout, as_layouts, positions_in_runs
from thdkit._src.validate.rules import validate_layout

__all__ = ["Balanced", "balance", "token_work"]


def token_work(
    segment_ids: Int[np.ndarray, "B T"],
    segment_pos: Int[np.ndarray, "B T"],
    *,
    mask_type: MaskType | str = "padding_causal",
    window_size: tuple[int | None, int | None] | None = None,
    kv_segment_ids: Int[np.ndarray, "B T_kv"] | None = None,
    kv_segment_pos: Int[np.ndarray, "B T_kv"] | None = None,
) -> Int[np.ndarray, "B T"]:
    """Each query token's allowed keys: the work model of the reorder.

    Self-attention by default; with ``kv_segment_ids``, cross-attention: the keys of the
    query's document on the key side that the mask type and window allow. Per query token that
    is the interval of ``x_kv - x_q`` the mask allows (``x`` the position, or the document's
    length minus the position under the bottom-right types; docs/semantics.md) intersected with
    the values of ``x`` the key document spans, counted as consecutive (positions 0, 1, 2, ...
    in every document of a packed row): O(T_q + T_kv log T_kv), no ``[T_q, T_kv]`` mask.

    Args:
        segment_ids: int[B, T]; 0 = padding.
        segment_pos: int[B, T]; positions inside the documents (0, 1, 2, ... in each).
        mask_type: a :class:`thdkit.MaskType` or its name.
        window_size: ``(left, right)`` or None.
        kv_segment_ids: int[B, T_kv], the key side's ids (the same documents by id), or None
            for self-attention.
        kv_segment_pos: int[B, T_kv], or None to number each key document 0, 1, 2, ...

    Returns:
        int64[B, T]. Self-attention: ``pos + 1`` (causal types; ``min(pos, left) + 1`` with a
        left window), the document's length (no_mask/padding; the band ``min(pos, left) +
        min(L - 1 - pos, right) + 1`` with a window), 0 on padding. Cross-attention: the count
        of allowed keys, 0 on padding and for documents absent from the key side.

    Raises:
        ValueError: ``kv_segment_pos`` without ``kv_segment_ids``, or sides whose batch sizes
            differ.

    Example:
        >>> ids = np.array([[1, 1, 1, 2, 2, 0]])
        >>> pos = np.array([[0, 1, 2, 0, 1, 0]])
        >>> token_work(ids, pos).tolist(), token_work(ids, pos, mask_type="padding").tolist()
        ([[1, 2, 3, 1, 2, 0]], [[3, 3, 3, 2, 2, 0]])
        >>> kv_ids = np.array([[1, 1, 1, 1, 2, 0]])  # four keys of document 1, one of 2
        >>> token_work(ids, pos, kv_segment_ids=kv_ids).tolist()
        [[1, 2, 3, 1, 1, 0]]
        >>> token_work(ids, pos, kv_segment_ids=kv_ids, mask_type="causal_bottom_right").tolist()
        [[2, 3, 4, 0, 1, 0]]
    """
    mask = MaskType.parse(mask_type)
    window = check_window(window_size)
    ids = np.asarray(segment_ids, np.int32)
    pos = np.asarray(segment_pos).astype(np.int64)
    if kv_segment_ids is not None:
        kv_ids = np.asarray(kv_segment_ids, np.int32)
        kv_pos = positions_in_runs(kv_ids, ops=NUMPY) if kv_segment_pos is None else kv_segment_pos
        return _cross_work(ids, pos, kv_ids, np.asarray(kv_pos).astype(np.int64), mask, window)
    if kv_segment_pos is not None:
        raise ValueError("kv_segment_pos was given without kv_segment_ids")
    left, right = window_bound(window, 0), window_bound(window, 1)
    before = pos if left is None else np.minimum(pos, left)
    if mask.uses_positions:
        work = before + 1
    else:
        lengths = run_lengths(ids).astype(np.int64)
        after = lengths - 1 - pos
        work = before + (after if right is None else np.minimum(after, right)) + 1
    return np.where(ids != 0, work, 0)


def _cross_work(
    ids: np.ndarray, pos: np.ndarray, kv_ids: np.ndarray, kv_pos: np.ndarray, mask: MaskType,
    window: Window,
) -> np.ndarray:  # fmt: skip
    """:func:`token_work` for cross-attention rows."""
    if ids.shape[:-1] != kv_ids.shape[:-1] or ids.ndim != 2:
        raise ValueError(
            "segment_ids and kv_segment_ids must be int[B, T] and int[B, T_kv] of one batch "
            f"size, got shapes {ids.shape} and {kv_ids.shape}"
        )
    bounds = difference_bounds(mask, window)

    def compared(ids: np.ndarray, pos: np.ndarray) -> np.ndarray:
        return run_lengths(ids).astype(np.int64) - pos if bounds.uses_key else pos

    x_q, x_kv = compared(ids, pos), compared(kv_ids, kv_pos)
    # Each key document's span of x, found by (row, id) keys sorted: O(T_kv log T_kv).
    rows = np.arange(ids.shape[0], dtype=np.int64)[:, None]
    keys, x = (rows << 32 | kv_ids)[kv_ids != 0], x_kv[kv_ids != 0]
    if not keys.size:
        return np.zeros(ids.shape, np.int64)
    order = np.argsort(keys, kind="stable")
    keys, x = keys[order], x[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    docs, low, high = keys[starts], np.minimum.reduceat(x, starts), np.maximum.reduceat(x, starts)
    q_keys = rows << 32 | ids
    at = np.minimum(np.searchsorted(docs, q_keys), docs.size - 1)
    present = (docs[at] == q_keys) & (ids != 0)
    first = low[at] if bounds.lo is None else np.maximum(low[at], x_q + bounds.lo)
    last = high[at] if bounds.hi is None else np.minimum(high[at], x_q + bounds.hi)
    return np.where(present, np.maximum(last - first + 1, 0), 0)


def _row_order(
    sides: list[tuple[np.ndarray, np.ndarray]],
    work: np.ndarray,
    cp: int,
    tolerances: tuple[float, float],
    tile: int,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per side of one row (one side: self-attention; two: queries, keys), the permutation and
    the new document labels."""
    found = RowDocuments.of(sides, work)
    rooms = [ids.size // cp for ids, _ in sides]
    # Costliest first; ties by document order (deterministic).
    ranked = sorted(range(len(found.documents)), key=lambda i: (-found.documents[i].work, i))
    docs = [found.documents[i] for i in ranked]
    mean = sum(d.work for d in docs) / cp
    crossed = len(sides) > 1
    spread: dict[int, list[np.ndarray]] = {}  # index -> each rank's share (self rows only)
    spread_used = np.zeros(cp, np.int64)

    def spread_if_room(index: int) -> bool:
        """Spreads document ``index`` where every rank has room for its share."""
        nonlocal spread_used
        tokens = docs[index].tokens[0]
        shares = spread_chunks(np.arange(tokens.size), cp, tile)
        sizes = np.array([share.size for share in shares])
        if np.any(spread_used + sizes > rooms[0]):
            return False
        spread_used = spread_used + sizes
        spread[index] = [tokens[share] for share in shares]
        return True

    # Spread only documents whose chunks fill a tile: smaller chunks leave tiles half empty.
    # Cross rows spread nothing (a document's queries and keys would need chunks of their own).
    spreadable = [] if crossed else [i for i, d in enumerate(docs) if d.size >= 2 * cp * tile]
    for index in [i for i, d in enumerate(docs) if d.size > rooms[0] and not crossed]:
        spread_if_room(index)
    step = 1
    while True:
        shares = [[spread[index][rank] for index in sorted(spread)] for rank in range(cp)]
        free = [[room - sum(s.size for s in shares[rank]) for room in rooms] for rank in range(cp)]
        load = [sum(int(work[s].sum()) for s in shares[rank]) for rank in range(cp)]
        parts, homeless = pack(docs, load, free, set(spread))
        pieces, sequence = compose(docs, parts, homeless, found.padding, free)
        load = np.array([x + int(work[p[0]].sum()) for x, p in zip(load, pieces, strict=True)])
        whole = [i for i in spreadable if i not in spread]
        # Spreading the first document makes the ring run every step (but at cp = 2, where one
        # step is the whole ring): it takes the larger excess.
        excess = tolerances[0] if spread or cp == 2 else tolerances[1]
        if mean == 0 or load.max() <= (1 + excess) * mean or not whole:
            break
        # Spread the costliest documents without room, then the costliest whole ones: one, then
        # two, four, ... per packing (a packing per doubling: O(log S) packings).
        added = 0
        for index in [i for i in homeless if i in whole] + [i for i in whole if i not in homeless]:
            if added == step:
                break
            added += spread_if_room(index)
        if not added:
            break
        step *= 2
    size = max(int(ids.max(initial=0)) for ids, _ in sides) + 1
    # The striped order (stripes of a tile) when it is lighter by more than the same excess:
    # rows of documents about a shard long, which fit neither whole nor in chunks of a tile.
    stripes = [
        striped(tokens, cp=cp, stripe_size=math.gcd(tile, room))
        for tokens, room in zip(found.in_order, rooms, strict=True)
    ]
    if load.max() > (1 + excess) * work[stripes[0]].reshape(cp, rooms[0]).sum(axis=1).max():
        lookup = np.zeros(size, np.int32)
        lookup[[d.id for d in found.documents]] = np.arange(1, len(docs) + 1)
        return [(order, lookup[ids[order]]) for order, (ids, _) in zip(stripes, sides, strict=True)]
    # Each shard: the spread documents' shares, then its piece of the sequence, padding last.
    # The documents are numbered in the order the shards meet them (self rows) or the sequence
    # lays them out (cross rows, whose documents may be absent from one side): so each shard's
    # labels increase, and the documents whole on rank r carry labels between those of the
    # ranks before and after it, which keeps a query tile's key span in another rank's shard
    # empty where the two share no document.
    orders = []
    for side, (ids, _) in enumerate(sides):
        order = []
        for rank, piece in enumerate(p[side] for p in pieces):
            piece_ids = ids[piece]
            order.extend((*shares[rank], piece[piece_ids != 0], piece[piece_ids == 0]))
        orders.append(np.concatenate(order))
    met = np.array([docs[i].id for i in sequence], np.int64) if crossed else sides[0][0][orders[0]]
    lookup = first_met_labels(met, size)
    return [(order, lookup[ids[order]]) for order, (ids, _) in zip(orders, sides, strict=True)]


class Balanced(NamedTuple):
    """What :func:`balance` gives: the permutation and the permuted layout.

    Attributes:
        order: int32[B, T]; ``order[b, t]`` is the token of row b that goes to place t (apply it
            to every per-token array with :func:`permute`, undo it with :func:`unpermute`).
        segment_ids: int32[B, T]; the permuted row's segment ids, the documents renumbered
            1, 2, ... in the order the shards meet them (the same documents, new labels: each
            shard's ids increase, and documents whole on different ranks never interleave, which
            keeps the kernel's key spans in other ranks' shards empty); 0 = padding.
        segment_pos: int32[B, T]; the permuted positions (``permute(segment_pos, order)``).
    """

    order: Int[np.ndarray, "B T"]
    segment_ids: Int[np.ndarray, "B T"]
    segment_pos: Int[np.ndarray, "B T"]


def balance(
    segment_ids: Int[Any, "B T"],
    segment_pos: Int[Any, "B T"] | None = None,
    *,
    cp: int,
    mask_type: MaskType | str = "padding_causal",
    window_size: tuple[int | None, int | None] | None = None,
    tolerance: float = 0.05,
    spread_tolerance: float = 0.1,
    tile: int = DEFAULT_BLOCK,
    kv_segment_ids: Int[Any, "B T_kv"] | None = None,
    kv_segment_pos: Int[Any, "B T_kv"] | None = None,
) -> Balanced | tuple[Balanced, Balanced]:
    """Per row, the permutation that balances context-parallel attention over ``cp`` ranks.

    Host-side (NumPy), for the input pipeline; the algorithm and its guarantees are in
    docs/context-parallel.md, "The balanced reorder". Use the returned ``segment_ids`` and
    ``segment_pos`` as the layout, apply ``order`` with :func:`permute` to every per-token
    feature (inputs, targets, loss weights), and undo it on the outputs with :func:`unpermute`.

    Args:
        segment_ids: int[B, T]; 0 = padding, documents one run each (a packed row).
        segment_pos: int[B, T], or None to number each document's tokens 0, 1, 2, ...
        cp: ranks; ``T`` a multiple of it.
        mask_type: a :class:`thdkit.MaskType` or its name: the work model (:func:`token_work`).
        window_size: ``(left, right)`` or None.
        tolerance: the busiest rank's work over the mean above which another document is
            spread once the ring runs every step (0.05: 5%): a document is spread already, or
            ``cp == 2``.
        spread_tolerance: the same before the first document is spread (0.1: 10%): spreading
            one makes the ring run every step, moving every key and value round it, where a row
            of documents whole or cut at the bounds needs one step.
        tile: the attention kernel's tile (the blockwise kernel's and the ring's is
            :data:`thdkit.kernels.DEFAULT_BLOCK`): only documents of at least ``2 * cp * tile``
            tokens are spread (else their chunks would leave tiles half empty), and those longer
            than ``T / cp``.
        kv_segment_ids: int[B, T_kv], the keys'/values' ids for cross-attention rows (the same
            documents, matched by id; a document may be present on one side only), or None for
            self-attention. Cross rows spread no document.
        kv_segment_pos: int[B, T_kv], or None to number each key document 0, 1, 2, ...

    Returns:
        Self-attention: :class:`Balanced` ``(order, segment_ids, segment_pos)``, int32[B, T]
        each; shard r is places ``[r * T / cp, (r + 1) * T / cp)``. Cross-attention: the
        queries' and the keys' :class:`Balanced`, ``(q_side, kv_side)``, int32[B, T_q] and
        int32[B, T_kv] fields, each document one label on both sides.

    Raises:
        TypeError: non-integer layouts, a non-int ``cp``.
        ValueError: ``T`` (``T_q``, ``T_kv``) not a multiple of ``cp``, a layout that breaks a
            rule (naming the parameter, row and token), a negative ``tolerance`` or
            ``spread_tolerance``, ``kv_segment_pos`` without ``kv_segment_ids``, sides of
            different batch sizes.

    Example:
        A causal document of six tokens and three of two, then padding, over two ranks, with
        tiles of one token (so that any document may be spread). The long document is spread
        (rank 0 holds its positions 0, 1, 4, 5, rank 1 its 2, 3), the short ones stay whole on
        rank 1, and the padding fills rank 0: the ranks' work (allowed pairs) is 14 and 16,
        against 21 and 9 with the long document whole.

        >>> ids = np.array([[1, 1, 1, 1, 1, 1, 2, 2, 3, 3, 4, 4, 0, 0, 0, 0]])
        >>> pos = np.array([[0, 1, 2, 3, 4, 5, 0, 1, 0, 1, 0, 1, 0, 0, 0, 0]])
        >>> result = balance(ids, pos, cp=2, tile=1)
        >>> result.segment_ids.tolist()
        [[1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4]]
        >>> result.segment_pos.tolist()
        [[0, 1, 4, 5, 0, 0, 0, 0, 2, 3, 0, 1, 0, 1, 0, 1]]
        >>> permute(token_work(ids, pos), result.order).reshape(2, 8).sum(axis=1).tolist()
        [14, 16]

        Cross-attention rows: three query documents of 3, 3 and 2 tokens; keys of 2 tokens for
        each, and for a fourth document with no queries. Each query reads 2 keys under the
        padding mask. Documents 1 and 2 (work 6 each) go whole to ranks 0 and 1, document 4
        (no work) to rank 0; document 3 finds no rank with room for its queries and is cut
        between them on the query side: 8 pairs per rank. One label per document, the same on
        both sides (documents 1, 4, 3, 2 become 1, 2, 3, 4).

        >>> q_ids = np.array([[1, 1, 1, 2, 2, 2, 3, 3]])
        >>> kv_ids = np.array([[1, 1, 2, 2, 3, 3, 4, 4]])
        >>> q_side, kv_side = balance(q_ids, cp=2, mask_type="padding", kv_segment_ids=kv_ids)
        >>> q_side.segment_ids.tolist(), kv_side.segment_ids.tolist()
        ([[1, 1, 1, 3, 3, 4, 4, 4]], [[1, 1, 2, 2, 3, 3, 4, 4]])
        >>> q_side.segment_pos.tolist()
        [[0, 1, 2, 0, 1, 0, 1, 2]]
    """
    cp = check_int(cp, "cp", low=1)
    tile = check_int(tile, "tile", low=1)
    for name, value in (("tolerance", tolerance), ("spread_tolerance", spread_tolerance)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative float, got {value!r}")
    (ids, pos), _ = as_layouts(
        np.asarray(segment_ids), None if segment_pos is None else np.asarray(segment_pos),
        None, None, ops=NUMPY, number_positions=True,
    )  # fmt: skip
    if ids.ndim != 2:
        raise ValueError(f"segment_ids must be int[B, T], got shape {ids.shape}")
    validate_layout(ids, pos, max_segments_per_seq=None, mask_type=mask_type)
    sides = [(ids, pos)]
    if kv_segment_ids is not None:
        sides.append(_kv_layout(kv_segment_ids, kv_segment_pos, ids.shape[0], mask_type))
    elif kv_segment_pos is not None:
        raise ValueError("kv_segment_pos was given without kv_segment_ids")
    names = ("T",) if len(sides) == 1 else ("T_q", "T_kv")
    for name, (side, _) in zip(names, sides, strict=True):
        if side.shape[1] % cp:
            raise ValueError(
                f"balance needs {name} to be a multiple of cp={cp}, got {name}={side.shape[1]}"
            )
    work = token_work(
        ids, pos, mask_type=mask_type, window_size=window_size,
        kv_segment_ids=None if len(sides) == 1 else sides[1][0],
        kv_segment_pos=None if len(sides) == 1 else sides[1][1],
    )  # fmt: skip
    tolerances = (float(tolerance), float(spread_tolerance))
    rows = [
        _row_order([(i[b], p[b]) for i, p in sides], work[b], cp, tolerances, tile)
        for b in range(ids.shape[0])
    ]
    result = []
    for side, (side_ids, side_pos) in enumerate(sides):
        if not rows:
            empty = np.zeros(side_ids.shape, np.int32)
            result.append(Balanced(empty, empty, empty))
            continue
        order = np.stack([r[side][0] for r in rows]).astype(np.int32)
        labels = np.stack([r[side][1] for r in rows]).astype(np.int32)
        result.append(Balanced(order, labels, permute(side_pos.astype(np.int32), order)))
    return result[0] if len(sides) == 1 else (result[0], result[1])


def _kv_layout(
    kv_segment_ids: Any, kv_segment_pos: Any, batch: int, mask_type: MaskType | str
) -> tuple[np.ndarray, np.ndarray]:
    """The key side's layout, checked like the query side's (and numbered where ``pos`` is
    None): int32[B, T_kv] ids and positions."""
    kv_ids = np.asarray(kv_segment_ids)
    given = kv_ids if kv_segment_pos is None else np.asarray(kv_segment_pos)
    kv_ids, kv_pos = as_layout(kv_ids, given, name="kv_segment_ids", ops=NUMPY)
    if kv_segment_pos is None:
        kv_pos = positions_in_runs(kv_ids, ops=NUMPY)
    if kv_ids.ndim != 2 or kv_ids.shape[0] != batch:
        raise ValueError(
            f"kv_segment_ids must be int[B, T_kv] with the queries' batch size B={batch}, got "
            f"shape {kv_ids.shape}"
        )
    validate_layout(
        kv_ids, kv_pos, max_segments_per_seq=None, mask_type=mask_type, name="kv_segment_ids"
    )
    return kv_ids, kv_pos
