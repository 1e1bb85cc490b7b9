"""The steps every method shares: compaction, and counting seqlens/offsets off per-token ids.

All functions here act on single rows (1-D arrays); the methods are written per row and mapped
over the batch with ``jax.vmap``.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Bool, Int

__all__ = ["compact", "count_and_offsets"]


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
