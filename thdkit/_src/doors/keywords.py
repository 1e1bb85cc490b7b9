"""The attention entry points: :func:`attention` and :func:`plan_attention`.

Axis legend: B batch, T_q / T_kv query and key/value lengths, H_q / H_kv query and key/value heads
(``H_q`` a multiple of ``H_kv``: GQA/MQA), D query/key head dim, D_v value head dim,
S = ``max_segments_per_seq``.

Each entry point converts and validates its inputs once, parses its options into one
:class:`thdkit.kernels.AttentionConfig`, and reads the registry of implementations
(:mod:`thdkit._src.kernels.base`): it names none. Called eagerly on host or concrete layouts, a call
with the layout keywords compiles one program, the chosen implementation's ``forward`` (its
``prepare`` runs in NumPy where it can, else in the same program), and a plan compiles nothing
(else one program for the auxiliary data); a call with a plan compiles its forward.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int

from thdkit._src.host import JAX, NUMPY, on_host, readable
from thdkit._src.kernels import base, builtins  # noqa: F401  (builtins: the built-in implementations)
from thdkit._src.kernels.arguments import check_arguments, check_layout_shapes
from thdkit._src.kernels.config import AttentionConfig, check_soft_cap
from thdkit._src.kernels.plan import (
    AttentionPlan,
    candidates,
    make_plan,
    no_candidate,
    prepare_on_host,
)
from thdkit._src.kernels.sinks import attach_sinks, check_sinks
from thdkit._src.limits import check_max_segments
from thdkit._src.mask_types import MaskType
from thdkit._src.programs import program
from thdkit._src.segments import Segments, run_lengths
from thdkit._src.validate.inputs import as_layouts
from thdkit._src.validate.segments import as_segments, validate_segments

__all__ = ["attention", "plan_attention"]


def _checked(
    q: Segments,
    kv: Segments | None,
    *,
    names: tuple[str, str],
    mask_type: Any,
    window_size: Any,
    max_segments_per_seq: Any,
    block_q: Any,
    block_kv: Any,
    implementation: Any,
    logits_soft_cap: Any,
) -> tuple[Segments, Segments, AttentionConfig]:
    """Both sides' Segments validated once (when concrete) and the parsed configuration."""
    check_max_segments(max_segments_per_seq)
    config = AttentionConfig.parse(
        mask_type=mask_type,
        window_size=window_size,
        max_segments_per_seq=max_segments_per_seq,
        block_q=block_q,
        block_kv=block_kv,
        seq_q=q.seq_len,
        seq_kv=q.seq_len if kv is None else kv.seq_len,
        self_attention=kv is None,
        logits_soft_cap=logits_soft_cap,
        prefix=any(side is not None and side.prefix_lengths is not None for side in (q, kv)),
    )
    base.check_name(implementation)
    if kv is not None and kv.ids.shape[0] != q.ids.shape[0]:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same batch size B, got "
            f"{q.ids.shape} and {kv.ids.shape}"
        )
    for name, side in zip(names, (q, kv), strict=True):
        if side is not None:
            validate_segments(
                side,
                name=name,
                max_segments_per_seq=config.max_segments_per_seq,
                mask_type=config.mask_type,
            )
    return q, q if kv is None else kv, config


