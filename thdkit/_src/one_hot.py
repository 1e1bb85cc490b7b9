"""The one_hot method: the published O(T·S) alternative, kept as the benchmark's baseline.

Per segment, the other side's key (positions, or ``rl - pos`` for bottom-right) is reduced over a
one-hot ``[T, S+1]`` matrix; each token then compares its own key with its segment's aggregate:

- padding / no_mask: a token is active iff its id is present on the other side;
- causal: q active iff ``pos_q >= min pos_kv`` of its segment, kv iff ``pos_kv <= max pos_q``;
- bottom-right: with ``key = rl - pos``, q active iff ``key_q <= max key_kv``, kv iff
  ``key_kv >= min key_q``.

The active tokens then go through the same counting step as the reference
(in :mod:`thdkit._src.metadata`). Memory O(T·S).
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Bool, Int

from thdkit._src.mask_types import MaskType
from thdkit._src.segments import run_lengths

__all__ = ["one_hot_row"]

_BIG = jnp.iinfo(jnp.int32).max


def _segment_reduce(
    one_hot: Bool[Array, "T S1"], key: Int[Array, " T"], *, take_max: bool
) -> Int[Array, " S1"]:
    """Max (or min) of ``key`` over each segment's tokens; -BIG (BIG) where a segment is absent."""
    if take_max:
        return jnp.max(jnp.where(one_hot, key[:, None], -_BIG), axis=0)
    return jnp.min(jnp.where(one_hot, key[:, None], _BIG), axis=0)


def one_hot_row(
    q: tuple[Int[Array, " T_q"], Int[Array, " T_q"]],
    kv: tuple[Int[Array, " T_kv"], Int[Array, " T_kv"]],
    *,
    mask_type: MaskType,
    num_segments: int,
) -> tuple[Bool[Array, " T_q"], Bool[Array, " T_kv"]]:
    """The tokens of one row with an allowed partner, by the one-hot method.

    Args:
        q: ``(ids, pos)`` of the queries; kv: of the keys/values.
        mask_type: a parsed ``MaskType``.
        num_segments: S, the width of the one-hot matrices.

    Returns:
        ``(q_active, kv_active)``: bool[T_q], bool[T_kv].

    Example:
        >>> side = (jnp.array([1, 1, 0]), jnp.array([0, 1, 0]))
        >>> [a.tolist() for a in one_hot_row(side, side, mask_type=MaskType.CAUSAL,
        ...                                  num_segments=1)]
        [[True, True, False], [True, True, False]]
    """
    (ids_q, pos_q), (ids_kv, pos_kv) = q, kv
    segments = jnp.arange(num_segments + 1, dtype=ids_q.dtype)[None, :]
    one_hot_q = ids_q[:, None] == segments
    one_hot_kv = ids_kv[:, None] == segments
    if mask_type.is_causal:
        q_active = pos_q >= _segment_reduce(one_hot_kv, pos_kv, take_max=False)[ids_q]
        kv_active = pos_kv <= _segment_reduce(one_hot_q, pos_q, take_max=True)[ids_kv]
    elif mask_type.is_bottom_right:
        key_q = run_lengths(ids_q) - pos_q
        key_kv = run_lengths(ids_kv) - pos_kv
        q_active = key_q <= _segment_reduce(one_hot_kv, key_kv, take_max=True)[ids_q]
        kv_active = key_kv >= _segment_reduce(one_hot_q, key_q, take_max=False)[ids_kv]
    else:
        q_active = jnp.any(one_hot_kv, axis=0)[ids_q]
        kv_active = jnp.any(one_hot_q, axis=0)[ids_kv]
    return q_active & (ids_q != 0), kv_active & (ids_kv != 0)
