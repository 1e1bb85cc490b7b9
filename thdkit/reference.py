"""The dense references: the O(T_q·T_kv) spec of docs/semantics.md, written as it reads.

``dense_row`` is the dense metadata method, ``reference_attention`` the dense masked-softmax
attention; both materialise ``allowed[T_q, T_kv]``. They are the oracles every other method is
tested against and the "before" of the benchmarks; do not use them on long rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from thdkit.counting import count_and_offsets
from thdkit.layout import run_lengths
from thdkit.masks import MaskType, Window, pair_mask, sanitize

__all__ = [
    "allowed_pairs",
    "dense_row",
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
    """Dense masked-softmax attention over :func:`thdkit.masks.pair_mask`: the oracle.

    O(T_q·T_kv) memory. Query head ``h`` reads key/value head ``h // (H_q // H_kv)`` (GQA/MQA).
    Computed in float32. Rows with no allowed key give zeros and ``-inf``, with zero (never NaN)
    gradients. Isolation: every product is computed from inputs whose non-finite elements were
    replaced by zeros (:func:`thdkit.masks.sanitize`); a row with at least one allowed key whose
    own query, or one of whose allowed keys or values, holds a NaN or inf gets NaN output and NaN
    ``lse``, and passes no gradient back (it contributes zeros to every gradient; non-finite
    input elements get zero gradients). Every other row, and its gradients, is bit-equal to the
    same call without the non-finite values.

    Args:
        query: float[B, T_q, H_q, D].
        key: float[B, T_kv, H_kv, D]; ``H_q`` a multiple of ``H_kv``.
        value: float[B, T_kv, H_kv, D_v].
        ids_q, pos_q, rl_q, ids_kv, pos_kv, rl_kv, mask_type, window_size: as for
            :func:`thdkit.masks.pair_mask`.
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
    (query, bad_q), (key, bad_k), (value, bad_v) = (sanitize(x) for x in (query, key, value))
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
    # Poisoned rows: [B, H_kv, G, T_q], like total.
    bad_kv = jnp.moveaxis(bad_k | bad_v, 1, 2)[:, :, None, None, :]
    poisoned = jnp.any(allowed & bad_kv, axis=-1)
    poisoned |= jnp.moveaxis(bad_q.reshape(batch, seq_q, heads_kv, groups), 1, 3)
    poisoned &= total > 0
    out = jnp.where(jnp.moveaxis(poisoned, 3, 1)[..., None], jnp.nan, out)
    lse = jnp.where(poisoned, jnp.nan, lse)
    return (
        out.reshape(batch, seq_q, heads_q, -1),
        jnp.moveaxis(lse, 3, 1).reshape(batch, seq_q, heads_q),
    )