def plan_attention(
    q_segments: Segments,
    kv_segments: Segments | None = None,
    *,
    mask_type: MaskType | str,
    window_size: tuple[int | None, int | None] | None = None,
    max_segments_per_seq: int,
    block_q: int | None = None,
    block_kv: int | None = None,
    implementation: str | None = None,
    logits_soft_cap: float | None = None,
) -> AttentionPlan:
    """The plan of one packed layout: compute it once per batch, pass it to every layer.

    Validates each side as a whole (``validate_segments``
    with S and the mask type: fields, dtypes, shapes, the layout rules and the run lengths, when
    concrete), chooses the candidates (every implementation of the default order that can run
    this configuration and layout, or the one asked for; :class:`thdkit.kernels.Implementation`) and
    computes what each reads (``prepare``): tile ranges for blockwise and pallas, compact
    metadata and key spans for cuDNN. cuDNN needs the compact metadata to express the layout:
    always true for self-attention without a window; otherwise checked here on concrete layouts,
    and refused for traced ones. At call time the first candidate that takes the arrays runs.

    Args:
        q_segments: :class:`thdkit.Segments` of the queries, int32[B, T_q] fields; with
            ``prefix_lengths`` (:meth:`thdkit.Segments.with_prefix`) the plan is of prefix-LM
            masks (docs/semantics.md, "Prefix-LM masks"), which only the implementations that
            declare ``"prefix"`` run.
        kv_segments: of the keys/values, int32[B, T_kv] fields, or None for self-attention.
        mask_type: a :class:`thdkit.MaskType` or its name.
        window_size: ``(left, right)`` or None; a bound that is None, negative or ``>= 2**31 - 1``
            is unbounded (see :func:`attention`).
        max_segments_per_seq: S, a static int >= the largest id.
        block_q, block_kv: tile sizes of the blockwise method, capped to T_q and T_kv; None
            chooses them from the mean document length (:func:`thdkit.kernels.default_block`).
        implementation: a registered name (``"reference"``, ``"blockwise"``, ``"cudnn"``,
            ``"pallas"``, or one's own: :func:`thdkit.kernels.register`), or None for the
            default order (cuDNN, then blockwise).
        logits_soft_cap: ``cap`` of the soft cap ``cap * tanh(logit / cap)`` applied to the scaled
            logits before the mask (docs/semantics.md, "Soft-capped logits"), or None; part of
            the plan (the candidates are those that implement it).

    Returns:
        :class:`AttentionPlan`.

    Raises:
        TypeError: segments that are not ``Segments``, a non-int window bound or S.
        ValueError: mismatched batch sizes, bad options (naming them), a layout breaking a rule
            (naming parameter, row and token).
        NotImplementedError: the implementation asked for cannot run; the message lists why.

    Example:
        >>> from thdkit import Segments
        >>> seg = Segments.from_ids(jnp.array([[1, 1, 1, 0, 2, 2, 2, 2]]),
        ...                         jnp.array([[0, 1, 2, 3, 0, 1, 2, 3]]))
        >>> plan = plan_attention(seg, mask_type="padding_causal", max_segments_per_seq=2,
        ...                       block_q=4, block_kv=4)
        >>> ranges = plan.aux["blockwise"]
        >>> plan.implementation, ranges.lo.tolist(), ranges.hi.tolist()
        ('blockwise', [[0, 1]], [[1, 2]])
    """
    q = as_segments(q_segments, "q_segments", rows=True)
    kv = None if kv_segments is None else as_segments(kv_segments, "kv_segments", rows=True)
    q, kv, config = _checked(
        q,
        kv,
        names=("q_segments", "kv_segments"),
        mask_type=mask_type,
        window_size=window_size,
        max_segments_per_seq=max_segments_per_seq,
        block_q=block_q,
        block_kv=block_kv,
        implementation=implementation,
        logits_soft_cap=logits_soft_cap,
    )
    return make_plan(q, kv, config, implementation)


def _runnable(
    names: tuple[str, ...],
    query: Array,
    key: Array,
    value: Array,
    *,
    config: AttentionConfig,
    sinks: bool,
) -> base.Implementation:
    """The first of ``names`` that takes these arrays (and the call's sinks)."""
    reasons = {}
    for name in names:
        candidate = base.get(name)
        try:
            base.check_features(candidate, config, sinks=sinks)
            candidate.check_arrays(query, key, value)
        except NotImplementedError as reason:
            reasons[name] = str(reason)
            continue
        return candidate
    raise no_candidate(reasons)


def _forward(query, key, value, q, kv, aux, sinks, *, implementation, config, scale):
    """One implementation's forward, the sinks joined, its output in the query's dtype."""
    out, lse = implementation.forward(query, key, value, q, kv, aux, config, scale=scale)
    if sinks is not None:
        out, _ = attach_sinks(out, lse, sinks)
    return out.astype(query.dtype)


_forward_program = program(_forward, static_argnames=("implementation", "config", "scale"))


@program(static_argnames=("implementation", "config", "scale"))
def _prepare_and_forward(query, key, value, q, kv, sinks, *, implementation, config, scale):
    """One implementation's auxiliary data and forward: the whole keyword call, one program."""
    aux = implementation.prepare(q, kv, config)
    return _forward(
        query,
        key,
        value,
        q,
        kv,
        aux,
        sinks,
        implementation=implementation,
        config=config,
        scale=scale,
    )


_LAYOUT_KEYWORDS = (
    "segment_ids_q",
    "segment_pos_q",
    "segment_ids_kv",
    "segment_pos_kv",
    "mask_type",
    "window_size",
    "max_segments_per_seq",
    "implementation",
    "block_q",
    "block_kv",
)


def _empty(query: Array, value: Array) -> Array:
    """The output of a batch of no rows: [0, T_q, H_q, D_v] in the query's dtype."""
    return jnp.zeros((0, *query.shape[1:3], value.shape[3]), query.dtype)


