"""``dot_product_attention``: ``jax.nn.dot_product_attention``'s call, on thdkit's attention.

Axis legend (``jax.nn``'s letters): B batch, T query length, S key/value length, N query heads,
K key/value heads (dividing N), H head dim. thdkit's own docs call them B, T_q, T_kv, H_q, H_kv, D.

A model written against ``jax.nn.dot_product_attention`` switches by changing the import: the
same arguments (``is_causal``, ``query_seq_lengths``, ``key_value_seq_lengths``,
``local_window_size``, ``bias``, ``mask``, ``scale``) mean the same thing, with one documented
difference (a query row with no allowed key gives zeros here; see the docstring). The packed
layout is added on top: ``segment_ids`` / ``segment_positions`` (several documents per row), or
a ``plan`` from :func:`thdkit.plan_attention` computed once per batch.

Without ``bias`` and ``mask`` the call runs :func:`thdkit.attention` (cuDNN or the blockwise
flash loop: no ``[T, S]`` array). With either of them it runs a dense path that builds the
``[B, N, T, S]`` logits, as ``jax.nn``'s XLA implementation does, combining the boolean mask with
the packed one and adding the bias. :func:`dot_product_attention_weights` returns those dense
weights (Flax's ``dot_product_attention_weights``, for sowing and attention-weight dropout).
"""

from __future__ import annotations

import math
import operator
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int

import thdkit

__all__ = ["dot_product_attention", "dot_product_attention_weights"]

Implementation = Literal["xla", "cudnn", "reference", "blockwise", "pallas"]
"""Accepted ``implementation`` names: ``jax.nn``'s (``"xla"``, ``"cudnn"``) and thdkit's."""

SegmentArrays = Int[ArrayLike, "B T"] | tuple[Int[ArrayLike, "B T"], Int[ArrayLike, "B S"]]
"""``segment_ids`` / ``segment_positions``: one int[B, T] array (self-attention) or a pair
(int[B, T] for the queries, int[B, S] for the keys/values)."""

_ALIASES: dict[str, str] = {"xla": "blockwise"}
"""``jax.nn``'s names that are not thdkit's: ``"xla"`` (plain XLA ops, any backend) is the
blockwise loop, which is plain XLA ops too and exact for every layout."""

_NAMES = ("xla", "cudnn", "reference", "blockwise", "pallas")
_DENSE = (None, "xla", "reference")
"""The implementations a call with ``bias`` or ``mask`` may name: it always runs densely."""


class _Layout(NamedTuple):
    """What the attention reads of the layout: a plan's fields, or what builds one."""

    q: Any  # thdkit.Segments
    kv: Any  # thdkit.Segments, or None for self-attention
    mask_type: Any  # thdkit.MaskType
    window: tuple[int | None, int | None] | None
    max_segments_per_seq: int
    plan: Any  # thdkit.AttentionPlan given by the caller, or None


# --- Argument checks ---------------------------------------------------------------------------


def _check_implementation(implementation: Any) -> str | None:
    if implementation is None:
        return None
    if not isinstance(implementation, str) or implementation not in _NAMES:
        raise ValueError(
            f"implementation must be one of {', '.join(map(repr, _NAMES))} or None, got "
            f"{implementation!r}"
        )
    return _ALIASES.get(implementation, implementation)


def _check_window(local_window_size: Any) -> tuple[int, int] | None:
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


def _layout(
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
) -> _Layout:
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
        return _Layout(
            plan.q_segments,
            None if plan.config.self_attention else plan.kv_segments,
            plan.config.mask_type,
            plan.config.window_size,
            plan.config.max_segments_per_seq,
            plan,
        )
    window = _check_window(local_window_size)
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
    return _Layout(q, kv, mask_type, window, num_segments, None)


def _arrays(query: Any, key: Any, value: Any) -> tuple[Array, Array, Array, bool]:
    query = jnp.asarray(query)
    if query.ndim not in (3, 4):
        raise ValueError(f"query must have rank 4 [B, T, N, H] or 3 [T, N, H], got {query.shape}")
    unbatched = query.ndim == 3
    key = _as_4d(key, "key", unbatched=unbatched)
    value = _as_4d(value, "value", unbatched=unbatched)
    return (query[None] if unbatched else query), key, value, unbatched


# --- The dense path ----------------------------------------------------------------------------


def _allowed(layout: _Layout) -> Bool[Array, "B T S"]:
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


