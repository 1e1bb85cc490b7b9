"""Context-parallel reorders of a row's tokens, their inverses, and ring-step views.

A reorder permutes the sequence axis so that the contiguous shard ``r`` of length ``T / cp``
holds what rank ``r`` owns:

- ``striped(stripe_size=k)``: blocks of k tokens dealt round-robin; block n goes to rank
  ``n % cp``, each rank keeps its blocks in order. Needs ``T % (cp * k) == 0``.
- ``dual_chunk_swap``: the row cut into ``2 * cp`` chunks; rank r holds chunks r and
  ``2 * cp - 1 - r`` (balances causal work). Needs ``T % (2 * cp) == 0``.

Reorder ids, positions and every per-token array with the same function. Works on NumPy and JAX
arrays, under jit (the permutation is static).
"""

from __future__ import annotations

import functools
from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "dual_chunk_swap",
    "ring_step",
    "shard",
    "striped",
    "undo_dual_chunk_swap",
    "unstriped",
]

ArrayT = TypeVar("ArrayT", np.ndarray, jax.Array)


def _check(seq_len: int, cp: int, multiple: int, what: str) -> None:
    if not isinstance(cp, int) or cp < 1:
        raise ValueError(f"cp must be a positive int, got {cp!r}")
    if seq_len % multiple:
        raise ValueError(
            f"{what} needs the sequence length to be a multiple of {multiple}, got T={seq_len}"
        )


@functools.lru_cache(maxsize=256)
def _striped_order(seq_len: int, cp: int, stripe_size: int) -> np.ndarray:
    if not isinstance(stripe_size, int) or stripe_size < 1:
        raise ValueError(f"stripe_size must be a positive int, got {stripe_size!r}")
    _check(seq_len, cp, cp * stripe_size, f"striped(cp={cp}, stripe_size={stripe_size})")
    blocks = np.arange(seq_len).reshape(-1, cp, stripe_size)
    return blocks.transpose(1, 0, 2).reshape(-1)


@functools.lru_cache(maxsize=256)
def _dual_chunk_order(seq_len: int, cp: int) -> np.ndarray:
    _check(seq_len, cp, 2 * cp, f"dual_chunk_swap(cp={cp})")
    chunks = np.arange(seq_len).reshape(2 * cp, -1)
    return np.concatenate([np.concatenate([chunks[r], chunks[2 * cp - 1 - r]]) for r in range(cp)])


def _take(x: ArrayT, order: np.ndarray, axis: int) -> ArrayT:
    if isinstance(x, np.ndarray):
        return np.take(x, order, axis=axis)
    return jnp.take(x, jnp.asarray(order), axis=axis)


def _inverse(order: np.ndarray) -> np.ndarray:
    return np.argsort(order, kind="stable")


def striped(x: ArrayT, *, cp: int, stripe_size: int = 1, axis: int = -1) -> ArrayT:
    """Striped reorder: contiguous shard r then holds blocks r, r + cp, r + 2cp, ... .

    Args:
        x: any array with a sequence axis of length T.
        cp: number of context-parallel ranks.
        stripe_size: tokens per block.
        axis: the sequence axis.

    Returns:
        ``x`` with its sequence axis permuted; same shape and type.

    Raises:
        ValueError: T is not a multiple of ``cp * stripe_size``, or cp/stripe_size are not >= 1.

    Example:
        >>> striped(np.arange(8), cp=2)
        array([0, 2, 4, 6, 1, 3, 5, 7])
    """
    return _take(x, _striped_order(x.shape[axis], cp, stripe_size), axis)


def unstriped(x: ArrayT, *, cp: int, stripe_size: int = 1, axis: int = -1) -> ArrayT:
    """Inverse of :func:`striped`: restores the original token order.

    Example:
        >>> unstriped(striped(np.arange(8), cp=2, stripe_size=2), cp=2, stripe_size=2)
        array([0, 1, 2, 3, 4, 5, 6, 7])
    """
    return _take(x, _inverse(_striped_order(x.shape[axis], cp, stripe_size)), axis)


def dual_chunk_swap(x: ArrayT, *, cp: int, axis: int = -1) -> ArrayT:
    """Dual-chunk-swap reorder: shard r holds chunks r and 2cp-1-r of 2cp equal chunks.

    Raises:
        ValueError: T is not a multiple of ``2 * cp``.

    Example:
        >>> dual_chunk_swap(np.arange(8), cp=2)
        array([0, 1, 6, 7, 2, 3, 4, 5])
    """
    return _take(x, _dual_chunk_order(x.shape[axis], cp), axis)


def undo_dual_chunk_swap(x: ArrayT, *, cp: int, axis: int = -1) -> ArrayT:
    """Inverse of :func:`dual_chunk_swap`.

    Example:
        >>> undo_dual_chunk_swap(dual_chunk_swap(np.arange(8), cp=2), cp=2)
        array([0, 1, 2, 3, 4, 5, 6, 7])
    """
    return _take(x, _inverse(_dual_chunk_order(x.shape[axis], cp)), axis)


def shard(x: ArrayT, *, cp: int, rank: int, axis: int = -1) -> ArrayT:
    """The contiguous slice of length ``T / cp`` that rank ``rank`` holds.

    Example:
        >>> shard(np.arange(8), cp=4, rank=1)
        array([2, 3])
    """
    seq_len = x.shape[axis]
    _check(seq_len, cp, cp, f"shard(cp={cp})")
    if not 0 <= rank < cp:
        raise ValueError(f"rank must be in [0, {cp}), got {rank}")
    size = seq_len // cp
    index = [slice(None)] * x.ndim
    index[axis] = slice(rank * size, (rank + 1) * size)
    return x[tuple(index)]


def ring_step(
    segment_ids: ArrayT, segment_pos: ArrayT, *, cp: int, q_rank: int, kv_rank: int
) -> tuple[ArrayT, ArrayT, ArrayT, ArrayT]:
    """The layout seen by ring step (q_rank, kv_rank) of an already reordered self-attention row.

    Args:
        segment_ids, segment_pos: int[*B, T]; reordered layout (last axis = sequence).
        cp: number of ranks.
        q_rank: the rank whose queries attend.
        kv_rank: the rank whose keys/values are visited.

    Returns:
        ``(ids_q, pos_q, ids_kv, pos_kv)``, each int[*B, T / cp].

    Example:
        >>> ids, pos = np.array([1, 1, 2, 2, 2, 2, 0, 0]), np.array([0, 1, 0, 1, 2, 3, 0, 0])
        >>> [a.tolist() for a in ring_step(striped(ids, cp=2), striped(pos, cp=2),
        ...                                cp=2, q_rank=0, kv_rank=1)]
        [[1, 2, 2, 0], [0, 0, 2, 0], [1, 2, 2, 0], [1, 1, 3, 0]]
    """
    return (
        shard(segment_ids, cp=cp, rank=q_rank),
        shard(segment_pos, cp=cp, rank=q_rank),
        shard(segment_ids, cp=cp, rank=kv_rank),
        shard(segment_pos, cp=cp, rank=kv_rank),
    )
