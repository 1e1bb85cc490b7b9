"""``dot_product_attention``: ``jax.nn.dot_product_attention``'s call, on thdkit's attention.

Axis legend (``jax.nn``'s letters): B batch, T query length, S key/value length, N query heads,
K key/value heads (dividing N), H head dim. thdkit's own docs call them B, T_q, T_kv, H_q, H_kv, D.

A model written against ``jax.nn.dot_product_attention`` switches by changing the import: the
same arguments (``is_causal``, ``query_seq_lengths``, ``key_value_seq_lengths``,
``local_window_size``, ``bias``, ``mask``, ``scale``) mean the same thing, with one documented
difference (a query row with no allowed key gives zeros here; see the docstring). The packed
layout is added on top: ``segment_ids`` / ``segment_positions`` (several documents per row), or
a ``plan`` from :func:`thdkit.plan_attention` computed once per batch; and so are soft-capped
logits (``logits_soft_cap``, tokamax's spelling) and attention sinks (``sinks``, one logit per
query head), which ``jax.nn``'s signature does not offer.

Without ``bias`` and ``mask`` the call runs :func:`thdkit.attention` (cuDNN or the blockwise
flash loop: no ``[T, S]`` array). With either of them it runs a dense path that builds the
``[B, N, T, S]`` logits, as ``jax.nn``'s XLA implementation does, combining the boolean mask with
the packed one and adding the bias. :func:`dot_product_attention_weights` returns those dense
weights (Flax's ``dot_product_attention_weights``, for sowing and attention-weight dropout).
"""

from __future__ import annotations

from typing import Any, Literal

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from thdkit._src.doors.jax_nn_checks import as_arrays
from thdkit._src.doors.jax_nn_dense import dense_attention
from thdkit._src.doors.jax_nn_layout import CallLayout, layout_of
from thdkit._src.doors.keywords import attention
from thdkit._src.kernels import base
from thdkit._src.kernels.arguments import check_scale
from thdkit._src.kernels.plan import AttentionPlan
from thdkit._src.kernels.sinks import check_sinks

__all__ = ["dot_product_attention", "dot_product_attention_weights", "implementation_names"]

Implementation = Literal["xla", "cudnn", "reference", "blockwise", "pallas"]
"""The built-in ``implementation`` names: ``jax.nn``'s (``"xla"``, ``"cudnn"``) and thdkit's.
What is accepted is :func:`implementation_names`: these and any implementation registered with
:func:`thdkit.kernels.register`, also at run time."""

SegmentArrays = Int[ArrayLike, "B T"] | tuple[Int[ArrayLike, "B T"], Int[ArrayLike, "B S"]]
"""``segment_ids`` / ``segment_positions``: one int[B, T] array (self-attention; a nested list
is one array) or a tuple (int[B, T] for the queries, int[B, S] for the keys/values)."""

_ALIASES: dict[str, str] = {"xla": "blockwise", "cudnn": "cudnn"}
"""``jax.nn``'s names, as thdkit's implementations: ``"xla"`` (plain XLA ops, any backend) is the
blockwise loop, plain XLA ops too and exact for every layout (with ``bias`` or ``mask``: the
dense path, as ``jax.nn``'s XLA implementation)."""

_DENSE = (None, "xla", "reference")
"""The implementations a call with ``bias`` or ``mask`` may name: it runs the dense path."""


def _check_cudnn_features(implementation: str | None, logits_soft_cap: Any, sinks: Any) -> None:
    """``implementation="cudnn"`` is ``jax.nn``'s cuDNN fused attention, whose signature has
    neither a soft cap nor sinks (nor returns thdkit's cuDNN call a log-sum-exp to join sinks
    through): refused with that reason, naming the alternative."""
    if implementation != "cudnn":
        return
    asked = [
        name
        for name, x in (("logits_soft_cap", logits_soft_cap), ("sinks", sinks))
        if x is not None
    ]
    if asked:
        raise NotImplementedError(
            f"implementation='cudnn' cannot take {' and '.join(asked)}: jax.nn's cuDNN fused "
            "attention expresses neither a logits soft cap nor attention sinks (and returns no "
            "log-sum-exp here to join sinks through); pass implementation=None or 'xla' "
            "(thdkit's blockwise loop)"
        )


def implementation_names() -> tuple[str, ...]:
    """The names ``implementation`` accepts: ``jax.nn``'s, then every registered implementation.

    Returns:
        ``("xla", "cudnn", ...)``: read from the registry at each call, so an implementation
        registered at run time (:func:`thdkit.kernels.register`) is accepted.

    Example:
        >>> implementation_names()[:2], "blockwise" in implementation_names()
        (('xla', 'cudnn'), True)
    """
    return (*_ALIASES, *(name for name in base.names() if name not in _ALIASES))


