"""The dense method: the O(T_q·T_kv) reference of DESIGN.md, written as the spec reads.

It materialises ``allowed[T_q, T_kv]`` per row. It is the oracle the other methods are tested
against and the "before" of the benchmark; do not use it on long rows.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Bool, Int

from thdkit.counting import count_and_offsets
from thdkit.layout import run_lengths
from thdkit.masks import MaskType, rel

__all__ = ["allowed_pairs", "dense_row"]


def allowed_pairs(
    ids_q: Int[Array, "*B T_q"],
    pos_q: Int[Array, "*B T_q"],
    ids_kv: Int[Array, "*B T_kv"],
    pos_kv: Int[Array, "*B T_kv"],
    *,
    mask_type: MaskType,
) -> Bool[Array, "*B T_q T_kv"]:
    """``allowed[..., i, j]``: whether query token i may attend key token j.

    Args:
        ids_q, pos_q: int[*B, T_q]; query segment ids (0 = padding) and positions.
        ids_kv, pos_kv: int[*B, T_kv]; key/value segment ids and positions.
        mask_type: a parsed ``MaskType``.

    Returns:
        bool[*B, T_q, T_kv].

    Example:
        >>> ids, pos = jnp.array([1, 1, 0]), jnp.array([0, 1, 2])
        >>> allowed_pairs(ids, pos, ids, pos, mask_type=MaskType.CAUSAL).astype(int)
        Array([[1, 0, 0],
               [1, 1, 0],
               [0, 0, 0]], dtype=int32)
    """
    q = (ids_q[..., :, None], pos_q[..., :, None], run_lengths(ids_q)[..., :, None])
    kv = (ids_kv[..., None, :], pos_kv[..., None, :], run_lengths(ids_kv)[..., None, :])
    same_segment = (q[0] == kv[0]) & (q[0] != 0)
    return same_segment & rel(mask_type, q[1], kv[1], q[2], kv[2])


def dense_row(
    q: tuple[Int[Array, " T_q"], Int[Array, " T_q"]],
    kv: tuple[Int[Array, " T_kv"], Int[Array, " T_kv"]] | None,
    *,
    mask_type: MaskType,
    num_segments: int,
) -> tuple[Array, Array, Array, Array]:
    """Raw metadata of one row by the reference (kv None means kv = q).

    Returns:
        ``(q_seqlens int32[S], kv_seqlens int32[S], q_offsets int32[S+1], kv_offsets int32[S+1])``.
    """
    ids_q, pos_q = q
    ids_kv, pos_kv = q if kv is None else kv
    allowed = allowed_pairs(ids_q, pos_q, ids_kv, pos_kv, mask_type=mask_type)
    row_ids = jnp.where(jnp.any(allowed, axis=1), ids_q, 0)
    col_ids = jnp.where(jnp.any(allowed, axis=0), ids_kv, 0)
    q_seqlens, q_offsets = count_and_offsets(row_ids, num_segments=num_segments)
    kv_seqlens, kv_offsets = count_and_offsets(col_ids, num_segments=num_segments)
    return q_seqlens, kv_seqlens, q_offsets, kv_offsets
