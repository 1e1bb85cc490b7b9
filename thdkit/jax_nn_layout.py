"""``jax.nn.dot_product_attention``'s layout arguments as thdkit's: what the call's layout is.

Axis legend (``jax.nn``'s letters): B batch, T query length, S key/value length, N query heads,
K key/value heads, H head dim.

:func:`layout_of` reads ``is_causal``, ``query_seq_lengths``, ``key_value_seq_lengths``,
``local_window_size``, ``segment_ids``, ``segment_positions``, ``plan`` and
``max_segments_per_seq`` (:data:`LAYOUT_KEYWORDS`) into a :class:`CallLayout`: a plan's fields, or
the Segments and options that plan one. :func:`as_arrays` brings query, key and value to rank 4.
"""

from __future__ import annotations

import operator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

import thdkit

__all__ = ["LAYOUT_KEYWORDS", "CallLayout", "as_arrays", "layout_of"]

LAYOUT_KEYWORDS = (
    "is_causal",
    "query_seq_lengths",
    "key_value_seq_lengths",
    "local_window_size",
    "segment_ids",
    "segment_positions",
    "plan",
    "max_segments_per_seq",
)
"""The public functions' keywords :func:`layout_of` reads, by name."""


class CallLayout(NamedTuple):
    """What the attention reads of the layout: a plan's fields, or what builds one."""

    q: Any  # thdkit.Segments
    kv: Any  # thdkit.Segments, or None for self-attention
    mask_type: Any  # thdkit.MaskType
    window: tuple[int | None, int | None] | None
    max_segments_per_seq: int
    plan: Any  # thdkit.AttentionPlan given by the caller, or None


def _check_local_window(local_window_size: Any) -> tuple[int, int] | None:
    """``jax.nn``'s window: an int (symmetric) or a pair of non-negative ints, or None."""
    if local_window_size is None:
        return None
    pair = (
        (local_window_size, local_window_size)
        if not isinstance(local_window_size, (tuple, list))
        else tuple(local_window_size)
    )
    if len(pair) != 2:
        raise ValueError(
            f"local_window_size must be an int or a pair (left, right), got {local_window_size!r}"
        )
    bounds = []
    for side, bound in zip(("left", "right"), pair, strict=True):
        if isinstance(bound, (bool, np.bool_)) or not isinstance(bound, (int, np.integer)):
            raise TypeError(
                f"local_window_size {side} bound must be an int, got {type(bound).__name__}"
            )
        if bound < 0:
            raise ValueError(
                f"local_window_size {side} bound must be >= 0, got {int(bound)} (thdkit reads a "
                "negative bound as unbounded; pass None for no window)"
            )
        bounds.append(int(bound))
    return bounds[0], bounds[1]


def _check_lengths(lengths: Any, name: str, batch: int) -> Array | None:
    if lengths is None:
        return None
    lengths = jnp.asarray(lengths)
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {lengths.dtype}")
    if lengths.shape != (batch,):
        raise ValueError(f"{name} must have shape [B] = ({batch},), got {lengths.shape}")
    return lengths


def _as_4d(x: Any, name: str, *, unbatched: bool) -> Array:
    x = jnp.asarray(x)
    want = 3 if unbatched else 4
    if x.ndim != want:
        form = "[T, N, H]" if unbatched else "[B, T, N, H]"
        raise ValueError(f"{name} must have rank {want} like query ({form}), got shape {x.shape}")
    return x[None] if unbatched else x


def _pair(x: Any, name: str, *, unbatched: bool) -> tuple[Array | None, Array | None]:
    """``segment_ids`` / ``segment_positions``: one array (self-attention) or a (q, kv) pair."""
    if x is None:
        return None, None
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"{name} must be an array or a pair (query, key_value), got {len(x)}")
        q, kv = x
    else:
        q = kv = x
    same = kv is q

    def convert(a: Any, side: str) -> Array | None:
        if a is None:
            return None
        a = jnp.asarray(a)
        want = 1 if unbatched else 2
        if a.ndim != want:
            raise ValueError(
                f"{name} ({side}) must have rank {want} ({'[T]' if unbatched else '[B, T]'}), "
                f"got shape {a.shape}"
            )
        return a[None] if unbatched else a

    q = convert(q, "query")
    return q, (q if same else convert(kv, "key_value"))


def _side(
    ids: Array | None, pos: Array | None, lengths: Array | None, *, batch: int, seq_len: int
) -> Any:
    """One side's Segments: the ids (ones without packing) cut at ``lengths`` (jax.nn's
    padding at the row ends), positions given or numbered inside each document."""
    if ids is None:
        ids = jnp.ones((batch, seq_len), jnp.int32)
        if pos is None and lengths is None:
            return thdkit.Segments.from_ids(ids)
    if lengths is not None:
        inside = jnp.arange(seq_len, dtype=jnp.int32)[None, :] < lengths[:, None]
        ids = jnp.where(inside, ids, jnp.zeros_like(ids))
    return thdkit.Segments.from_ids(ids, pos)


def _default_segments(*ids: Array | None, seq_len: int) -> int:
    """S when not given: the largest id of concrete ids (1 without ids), else the row length
    (a row of T tokens holds at most T documents numbered 1..n)."""
    given = [a for a in ids if a is not None]
    if not given:
        return 1
    if any(isinstance(a, jax.core.Tracer) for a in given):
        return seq_len
    return max(1, *(int(np.max(np.asarray(a), initial=0)) for a in given))


