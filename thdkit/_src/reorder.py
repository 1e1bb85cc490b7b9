"""Context-parallel reorders of a row's tokens, their inverses, and ring-step views.

A reorder permutes the sequence axis so that the contiguous shard ``r`` of length ``T / cp``
holds what rank ``r`` owns:

- ``striped(stripe_size=k)``: blocks of k tokens dealt round-robin; block n goes to rank
  ``n % cp``, each rank keeps its blocks in order. Needs ``T % (cp * k) == 0``.
- ``dual_chunk_swap``: the row cut into ``2 * cp`` chunks; rank r holds chunks r and
  ``2 * cp - 1 - r`` (balances causal work). Needs ``T % (2 * cp) == 0``.

Reorder ids, positions and every per-token array with the same function (a permutation per
row, e.g. :func:`thdkit.reorder.balance`'s, with ``permute``; ``unpermute`` undoes it). Works on
NumPy and JAX arrays, under jit (the permutation is static); other array-likes (lists) are read
as NumPy arrays and give NumPy arrays. Arguments are checked on every call, before the cached
permutation is built, and accept Python and NumPy integers (not bools).
"""

from __future__ import annotations

import functools
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Int

from thdkit._src.limits import check_int

__all__ = [
    "dual_chunk_swap",
    "permute",
    "ring_step",
    "shard",
    "striped",
    "undo_dual_chunk_swap",
    "unpermute",
    "unstriped",
]

ArrayT = TypeVar("ArrayT", np.ndarray, jax.Array)


def _sequence_axis(x: Any, axis: Any) -> tuple[np.ndarray | jax.Array, int]:
    """``x`` as an array (lists become NumPy arrays) and ``axis`` as a non-negative index."""
    if not isinstance(x, (np.ndarray, jax.Array)):
        x = np.asarray(x)
    if x.ndim == 0:
        raise ValueError("x must have a sequence axis, got a 0-d array")
    return x, check_int(axis, "axis", low=-x.ndim, high=x.ndim - 1) % x.ndim


def _check_multiple(seq_len: int, multiple: int, what: str) -> None:
    if seq_len % multiple:
        raise ValueError(
            f"{what} needs the sequence length to be a multiple of {multiple}, got T={seq_len}"
        )


@functools.lru_cache(maxsize=256)
def _striped_order(seq_len: int, cp: int, stripe_size: int) -> np.ndarray:
    """The permutation of :func:`striped`; its arguments are checked by the caller."""
    blocks = np.arange(seq_len).reshape(-1, cp, stripe_size)
    return blocks.transpose(1, 0, 2).reshape(-1)


@functools.lru_cache(maxsize=256)
def _dual_chunk_order(seq_len: int, cp: int) -> np.ndarray:
    """The permutation of :func:`dual_chunk_swap`; its arguments are checked by the caller."""
    chunks = np.arange(seq_len).reshape(2 * cp, -1)
    return np.concatenate([np.concatenate([chunks[r], chunks[2 * cp - 1 - r]]) for r in range(cp)])


def _striped_args(x: Any, cp: Any, stripe_size: Any, axis: Any) -> tuple[Any, int, np.ndarray]:
    x, axis = _sequence_axis(x, axis)
    cp = check_int(cp, "cp", low=1)
    stripe_size = check_int(stripe_size, "stripe_size", low=1)
    seq_len = x.shape[axis]
    _check_multiple(seq_len, cp * stripe_size, f"striped(cp={cp}, stripe_size={stripe_size})")
    return x, axis, _striped_order(seq_len, cp, stripe_size)


def _dual_chunk_args(x: Any, cp: Any, axis: Any) -> tuple[Any, int, np.ndarray]:
    x, axis = _sequence_axis(x, axis)
    cp = check_int(cp, "cp", low=1)
    _check_multiple(x.shape[axis], 2 * cp, f"dual_chunk_swap(cp={cp})")
    return x, axis, _dual_chunk_order(x.shape[axis], cp)