def _validate(layout: _Layout) -> None:
    """The layout rules a plan checks (concrete layouts only), for the dense path."""
    if layout.plan is None:
        thdkit.plan_attention(
            layout.q,
            layout.kv,
            mask_type=layout.mask_type,
            window_size=layout.window,
            max_segments_per_seq=layout.max_segments_per_seq,
            implementation="reference",
        )


def _dense(
    query: Array,
    key: Array,
    value: Array | None,
    bias: Any,
    mask: Any,
    layout: _Layout,
    scale: float,
) -> tuple[Float[Array, "B N T S"], Bool[Array, "B N T"], Array | None]:
    """Weights (float32 [B, N, T, S]), poisoned rows, and (with ``value``) the output.

    Every non-finite input element is replaced by zero with a select before any product; the
    rows the dense computation would make NaN (a row with an allowed key whose own query, or one
    of whose allowed keys or values, is non-finite) are set to NaN after it, so other rows and
    their gradients are exactly those of the call without the non-finite values.
    """
    batch, seq_q, heads_q, dim = query.shape
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
        out = jnp.einsum(
            "bkgts,bskh->btkgh", probs.reshape(batch, heads_kv, groups, seq_q, seq_kv), v
        ).reshape(batch, seq_q, heads_q, v.shape[-1])
        out = jnp.where(jnp.swapaxes(poisoned, 1, 2)[..., None], jnp.nan, out)
    return probs, poisoned, out


# --- Public functions --------------------------------------------------------------------------


