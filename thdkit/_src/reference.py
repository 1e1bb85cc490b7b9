"""The dense references: the O(T_q·T_kv) spec of docs/semantics.md, written as it reads.

``dense_row`` is the dense metadata method, ``reference_attention`` the dense masked-softmax
attention; both materialise ``allowed[T_q, T_kv]``. They are the oracles every other method is
tested against and the "before" of the benchmarks; do not use them on long rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from thdkit._src.isolation import sanitize
from thdkit._src.mask_types import MaskType, Window
from thdkit._src.masks import pair_mask
from thdkit._src.segments import Segments, run_lengths

__all__ = [
    "allowed_pairs",
    "compute_dtype",
    "dense_row",
    "reference_attention",
]


def allowed_pairs(q: Segments, kv: Segments, *, mask_type: MaskType) -> Bool[Array, "*B T_q T_kv"]:
    """``allowed[..., i, j]``: whether query token i may attend key token j (no window).

    Args:
        q: the queries' :class:`thdkit.Segments`, int32[*B, T_q] fields.
        kv: the keys'/values' :class:`thdkit.Segments`, int32[*B, T_kv] fields.
        mask_type: a parsed ``MaskType``.

    Returns:
        bool[*B, T_q, T_kv].

    Example:
        >>> seg = Segments.from_ids(jnp.array([1, 1, 0]))
        >>> allowed_pairs(seg, seg, mask_type=MaskType.CAUSAL).astype(int)
        Array([[1, 0, 0],
               [1, 1, 0],
               [0, 0, 0]], dtype=int32)
    """
    return pair_mask(q, kv, mask_type=mask_type, window_size=None)


def dense_row(
    q: tuple[Int[Array, " T_q"], Int[Array, " T_q"]],
    kv: tuple[Int[Array, " T_kv"], Int[Array, " T_kv"]],
    *,
    mask_type: MaskType,
) -> tuple[Bool[Array, " T_q"], Bool[Array, " T_kv"]]:
    """The tokens of one row with an allowed partner, by the dense reference.

    Args:
        q: ``(ids, pos)`` of the queries; kv: of the keys/values.
        mask_type: a parsed ``MaskType``.

    Returns:
        ``(q_active, kv_active)``: bool[T_q], bool[T_kv].

    Example:
        >>> side = (jnp.array([1, 1, 0]), jnp.array([0, 1, 0]))
        >>> [a.tolist() for a in dense_row(side, side, mask_type=MaskType.CAUSAL)]
        [[True, True, False], [True, True, False]]
    """
    allowed = allowed_pairs(
        Segments(q[0], q[1], run_lengths(q[0])),
        Segments(kv[0], kv[1], run_lengths(kv[0])),
        mask_type=mask_type,
    )
    return jnp.any(allowed, axis=1), jnp.any(allowed, axis=0)


# --- The dense reference attention -------------------------------------------------------------


def compute_dtype() -> jnp.dtype:
    """The dtype :func:`reference_attention` computes in: float64 when x64 is enabled, else
    float32.

    Read at trace time, so ``jax.enable_x64(True)`` (or ``jax.config.update("jax_enable_x64",
    True)``) around a call makes the oracle compute in float64.

    Returns:
        ``jnp.float64`` or ``jnp.float32``.

    Example:
        >>> compute_dtype()
        dtype('float32')
        >>> with jax.enable_x64(True):
        ...     compute_dtype()
        dtype('float64')
    """
    return jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))


def reference_attention(
    query: Float[Array, "B T_q H_q D"],
    key: Float[Array, "B T_kv H_kv D"],
    value: Float[Array, "B T_kv H_kv D_v"],
    *,
    q_segments: Segments,
    kv_segments: Segments,
    mask_type: MaskType,
    window_size: Window,
    scale: float,
    logits_soft_cap: float | None = None,
) -> tuple[Float[Array, "B T_q H_q D_v"], Float[Array, "B T_q H_q"]]:
    """Dense masked-softmax attention over :func:`thdkit.kernels.pair_mask`: the oracle.

    O(T_q·T_kv) memory. Query head ``h`` reads key/value head ``h // (H_q // H_kv)`` (GQA/MQA).
    Computed in float64 when x64 is enabled (:func:`compute_dtype`), else in float32, in a form
    that stays exact for large finite logits (any finite ``scale``): the mask is applied with
    selects, and each exponent is ``(q·k - m) * scale`` with ``m`` the row's allowed dot giving
    the largest logit, so every exponent is ``<= 0`` and the largest is exactly 0 (ties
    included), however the compiler fuses it. Rows with no allowed key give zeros and ``-inf``,
    with zero (never NaN) gradients. Isolation: every product is computed from inputs whose
    non-finite elements were replaced by zeros (:func:`thdkit._src.isolation.sanitize`); a row with
    at least one allowed key whose own query, or one of whose allowed keys or values, holds a NaN or
    inf gets NaN output and NaN ``lse``, and passes no gradient back (it contributes zeros to
    every gradient; non-finite input elements get zero gradients). Every other row, and its
    gradients, is bit-equal to the same call without the non-finite values.

    Args:
        query: float[B, T_q, H_q, D].
        key: float[B, T_kv, H_kv, D]; ``H_q`` a multiple of ``H_kv``.
        value: float[B, T_kv, H_kv, D_v].
        q_segments: the queries' :class:`thdkit.Segments`, int32[B, T_q] fields.
        kv_segments: the keys'/values' :class:`thdkit.Segments`, int32[B, T_kv] fields.
        mask_type, window_size: as for :func:`thdkit.kernels.pair_mask`.
        scale: multiplies the logits; any finite float.
        logits_soft_cap: ``cap`` of the soft cap ``cap * tanh(logit / cap)`` applied to the
            scaled logits before the mask (docs/semantics.md, "Soft-capped logits"), or None.

    Returns:
        ``(out, lse)`` in the compute dtype (float32, or float64 with x64 enabled):
        float[B, T_q, H_q, D_v], the attention output normalised over the allowed keys;
        float[B, T_q, H_q], the log-sum-exp of the allowed logits (``-inf`` where none).

    Example:
        >>> seg = Segments.from_ids(jnp.array([[1, 1, 0]]))
        >>> q = k = jnp.zeros((1, 3, 1, 2))
        >>> v = jnp.arange(3.0).reshape(1, 3, 1, 1)
        >>> out, lse = reference_attention(q, k, v, q_segments=seg, kv_segments=seg,
        ...     mask_type=MaskType.CAUSAL, window_size=None, scale=1.0)
        >>> out[0, :, 0, 0]
        Array([0. , 0.5, 0. ], dtype=float32)
        >>> lse[0, :, 0]
        Array([0.       , 0.6931472,      -inf], dtype=float32)

        Huge logits stay exact (here 1e30 and 2e30: the second key wins outright):

        >>> seg = Segments.from_ids(jnp.array([[1, 1]]))
        >>> q = jnp.ones((1, 2, 1, 1))
        >>> k = jnp.array([1.0, 2.0]).reshape(1, 2, 1, 1)
        >>> out, lse = jax.jit(lambda q, k, v: reference_attention(q, k, v, q_segments=seg,
        ...     kv_segments=seg, mask_type=MaskType.PADDING, window_size=None, scale=1e30))(
        ...     q, k, jnp.array([3.0, 4.0]).reshape(1, 2, 1, 1))
        >>> out[0, :, 0, 0], lse[0, :, 0]
        (Array([4., 4.], dtype=float32), Array([2.e+30, 2.e+30], dtype=float32))
    """
    dtype = compute_dtype()
    batch, seq_q, heads_q, _ = query.shape
    heads_kv = key.shape[2]
    groups = heads_q // heads_kv
    (query, bad_q), (key, bad_k), (value, bad_v) = (sanitize(x) for x in (query, key, value))
    q = query.astype(dtype).reshape(batch, seq_q, heads_kv, groups, -1)
    # The values whose multiples by ``unit`` are the logits: the dots (logits over ``scale``),
    # or under a soft cap the capped logits themselves (bounded: no large-magnitude care needed).
    dots = jnp.einsum("bqhgd,bkhd->bhgqk", q, key.astype(dtype))
    if logits_soft_cap is not None:
        cap = jnp.asarray(logits_soft_cap, dtype)
        dots, scale = cap * jnp.tanh(dots * (jnp.asarray(scale, dtype) / cap)), 1.0
    allowed = pair_mask(q_segments, kv_segments, mask_type=mask_type, window_size=window_size)
    allowed = allowed[:, None, None]
    # The shift: the allowed dot that gives the largest logit (the largest dot for scale >= 0,
    # the smallest below), as a select. It only stabilises exp; its gradient cancels. Rows with
    # no allowed key keep a finite stand-in, so that nothing evaluates inf - inf.
    scale = jnp.asarray(scale, dtype)
    top = jnp.where(
        scale >= 0,
        jnp.max(jnp.where(allowed, dots, -jnp.inf), axis=-1, keepdims=True),
        jnp.min(jnp.where(allowed, dots, jnp.inf), axis=-1, keepdims=True),
    )
    top = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
    # ``(dots - top) * scale``, not ``scale * dots - scale * top``: the difference is exactly 0
    # at the row's largest logit (ties included) and of one sign elsewhere, so every exponent is
    # <= 0 and the largest exactly 0 however large the logits, whatever the compiler fuses (it
    # may contract ``scale * x - max`` into an FMA, which no longer gives 0 at the max). Selects,
    # not multiplies, mask: masked logits (finite or not) never reach exp, nor its gradient.
    weights = jnp.exp(jnp.where(allowed, (dots - top) * scale, -jnp.inf))
    row_max = top * scale
    total = jnp.sum(weights, axis=-1)
    # Double where: the log and the division never see a zero, so masked rows get zero
    # gradients instead of 0 * inf.
    safe_total = jnp.where(total > 0, total, 1.0)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", weights, value.astype(dtype))
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