def _take(x: ArrayT, order: np.ndarray, axis: int) -> ArrayT:
    if isinstance(x, np.ndarray):
        return np.take(x, order, axis=axis)
    return jnp.take(x, jnp.asarray(order), axis=axis)


def _inverse(order: np.ndarray) -> np.ndarray:
    return np.argsort(order, kind="stable")


def striped(x: ArrayT, *, cp: int, stripe_size: int = 1, axis: int = -1) -> ArrayT:
    """Striped reorder: contiguous shard r then holds blocks r, r + cp, r + 2cp, ... .

    Args:
        x: a NumPy or JAX array with a sequence axis of length T (other array-likes, e.g.
            lists, are read as NumPy arrays).
        cp: number of context-parallel ranks, a Python or NumPy int >= 1.
        stripe_size: tokens per block, an int >= 1.
        axis: the sequence axis.

    Returns:
        ``x`` with its sequence axis permuted; same shape and array type.

    Raises:
        TypeError: cp, stripe_size or axis is not an int (bools included).
        ValueError: cp or stripe_size < 1, axis out of range, a 0-d ``x``, or T not a multiple
            of ``cp * stripe_size``.

    Example:
        >>> striped(np.arange(8), cp=2)
        array([0, 2, 4, 6, 1, 3, 5, 7])
    """
    x, axis, order = _striped_args(x, cp, stripe_size, axis)
    return _take(x, order, axis)


def unstriped(x: ArrayT, *, cp: int, stripe_size: int = 1, axis: int = -1) -> ArrayT:
    """Inverse of :func:`striped`: restores the original token order.

    Args:
        x, cp, stripe_size, axis: as for :func:`striped`.

    Returns:
        ``x`` with its sequence axis permuted back; same shape and array type.

    Raises:
        TypeError, ValueError: as :func:`striped`.

    Example:
        >>> unstriped(striped(np.arange(8), cp=2, stripe_size=2), cp=2, stripe_size=2)
        array([0, 1, 2, 3, 4, 5, 6, 7])
    """
    x, axis, order = _striped_args(x, cp, stripe_size, axis)
    return _take(x, _inverse(order), axis)


def dual_chunk_swap(x: ArrayT, *, cp: int, axis: int = -1) -> ArrayT:
    """Dual-chunk-swap reorder: shard r holds chunks r and 2cp-1-r of 2cp equal chunks.

    Args:
        x: a NumPy or JAX array with a sequence axis of length T (lists are read as NumPy).
        cp: number of context-parallel ranks, an int >= 1.
        axis: the sequence axis.

    Returns:
        ``x`` with its sequence axis permuted; same shape and array type.

    Raises:
        TypeError: cp or axis is not an int (bools included).
        ValueError: cp < 1, axis out of range, a 0-d ``x``, or T not a multiple of ``2 * cp``.

    Example:
        >>> dual_chunk_swap(np.arange(8), cp=2)
        array([0, 1, 6, 7, 2, 3, 4, 5])
    """
    x, axis, order = _dual_chunk_args(x, cp, axis)
    return _take(x, order, axis)


def undo_dual_chunk_swap(x: ArrayT, *, cp: int, axis: int = -1) -> ArrayT:
    """Inverse of :func:`dual_chunk_swap`.

    Args:
        x, cp, axis: as for :func:`dual_chunk_swap`.

    Returns:
        ``x`` with its sequence axis permuted back; same shape and array type.

    Raises:
        TypeError, ValueError: as :func:`dual_chunk_swap`.

    Example:
        >>> undo_dual_chunk_swap(dual_chunk_swap(np.arange(8), cp=2), cp=2)
        array([0, 1, 2, 3, 4, 5, 6, 7])
    """
    x, axis, order = _dual_chunk_args(x, cp, axis)
    return _take(x, _inverse(order), axis)


