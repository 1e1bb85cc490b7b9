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

from collections.abc import Mapping
from typing import Any, Literal

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int

import thdkit
from thdkit.dense_path import dense_attention
from thdkit.jax_nn_layout import LAYOUT_KEYWORDS, CallLayout, as_arrays, layout_of

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


def _check_implementation(implementation: Any) -> str | None:
    if implementation is None:
        return None
    if not isinstance(implementation, str) or implementation not in _NAMES:
        raise ValueError(
            f"implementation must be one of {', '.join(map(repr, _NAMES))} or None, got "
            f"{implementation!r}"
        )
    return _ALIASES.get(implementation, implementation)


def _call_layout(
    query: Array, key: Array, unbatched: bool, arguments: Mapping[str, Any]
) -> CallLayout:
    """The layout of a public function's call, from its arguments (``locals()``) read by the
    names in :data:`~thdkit.jax_nn_layout.LAYOUT_KEYWORDS` (both functions take them all)."""
    return layout_of(
        batch=query.shape[0],
        seq_q=query.shape[1],
        seq_kv=key.shape[1],
        unbatched=unbatched,
        **{name: arguments[name] for name in LAYOUT_KEYWORDS},
    )


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
    arguments = dict(locals())
    query, key, value, unbatched = as_arrays(query, key, value)
    implementation = _check_implementation(implementation)
    layout = _call_layout(query, key, unbatched, arguments)
    if plan is not None and implementation is not None:
        raise ValueError("the plan fixes the implementation; do not pass implementation with plan")
    if bias is not None or mask is not None:
        if implementation not in _DENSE:
            raise NotImplementedError(
                f"bias and mask run the dense path; implementation={implementation!r} cannot "
                "take them. Express the mask with segment_ids / is_causal / local_window_size "
                "to use the kernels, or pass implementation=None"
            )
        out = dense_attention(query, key, value, bias, mask, layout, scale)[2]
        out = out.astype(query.dtype)
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
    arguments = dict(locals())
    query, key, _, unbatched = as_arrays(query, key, key)
    layout = _call_layout(query, key, unbatched, arguments)
    probs, poisoned, _ = dense_attention(query, key, None, bias, mask, layout, scale)
    probs = jnp.where(poisoned[..., None], jnp.nan, probs).astype(query.dtype)
    return probs[0] if unbatched else probs