def dot_product_attention(
    query: Float[ArrayLike, "B T N H"],
    key: Float[ArrayLike, "B S K H"],
    value: Float[ArrayLike, "B S K H_v"],
    bias: Float[ArrayLike, "#B #N #T #S"] | None = None,
    mask: Bool[ArrayLike, "#B #N #T #S"] | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: Int[ArrayLike, " B"] | None = None,
    key_value_seq_lengths: Int[ArrayLike, " B"] | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    implementation: Implementation | None = None,
    segment_ids: SegmentArrays | None = None,
    segment_positions: SegmentArrays | None = None,
    plan: thdkit.AttentionPlan | None = None,
    max_segments_per_seq: int | None = None,
) -> Float[Array, "B T N H_v"]:
    """``jax.nn.dot_product_attention`` (same arguments and meaning), over packed rows too.

    Query token ``i`` attends key token ``j`` when they lie in the same document (one document a
    row unless ``segment_ids`` says otherwise), neither is padding, and the options allow it:

    - ``is_causal``: ``j <= i`` (top-left aligned, as ``jax.nn``: query ``i`` and key ``i`` share
      a position also when T != S); in packed rows, positions inside the document.
    - ``query_seq_lengths`` / ``key_value_seq_lengths``: tokens at index ``>= length`` of a row
      are padding (``jax.nn``'s right padding); combined with ``segment_ids`` they cut the row.
    - ``local_window_size=(left, right)``: ``i - left <= j <= i + right``; an int ``w`` is
      ``(w, w)``.
    - ``mask`` (True: attend) is and-ed in, ``bias`` added to the logits: both run the dense path.

    Query head ``n`` reads key/value head ``n // (N // K)`` (GQA/MQA, as ``jax.nn``).

    Where it differs from ``jax.nn``: a query row with no allowed key (a padding row, a row whose
    keys are all masked, ``key_value_seq_lengths = 0``) outputs zeros and passes no gradient.
    ``jax.nn``'s XLA path zeroes the rows past ``query_seq_lengths`` too, but gives the other
    empty rows the mean of all values (every logit replaced by one large negative number) and a
    row of ``-inf`` bias NaN. A NaN or inf in one document's inputs stays in that document
    (docs/semantics.md, "Non-finite values").

    Args:
        query: float32/bfloat16/float16[B, T, N, H], or [T, N, H] (unbatched, as ``jax.nn``).
        key: [B, S, K, H] (rank as ``query``), the query's dtype; N a multiple of K.
        value: [B, S, K, H_v], the query's dtype.
        bias: float, up to 4-D, broadcastable to [B, N, T, S]: added to the scaled logits
            (dense path, O(B·N·T·S) memory). ``-inf`` entries act as masked.
        mask: bool, up to 4-D, broadcastable to [B, N, T, S]: False removes the pair (dense
            path). An additive mask goes in ``bias``.
        scale: a finite real multiplying the logits; None is ``1 / sqrt(H)``.
        is_causal: top-left causal mask.
        query_seq_lengths: int[B]; tokens of row b at index ``>= query_seq_lengths[b]`` are
            padding (output zeros).
        key_value_seq_lengths: int[B]; keys at index ``>= key_value_seq_lengths[b]`` are
            padding.
        local_window_size: a non-negative int or pair ``(left, right)``, or None.
        implementation: ``"xla"`` (thdkit's blockwise loop: plain XLA ops on any backend, exact
            for every layout), ``"cudnn"`` (JAX's cuDNN fused attention fed with thdkit's compact
            metadata), thdkit's ``"reference"``, ``"blockwise"``, ``"pallas"``, or None for the
            first of cuDNN and blockwise that can run. With ``bias`` or ``mask`` only None,
            ``"xla"`` or ``"reference"`` (the dense path).
        segment_ids: int[B, T] (self-attention, T == S) or a pair (int[B, T], int[B, S]);
            0 = padding, 1..n = documents, each one run, increasing along the row
            (docs/semantics.md). None: one document a row.
        segment_positions: int[B, T] or a pair, each token's position inside its document; None
            numbers every document's tokens 0, 1, 2, ...
        plan: a :class:`thdkit.AttentionPlan` of the layout (from :func:`thdkit.plan_attention`,
            once per batch); it fixes the layout, mask and window, so ``segment_*``,
            ``*_seq_lengths``, ``local_window_size``, ``max_segments_per_seq`` and
            ``implementation`` may not be passed with it (``is_causal=True`` only checks that
            the plan is top-left causal).
        max_segments_per_seq: S of the plan, a static int >= the largest segment id; None is
            the largest id of concrete ``segment_ids`` (1 without them) and ``max(T, S)`` for
            traced ones (under ``jit``; ids with gaps above it need S). S sizes cuDNN's metadata
            and the blockwise tiles (from the mean document length T / S).

    Returns:
        float[B, T, N, H_v] (or [T, N, H_v] unbatched) in the query's dtype; float32
        accumulation.

    Raises:
        TypeError: non-float or mixed dtypes, a non-bool ``mask`` or ``is_causal``, non-integer
            seq lengths or segment ids, a non-int window bound, a ``plan`` of another type.
        ValueError: ranks and shapes (naming the parameter), a negative window bound, an unknown
            ``implementation``, a ``bias``/``mask`` that does not broadcast, layout keywords
            together with ``plan``, a broken layout rule (concrete layouts).
        NotImplementedError: ``bias``/``mask`` with a kernel implementation, or an
            implementation that cannot run here (the message says why).

    Example:
        >>> q = k = v = jax.random.normal(jax.random.key(0), (2, 8, 4, 16))
        >>> lengths = jnp.array([8, 5], jnp.int32)
        >>> out = dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=lengths,
        ...                             key_value_seq_lengths=lengths)
        >>> ref = jax.nn.dot_product_attention(q, k, v, is_causal=True,
        ...                                    query_seq_lengths=lengths,
        ...                                    key_value_seq_lengths=lengths)
        >>> bool(jnp.allclose(out, ref, atol=1e-5))
        True
        >>> ids = jnp.array([[1, 1, 1, 2, 2, 0, 0, 3]] * 2)  # three documents a row, packed
        >>> dot_product_attention(q, k, v, is_causal=True, segment_ids=ids).shape
        (2, 8, 4, 16)
    """
    query, key, value, unbatched = _arrays(query, key, value)
    implementation = _check_implementation(implementation)
    batch, seq_q, _, dim = query.shape
    layout = _layout(
        batch=batch,
        seq_q=seq_q,
        seq_kv=key.shape[1],
        is_causal=is_causal,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size,
        segment_ids=segment_ids,
        segment_positions=segment_positions,
        plan=plan,
        max_segments_per_seq=max_segments_per_seq,
        unbatched=unbatched,
    )
    if plan is not None and implementation is not None:
        raise ValueError("the plan fixes the implementation; do not pass implementation with plan")
    if bias is not None or mask is not None:
        if implementation not in _DENSE:
            raise NotImplementedError(
                f"bias and mask run the dense path; implementation={implementation!r} cannot "
                "take them. Express the mask with segment_ids / is_causal / local_window_size "
                "to use the kernels, or pass implementation=None"
            )
        _check_dense_arrays(query, key, value)
        _validate(layout)
        scale = (1.0 / math.sqrt(dim)) if scale is None else _check_scale(scale)
        out = _dense(query, key, value, bias, mask, layout, scale)[2].astype(query.dtype)
    else:
        if layout.plan is None:
            plan = thdkit.plan_attention(
                layout.q,
                layout.kv,
                mask_type=layout.mask_type,
                window_size=layout.window,
                max_segments_per_seq=layout.max_segments_per_seq,
                implementation=implementation,
            )
        out = thdkit.attention(query, key, value, plan=plan, scale=scale)
    return out[0] if unbatched else out


