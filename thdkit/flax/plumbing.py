"""What the Flax ``attention_fn`` and the layer share: planning a layout and attending on a plan.

:func:`plan_layout` is :func:`thdkit.plan_attention` with errors that name the caller's arguments
(:func:`renamed`); :func:`attend` runs thdkit's kernels, or the dense path (with Flax's dropout,
bit for bit) when the weights are needed; :func:`ring` is :func:`thdkit.ring_attention` with the
caller's names and, on a one-device mesh axis, why a reordered row is refused.
"""

from __future__ import annotations

import operator
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jaxtyping import Array

import thdkit
from thdkit._src.kernels.base import check_features as check_kernel_features
from thdkit._src.kernels.config import AttentionConfig

__all__ = [
    "attend",
    "check_features",
    "check_implementation",
    "check_size",
    "check_strategy",
    "default_segments",
    "dropout_stream",
    "plan_layout",
    "renamed",
    "ring",
]


def check_size(name: str, value: Any) -> int:
    """A layer size: an int >= 1 (``TypeError`` / ``ValueError`` naming it otherwise)."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        size = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if size < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return size


def check_implementation(implementation: Any) -> None:
    """Raises ``ValueError`` unless ``implementation`` is None or a registered kernel's name."""
    if implementation is not None and implementation not in thdkit.kernels.names():
        raise ValueError(
            f"implementation must be one of {', '.join(map(repr, thdkit.kernels.names()))} or "
            f"None, got {implementation!r}"
        )


def check_strategy(strategy: Any) -> None:
    """Raises ``ValueError`` unless ``strategy`` is a registered context-parallel strategy's
    name (:func:`thdkit.context_parallel.names`)."""
    if not isinstance(strategy, str) or strategy not in thdkit.context_parallel.names():
        raise ValueError(
            f"strategy must be one of {', '.join(map(repr, thdkit.context_parallel.names()))}, "
            f"got {strategy!r}"
        )


_PARAMETERS = re.compile(r"\b(q_segments|kv_segments)\b")
""":func:`thdkit.plan_attention`'s and :func:`thdkit.ring_attention`'s layout parameters, which
the callers of the Flax drop-ins never pass: their messages are re-raised with the caller's."""


def renamed(error: Exception, names: dict[str, str]) -> Exception:
    """``error`` again (same type), with the layout parameters it names replaced by ``names``
    (``{"q_segments": "mask"}``): the arguments the caller passed."""
    message = _PARAMETERS.sub(lambda m: names.get(m.group(1), m.group(1)), str(error))
    return type(error)(message)


def plan_layout(
    *sides: thdkit.Segments | None, names: dict[str, str], **options: Any
) -> thdkit.AttentionPlan:
    """:func:`thdkit.plan_attention`, its errors naming the caller's arguments (``names``: the
    caller's name of ``q_segments`` and ``kv_segments``)."""
    try:
        return thdkit.plan_attention(*sides, **options)
    except (TypeError, ValueError, NotImplementedError) as error:
        raise renamed(error, names) from error


_ORDER_RULES = ("starts a second run", "must increase from run to run", "does not increase")
"""The layout rules (3, 4 and 6) that a row reordered for context parallelism breaks whole."""


