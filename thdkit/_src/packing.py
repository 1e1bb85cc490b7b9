"""The pieces of the balanced reorder (:func:`thdkit.reorder.balance`): one row's documents
found, packed whole onto the ranks, laid end to end and cut at the ranks' bounds.

A row has one side (self-attention: the queries' tokens are the keys') or two (cross-attention:
queries and keys/values of the same documents, of different lengths). A document is known by
its id on every side, and has one token array per side (empty where it is absent). The packing
gives each document, whole, to the least-loaded rank with room on every side; the composition
lays each side out in one document order, rank after rank, and cuts it at that side's bounds, so
that a document is whole or cut between consecutive ranks on every side.
"""

from __future__ import annotations

import heapq
from typing import NamedTuple

import numpy as np

__all__ = ["Document", "RowDocuments", "compose", "first_met_labels", "pack", "spread_chunks"]


class Document(NamedTuple):
    """One document of a row: its id, its work, its tokens on each side (sorted by position;
    empty where it is absent) and their number over every side."""

    id: int
    work: int
    tokens: tuple[np.ndarray, ...]
    size: int


class RowDocuments(NamedTuple):
    """A row's documents (by increasing id), each side's padding, and each side's tokens in
    document order (by id, then position; padding last)."""

    documents: list[Document]
    padding: tuple[np.ndarray, ...]
    in_order: tuple[np.ndarray, ...]

    @classmethod
    def of(cls, sides: list[tuple[np.ndarray, np.ndarray]], work: np.ndarray) -> RowDocuments:
        """Finds the documents of one row.

        Args:
            sides: ``(ids, pos)`` per side, int[T_side] each; ids 0 = padding.
            work: int64[T_q]; each token of the first side's work (a document's work is the sum
                over its tokens).

        Returns:
            The row's :class:`RowDocuments`.

        Example:
            >>> ids, pos = np.array([2, 2, 0, 5]), np.array([0, 1, 0, 0])
            >>> found = RowDocuments.of([(ids, pos)], np.array([1, 2, 0, 1]))
            >>> [(d.id, d.work, d.tokens[0].tolist()) for d in found.documents]
            [(2, 3, [0, 1]), (5, 1, [3])]
        """
        tokens: dict[int, list[np.ndarray]] = {}
        works: dict[int, int] = {}
        padding, in_order = [], []
        for side, (ids, pos) in enumerate(sides):
            # By document, then position, padding (id 0) first: a packed row already is.
            key = ids.astype(np.int64) << 32 | pos.astype(np.int64)
            ordered = np.all(key[1:] >= key[:-1])
            order = np.arange(ids.size) if ordered else np.argsort(key, kind="stable")
            sorted_ids = ids[order]
            starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
            if side == 0 and ids.size:
                totals = np.add.reduceat(work[order], starts).tolist()
                works = dict(zip(sorted_ids[starts].tolist(), totals, strict=True))
            pad = np.zeros(0, np.int64)
            for start, end in zip(starts.tolist(), [*starts[1:].tolist(), ids.size], strict=True):
                doc = int(sorted_ids[start])
                if doc == 0:
                    pad = order[start:end]
                else:
                    empty = [np.zeros(0, np.int64)] * len(sides)
                    tokens.setdefault(doc, empty)[side] = order[start:end]
            padding.append(pad)
            in_order.append(np.concatenate([order[sorted_ids != 0], pad]))
        docs = [
            Document(doc, works.get(doc, 0), tuple(parts), sum(t.size for t in parts))
            for doc, parts in sorted(tokens.items())
        ]
        return cls(docs, tuple(padding), tuple(in_order))


def spread_chunks(tokens: np.ndarray, cp: int, tile: int) -> list[np.ndarray]:
    """A document's tokens (sorted by position) for each rank: chunks r and ``2cp - 1 - r`` of
    ``2 * cp`` near-equal chunks, their bounds on multiples of ``tile`` where the document has
    a tile per chunk (so that each share fills whole tiles; the last chunk takes the rest).

    Example:
        >>> [share.tolist() for share in spread_chunks(np.arange(8), 2, 1)]
        [[0, 1, 6, 7], [2, 3, 4, 5]]
    """
    bounds = np.linspace(0, tokens.size, 2 * cp + 1)
    if tokens.size >= 2 * cp * tile:
        bounds = np.round(bounds / tile) * tile
        bounds[-1] = tokens.size
    bounds = bounds.round().astype(np.int64)
    chunks = [tokens[bounds[i] : bounds[i + 1]] for i in range(2 * cp)]
    return [np.concatenate([chunks[r], chunks[2 * cp - 1 - r]]) for r in range(cp)]