def layout_of(
    *,
    batch: int,
    seq_q: int,
    seq_kv: int,
    is_causal: Any,
    query_seq_lengths: Any,
    key_value_seq_lengths: Any,
    local_window_size: Any,
    segment_ids: Any,
    segment_positions: Any,
    plan: Any,
    max_segments_per_seq: Any,
    unbatched: bool,
) -> CallLayout:
    """The call's layout: the plan's, or the Segments, mask and window the keywords describe.

    Raises:
        TypeError, ValueError: as :func:`thdkit.dot_product_attention` for these keywords.
    """
    if not isinstance(is_causal, (bool, np.bool_)):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if plan is not None:
        if not isinstance(plan, thdkit.AttentionPlan):
            raise TypeError(f"plan must be a thdkit.AttentionPlan, got {type(plan).__name__}")
        given = [
            name
            for name, x in (
                ("query_seq_lengths", query_seq_lengths),
                ("key_value_seq_lengths", key_value_seq_lengths),
                ("local_window_size", local_window_size),
                ("segment_ids", segment_ids),
                ("segment_positions", segment_positions),
                ("max_segments_per_seq", max_segments_per_seq),
            )
            if x is not None
        ]
        if given:
            raise ValueError(
                "the plan fixes the layout, the mask and the window; do not pass "
                + ", ".join(given)
                + " with plan"
            )
        if is_causal and not plan.config.mask_type.is_causal:
            raise ValueError(
                f"is_causal=True (top-left causal) but the plan's mask_type is "
                f"{plan.config.mask_type.value!r}; plan with mask_type='padding_causal'"
            )
        shapes = (plan.q_segments.ids.shape, plan.kv_segments.ids.shape)
        if shapes != ((batch, seq_q), (batch, seq_kv)):
            raise ValueError(
                f"the plan's layout has shapes {shapes[0]} (query) and {shapes[1]} (key/value); "
                f"the arrays need [B, T] = {(batch, seq_q)} and [B, S] = {(batch, seq_kv)}"
            )
        return CallLayout(
            plan.q_segments,
            None if plan.config.self_attention else plan.kv_segments,
            plan.config.mask_type,
            plan.config.window_size,
            plan.config.max_segments_per_seq,
            plan,
        )
    window = _check_local_window(local_window_size)
    q_len = _check_lengths(query_seq_lengths, "query_seq_lengths", batch)
    kv_len = _check_lengths(key_value_seq_lengths, "key_value_seq_lengths", batch)
    ids_q, ids_kv = _pair(segment_ids, "segment_ids", unbatched=unbatched)
    pos_q, pos_kv = _pair(segment_positions, "segment_positions", unbatched=unbatched)
    for name, ids, pos in (("segment_ids", ids_q, pos_q), ("segment_ids", ids_kv, pos_kv)):
        if pos is not None and ids is None:
            raise ValueError(f"segment_positions needs {name} too")
    for name, a, seq in (
        ("segment_ids (query)", ids_q, seq_q),
        ("segment_positions (query)", pos_q, seq_q),
        ("segment_ids (key_value)", ids_kv, seq_kv),
        ("segment_positions (key_value)", pos_kv, seq_kv),
    ):
        if a is not None and a.shape != (batch, seq):
            raise ValueError(
                f"{name} must have shape {(batch, seq)}, got {a.shape}"
                + (
                    "; pass a pair (query, key_value) for cross-attention"
                    if seq_q != seq_kv and "key_value" in name
                    else ""
                )
            )
    if max_segments_per_seq is None:
        num_segments = _default_segments(ids_q, ids_kv, seq_len=max(seq_q, seq_kv))
    else:
        if isinstance(max_segments_per_seq, (bool, np.bool_)):
            raise TypeError("max_segments_per_seq must be an int, got bool")
        try:
            num_segments = operator.index(max_segments_per_seq)
        except TypeError:
            raise TypeError(
                f"max_segments_per_seq must be an int, got {type(max_segments_per_seq).__name__}"
            ) from None
    q = _side(ids_q, pos_q, q_len, batch=batch, seq_len=seq_q)
    # One layout for both sides (self-attention: cuDNN needs no representability check) when
    # nothing tells them apart: the same ids, positions and lengths (None, or the same array).
    shared = (
        seq_q == seq_kv
        and ids_kv is ids_q
        and pos_kv is pos_q
        and query_seq_lengths is key_value_seq_lengths
    )
    kv = None if shared else _side(ids_kv, pos_kv, kv_len, batch=batch, seq_len=seq_kv)
    mask_type = thdkit.MaskType.PADDING_CAUSAL if is_causal else thdkit.MaskType.PADDING
    return CallLayout(q, kv, mask_type, window, num_segments, None)


def as_arrays(query: Any, key: Any, value: Any) -> tuple[Array, Array, Array, bool]:
    """Query, key and value as [B, ...] arrays (an unbatched call gains B = 1), and whether the
    call was unbatched."""
    query = jnp.asarray(query)
    if query.ndim not in (3, 4):
        raise ValueError(f"query must have rank 4 [B, T, N, H] or 3 [T, N, H], got {query.shape}")
    unbatched = query.ndim == 3
    key = _as_4d(key, "key", unbatched=unbatched)
    value = _as_4d(value, "value", unbatched=unbatched)
    return (query[None] if unbatched else query), key, value, unbatched
