"""The dense path of :func:`thdkit.dot_product_attention`: ``bias``, ``mask`` and the weights.

It builds the ``[B, N, T, S]`` logits, as ``jax.nn``'s XLA implementation does, combining the
boolean mask with the packed one (``allowed[i, j]`` of docs/attention.md) and adding the bias;
non-finite inputs stay in their document. The soft cap (``cap * tanh(logit / cap)``) applies to
the scaled logits before the bias and the masks, so a ``-inf`` bias still masks; sinks join each
row's denominator through its log-sum-exp (:func:`thdkit.kernels.attach_sinks`), so the weights
of a row then sum to ``1 - sigmoid(sink - lse)``, less than 1.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from thdkit._src.doors.jax_nn_layout import CallLayout
from thdkit._src.kernels.arguments import check_scale
from thdkit._src.kernels.sinks import attach_sinks

__all__ = ["dense_attention"]


def _allowed(layout: CallLayout) -> Bool[Array, "B T S"]:
    """``allowed[i, j]`` of docs/attention.md, densely: same document, mask rule, window."""
    q = layout.q
    kv = q if layout.kv is None else layout.kv
    iq, ik = q.ids[:, :, None], kv.ids[:, None, :]
    pq, pk = q.positions[:, :, None], kv.positions[:, None, :]
    allowed = (iq == ik) & (iq != 0)
    mask_type = layout.mask_type
    if mask_type.is_causal:
        allowed = allowed & (pq >= pk)
    if mask_type.is_bottom_right:
        from_end_q = q.lengths[:, :, None] - pq
        from_end_kv = kv.lengths[:, None, :] - pk
        allowed = allowed & (from_end_q <= from_end_kv)
    if layout.window is not None:
        left, right = layout.window
        if mask_type.is_bottom_right:
            if left is not None:
                allowed = allowed & (from_end_kv - from_end_q <= left)
        else:
            if left is not None:
                allowed = allowed & (pk - pq >= -left)
            if right is not None:
                allowed = allowed & (pk - pq <= right)
    return allowed


def _as_dense_4d(x: Any, name: str, shape: tuple[int, int, int, int]) -> Array:
    """A ``bias`` or ``mask`` as ``jax.nn`` takes it: up to 4-D, broadcast to [B, N, T, S]."""
    x = jnp.asarray(x)
    if x.ndim > 4:
        raise ValueError(f"{name} must have at most 4 dims ([B, N, T, S]), got shape {x.shape}")
    x = x.reshape((1,) * (4 - x.ndim) + x.shape)
    try:
        return jnp.broadcast_to(x, shape)
    except ValueError:
        raise ValueError(
            f"{name} of shape {x.shape} does not broadcast to [B, N, T, S] = {shape}"
        ) from None


def dense_attention(
    query: Array,
    key: Array,
    value: Array | None,
    bias: Any,
    mask: Any,
    layout: CallLayout,
    scale: Any,
    sinks: Array | None = None,
) -> tuple[Float[Array, "B N T S"], Bool[Array, "B N T"], Array | None]:
    """Weights (float32 [B, N, T, S]), poisoned rows, and (with ``value``) the output.

    The arrays come checked (:func:`thdkit._src.doors.jax_nn_checks.as_arrays`; ``value`` None:
    the weights alone), ``sinks`` too (float32[N] or None:
    :func:`thdkit.kernels.check_sinks`); this checks the layout rules (concrete layouts) and
    ``scale`` (None: ``1 / sqrt(H)``) first. The soft cap is the layout's
    (``layout.logits_soft_cap``: the caller's or the plan's).

    Every non-finite input element is replaced by zero with a select before any product; the
    rows the dense computation would make NaN (a row with an allowed key whose own query, or one
    of whose allowed keys or values, is non-finite) are set to NaN after it, so other rows and
    their gradients are exactly those of the call without the non-finite values.
    """
    layout.planned("reference")  # the layout rules a plan checks (concrete layouts)
    batch, seq_q, heads_q, dim = query.shape
    scale = check_scale(scale, head_dim=dim)
    seq_kv, heads_kv = key.shape[1], key.shape[2]
    groups = heads_q // heads_kv
    shape = (batch, heads_q, seq_q, seq_kv)
    allow = _allowed(layout)[:, None]
    if mask is not None:
        mask = _as_dense_4d(mask, "mask", shape)
        if mask.dtype != jnp.bool_:
            raise TypeError(
                f"mask must be a boolean array (True: attend), got dtype {mask.dtype}; pass an "
                "additive mask as bias"
            )
        allow = allow & mask
    else:
        allow = jnp.broadcast_to(allow, shape)

    def clean(x: Array) -> tuple[Array, Array]:
        finite = jnp.isfinite(x)
        return jnp.where(finite, x, jnp.zeros_like(x)).astype(jnp.float32), jnp.all(finite, -1)

    q, good_q = clean(query)
    k, good_kv = clean(key)
    if value is not None:
        v, good_v = clean(value)
        good_kv = good_kv & good_v
    logits = jnp.einsum(
        "btkgh,bskh->bkgts", q.reshape(batch, seq_q, heads_kv, groups, dim), k
    ).reshape(shape) * jnp.float32(scale)
    cap = layout.logits_soft_cap
    if cap is not None:  # before the bias and the masks: a -inf bias still masks
        logits = jnp.float32(cap) * jnp.tanh(logits / jnp.float32(cap))
    if bias is not None:
        logits = logits + _as_dense_4d(bias, "bias", shape).astype(jnp.float32)
    masked = jnp.where(allow, logits, -jnp.inf)
    top = jax.lax.stop_gradient(jnp.max(masked, axis=-1, keepdims=True))
    top = jnp.where(jnp.isfinite(top), top, jnp.zeros_like(top))
    weight = jnp.where(allow, jnp.exp(masked - top), jnp.zeros_like(masked))
    total = jnp.sum(weight, axis=-1, keepdims=True)
    probs = weight / jnp.where(total > 0, total, jnp.ones_like(total))
    bad_kv = jnp.repeat(jnp.swapaxes(~good_kv, 1, 2), groups, axis=1)  # [B, N, S]
    reads_bad = jnp.any(allow & bad_kv[:, :, None, :], axis=-1)
    poisoned = jnp.any(allow, axis=-1) & (reads_bad | jnp.swapaxes(~good_q, 1, 2))
    out = None
    if value is not None:
        # Weighted sum first, normalised after: the weights' cotangent ``d_out . v`` of a masked
        # pair (which overflows for a huge but finite value of another document) is dropped by
        # the select that made ``weight``, and only this row's sums reach ``total``'s cotangent.
        # Normalising the weights first would send it through ``weight / total``, as
        # ``inf * 0 = nan``, into every weight of the row.
        unnormalised = jnp.einsum(
            "bkgts,bskh->btkgh", weight.reshape(batch, heads_kv, groups, seq_q, seq_kv), v
        ).reshape(batch, seq_q, heads_q, v.shape[-1])
        safe_total = jnp.where(total > 0, total, jnp.ones_like(total))
        out = unnormalised / jnp.swapaxes(safe_total[..., 0], 1, 2)[..., None]
        out = jnp.where(jnp.swapaxes(poisoned, 1, 2)[..., None], jnp.nan, out)
    if sinks is not None:
        # The row's log-sum-exp (-inf where no key is allowed, NaN where poisoned), through a
        # select: log(0)'s infinite derivative never meets a zero cotangent.
        live = total > 0
        lse = top + jnp.log(jnp.where(live, total, jnp.ones_like(total)))
        lse = jnp.where(live, lse, -jnp.inf)[..., 0]
        lse = jnp.swapaxes(jnp.where(poisoned, jnp.nan, lse), 1, 2)  # [B, T, N]
        # The weights take the same share as the output: [B, N, T, S] read as [B, T, N, "D_v"].
        probs = jnp.swapaxes(attach_sinks(jnp.swapaxes(probs, 1, 2), lse, sinks)[0], 1, 2)
        if out is not None:
            out = attach_sinks(out, lse, sinks)[0]
    return probs, poisoned, out
