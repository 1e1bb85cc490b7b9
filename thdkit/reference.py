"""The dense references: the O(T_q·T_kv) spec of DESIGN.md, written as it reads.

``dense_row`` is the dense metadata method, ``reference_attention`` the dense masked-softmax
attention; both materialise ``allowed[T_q, T_kv]``. They are the oracles every other method is
tested against and the "before" of the benchmarks; do not use them on long rows.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from thdkit.counting import count_and_offsets
from thdkit.layout import run_lengths
from thdkit.masks import MaskType, rel

__all__ = [
    "allowed_pairs",
    "check_window",
    "dense_row",
    "in_window",
    "pair_mask",
    "reference_attention",
]


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
    return pair_mask(
        ids_q,
        pos_q,
        run_lengths(ids_q),
        ids_kv,
        pos_kv,
        run_lengths(ids_kv),
        mask_type=mask_type,
        window_size=None,
    )


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


# --- The dense reference attention -------------------------------------------------------------

Window = tuple[int | None, int | None] | None
"""A sliding window ``(left, right)``; None (or a negative bound) means unbounded on that side."""


def check_window(window_size: Any) -> Window:
    """``window_size`` as ``(left, right)`` with None for unbounded sides, or None.

    Raises:
        ValueError: not None and not a pair.
        TypeError: a bound that is neither a Python int nor None.

    Example:
        >>> check_window((-1, 3)), check_window((None, -1))
        ((None, 3), None)
    """
    if window_size is None:
        return None
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise ValueError(f"window_size must be None or a pair (left, right), got {window_size!r}")
    bounds = []
    for side, bound in zip(("left", "right"), window_size, strict=True):
        if bound is not None and (
            isinstance(bound, bool) or not isinstance(bound, (int, np.integer))
        ):
            raise TypeError(
                f"window_size {side} bound must be a Python int or None, got {type(bound).__name__}"
            )
        bounds.append(None if bound is None or bound < 0 else int(bound))
    return None if bounds == [None, None] else (bounds[0], bounds[1])


def _bound(window_size: Window, side: int) -> int | None:
    """One side of a window as a non-negative int, or None where it is unbounded."""
    if window_size is None or window_size[side] is None or window_size[side] < 0:
        return None
    return int(window_size[side])


def in_window(
    mask_type: MaskType,
    window_size: Window,
    pos_q: Int[Array, "..."],
    pos_kv: Int[Array, "..."],
    rl_q: Int[Array, "..."],
    rl_kv: Int[Array, "..."],
) -> Bool[Array, "..."] | bool:
    """Whether key tokens lie inside the queries' sliding window, broadcasting the arguments.

    Top-left types (causal, padding_causal) and no_mask/padding: ``pos_q - left <= pos_kv <=
    pos_q + right``. Bottom-right types: ``rl_q - pos_q + left >= rl_kv - pos_kv`` (the window
    slides along the bottom-right diagonal; ``right`` does not apply).

    Args:
        mask_type: a parsed ``MaskType``.
        window_size: ``(left, right)`` or None; None or negative bounds are unbounded.
        pos_q, pos_kv: positions inside the documents.
        rl_q, rl_kv: run (document) lengths, read by the bottom-right types only.

    Returns:
        bool array of the broadcast shape, or the Python ``True`` when nothing is bounded.

    Example:
        >>> pos = jnp.arange(4)
        >>> in_window(MaskType.CAUSAL, (1, None), pos[:, None], pos[None, :], 4, 4).astype(int)
        Array([[1, 1, 1, 1],
               [1, 1, 1, 1],
               [0, 1, 1, 1],
               [0, 0, 1, 1]], dtype=int32)
    """
    left, right = _bound(window_size, 0), _bound(window_size, 1)
    inside: Bool[Array, "..."] | bool = True
    if mask_type.is_bottom_right:
        if left is not None:
            inside = rl_q - pos_q + left >= rl_kv - pos_kv
        return inside
    if left is not None:
        inside = pos_kv >= pos_q - left
    if right is not None:
        inside = inside & (pos_kv <= pos_q + right)
    return inside


def pair_mask(
    ids_q: Int[Array, "*B T_q"],
    pos_q: Int[Array, "*B T_q"],
    rl_q: Int[Array, "*B T_q"],
    ids_kv: Int[Array, "*B T_kv"],
    pos_kv: Int[Array, "*B T_kv"],
    rl_kv: Int[Array, "*B T_kv"],
    *,
    mask_type: MaskType,
    window_size: Window,
) -> Bool[Array, "*B T_q T_kv"]:
    """``allowed[..., i, j]`` with explicit run lengths, intersected with the sliding window.

    With ``rl = run_lengths(ids)`` and no window this equals :func:`allowed_pairs`; ring steps
    pass the global document lengths instead, which the bottom-right rule needs there.

    Args:
        ids_q, pos_q, rl_q: int[*B, T_q]; query ids (0 = padding), positions, run lengths.
        ids_kv, pos_kv, rl_kv: int[*B, T_kv]; the same for keys/values.
        mask_type: a parsed ``MaskType``.
        window_size: ``(left, right)`` or None (see :func:`in_window`).

    Returns:
        bool[*B, T_q, T_kv].

    Example:
        >>> ids, pos = jnp.array([1, 1, 1]), jnp.arange(3)
        >>> pair_mask(ids, pos, 3 * ids, ids, pos, 3 * ids, mask_type=MaskType.CAUSAL,
        ...           window_size=(1, 0)).astype(int)
        Array([[1, 0, 0],
               [1, 1, 0],
               [0, 1, 1]], dtype=int32)
    """
    q = (ids_q[..., :, None], pos_q[..., :, None], rl_q[..., :, None])
    kv = (ids_kv[..., None, :], pos_kv[..., None, :], rl_kv[..., None, :])
    same_segment = (q[0] == kv[0]) & (q[0] != 0)
    allowed = same_segment & rel(mask_type, q[1], kv[1], q[2], kv[2])
    return allowed & in_window(mask_type, window_size, q[1], kv[1], q[2], kv[2])


def reference_attention(
    query: Float[Array, "B T_q H_q D"],
    key: Float[Array, "B T_kv H_kv D"],
    value: Float[Array, "B T_kv H_kv D_v"],
    *,
    ids_q: Int[Array, "B T_q"],
    pos_q: Int[Array, "B T_q"],
    rl_q: Int[Array, "B T_q"],
    ids_kv: Int[Array, "B T_kv"],
    pos_kv: Int[Array, "B T_kv"],
    rl_kv: Int[Array, "B T_kv"],
    mask_type: MaskType,
    window_size: Window,
    scale: float,
) -> tuple[Float[Array, "B T_q H_q D_v"], Float[Array, "B T_q H_q"]]:
    """Dense masked-softmax attention over :func:`pair_mask`: the oracle, O(T_q·T_kv) memory.

    Query head ``h`` reads key/value head ``h // (H_q // H_kv)`` (GQA/MQA). Computed in float32.
    Rows with no allowed key give zeros and ``-inf``, with zero (never NaN) gradients.

    Args:
        query: float[B, T_q, H_q, D].
        key: float[B, T_kv, H_kv, D]; ``H_q`` a multiple of ``H_kv``.
        value: float[B, T_kv, H_kv, D_v].
        ids_q, pos_q, rl_q, ids_kv, pos_kv, rl_kv, mask_type, window_size: as for
            :func:`pair_mask`.
        scale: multiplies the logits.

    Returns:
        ``(out, lse)``: float32[B, T_q, H_q, D_v], the attention output normalised over the
        allowed keys; float32[B, T_q, H_q], the log-sum-exp of the allowed logits.

    Example:
        >>> ids, pos = jnp.array([[1, 1, 0]]), jnp.array([[0, 1, 2]])
        >>> q = k = jnp.zeros((1, 3, 1, 2))
        >>> v = jnp.arange(3.0).reshape(1, 3, 1, 1)
        >>> out, lse = reference_attention(q, k, v, ids_q=ids, pos_q=pos, rl_q=2 * ids,
        ...     ids_kv=ids, pos_kv=pos, rl_kv=2 * ids, mask_type=MaskType.CAUSAL,
        ...     window_size=None, scale=1.0)
        >>> out[0, :, 0, 0]
        Array([0. , 0.5, 0. ], dtype=float32)
        >>> lse[0, :, 0]
        Array([0.       , 0.6931472,      -inf], dtype=float32)
    """
    batch, seq_q, heads_q, _ = query.shape
    heads_kv = key.shape[2]
    groups = heads_q // heads_kv
    q = query.astype(jnp.float32).reshape(batch, seq_q, heads_kv, groups, -1)
    logits = scale * jnp.einsum("bqhgd,bkhd->bhgqk", q, key.astype(jnp.float32))
    allowed = pair_mask(
        ids_q, pos_q, rl_q, ids_kv, pos_kv, rl_kv, mask_type=mask_type, window_size=window_size
    )[:, None, None]
    # The max only stabilises exp; its gradient cancels, and rows with no allowed key keep a
    # finite stand-in so that nothing evaluates inf - inf.
    row_max = jnp.max(jnp.where(allowed, logits, -jnp.inf), axis=-1, keepdims=True)
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    weights = jnp.where(allowed, jnp.exp(logits - row_max), 0.0)
    total = jnp.sum(weights, axis=-1)
    # Double where: the log and the division never see a zero, so masked rows get zero
    # gradients instead of 0 * inf.
    safe_total = jnp.where(total > 0, total, 1.0)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", weights, value.astype(jnp.float32))
    out = out / jnp.moveaxis(safe_total, 3, 1)[..., None]
    lse = jnp.where(total > 0, row_max[..., 0] + jnp.log(safe_total), -jnp.inf)
    return (
        out.reshape(batch, seq_q, heads_q, -1),
        jnp.moveaxis(lse, 3, 1).reshape(batch, seq_q, heads_q),
    )
