"""Random packed layouts for tests and benchmarks, and context-parallel views of them.

The generator follows the distribution of the well-known Transformer Engine test generator: per
row, up to ``max_segments`` documents, each of ``size`` uniform in ``[min_len, T // max_segments]``
tokens, of which a uniform number in ``[min_len, size]`` are valid and the rest are tail padding
(id 0, positions still counting); the row's remainder is trailing padding with position 0.

``filled_segments`` packs rows full (no padding) with documents of widely varying lengths, the
shape of real packed training data used by the attention and ring benchmarks.

All generators are host-side NumPy and return int32 arrays.
"""

from __future__ import annotations

import numpy as np

from thdkit._src.limits import check_int

__all__ = ["cross_segments", "filled_segments", "packed_segments"]


def _check_counts(**counts: object) -> None:
    """Raises TypeError for a count that is not an int (bools included), ValueError below 0."""
    for name, value in counts.items():
        check_int(value, name, low=0)


def _check_sizes(batch: int, seq_len: int, max_segments: int, min_len: int) -> None:
    _check_counts(batch=batch, seq_len=seq_len, max_segments=max_segments, min_len=min_len)
    if max_segments < 1 or seq_len < 1 or min_len < 1:
        raise ValueError(
            f"seq_len, max_segments and min_len must be >= 1, got {seq_len=}, {max_segments=}, "
            f"{min_len=}"
        )
    if min_len > seq_len // max_segments:
        raise ValueError(
            f"min_len={min_len} exceeds seq_len // max_segments = {seq_len // max_segments}"
        )


def _segment_sizes(
    rng: np.random.Generator, seq_len: int, max_segments: int, min_len: int, tail_padding: bool
) -> tuple[np.ndarray, np.ndarray]:
    sizes = rng.integers(min_len, seq_len // max_segments, size=max_segments, endpoint=True)
    valid = rng.integers(min_len, sizes, endpoint=True) if tail_padding else sizes
    return sizes, valid


def _fill_row(ids: np.ndarray, pos: np.ndarray, sizes: np.ndarray, valid: np.ndarray) -> None:
    start = 0
    for k, (size, n_valid) in enumerate(zip(sizes, valid, strict=True)):
        ids[start : start + n_valid] = k + 1
        pos[start : start + size] = np.arange(size)
        start += size


def packed_segments(
    rng: np.random.Generator,
    *,
    batch: int,
    seq_len: int,
    max_segments: int,
    min_len: int = 1,
    tail_padding: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """A random batch of packed rows (self-attention layout).

    Args:
        rng: a NumPy generator (``np.random.default_rng(seed)``).
        batch: B, rows.
        seq_len: T, tokens per row.
        max_segments: documents per row (ids 1..max_segments); use it as ``max_segments_per_seq``.
        min_len: smallest document and smallest valid part.
        tail_padding: whether documents end in padding whose positions keep counting.

    Returns:
        ``(segment_ids, segment_pos)``, each int32[B, T].

    Raises:
        TypeError: a size is not an int (bools included).
        ValueError: ``batch < 0``, another size < 1, or ``min_len > seq_len // max_segments``.

    Example:
        >>> ids, pos = packed_segments(np.random.default_rng(0), batch=1, seq_len=8, max_segments=2)
        >>> ids.shape, int(ids.max()) <= 2
        ((1, 8), True)
    """
    _check_sizes(batch, seq_len, max_segments, min_len)
    ids = np.zeros((batch, seq_len), np.int32)
    pos = np.zeros((batch, seq_len), np.int32)
    for b in range(batch):
        _fill_row(
            ids[b], pos[b], *_segment_sizes(rng, seq_len, max_segments, min_len, tail_padding)
        )
    return ids, pos


def cross_segments(
    rng: np.random.Generator,
    *,
    batch: int,
    seq_len_q: int,
    seq_len_kv: int,
    max_segments: int,
    min_len: int = 1,
    tail_padding: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A random cross-attention batch whose kv documents are at least as long as the q ones.

    Each q document of ``size`` tokens gets a kv document of ``size * T_kv // T_q`` tokens; its
    valid part is uniform between the q document's valid part and its size.

    Args:
        rng, batch, max_segments, min_len, tail_padding: as for :func:`packed_segments`.
        seq_len_q: T_q.
        seq_len_kv: T_kv, at least T_q.

    Returns:
        ``(ids_q, pos_q, ids_kv, pos_kv)``: int32[B, T_q] and int32[B, T_kv] arrays.

    Raises:
        TypeError: a size is not an int (bools included).
        ValueError: ``seq_len_kv < seq_len_q`` or sizes that cannot hold the documents.
    """
    _check_sizes(batch, seq_len_q, max_segments, min_len)
    _check_counts(seq_len_kv=seq_len_kv)
    if seq_len_kv < seq_len_q:
        raise ValueError(f"seq_len_kv must be >= seq_len_q, got {seq_len_kv} < {seq_len_q}")
    ids_q = np.zeros((batch, seq_len_q), np.int32)
    pos_q = np.zeros_like(ids_q)
    ids_kv = np.zeros((batch, seq_len_kv), np.int32)
    pos_kv = np.zeros_like(ids_kv)
    for b in range(batch):
        sizes, valid = _segment_sizes(rng, seq_len_q, max_segments, min_len, tail_padding)
        kv_sizes = sizes * seq_len_kv // seq_len_q
        kv_valid = rng.integers(valid, kv_sizes, endpoint=True) if tail_padding else kv_sizes
        _fill_row(ids_q[b], pos_q[b], sizes, valid)
        _fill_row(ids_kv[b], pos_kv[b], kv_sizes, kv_valid)
    return ids_q, pos_q, ids_kv, pos_kv


def filled_segments(
    rng: np.random.Generator, *, batch: int, seq_len: int, segments: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rows packed full with ``segments`` documents of random lengths (no padding).

    The lengths come from ``segments - 1`` distinct cut points drawn uniformly in the row, so
    they vary widely, as packed training data does.

    Args:
        rng: a NumPy generator.
        batch: B.
        seq_len: T.
        segments: documents per row, at most T.

    Returns:
        ``(segment_ids, segment_pos)``, each int32[B, T]; ids 1..segments.

    Raises:
        TypeError: a size is not an int (bools included).
        ValueError: ``batch < 0``, ``seq_len < 1``, or ``segments`` outside ``[1, seq_len]``.

    Example:
        >>> ids, pos = filled_segments(np.random.default_rng(0), batch=1, seq_len=8, segments=1)
        >>> ids.tolist(), pos.tolist()
        ([[1, 1, 1, 1, 1, 1, 1, 1]], [[0, 1, 2, 3, 4, 5, 6, 7]])
    """
    _check_counts(batch=batch, seq_len=seq_len, segments=segments)
    if not 1 <= segments <= seq_len:
        raise ValueError(f"segments must be in [1, seq_len={seq_len}], got {segments}")
    ids = np.zeros((batch, seq_len), np.int32)
    pos = np.zeros((batch, seq_len), np.int32)
    for row in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, seq_len), size=segments - 1, replace=False))
        starts = np.concatenate([[0], cuts])
        lengths = np.diff(np.concatenate([starts, [seq_len]]))
        ids[row] = np.repeat(np.arange(1, segments + 1), lengths)
        pos[row] = np.arange(seq_len) - np.repeat(starts, lengths)
    return ids, pos