def dot_product_attention_weights(
    query: Float[ArrayLike, "B T N H"],
    key: Float[ArrayLike, "B S K H"],
    bias: Float[ArrayLike, "#B #N #T #S"] | None = None,
    mask: Bool[ArrayLike, "#B #N #T #S"] | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: Int[ArrayLike, " B"] | None = None,
    key_value_seq_lengths: Int[ArrayLike, " B"] | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    segment_ids: SegmentArrays | None = None,
    segment_positions: SegmentArrays | None = None,
    plan: thdkit.AttentionPlan | None = None,
    max_segments_per_seq: int | None = None,
) -> Float[Array, "B N T S"]:
    """The dense attention weights of :func:`dot_product_attention` (Flax's weights function).

    ``softmax(scale · q·k + bias)`` over the allowed keys, the same mask as
    :func:`dot_product_attention`; a row with no allowed key is zeros, a row reading a non-finite
    query or key is NaN. For sowing the weights and for attention-weight dropout
    (:func:`thdkit.flax.make_attention_fn`); O(B·N·T·S) memory.

    Args:
        query: float[B, T, N, H] or [T, N, H].
        key: float[B, S, K, H] (rank as ``query``), the query's dtype; N a multiple of K.
        bias, mask, scale, is_causal, query_seq_lengths, key_value_seq_lengths,
            local_window_size, segment_ids, segment_positions, plan, max_segments_per_seq: as
            :func:`dot_product_attention`.

    Returns:
        [B, N, T, S] (or [N, T, S] unbatched) in the query's dtype, computed in float32.

    Raises:
        TypeError, ValueError: as :func:`dot_product_attention`.

    Example:
        >>> q = k = jnp.zeros((1, 3, 1, 4))
        >>> (dot_product_attention_weights(q, k, is_causal=True)[0, 0] * 6).tolist()
        [[6.0, 0.0, 0.0], [3.0, 3.0, 0.0], [2.0, 2.0, 2.0]]
    """
    query, key, _, unbatched = _arrays(query, key, key)
    batch, seq_q, _, dim = query.shape
    layout = _layout(
        batch=batch,
        seq_q=seq_q,
        seq_kv=key.shape[1],
        is_causal=is_causal,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size,
        segment_ids=segment_ids,
        segment_positions=segment_positions,
        plan=plan,
        max_segments_per_seq=max_segments_per_seq,
        unbatched=unbatched,
    )
    _check_dense_arrays(query, key, key)
    _validate(layout)
    scale = (1.0 / math.sqrt(dim)) if scale is None else _check_scale(scale)
    probs, poisoned, _ = _dense(query, key, None, bias, mask, layout, scale)
    probs = jnp.where(poisoned[..., None], jnp.nan, probs).astype(query.dtype)
    return probs[0] if unbatched else probs


def _check_dense_arrays(query: Array, key: Array, value: Array) -> None:
    """The checks :func:`thdkit.attention` makes, for the dense path (which does not call it)."""
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got dtype {x.dtype}")
    if not query.dtype == key.dtype == value.dtype:
        raise TypeError(
            f"query, key and value must share one dtype, got {query.dtype}, {key.dtype} and "
            f"{value.dtype}"
        )
    if not query.shape[0] == key.shape[0] == value.shape[0]:
        raise ValueError(
            f"query, key and value must have the same batch size B, got shapes {query.shape}, "
            f"{key.shape} and {value.shape}"
        )
    if key.shape[:3] != value.shape[:3]:
        raise ValueError(
            f"key and value must agree in B, S and K, got shapes {key.shape} and {value.shape}"
        )
    if query.shape[3] != key.shape[3]:
        raise ValueError(
            f"query and key must have the same head dim H, got {query.shape} and {key.shape}"
        )
    if min(query.shape[1:] + key.shape[1:] + value.shape[3:]) == 0:
        raise ValueError(
            f"query, key and value need T, S, N, K and H > 0, got shapes {query.shape}, "
            f"{key.shape} and {value.shape}"
        )
    if query.shape[2] % key.shape[2]:
        raise ValueError(
            f"the query heads N = {query.shape[2]} must be a multiple of the key/value heads "
            f"K = {key.shape[2]}"
        )


def _check_scale(scale: Any) -> float:
    if isinstance(scale, (bool, np.bool_)) or not isinstance(
        scale, (int, float, np.integer, np.floating)
    ):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)