def pack(
    docs: list[Document], load: list[int], free: list[list[int]], skip: set[int]
) -> tuple[list[list[int]], list[int]]:
    """Each document (by index, costliest first, but those in ``skip``) whole to the
    least-loaded rank with room for it on every side.

    Args:
        docs: the documents, costliest first.
        load: each rank's work already placed (e.g. its shares of spread documents).
        free: ``free[rank][side]``, each rank's room left on each side.
        skip: the indices of the documents placed already (spread).

    Returns:
        ``(parts, homeless)``: each rank's documents (indices, in placing order), and the
        documents that found no rank with room on every side.

    Example:
        >>> docs = [Document(i + 1, w, (np.arange(n),), n) for i, (w, n) in enumerate([(9, 3), (4, 2), (3, 2)])]
        >>> pack(docs, [0, 0], [[4], [4]], set())
        ([[0], [1, 2]], [])
    """  # noqa: E501
    load, free = list(load), [list(f) for f in free]  # Python ints: one step per document
    parts: list[list[int]] = [[] for _ in load]
    homeless = []
    heap = [(load[rank], rank) for rank in range(len(load))]
    heapq.heapify(heap)
    for index, doc in enumerate(docs):
        if index in skip:
            continue
        # The least-loaded rank with room: pop until one fits (those without room return).
        sizes, skipped, chosen = [t.size for t in doc.tokens], [], None
        while heap:
            entry = heapq.heappop(heap)
            if all(f >= n for f, n in zip(free[entry[1]], sizes, strict=True)):
                chosen = entry[1]
                break
            skipped.append(entry)
        for entry in skipped:
            heapq.heappush(heap, entry)
        if chosen is None:
            homeless.append(index)
            continue
        parts[chosen].append(index)
        load[chosen] += doc.work
        free[chosen] = [f - n for f, n in zip(free[chosen], sizes, strict=True)]
        heapq.heappush(heap, (load[chosen], chosen))
    return parts, homeless


def compose(
    docs: list[Document],
    parts: list[list[int]],
    homeless: list[int],
    padding: tuple[np.ndarray, ...],
    capacity: list[list[int]],
) -> tuple[list[list[np.ndarray]], list[int]]:
    """Each rank's tokens on each side: its place in one sequence of the whole documents, laid
    out on every side in the same document order and cut at that side's bounds.

    The sequence walks the ranks in order: the rank's own documents (largest first), then, up to
    the rank's bound on each side, that side's padding, else the documents that found no room
    (the smallest that reaches the bound on every side still short of it, else the largest).
    Cutting a side at its bounds cuts at most one document per bound, which then ends one rank
    and starts the next.

    Args:
        docs: the documents.
        parts: each rank's documents (indices), as :func:`pack` gives them.
        homeless: the documents that found no rank with room.
        padding: each side's padding tokens.
        capacity: ``capacity[rank][side]``, the tokens each rank takes from the sequence.

    Returns:
        ``(pieces, sequence)``: ``pieces[rank][side]``, int64 token indices, and the documents
        (indices) in the sequence's order.

    Example:
        >>> docs = [Document(1, 9, (np.arange(3),), 3), Document(2, 4, (np.arange(3, 6),), 3)]
        >>> pieces, sequence = compose(docs, [[0], []], [1], (np.arange(6, 8),), [[4], [4]])
        >>> [p[0].tolist() for p in pieces], sequence
        ([[0, 1, 2, 6], [7, 3, 4, 5]], [0, 1])
    """
    sides = len(padding)
    homeless = sorted(homeless, key=lambda index: docs[index].size)
    sequence: list[int] = []
    laid: list[list[np.ndarray]] = [[] for _ in range(sides)]
    length, bound, at_padding = [0] * sides, [0] * sides, [0] * sides

    def lay(index: int) -> None:
        sequence.append(index)
        for side, tokens in enumerate(docs[index].tokens):
            laid[side].append(tokens)
            length[side] += tokens.size

    for rank, own in enumerate(parts):
        bound = [b + c for b, c in zip(bound, capacity[rank], strict=True)]
        for index in sorted(own, key=lambda index: -docs[index].size):
            lay(index)
        while True:
            for side in range(sides):
                gap = bound[side] - length[side]
                if gap > 0 and at_padding[side] < padding[side].size:
                    piece = padding[side][at_padding[side] : at_padding[side] + gap]
                    at_padding[side] += piece.size
                    laid[side].append(piece)
                    length[side] += piece.size
            short = [(side, bound[side] - length[side]) for side in range(sides)]
            short = [(side, gap) for side, gap in short if gap > 0]
            if not short or not homeless:
                break
            reach = [
                i
                for i, index in enumerate(homeless)
                if all(docs[index].tokens[side].size >= gap for side, gap in short)
            ]
            lay(homeless.pop(reach[0] if reach else -1))
    for index in homeless:
        lay(index)
    pieces: list[list[np.ndarray]] = [[] for _ in parts]
    for side in range(sides):
        tokens = np.concatenate([*laid[side], padding[side][at_padding[side] :]]).astype(np.int64)
        start = 0
        for rank in range(len(parts)):
            pieces[rank].append(tokens[start : start + capacity[rank][side]])
            start += capacity[rank][side]
    return pieces, sequence


def first_met_labels(met: np.ndarray, size: int) -> np.ndarray:
    """A lookup from old document ids to labels 1, 2, ... in the order ``met`` first meets them.

    Args:
        met: int[N]; old ids in walking order (0 = padding, skipped; repeats allowed).
        size: the lookup's length (above the largest id).

    Returns:
        int32[size]; ``lookup[old]`` is the new label, 0 for padding and ids never met.

    Example:
        >>> first_met_labels(np.array([4, 4, 0, 2, 4, 7]), 8).tolist()
        [0, 0, 2, 0, 1, 0, 0, 3]
    """
    runs = met[np.flatnonzero(np.r_[True, met[1:] != met[:-1]])] if met.size else met
    old, first = np.unique(runs[runs != 0], return_index=True)
    lookup = np.zeros(size, np.int32)
    lookup[old[np.argsort(first, kind="stable")]] = np.arange(1, old.size + 1, dtype=np.int32)
    return lookup