def ring(
    query: Array,
    key: Array,
    value: Array,
    segments: thdkit.Segments,
    *,
    name: str,
    mesh: Mesh,
    axis_name: str,
    **options: Any,
) -> Array:
    """:func:`thdkit.context_parallel_attention` (self-attention, ``options``: its mask, window,
    S, implementation and strategy, ``"ring"`` by default), its errors naming the caller's
    ``name`` of the Segments; on a one-device axis a reordered row's error says why (cp = 1
    reads rows whole) and how to get devices."""
    try:
        return thdkit.context_parallel.context_parallel_attention(
            query, key, value, q_segments=segments, mesh=mesh, axis_name=axis_name, **options
        )
    except (TypeError, ValueError, NotImplementedError) as error:
        error_ = renamed(error, {"q_segments": name})
        if mesh.shape.get(axis_name) == 1 and any(rule in str(error) for rule in _ORDER_RULES):
            error_ = ValueError(
                f"{error_}; the mesh axis {axis_name!r} has 1 device, so the ring reads every "
                "row whole (cp = 1: rows in document order, thdkit.data.pack(cp=1)); rows "
                "reordered for cp = N (pack(cp=N)) need a mesh axis of N devices: on a CPU-only "
                "machine, simulate them by starting Python with "
                "XLA_FLAGS=--xla_force_host_platform_device_count=N"
            )
        raise error_ from error


def default_segments(*sides: thdkit.Segments | None, seq_len: int, given: int | None = None) -> int:
    """S: ``given`` where not None, else the largest id of concrete segments, else the row
    length (a row of T tokens holds at most T documents numbered 1..n). S sizes cuDNN's
    metadata and, through the mean document length T / S, the blockwise tiles."""
    if given is not None:
        return given
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
    batch_shape: tuple[int, ...] | None = None,
    sinks: Array | None = None,
) -> Array:
    """Attention of [B, T, N, D] arrays on a plan: thdkit's kernels, or the dense path when the
    weights are needed (sowing, dropout) with Flax's dropout, bit for bit. ``batch_shape``: the
    caller's batch dims that B flattens (the sown weights get them back), None for B itself.
    The soft cap is the plan's; ``sinks`` (float[N] or None) join every row's denominator, on
    the dense path too (the weights then sum to less than 1, the rest the sink's share)."""
    dropout = not deterministic and dropout_rate > 0.0
    if not dropout and module is None:
        return thdkit.dot_product_attention(
            query, key, value, bias, mask, is_causal=is_causal, plan=plan, sinks=sinks
        )
    weights = thdkit.dot_product_attention_weights(
        query, key, bias, mask, is_causal=is_causal, plan=plan, sinks=sinks
    )
    if module is not None:
        shape = weights.shape if batch_shape is None else (*batch_shape, *weights.shape[1:])
        _sow(module, weights.reshape(shape))
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


def check_features(implementation: str | None, *, logits_soft_cap: Any, sinks: bool) -> None:
    """Refuses, at construction, a soft cap or sinks that ``implementation`` cannot take (the
    registry's rule: ``thdkit.kernels.Implementation.features``, and a log-sum-exp for sinks).
    None picks one that can at each call."""
    if implementation is None:
        return
    config = AttentionConfig.parse(
        mask_type="padding", window_size=None, max_segments_per_seq=None,
        logits_soft_cap=logits_soft_cap,
    )  # fmt: skip
    try:
        check_kernel_features(thdkit.kernels.get(implementation), config, sinks=sinks)
    except NotImplementedError as reason:
        raise NotImplementedError(
            f"implementation={implementation!r} cannot take the layer's options: {reason}; pass "
            "implementation=None (the first that can), 'blockwise' or 'reference'"
        ) from None


def dropout_stream(
    rate: float, deterministic: bool | None, rngs: Any, *, default: bool | None, own: Any
) -> Array | None:
    """Flax's rule: dropout needs ``deterministic`` (the call's, else the layer's ``default``)
    and a stream (the call's ``rngs``, else the layer's ``own``); None without dropout."""
    if rate == 0.0:
        return None
    deterministic = deterministic if deterministic is not None else default
    if deterministic is None:
        raise ValueError("dropout_rate > 0: pass deterministic to the constructor or to the call")
    if deterministic:
        return None
    stream = rngs.dropout if isinstance(rngs, nnx.Rngs) else rngs
    stream = stream if stream is not None else own
    if stream is None:
        raise ValueError("dropout needs an rng stream: pass rngs to the call (keep_rngs=False)")
    return stream()
