"""Steps shared across the package: compaction, counting seqlens/offsets off per-token ids,
per-id minima and maxima, and the search for where a threshold is crossed inside ranges of a row.

``compact`` and ``count_and_offsets`` act on single rows (1-D arrays, mapped over the batch with
``jax.vmap``); ``segment_extrema``, ``first_at_least`` and ``gather_rows`` act on ``[N, T]`` rows
directly.

``compact``, ``segment_extrema``, ``first_at_least``, ``gather_rows`` and ``shift`` take an
``ops`` (:class:`thdkit._src.host.ArrayOps`): :data:`thdkit._src.host.JAX` (the default) traces
them, :data:`thdkit._src.host.NUMPY` runs the same code in NumPy on the host (there ``compact``
takes ``[N, K]`` rows at once).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jaxtyping import Array, Bool, Int

from thdkit._src.host import JAX, ArrayOps

__all__ = ["compact", "count_and_offsets", "first_at_least", "gather_rows", "segment_extrema"]

_INT32_MIN = int(jnp.iinfo(jnp.int32).min)
_INT32_MAX = int(jnp.iinfo(jnp.int32).max)


def compact(
    values: Int[Array, "*R N"],
    keep: Bool[Array, "*R N"],
    *,
    size: int,
    fill: int,
    ops: ArrayOps = JAX,
) -> Int[Array, "*R size"]:
    """Moves the kept values to the front, in order, and fills the rest.

    Kept values beyond ``size`` are dropped, so ``size`` may be smaller than ``N``.

    Args:
        values: int[N] (with ``ops=NUMPY`` also int[*R, N], row by row).
        keep: bool, the shape of ``values``; which values to keep.
        size: static length of the result.
        fill: value of the slots after the kept ones.
        ops: the array module (:data:`thdkit._src.host.JAX` or :data:`thdkit._src.host.NUMPY`).

    Returns:
        int32[size] (int32[*R, size]).

    Example:
        >>> compact(jnp.array([5, 0, 7, 0]), jnp.array([True, False, True, False]), size=3, fill=-1)
        Array([ 5,  7, -1], dtype=int32)
    """
    xp = ops.xp
    slot = xp.where(keep, xp.cumsum(keep, axis=-1, dtype=xp.int32) - 1, size)
    out = xp.full((*keep.shape[:-1], size), fill, xp.int32)
    return ops.place(out, slot, values.astype(xp.int32))


def count_and_offsets(
    row_ids: Int[Array, " T"], *, num_segments: int
) -> tuple[Int[Array, " S"], Int[Array, " S+1"]]:
    """Seqlens by id and run-start offsets of a row of active ids (the reference's last step).

    Args:
        row_ids: int[T]; the id of each token that stays active, 0 elsewhere.
        num_segments: S.

    Returns:
        ``(seqlens, offsets)``: int32[S], the count of tokens of each id 1..S; int32[S+1], the
        first S+1 indices where a run of a non-zero id starts, ascending, -1 after them.

    Example:
        >>> count_and_offsets(jnp.array([1, 1, 1, 2, 2, 0, 0, 3]), num_segments=4)
        (Array([3, 2, 1, 0], dtype=int32), Array([ 0,  3,  7, -1, -1], dtype=int32))
    """
    seqlens = jnp.zeros(num_segments + 1, jnp.int32).at[row_ids].add(1, mode="drop")[1:]
    previous = jnp.concatenate([jnp.zeros(1, row_ids.dtype), row_ids[:-1]])
    starts = (row_ids != 0) & (row_ids != previous)
    t = jnp.arange(row_ids.shape[0], dtype=jnp.int32)
    return seqlens, compact(t, starts, size=num_segments + 1, fill=-1)


def segment_extrema(
    ids: Int[Array, "N T"],
    values: Int[Array, "N T"],
    *,
    num_segments: int,
    ops: ArrayOps = JAX,
) -> tuple[Int[Array, "N S1"], Int[Array, "N S1"]]:
    """Per row, the smallest and largest of ``values`` over the tokens of each id 0..S.

    One scatter-max of ``(v, -v)`` over the flattened rows: each row's ids are offset into a bin
    range of its own, which avoids both a batched (vmapped) scatter and a ``[N*T, 2]`` index
    array. O(N*T) time, O(N*S) memory.

    Args:
        ids: int32[N, T]; ids outside ``[0, S]`` are dropped.
        values: int32[N, T]; greater than the int32 minimum (``-v`` must not overflow).
        num_segments: S.
        ops: the array module (:data:`thdkit._src.host.JAX` or :data:`thdkit._src.host.NUMPY`).

    Returns:
        ``(low, high)``, int32[N, S+1] each; where an id is absent from a row ``low`` is the int32
        maximum and ``high`` the int32 minimum.

    Example:
        >>> low, high = segment_extrema(jnp.array([[1, 1, 0, 2, 2, 2]]),
        ...                             jnp.array([[4, 5, 9, 0, 1, 2]]), num_segments=3)
        >>> low.tolist(), high.tolist()
        ([[9, 4, 0, 2147483647]], [[9, 5, 2, -2147483648]])
    """
    xp = ops.xp
    rows, _ = ids.shape
    bins_per_row = num_segments + 1
    in_range = (ids >= 0) & (ids <= num_segments)
    bins = xp.where(
        in_range,
        ids + bins_per_row * xp.arange(rows, dtype=xp.int32)[:, None],
        rows * bins_per_row,
    ).reshape(-1)
    # low = -max(-v): absent ids start from -(-INT32_MAX) = INT32_MAX.
    init = xp.broadcast_to(xp.array([_INT32_MIN, -_INT32_MAX], xp.int32), (rows * bins_per_row, 2))
    flat = values.reshape(-1)
    ends = ops.scatter_max(init, bins, xp.stack([flat, -flat], axis=-1))
    ends = ends.reshape(rows, bins_per_row, 2)
    return -ends[..., 1], ends[..., 0]


def first_at_least(
    pos: Int[Array, "N T"],
    lo: Int[Array, "N K"],
    hi: Int[Array, "N K"],
    threshold: Int[Array, "N K"],
    *,
    ops: ArrayOps = JAX,
) -> Int[Array, "N K"]:
    """Per query, the smallest i in [lo, hi) with ``pos[i] >= threshold`` (hi if none).

    Every query searches its own range of its row; ``pos`` must not decrease on each range.
    Positions are usually affine along a run (``0, 1, 2, ...`` in a packed row, ``r, r + cp,
    ...`` in a striped shard), so one interpolation step finds every answer; it is verified, and
    only when some answer is wrong (e.g. stripes of several tokens) does the exact search run.

    Args:
        pos: int[N, T]; the values searched, row by row.
        lo, hi: int[N, K]; each query's range [lo, hi) of its row (empty when lo >= hi).
        threshold: int[N, K].
        ops: the array module (:data:`thdkit._src.host.JAX` or :data:`thdkit._src.host.NUMPY`).

    Returns:
        int32[N, K].

    Example:
        >>> pos = jnp.array([[0, 2, 4, 6, 1, 3, 9, 10]])
        >>> first_at_least(pos, jnp.array([[0, 4, 4]]), jnp.array([[4, 8, 8]]),
        ...                jnp.array([[3, 4, 11]]))
        Array([[2, 6, 8]], dtype=int32)
    """
    xp = ops.xp
    guess = _affine_guess(pos, lo, hi, threshold, ops=ops)
    before = gather_rows(pos, xp.clip(guess - 1, 0, pos.shape[-1] - 1), ops=ops)
    at = gather_rows(pos, xp.clip(guess, 0, pos.shape[-1] - 1), ops=ops)
    exact = ((guess <= lo) | (before < threshold)) & ((guess >= hi) | (at >= threshold))
    return ops.cond(
        xp.all(exact | (lo >= hi)),
        lambda: guess,
        lambda: _search(pos, lo, hi, threshold, ops=ops),
    )


def _affine_guess(
    pos: Array, lo: Array, hi: Array, threshold: Array, *, ops: ArrayOps = JAX
) -> Array:
    """The answer of :func:`first_at_least` if positions were affine on each [lo, hi)."""
    xp = ops.xp
    last = xp.maximum(hi - 1, lo)
    first_pos = gather_rows(pos, xp.clip(lo, 0, pos.shape[-1] - 1), ops=ops)
    last_pos = gather_rows(pos, xp.clip(last, 0, pos.shape[-1] - 1), ops=ops)
    stride = xp.maximum((last_pos - first_pos) // xp.maximum(last - lo, 1), 1)
    steps = -((first_pos - threshold) // stride)  # ceil((threshold - first_pos) / stride)
    # Clipped before the sum, which could otherwise leave int32 for far thresholds.
    return lo + xp.clip(steps, 0, xp.maximum(hi - lo, 0))


_SEARCH_WAYS = 16


def _search(pos: Array, lo: Array, hi: Array, threshold: Array, *, ops: ArrayOps = JAX) -> Array:
    """:func:`first_at_least` by a 16-way search.

    Each round probes 15 points of every interval at once: ~log16(T) dependent rounds instead of
    log2(T) (the rounds, not the gathers, dominate the cost).
    """
    xp = ops.xp
    seq_len = pos.shape[-1]
    fractions = xp.arange(1, _SEARCH_WAYS, dtype=xp.int32)[None, None, :]
    for _ in range(max(1, math.ceil(math.log(seq_len + 1, _SEARCH_WAYS)))):
        # lo + floor(span * k / 16), without forming span * k (past int32 for long rows).
        span = (hi - lo)[..., None]
        probes = (
            lo[..., None]
            + (span // _SEARCH_WAYS) * fractions
            + ((span % _SEARCH_WAYS) * fractions) // _SEARCH_WAYS
        )
        values = gather_rows(pos, xp.clip(probes, 0, seq_len - 1), ops=ops)
        below = (values < threshold[..., None]) & (probes < hi[..., None])
        n_below = xp.sum(below, axis=-1, dtype=xp.int32)
        last_below = xp.take_along_axis(probes, xp.maximum(n_below - 1, 0)[..., None], axis=-1)
        first_not = xp.take_along_axis(
            probes, xp.minimum(n_below, _SEARCH_WAYS - 2)[..., None], axis=-1
        )
        lo = xp.where(n_below > 0, last_below[..., 0] + 1, lo)
        hi = xp.maximum(xp.where(n_below < _SEARCH_WAYS - 1, first_not[..., 0], hi), lo)
    return lo


def gather_rows(
    values: Int[Array, "N T"], index: Int[Array, "N ..."], *, ops: ArrayOps = JAX
) -> Int[Array, "N ..."]:
    """``values[n, index[n, ...]]`` for every row n.

    Args:
        values: int[N, T].
        index: int[N, ...]; indices into each row, in ``[0, T)``.
        ops: the array module (:data:`thdkit._src.host.JAX` or :data:`thdkit._src.host.NUMPY`).

    Returns:
        int[N, ...], the shape of ``index`` and the dtype of ``values``.

    Example:
        >>> gather_rows(jnp.array([[5, 6, 7], [8, 9, 10]]), jnp.array([[2, 0], [1, 1]]))
        Array([[7, 5],
               [9, 9]], dtype=int32)
    """
    flat = index.reshape(index.shape[0], math.prod(index.shape[1:]))  # no -1: N may be 0
    return ops.xp.take_along_axis(values, flat, axis=-1).reshape(index.shape)


def shift(x: Array, by: int, *, fill: int, ops: ArrayOps = JAX) -> Array:
    """Shifts ``x`` along its last axis by ``by`` places (right if positive), filling in."""
    xp = ops.xp
    pad = xp.full((*x.shape[:-1], abs(by)), fill, x.dtype)
    if by > 0:
        return xp.concatenate([pad, x[..., :-by]], axis=-1)
    return xp.concatenate([x[..., -by:], pad], axis=-1)