def attention(
    query: Float[ArrayLike, "B T_q H_q D"],
    key: Float[ArrayLike, "B T_kv H_kv D"],
    value: Float[ArrayLike, "B T_kv H_kv D_v"],
    *,
    plan: AttentionPlan | None = None,
    segment_ids_q: Int[ArrayLike, "B T_q"] | None = None,
    segment_pos_q: Int[ArrayLike, "B T_q"] | None = None,
    segment_ids_kv: Int[ArrayLike, "B T_kv"] | None = None,
    segment_pos_kv: Int[ArrayLike, "B T_kv"] | None = None,
    mask_type: MaskType | str | None = None,
    window_size: tuple[int | None, int | None] | None = None,
    max_segments_per_seq: int | None = None,
    scale: float | None = None,
    implementation: str | None = None,
    block_q: int | None = None,
    block_kv: int | None = None,
    logits_soft_cap: float | None = None,
    sinks: Float[ArrayLike, " H_q"] | None = None,
) -> Float[Array, "B T_q H_q D_v"]:
    """Scaled dot-product attention over packed rows, masked by segment ids and positions.

    Softmax over the keys allowed by ``allowed[i, j]`` of docs/semantics.md (same non-padding
    document, and the mask type's rule on positions) intersected with the sliding window; query
    rows with no allowed key give zeros (and zero gradients). Float32 accumulation everywhere.

    Either ``plan=`` (from :func:`plan_attention`, computed once per batch and shared by the
    layers: nothing of the layout is recomputed) or the layout keywords (a plan is built here;
    identical results). Isolation: a row with at least one allowed key whose own query, or one of
    whose allowed keys or values, holds a NaN or inf gives NaN (and passes no gradient back); every
    other row and its gradients are bit-equal to the call without the non-finite values.

    Args:
        query: float32/bfloat16/float16[B, T_q, H_q, D].
        key: [B, T_kv, H_kv, D], the query's dtype; ``H_q`` a multiple of ``H_kv``: query head h
            reads key/value head ``h // (H_q // H_kv)``.
        value: [B, T_kv, H_kv, D_v], the query's dtype.
        plan: an :class:`AttentionPlan` of this layout, or None to pass the layout keywords.
        segment_ids_q: int[B, T_q]; 0 = padding, 1..S = the document of each query token.
        segment_pos_q: int[B, T_q]; each query token's position inside its document, or None
            to number each document's tokens 0, 1, 2, ... (as :meth:`thdkit.Segments.from_ids`;
            right for rows in document order). Positions come for both sides or for neither.
        segment_ids_kv, segment_pos_kv: int[B, T_kv], or both None for self-attention (then
            ``T_kv == T_q`` and the kv layout is the query's); ``segment_pos_kv`` None with
            ``segment_ids_kv`` when ``segment_pos_q`` is None.
        mask_type: a :class:`thdkit.MaskType` or its name; None means ``"padding_causal"``.
        window_size: ``(left, right)`` or None; a bound that is None, negative or ``>= 2**31 - 1``
            is unbounded. Top-left types and no_mask/padding keep ``pos_q - left <= pos_kv <=
            pos_q + right``; bottom-right types keep ``rl_q - pos_q + left >= rl_kv - pos_kv``
            (no right bound).
        max_segments_per_seq: S, a static int >= the largest id.
        scale: a finite real multiplying the logits; None means ``1 / sqrt(D)``.
        implementation: ``"reference"`` (dense, O(T_q·T_kv) memory), ``"blockwise"`` (tiled,
            O(T·tile) memory, exact for every valid layout), ``"cudnn"`` (GPU; compact metadata,
            see :func:`thdkit.kernels.is_representable`), ``"pallas"`` (a kernel over the tile
            ranges; GPU and TPU, interpret mode on CPU), or None: the first of cuDNN and
            blockwise that can run.
        block_q, block_kv: tile sizes of the blockwise method, capped to T; None chooses them
            from the mean document length (:func:`thdkit.kernels.default_block`).
        logits_soft_cap: ``cap`` of the soft cap ``cap * tanh(logit / cap)`` applied to the scaled
            logits before the mask, in float32 (docs/semantics.md, "Soft-capped logits"), or
            None. With ``plan``, the plan's (:func:`plan_attention`): None, or the same value.
        sinks: float[H_q], one learned logit per query head that joins every row's softmax
            denominator and attends to nothing (docs/semantics.md, "Attention sinks"), or None;
            differentiable. Needs an implementation that returns a log-sum-exp (all built-ins but
            cuDNN).

    Returns:
        [B, T_q, H_q, D_v] in the query's dtype (empty for B = 0).

    Raises:
        TypeError: non-float or mixed dtypes, non-integer layouts, a non-int window bound or
            ``max_segments_per_seq``, a non-real ``scale``.
        ValueError: ranks, batch/length/head mismatches, zero heads or head dims, a non-finite
            ``scale``, a bad ``window_size`` form or block size, an unknown ``mask_type`` or
            ``implementation``, ``plan`` together with layout keywords, a ``logits_soft_cap``
            other than the plan's or not positive, ``sinks`` not of shape [H_q], or (concrete
            layouts) a layout that breaks a rule, naming the parameter, row and token.
        NotImplementedError: the implementation asked for cannot run this configuration, layout
            or these arrays; the message says why.

    Example:
        >>> ids = jnp.array([[1, 1, 1, 0, 2, 2, 2, 2]])
        >>> pos = jnp.array([[0, 1, 2, 3, 0, 1, 2, 3]])
        >>> q = k = jnp.zeros((1, 8, 2, 4))
        >>> v = jnp.broadcast_to(jnp.arange(8.0).reshape(1, 8, 1, 1), (1, 8, 2, 4))
        >>> out = attention(q, k, v, segment_ids_q=ids, segment_pos_q=pos,
        ...                 max_segments_per_seq=2)
        >>> out[0, :, 0, 0]
        Array([0. , 0.5, 1. , 0. , 4. , 4.5, 5. , 5.5], dtype=float32)

        The padding mask reads no positions; left out, each document is numbered 0, 1, 2, ...:

        >>> out = attention(q, k, v, segment_ids_q=ids, mask_type="padding",
        ...                 max_segments_per_seq=2)
        >>> out[0, :, 0, 0]
        Array([1. , 1. , 1. , 0. , 5.5, 5.5, 5.5, 5.5], dtype=float32)
    """
    query, key, value, scale = check_arguments(query, key, value, scale=scale)
    batch, seq_q = query.shape[:2]
    sinks = check_sinks(sinks, heads_q=query.shape[2])
    layout = dict(
        zip(
            _LAYOUT_KEYWORDS,
            (
                segment_ids_q,
                segment_pos_q,
                segment_ids_kv,
                segment_pos_kv,
                mask_type,
                window_size,
                max_segments_per_seq,
                implementation,
                block_q,
                block_kv,
            ),
            strict=True,
        )
    )
    if plan is None:
        if max_segments_per_seq is None:
            raise TypeError("max_segments_per_seq is required with the layout keywords")
        # Host data (NumPy, lists) is converted and validated in NumPy: nothing compiles but
        # the attention itself.
        given = tuple(map(readable, (segment_ids_q, segment_pos_q, segment_ids_kv, segment_pos_kv)))
        q_layout, kv_layout = as_layouts(
            *given, ops=NUMPY if on_host(*given) else JAX, number_positions=True
        )
        check_layout_shapes(query, key, q_layout[0], None if kv_layout is None else kv_layout[0])
        if batch == 0:
            return _empty(query, value)
        q, kv, config = _checked(
            Segments(*q_layout, run_lengths(q_layout[0])),
            None if kv_layout is None else Segments(*kv_layout, run_lengths(kv_layout[0])),
            names=("segment_ids_q", "segment_ids_kv"),
            mask_type="padding_causal" if mask_type is None else mask_type,
            window_size=window_size,
            max_segments_per_seq=max_segments_per_seq,
            block_q=block_q,
            block_kv=block_kv,
            implementation=implementation,
            logits_soft_cap=logits_soft_cap,
        )
        names = candidates(q, kv, config, implementation)
        chosen = _runnable(names, query, key, value, config=config, sinks=sinks is not None)
        aux = prepare_on_host(q, kv, (chosen,), config)
        if aux is None:
            return _prepare_and_forward(
                query, key, value, q, kv, sinks, implementation=chosen, config=config, scale=scale
            )
        return _forward_program(
            query,
            key,
            value,
            q,
            kv,
            aux[chosen.name],
            sinks,
            implementation=chosen,
            config=config,
            scale=scale,
        )
    given = [name for name, x in layout.items() if x is not None]
    if given:
        raise ValueError(
            "pass either plan or the layout keywords, not both; got plan and " + ", ".join(given)
        )
    if not isinstance(plan, AttentionPlan):
        raise TypeError(f"plan must be an AttentionPlan, got {type(plan).__name__}")
    cap = check_soft_cap(logits_soft_cap)
    if cap is not None and cap != plan.config.logits_soft_cap:
        raise ValueError(
            f"logits_soft_cap={cap} differs from the plan's ({plan.config.logits_soft_cap}): "
            f"the cap is part of the plan; pass it to plan_attention(logits_soft_cap=...)"
        )
    for name, side, seq, of in (
        ("plan.q_segments", plan.q_segments, seq_q, "query"),
        ("plan.kv_segments", plan.kv_segments, key.shape[1], "key"),
    ):
        if side.ids.shape != (batch, seq):
            raise ValueError(
                f"{name} has shape [B, T] = {side.ids.shape}; it must be {(batch, seq)} to "
                f"match {of}"
            )
    if batch == 0:
        return _empty(query, value)
    chosen = _runnable(
        plan.candidates, query, key, value, config=plan.config, sinks=sinks is not None
    )
    return _forward_program(
        query,
        key,
        value,
        plan.q_segments,
        plan.kv_segments,
        plan.aux[chosen.name],
        sinks,
        implementation=chosen,
        config=plan.config,
        scale=scale,
    )