def shard(x: ArrayT, *, cp: int, rank: int, axis: int = -1) -> ArrayT:
    """The contiguous slice of length ``T / cp`` that rank ``rank`` holds.

    Args:
        x: a NumPy or JAX array with a sequence axis of length T (lists are read as NumPy).
        cp: number of context-parallel ranks, an int >= 1 dividing T.
        rank: an int in ``[0, cp)``.
        axis: the sequence axis.

    Returns:
        ``x[..., rank * T / cp : (rank + 1) * T / cp, ...]`` along ``axis``.

    Raises:
        TypeError: cp, rank or axis is not an int (bools included).
        ValueError: cp < 1, rank outside ``[0, cp)``, axis out of range, a 0-d ``x``, or T not
            a multiple of cp.

    Example:
        >>> shard(np.arange(8), cp=4, rank=1)
        array([2, 3])
    """
    return _shard(x, cp=cp, rank=rank, axis=axis, rank_name="rank")


def _shard(x: Any, *, cp: Any, rank: Any, axis: Any, rank_name: str) -> Any:
    x, axis = _sequence_axis(x, axis)
    cp = check_int(cp, "cp", low=1)
    rank = check_int(rank, rank_name, low=0, high=cp - 1)
    seq_len = x.shape[axis]
    _check_multiple(seq_len, cp, f"shard(cp={cp})")
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

    Raises:
        TypeError, ValueError: as :func:`shard`, naming ``q_rank`` or ``kv_rank``.

    Example:
        >>> ids, pos = np.array([1, 1, 2, 2, 2, 2, 0, 0]), np.array([0, 1, 0, 1, 2, 3, 0, 0])
        >>> [a.tolist() for a in ring_step(striped(ids, cp=2), striped(pos, cp=2),
        ...                                cp=2, q_rank=0, kv_rank=1)]
        [[1, 2, 2, 0], [0, 0, 2, 0], [1, 2, 2, 0], [1, 1, 3, 0]]
    """
    return (
        _shard(segment_ids, cp=cp, rank=q_rank, axis=-1, rank_name="q_rank"),
        _shard(segment_pos, cp=cp, rank=q_rank, axis=-1, rank_name="q_rank"),
        _shard(segment_ids, cp=cp, rank=kv_rank, axis=-1, rank_name="kv_rank"),
        _shard(segment_pos, cp=cp, rank=kv_rank, axis=-1, rank_name="kv_rank"),
    )


def permute(x: Any, order: Int[Any, "B T"], *, axis: int = 1) -> Any:
    """``x`` with each row's tokens in ``order`` (e.g. :attr:`thdkit.reorder.Balanced.order`).

    Args:
        x: a NumPy or JAX array [B, ..., T, ...] whose axis ``axis`` is the sequence.
        order: int[B, T], a permutation per row.
        axis: the sequence axis of ``x`` (1 by default; the batch is axis 0).

    Returns:
        ``x`` reordered, the same type and shape.

    Example:
        >>> permute(np.array([[10, 11, 12]]), np.array([[2, 0, 1]])).tolist()
        [[12, 10, 11]]
    """
    xp = np if isinstance(x, np.ndarray) else jnp
    index = xp.asarray(order).reshape(order.shape[:2] + (1,) * (x.ndim - 2))
    index = xp.moveaxis(index, 1, axis) if axis != 1 else index
    return xp.take_along_axis(x, index, axis=axis)


def unpermute(x: Any, order: Int[Any, "B T"], *, axis: int = 1) -> Any:
    """The inverse of :func:`permute`: ``unpermute(permute(x, order), order) == x``.

    Example:
        >>> order = np.array([[2, 0, 1]])
        >>> unpermute(permute(np.array([[10, 11, 12]]), order), order).tolist()
        [[10, 11, 12]]
    """
    return permute(x, np.argsort(np.asarray(order), axis=1, kind="stable"), axis=axis)
