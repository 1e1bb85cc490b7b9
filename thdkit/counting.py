"""Steps shared across the package: compaction, counting seqlens/offsets off per-token ids, and
the search for where a threshold is crossed inside ranges of a row.

``compact`` and ``count_and_offsets`` act on single rows (1-D arrays, mapped over the batch with
``jax.vmap``); ``first_at_least`` and ``gather_rows`` act on ``[N, T]`` rows directly.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int

__all__ = ["compact", "count_and_offsets", "first_at_least", "gather_rows"]


def compact(
    values: Int[Array, " N"], keep: Bool[Array, " N"], *, size: int, fill: int
) -> Int[Array, " size"]:
    """Moves the kept values to the front, in order, and fills the rest.

    Kept values beyond ``size`` are dropped, so ``size`` may be smaller than ``N``.

    Args:
        values: int[N].
        keep: bool[N]; which values to keep.
        size: static length of the result.
        fill: value of the slots after the kept ones.

    Returns:
        int32[size].

    Example:
        >>> compact(jnp.array([5, 0, 7, 0]), jnp.array([True, False, True, False]), size=3, fill=-1)
        Array([ 5,  7, -1], dtype=int32)
    """
    slot = jnp.where(keep, jnp.cumsum(keep, dtype=jnp.int32) - 1, size)
    return jnp.full(size, fill, jnp.int32).at[slot].set(values.astype(jnp.int32), mode="drop")


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


def first_at_least(
    pos: Int[Array, "N T"],
    lo: Int[Array, "N K"],
    hi: Int[Array, "N K"],
    threshold: Int[Array, "N K"],
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

    Returns:
        int32[N, K].

    Example:
        >>> pos = jnp.array([[0, 2, 4, 6, 1, 3, 9, 10]])
        >>> first_at_least(pos, jnp.array([[0, 4, 4]]), jnp.array([[4, 8, 8]]),
        ...                jnp.array([[3, 4, 11]]))
        Array([[2, 6, 8]], dtype=int32)
    """
    guess = _affine_guess(pos, lo, hi, threshold)
    before = gather_rows(pos, jnp.clip(guess - 1, 0, pos.shape[-1] - 1))
    at = gather_rows(pos, jnp.clip(guess, 0, pos.shape[-1] - 1))
    exact = ((guess <= lo) | (before < threshold)) & ((guess >= hi) | (at >= threshold))
    return jax.lax.cond(
        jnp.all(exact | (lo >= hi)),
        lambda: guess,
        lambda: _search(pos, lo, hi, threshold),
    )


def _affine_guess(pos: Array, lo: Array, hi: Array, threshold: Array) -> Array:
    """The answer of :func:`first_at_least` if positions were affine on each [lo, hi)."""
    last = jnp.maximum(hi - 1, lo)
    first_pos = gather_rows(pos, jnp.clip(lo, 0, pos.shape[-1] - 1))
    last_pos = gather_rows(pos, jnp.clip(last, 0, pos.shape[-1] - 1))
    stride = jnp.maximum((last_pos - first_pos) // jnp.maximum(last - lo, 1), 1)
    steps = -((first_pos - threshold) // stride)  # ceil((threshold - first_pos) / stride)
    return jnp.clip(lo + steps, lo, jnp.maximum(hi, lo))


_SEARCH_WAYS = 16


def _search(pos: Array, lo: Array, hi: Array, threshold: Array) -> Array:
    """:func:`first_at_least` by a 16-way search.

    Each round probes 15 points of every interval at once: ~log16(T) dependent rounds instead of
    log2(T) (the rounds, not the gathers, dominate the cost).
    """
    seq_len = pos.shape[-1]
    fractions = jnp.arange(1, _SEARCH_WAYS, dtype=jnp.int32)[None, None, :]
    for _ in range(max(1, math.ceil(math.log(seq_len + 1, _SEARCH_WAYS)))):
        probes = lo[..., None] + ((hi - lo)[..., None] * fractions) // _SEARCH_WAYS
        values = gather_rows(pos, jnp.clip(probes, 0, seq_len - 1))
        below = (values < threshold[..., None]) & (probes < hi[..., None])
        n_below = jnp.sum(below, axis=-1, dtype=jnp.int32)
        last_below = jnp.take_along_axis(probes, jnp.maximum(n_below - 1, 0)[..., None], axis=-1)
        first_not = jnp.take_along_axis(
            probes, jnp.minimum(n_below, _SEARCH_WAYS - 2)[..., None], axis=-1
        )
        lo = jnp.where(n_below > 0, last_below[..., 0] + 1, lo)
        hi = jnp.maximum(jnp.where(n_below < _SEARCH_WAYS - 1, first_not[..., 0], hi), lo)
    return lo


def gather_rows(values: Int[Array, "N T"], index: Int[Array, "N ..."]) -> Int[Array, "N ..."]:
    """``values[n, index[n, ...]]`` for every row n."""
    flat = index.reshape(index.shape[0], -1)
    return jnp.take_along_axis(values, flat, axis=-1).reshape(index.shape)
