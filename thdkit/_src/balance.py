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
the shards are valid layouts. Limits: self-attention rows only (one permutation of the row); the
work model counts allowed pairs, which the blockwise kernel's visited tiles follow for documents
longer than a tile (``thdkit bench ring`` reports both); under a non-causal mask a cut
document's first part also needs its second's keys (ring step ``cp - 1``).
"""

from __future__ import annotations

import heapq
import math
from typing import Any, NamedTuple

import numpy as np
from jaxtyping import Int

from thdkit._src.host import NUMPY
from thdkit._src.kernels.tiles import DEFAULT_BLOCK
from thdkit._src.limits import check_int
from thdkit._src.mask_types import MaskType, check_window, window_bound
from thdkit._src.reorder import permute, striped
from thdkit._src.segments import run_lengths
from thdkit._src.validate.inputs import as_layouts
from thdkit._src.validate.rules import validate_layout

__all__ = ["Balanced", "balance", "token_work"]


def token_work(
    segment_ids: Int[np.ndarray, "B T"],
    segment_pos: Int[np.ndarray, "B T"],
    *,
    mask_type: MaskType | str = "padding_causal",
    window_size: tuple[int | None, int | None] | None = None,
) -> Int[np.ndarray, "B T"]:
    """Each query token's allowed keys under self-attention: the work model of the reorder.

    Args:
        segment_ids: int[B, T]; 0 = padding.
        segment_pos: int[B, T]; positions inside the documents (0, 1, 2, ... in each).
        mask_type: a :class:`thdkit.MaskType` or its name.
        window_size: ``(left, right)`` or None.

    Returns:
        int64[B, T]: ``pos + 1`` (causal types; ``min(pos, left) + 1`` with a left window), the
        document's length (no_mask/padding; the band ``min(pos, left) + min(L - 1 - pos,
        right) + 1`` with a window), 0 on padding.

    Example:
        >>> ids = np.array([[1, 1, 1, 2, 2, 0]])
        >>> pos = np.array([[0, 1, 2, 0, 1, 0]])
        >>> token_work(ids, pos).tolist(), token_work(ids, pos, mask_type="padding").tolist()
        ([[1, 2, 3, 1, 2, 0]], [[3, 3, 3, 2, 2, 0]])
    """
    mask = MaskType.parse(mask_type)
    window = check_window(window_size)
    ids = np.asarray(segment_ids, np.int32)
    pos = np.asarray(segment_pos).astype(np.int64)
    left, right = window_bound(window, 0), window_bound(window, 1)
    before = pos if left is None else np.minimum(pos, left)
    if mask.uses_positions:
        work = before + 1
    else:
        lengths = run_lengths(ids).astype(np.int64)
        after = lengths - 1 - pos
        work = before + (after if right is None else np.minimum(after, right)) + 1
    return np.where(ids != 0, work, 0)


def _spread(tokens: np.ndarray, cp: int, tile: int) -> list[np.ndarray]:
    """A document's tokens (sorted by position) for each rank: chunks r and 2cp - 1 - r of
    ``2 * cp`` near-equal chunks, their bounds on multiples of ``tile`` where the document has
    a tile per chunk (so that each share fills whole tiles; the last chunk takes the rest)."""
    bounds = np.linspace(0, tokens.size, 2 * cp + 1)
    if tokens.size >= 2 * cp * tile:
        bounds = np.round(bounds / tile) * tile
        bounds[-1] = tokens.size
    bounds = bounds.round().astype(np.int64)
    chunks = [tokens[bounds[i] : bounds[i + 1]] for i in range(2 * cp)]
    return [np.concatenate([chunks[r], chunks[2 * cp - 1 - r]]) for r in range(cp)]


def _pack(
    docs: list[tuple[int, np.ndarray]],
    spread: dict[int, list[tuple[np.ndarray, int]]],
    cp: int,
    room: int,
) -> tuple[list[list[np.ndarray]], list[int]]:
    """One packing: the spread documents dealt over every rank (``spread[index][rank]`` = the
    tokens and work of the rank's share), then the others whole, costliest first, each to the
    least-loaded rank with room. Returns each rank's token lists and the documents (by index)
    that found no rank with room."""
    parts: list[list[np.ndarray]] = [[] for _ in range(cp)]
    load, free = [0] * cp, [room] * cp  # Python ints: this loop runs once per document
    for index in sorted(spread):
        for rank, (tokens, work) in enumerate(spread[index]):
            parts[rank].append(tokens)
            load[rank] += work
            free[rank] -= tokens.size
    homeless = []
    heap = [(load[rank], rank) for rank in range(cp)]
    heapq.heapify(heap)
    for index, (total, tokens) in enumerate(docs):
        if index in spread:
            continue
        # The least-loaded rank with room: pop until one fits (those without room return).
        size, skipped, chosen = tokens.size, [], None
        while heap:
            entry = heapq.heappop(heap)
            if free[entry[1]] >= size:
                chosen = entry[1]
                break
            skipped.append(entry)
        for entry in skipped:
            heapq.heappush(heap, entry)
        if chosen is None:
            homeless.append(index)
            continue
        parts[chosen].append(tokens)
        load[chosen] += total
        free[chosen] -= size
        heapq.heappush(heap, (load[chosen], chosen))
    return parts, homeless


def _compose(
    parts: list[list[np.ndarray]],
    spread: int,
    homeless: list[np.ndarray],
    padding: np.ndarray,
    room: int,
) -> list[list[np.ndarray]]:
    """Each rank's tokens, in shard order: its shares of the ``spread`` spread documents (the
    first entries of each part), then its place in one sequence of the whole documents cut at
    the ranks' bounds, padding last.

    The sequence walks the ranks in order: the rank's own documents (largest first), then, up to
    the rank's bound, padding, else the documents that found no room (the smallest that reaches
    the bound, else the largest). Cutting it at the bounds cuts at most one document per bound,
    which then ends one rank and starts the next: under a causal mask only ring step 1 carries
    its pairs.
    """
    homeless = sorted(homeless, key=lambda tokens: tokens.size)
    sequence, length, bound, at_padding = [], 0, 0, 0
    capacity = [room - sum(p.size for p in ranks[:spread]) for ranks in parts]
    for rank, ranks in enumerate(parts):
        bound += capacity[rank]
        own = sorted(ranks[spread:], key=lambda tokens: -tokens.size)
        sequence.extend(own)
        length += sum(tokens.size for tokens in own)
        while length < bound and (at_padding < padding.size or homeless):
            if at_padding < padding.size:
                piece = padding[at_padding : at_padding + bound - length]
                at_padding += piece.size
            else:
                reach = [i for i, tokens in enumerate(homeless) if tokens.size >= bound - length]
                piece = homeless.pop(reach[0] if reach else -1)
            sequence.append(piece)
            length += piece.size
    tokens = np.concatenate([*sequence, *homeless, padding[at_padding:]]).astype(np.int64)
    shards, start = [], 0
    for rank, ranks in enumerate(parts):
        shards.append([*ranks[:spread], tokens[start : start + capacity[rank]]])
        start += capacity[rank]
    return shards


def _loads(shards: list[list[np.ndarray]], work: np.ndarray) -> np.ndarray:
    """Each rank's work: the summed work of the tokens it holds."""
    return np.array([sum(int(work[p].sum()) for p in ranks) for ranks in shards], np.int64)