def _check_empty_call(bias: Any, mask: Any, scale: Any, shape: tuple[int, ...]) -> None:
    """The checks the dense path makes of ``bias``, ``mask`` and ``scale``, for a call with
    no tokens on a side (T = 0 or S = 0), which runs neither path."""
    for name, x in (("bias", bias), ("mask", mask)):
        if x is None:
            continue
        x = jnp.asarray(x)
        if name == "mask" and x.dtype != jnp.bool_:
            raise TypeError(f"mask must be a boolean array (True: attend), got dtype {x.dtype}")
        padded = (1,) * (4 - x.ndim) + x.shape
        try:
            fits = x.ndim <= 4 and np.broadcast_shapes(padded, shape) == shape
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(
                f"{name} of shape {x.shape} does not broadcast to [B, N, T, S] = {shape}"
            )
    check_scale(scale, head_dim=1)


def _kernel_attention(
    query: Array,
    key: Array,
    value: Array,
    layout: CallLayout,
    implementation: str | None,
    scale: Any,
    sinks: Array | None,
) -> Array:
    """The call on :func:`thdkit.attention` (a plan made here unless the caller gave one, with
    the layout's soft cap); an implementation that cannot run is reported under the caller's
    name for it."""
    kernel = _ALIASES.get(implementation, implementation)
    try:
        return attention(query, key, value, plan=layout.planned(kernel), scale=scale, sinks=sinks)
    except NotImplementedError as error:
        if kernel == implementation:
            raise
        raise NotImplementedError(
            f"implementation={implementation!r} (thdkit's {kernel!r}) cannot run: {error}"
        ) from None


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
    implementation: Implementation | str | None = None,
    segment_ids: SegmentArrays | None = None,
    segment_positions: SegmentArrays | None = None,
    plan: AttentionPlan | None = None,
    max_segments_per_seq: int | None = None,
    padding_id: int = 0,
    logits_soft_cap: float | None = None,
    sinks: Float[ArrayLike, " N"] | None = None,
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

    Two options beyond ``jax.nn``'s, on every path (docs/semantics.md, "Soft-capped logits" and
    "Attention sinks"): ``logits_soft_cap`` replaces each scaled logit ``l`` by
    ``cap * tanh(l / cap)`` (float32, before ``bias`` and the masks, so a ``-inf`` bias still
    masks), and ``sinks`` adds ``exp(sinks[n])`` to the softmax denominator of every row of
    query head ``n`` (a logit that attends to nothing):
    ``out_i = sum_j exp(l_ij) v_j / (sum_j exp(l_ij) + exp(sinks[n]))``. Per implementation:
    ``"xla"`` (blockwise, or the dense path) takes both; ``"cudnn"`` takes neither (``jax.nn``'s
    cuDNN path expresses neither: ``NotImplementedError``); thdkit's own take the cap where they
    declare it (:class:`thdkit.kernels.Implementation` ``features``) and sinks where they return
    a log-sum-exp; None picks the first that can run.

    Query head ``n`` reads key/value head ``n // (N // K)`` (GQA/MQA, as ``jax.nn``).

    Where it differs from ``jax.nn``: a query row with no allowed key (a padding row, a row whose
    keys are all masked, ``key_value_seq_lengths = 0``, S = 0) outputs zeros and passes no
    gradient. ``jax.nn``'s XLA path zeroes the rows past ``query_seq_lengths`` too, but gives the
    other empty rows the mean of all values (every logit replaced by one large negative number)
    and a row of ``-inf`` bias NaN. A NaN or inf in one document's inputs stays in that document
    (docs/semantics.md, "Non-finite values"). T = 0 gives an empty result, as ``jax.nn``.

    Ids and positions of any integer dtype are checked against int32 before any cast: a value
    outside it (int64 arrays, with or without x64, Python ints) raises, never wraps
    (docs/semantics.md, "Accepted ranges"); under ``jit`` values are not read.

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
        implementation: ``"xla"`` (as ``jax.nn``: plain XLA ops on any backend; thdkit's
            blockwise loop, exact for every layout, or the dense path with ``bias`` or
            ``mask``), ``"cudnn"`` (JAX's cuDNN fused attention fed with thdkit's compact
            metadata), thdkit's ``"reference"``, ``"blockwise"``, ``"pallas"``, any name
            registered with :func:`thdkit.kernels.register` (:func:`implementation_names`), or
            None for the first of cuDNN and blockwise that can run. With ``bias`` or ``mask``
            only None, ``"xla"`` or ``"reference"`` (the dense path).
        segment_ids: int[B, T] (self-attention, T == S; a nested list is one array) or a tuple
            (int[B, T], int[B, S]); 0 = padding unless padding_id says otherwise, 1..n =
            documents, each one run, increasing along the row (docs/semantics.md). None: one
            document a row. Errors name the half of a tuple as ``segment_ids[0]`` or ``[1]``.
        segment_positions: int[B, T] or a tuple as ``segment_ids``, each token's position inside
            its document; None numbers every document's tokens 0, 1, 2, ...
        plan: a :class:`thdkit.AttentionPlan` of the layout (from :func:`thdkit.plan_attention`,
            once per batch); it fixes the layout, mask and window, so ``segment_*``,
            ``*_seq_lengths``, ``local_window_size``, ``max_segments_per_seq``, ``padding_id``
            and ``implementation`` may not be passed with it (``is_causal=True`` only checks that
            the plan is top-left causal).
        max_segments_per_seq: S of the plan, a static int >= the number of documents a row can
            hold (the largest id; with ``padding_id=-1`` the largest id + 1); None reads it from
            concrete ``segment_ids`` (1 without them) and is ``max(T, S)`` for traced ones
            (under ``jit``; ids with gaps above it need S). S sizes cuDNN's metadata and the
            blockwise tiles (from the mean document length T / S).
        padding_id: which id marks padding, as :meth:`thdkit.Segments.from_ids` reads it: 0
            (ids 1..n are documents: thdkit's, Grain's and cuDNN's convention) or -1 (ids
            0..n-1 are documents, -1 is padding: splash attention's and kvax's). Ids that number
            documents from 0 need ``padding_id=-1``: with the default, document 0 is padding.
        logits_soft_cap: a positive finite float ``cap`` (static), or None for no cap. With
            ``plan``: the plan's (:func:`thdkit.plan_attention` takes it), or None.
        sinks: float[N], one learned logit per query head (``jax.nn``'s N), or None;
            differentiable. Its gradient is 0 from rows with no allowed key (they output 0)
            and NaN-free from other documents' non-finite rows.

    Returns:
        float[B, T, N, H_v] (or [T, N, H_v] unbatched) in the query's dtype; float32
        accumulation.

    Raises:
        TypeError: non-float or mixed dtypes, a non-bool ``mask`` or ``is_causal``, non-integer
            seq lengths or segment ids, a non-int window bound, ``max_segments_per_seq`` or
            ``padding_id``, a ``plan`` of another type, a non-real ``logits_soft_cap``, non-float
            ``sinks``.
        ValueError: ranks and shapes (naming the argument; a query laid out [B, N, T, H] is
            told so), a value outside int32, a negative window bound, an unknown
            ``implementation``, a ``padding_id`` other than 0 or -1, a ``bias``/``mask`` that
            does not broadcast, layout keywords together with ``plan``, a broken layout rule
            (concrete layouts; naming the argument, the row and the token, with the fix), a
            ``logits_soft_cap`` not positive and finite or other than the plan's, ``sinks`` not
            of shape [N].
        NotImplementedError: ``bias``/``mask`` with a kernel implementation, ``logits_soft_cap``
            or ``sinks`` with ``"cudnn"``, or an implementation that cannot run here (the
            message says why, naming the feature).

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
        >>> out = dot_product_attention(q, k, v, is_causal=True, segment_ids=ids)
        >>> from_zero = dot_product_attention(q, k, v, is_causal=True, segment_ids=ids - 1,
        ...                                   padding_id=-1)  # documents 0, 1, 2; -1 padding
        >>> out.shape, bool(jnp.array_equal(out, from_zero))
        ((2, 8, 4, 16), True)
        >>> capped = dot_product_attention(q, k, v, is_causal=True, segment_ids=ids,
        ...                                logits_soft_cap=30.0, sinks=jnp.zeros(4))
        >>> capped.shape
        (2, 8, 4, 16)
    """
    query, key, value, unbatched = as_arrays(query, key, value)
    implementation = base.check_name(
        implementation,
        among=implementation_names(),
        words="implementation must be one of {valid}, got {name}",
    )
    layout = layout_of(
        query_shape=query.shape,
        key_shape=key.shape,
        unbatched=unbatched,
        is_causal=is_causal,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size,
        segment_ids=segment_ids,
        segment_positions=segment_positions,
        plan=plan,
        max_segments_per_seq=max_segments_per_seq,
        padding_id=padding_id,
        logits_soft_cap=logits_soft_cap,
    )
    sinks = check_sinks(sinks, heads_q=query.shape[2])
    _check_cudnn_features(implementation, layout.logits_soft_cap, sinks)
    if plan is not None and implementation is not None:
        raise ValueError(
            f"the plan fixes the implementation; do not pass implementation={implementation!r} "
            "with plan"
        )
    if (bias is not None or mask is not None) and implementation not in _DENSE:
        raise NotImplementedError(
            f"bias and mask run the dense path; implementation={implementation!r} cannot take "
            "them. Express the mask with segment_ids / is_causal / local_window_size to use "
            "that implementation, or pass implementation=None, 'xla' or 'reference'"
        )
    batch, seq_q, heads_q = query.shape[:3]
    if layout.q is None:  # T = 0 or S = 0: no key for any query
        _check_empty_call(bias, mask, scale, (batch, heads_q, seq_q, key.shape[1]))
        out = jnp.zeros((batch, seq_q, heads_q, value.shape[3]), query.dtype)
    elif bias is not None or mask is not None:
        out = dense_attention(query, key, value, bias, mask, layout, scale, sinks)[2]
        out = out.astype(query.dtype)
    else:
        out = _kernel_attention(query, key, value, layout, implementation, scale, sinks)
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
    plan: AttentionPlan | None = None,
    max_segments_per_seq: int | None = None,
    padding_id: int = 0,
    logits_soft_cap: float | None = None,
    sinks: Float[ArrayLike, " N"] | None = None,
) -> Float[Array, "B N T S"]:
    """The dense attention weights of :func:`dot_product_attention` (Flax's weights function).

    ``softmax(scale · q·k + bias)`` over the allowed keys, the same mask as
    :func:`dot_product_attention`; a row with no allowed key is zeros, a row reading a non-finite
    query or key is NaN. With ``logits_soft_cap`` they are the weights of the capped logits;
    with ``sinks`` each row's weights sum to ``1 - exp(sink) / (sum_j exp(l_ij) + exp(sink))``,
    less than 1 (the rest is the sink's share), so ``weights @ value`` is the output of
    :func:`dot_product_attention` in every case. For sowing the weights and for
    attention-weight dropout (:func:`thdkit.flax.make_attention_fn`); O(B·N·T·S) memory. T = 0 or
    S = 0 gives an empty result.

    Args:
        query: float[B, T, N, H] or [T, N, H].
        key: float[B, S, K, H] (rank as ``query``), the query's dtype; N a multiple of K.
        bias, mask, scale, is_causal: as :func:`dot_product_attention`.
        query_seq_lengths, key_value_seq_lengths: as :func:`dot_product_attention`.
        local_window_size, segment_ids, segment_positions: as :func:`dot_product_attention`.
        plan, max_segments_per_seq: as :func:`dot_product_attention`.
        padding_id: 0 (0 = padding unless padding_id says otherwise: ids 1..n are documents) or
            -1 (ids 0..n-1 are documents), as :func:`dot_product_attention`.
        logits_soft_cap, sinks: as :func:`dot_product_attention`.

    Returns:
        [B, N, T, S] (or [N, T, S] unbatched) in the query's dtype, computed in float32.

    Raises:
        TypeError, ValueError: as :func:`dot_product_attention`.

    Example:
        >>> q = k = jnp.zeros((1, 3, 1, 4))
        >>> (dot_product_attention_weights(q, k, is_causal=True)[0, 0] * 6).tolist()
        [[6.0, 0.0, 0.0], [3.0, 3.0, 0.0], [2.0, 2.0, 2.0]]
        >>> w = dot_product_attention_weights(q, k, segment_ids=[[0, 0, -1]], padding_id=-1)
        >>> (w[0, 0] * 2).tolist()
        [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
        >>> w = dot_product_attention_weights(q, k, is_causal=True, sinks=jnp.zeros(1))
        >>> jnp.round(w[0, 0] * 12).tolist()  # the sink takes 1/2, 1/3, 1/4 of the rows
        [[6.0, 0.0, 0.0], [4.0, 4.0, 0.0], [3.0, 3.0, 3.0]]
    """
    query, key, _, unbatched = as_arrays(query, key, key)
    layout = layout_of(
        query_shape=query.shape,
        key_shape=key.shape,
        unbatched=unbatched,
        is_causal=is_causal,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size,
        segment_ids=segment_ids,
        segment_positions=segment_positions,
        plan=plan,
        max_segments_per_seq=max_segments_per_seq,
        padding_id=padding_id,
        logits_soft_cap=logits_soft_cap,
    )
    sinks = check_sinks(sinks, heads_q=query.shape[2])
    batch, seq_q, heads_q = query.shape[:3]
    shape = (batch, heads_q, seq_q, key.shape[1])
    if layout.q is None:  # T = 0 or S = 0: an empty [B, N, T, S]
        _check_empty_call(bias, mask, scale, shape)
        probs = jnp.zeros(shape, query.dtype)
    else:
        probs, poisoned, _ = dense_attention(query, key, None, bias, mask, layout, scale, sinks)
        probs = jnp.where(poisoned[..., None], jnp.nan, probs).astype(query.dtype)
    return probs[0] if unbatched else probs
