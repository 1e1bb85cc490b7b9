"""What the Flax ``attention_fn`` and the layer share: planning a layout and attending on a plan.

:func:`plan_layout` is :func:`thdkit.plan_attention` with a hint for rows reordered for context
parallelism; :func:`attend` runs thdkit's kernels, or the dense path (with Flax's dropout, bit
for bit) when the weights are needed.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array

import thdkit

__all__ = ["attend", "check_implementation", "default_segments", "plan_layout"]


def check_implementation(implementation: Any) -> None:
    """Raises ``ValueError`` unless ``implementation`` is None or a registered kernel's name."""
    if implementation is not None and implementation not in thdkit.kernels.names():
        raise ValueError(
            f"implementation must be one of {', '.join(map(repr, thdkit.kernels.names()))} or "
            f"None, got {implementation!r}"
        )


_REORDERED_HINT = (
    "; if these rows were reordered for context parallelism (striped / dual_chunk_swap, e.g. "
    "by thdkit.data.pack(cp=...)), they are valid only shard by shard: pass them with mesh= "
    "and axis_name= (ring attention) or to thdkit.context_parallel_attention, or plan the rows "
    "in document order"
)
_RING_HINT = (
    "; to thdkit.flax.PackedSelfAttention, pass them with mesh= and axis_name= (ring attention)"
)
"""The layer's route, for a message that already says where reordered rows go."""
_RUN_RULES = ("starts a second run", "must increase from run to run")  # Rules 3 and 4.


def plan_layout(*sides: thdkit.Segments | None, **options: Any) -> thdkit.AttentionPlan:
    """:func:`thdkit.plan_attention`, with a hint on rules 3 and 4, which a row reordered for
    context parallelism breaks as a whole row."""
    try:
        return thdkit.plan_attention(*sides, **options)
    except ValueError as error:
        message = str(error)
        if any(rule in message for rule in _RUN_RULES) and "mesh=" not in message:
            hint = _RING_HINT if "context parallelism" in message else _REORDERED_HINT
            raise ValueError(message + hint) from error
        raise


def default_segments(*sides: thdkit.Segments | None, seq_len: int) -> int:
    """S when not given: the largest id of concrete segments, else the row length (a row of T
    tokens holds at most T documents numbered 1..n). S sizes cuDNN's metadata and, through
    the mean document length T / S, the blockwise tiles."""
    ids = [side.ids for side in sides if side is not None]
    if any(isinstance(a, jax.core.Tracer) for a in ids):
        return seq_len
    return max(1, *(int(np.max(np.asarray(a), initial=0)) for a in ids))


def _sow(module: Any, weights: Array) -> None:
    if isinstance(module, nnx.Module):
        module.sow(nnx.Intermediate, "attention_weights", weights)
    else:  # a linen module
        module.sow("intermediates", "attention_weights", weights)


def attend(
    query: Array,
    key: Array,
    value: Array,
    *,
    plan: thdkit.AttentionPlan,
    bias: Array | None,
    mask: Array | None,
    is_causal: bool,
    broadcast_dropout: bool,
    dropout_rng: Array | None,
    dropout_rate: float,
    deterministic: bool,
    module: Any,
) -> Array:
    """Attention of [B, T, N, D] arrays on a plan: thdkit's kernels, or the dense path when the
    weights are needed (sowing, dropout) with Flax's dropout, bit for bit."""
    dropout = not deterministic and dropout_rate > 0.0
    if not dropout and module is None:
        return thdkit.dot_product_attention(
            query, key, value, bias, mask, is_causal=is_causal, plan=plan
        )
    weights = thdkit.dot_product_attention_weights(
        query, key, bias, mask, is_causal=is_causal, plan=plan
    )
    if module is not None:
        _sow(module, weights)
    if dropout:
        if dropout_rng is None:
            raise ValueError("dropout_rng is required when dropout_rate > 0 and not deterministic")
        dtype = weights.dtype
        keep_prob = 1.0 - dropout_rate
        shape = (1, 1, *weights.shape[-2:]) if broadcast_dropout else weights.shape
        keep = jax.random.bernoulli(dropout_rng, keep_prob, shape)
        scaled = weights * (jnp.asarray(1, dtype) / jnp.asarray(keep_prob, dtype))
        weights = jnp.where(keep, scaled, jnp.zeros_like(scaled))
    batch, seq_q, heads_q, _ = query.shape
    heads_kv = key.shape[2]
    grouped = weights.reshape(batch, heads_kv, heads_q // heads_kv, seq_q, key.shape[1])
    out = jnp.einsum("bkgts,bskd->btkgd", grouped.astype(jnp.float32), value.astype(jnp.float32))
    return out.reshape(batch, seq_q, heads_q, value.shape[-1]).astype(query.dtype)