def _row_order(
    ids: np.ndarray,
    pos: np.ndarray,
    work: np.ndarray,
    cp: int,
    tolerances: tuple[float, float],
    tile: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The permutation of one row and its new document labels."""
    seq_len = ids.size
    room = seq_len // cp
    # By document, then position, padding (id 0) first: a packed row already is, but for padding.
    key = ids.astype(np.int64) << 32 | pos.astype(np.int64)
    order = np.arange(seq_len) if np.all(key[1:] >= key[:-1]) else np.argsort(key, kind="stable")
    sorted_ids = ids[order]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    ends = np.r_[starts[1:], seq_len]
    totals = np.add.reduceat(work[order], starts)
    docs, padding = [], np.zeros(0, np.int64)
    for start, end, total in zip(starts.tolist(), ends.tolist(), totals.tolist(), strict=True):
        tokens = order[start:end]
        if sorted_ids[start] == 0:
            padding = tokens
        else:
            docs.append((total, tokens))
    # Costliest first; ties by document order (deterministic).
    ranked = sorted(range(len(docs)), key=lambda i: (-docs[i][0], i))
    docs = [docs[i] for i in ranked]
    mean = sum(d[0] for d in docs) / cp
    spread: dict[int, list[tuple[np.ndarray, int]]] = {}
    spread_used = np.zeros(cp, np.int64)

    def spread_if_room(index: int) -> bool:
        """Spreads document ``index`` where every rank has room for its share."""
        nonlocal spread_used
        tokens = docs[index][1]
        shares = _spread(np.arange(tokens.size), cp, tile)
        sizes = np.array([share.size for share in shares])
        if np.any(spread_used + sizes > room):
            return False
        spread_used = spread_used + sizes
        spread[index] = [(tokens[share], int(work[tokens[share]].sum())) for share in shares]
        return True

    # Spread only documents whose chunks fill a tile: smaller chunks leave tiles half empty.
    spreadable = [i for i, d in enumerate(docs) if d[1].size >= 2 * cp * tile]
    for index, (_, tokens) in enumerate(docs):
        if tokens.size > room:
            spread_if_room(index)
    step = 1
    while True:
        parts, homeless = _pack(docs, spread, cp, room)
        shards = _compose(parts, len(spread), [docs[i][1] for i in homeless], padding, room)
        load = _loads(shards, work)
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
    # The striped order (stripes of a tile) when it is lighter by more than the same excess:
    # rows of documents about a shard long, which fit neither whole nor in chunks of a tile.
    in_order = np.concatenate([order[sorted_ids != 0], order[sorted_ids == 0]])
    stripes = striped(in_order, cp=cp, stripe_size=math.gcd(tile, room))
    if load.max() > (1 + excess) * work[stripes].reshape(cp, room).sum(axis=1).max():
        labels = np.zeros(int(ids.max()) + 1, np.int32)
        labels[np.unique(ids[ids != 0])] = np.arange(1, len(docs) + 1)
        return stripes, labels[ids[stripes]]
    return _relabelled(shards, len(spread), ids)


def _relabelled(
    shards: list[list[np.ndarray]], spread: int, ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The row's permutation and its new document labels.

    Each rank's first ``spread`` parts are its shares of the spread documents (the same
    documents on every rank, in the same order), the last its place in the sequence of whole
    documents (:func:`_compose`). The documents are numbered in the order they are first met
    walking the ranks, the spread ones first, padding moved to the end of each shard: so each
    shard's labels increase (a valid layout) and the documents whole on rank r carry labels
    between those of the ranks before and after it, which keeps a query tile's key span in
    another rank's shard empty where the two share no document.
    """
    order = []
    for ranks in shards:
        *shares, piece = ranks
        piece_ids = ids[piece]
        order.extend((*shares, piece[piece_ids != 0], piece[piece_ids == 0]))
    order = np.concatenate(order)
    # Labels 1, 2, ... in the order the documents are first met.
    met = ids[order]
    runs = met[np.flatnonzero(np.r_[True, met[1:] != met[:-1]])]
    old, first = np.unique(runs[runs != 0], return_index=True)
    lookup = np.zeros(int(ids.max()) + 1, np.int32)
    lookup[old[np.argsort(first, kind="stable")]] = np.arange(1, old.size + 1, dtype=np.int32)
    return order, lookup[met]


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
) -> Balanced:
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

    Returns:
        :class:`Balanced` ``(order, segment_ids, segment_pos)``, int32[B, T] each; shard r is
        places ``[r * T / cp, (r + 1) * T / cp)``.

    Raises:
        TypeError: non-integer layouts, a non-int ``cp``.
        ValueError: ``T`` not a multiple of ``cp``, a layout that breaks a rule (naming the
            parameter, row and token), a negative ``tolerance`` or ``spread_tolerance``.

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
    seq_len = ids.shape[1]
    if seq_len % cp:
        raise ValueError(f"balance needs T to be a multiple of cp={cp}, got T={seq_len}")
    work = token_work(ids, pos, mask_type=mask_type, window_size=window_size)
    rows = [
        _row_order(ids[b], pos[b], work[b], cp, (float(tolerance), float(spread_tolerance)), tile)
        for b in range(ids.shape[0])
    ]
    if not rows:
        empty = np.zeros(ids.shape, np.int32)
        return Balanced(empty, empty, empty)
    order = np.stack([r[0] for r in rows]).astype(np.int32)
    labels = np.stack([r[1] for r in rows]).astype(np.int32)
    return Balanced(order, labels, permute(pos.astype(np.int32), order))
