"""Context-parallel attention over packed rows: the entry points.

Axis legend: B batch, T_q / T_kv row lengths, H_q / H_kv heads, D / D_v head dims,
S = ``max_segments_per_seq``, cp = size of the context-parallel mesh axis, n = T / cp tokens per
shard.

The sequence axis of every input is split into cp contiguous shards over one mesh axis.
:func:`context_parallel_attention` converts and checks its arguments once for every strategy (the
layout, :class:`thdkit.Segments` or the deprecated arrays, read by
:func:`thdkit._src.context_parallel.shards.row_segments`; the attention checks of
:mod:`thdkit._src.kernels.arguments`, the mesh, the split of T, the strategy's own check, each
concrete shard's layout) and runs the strategy chosen from
:data:`thdkit.context_parallel.STRATEGIES`
(:func:`thdkit._src.context_parallel.program.run_strategy`).
:func:`ring_attention` is the same with ``strategy="ring"``.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax.sharding import Mesh
from jaxtyping import Array, ArrayLike, Float, Int

from thdkit._src.context_parallel import builtins  # noqa: F401  (fills STRATEGIES)
from thdkit._src.context_parallel.base import (
    Shapes,
    StrategyConfig,
    StrategyName,
    check_features,
    get,
)
from thdkit._src.context_parallel.program import run_strategy
from thdkit._src.context_parallel.shards import (
    check_mesh,
    check_split,
    readable,
    row_segments,
    validate_shards,
)
from thdkit._src.kernels import base
from thdkit._src.kernels.arguments import check_arguments, check_layout_shapes
from thdkit._src.kernels.config import AttentionConfig
from thdkit._src.kernels.partial import check_partial_implementation
from thdkit._src.kernels.plan import no_candidate
from thdkit._src.kernels.sinks import check_sinks
from thdkit._src.mask_types import MaskType
from thdkit._src.segments import Segments

__all__ = ["context_parallel_attention", "ring_attention"]


def context_parallel_attention(
    query: Float[ArrayLike, "B T_q H_q D"],
    key: Float[ArrayLike, "B T_kv H_kv D"],
    value: Float[ArrayLike, "B T_kv H_kv D_v"],
    *,
    q_segments: Segments | None = None,
    kv_segments: Segments | None = None,
    mask_type: MaskType | str = "padding_causal",
    window_size: tuple[int | None, int | None] | None = None,
    max_segments_per_seq: int,
    mesh: Mesh,
    axis_name: str,
    strategy: StrategyName = "ring",
    scale: float | None = None,
    implementation: str | None = None,
    logits_soft_cap: float | None = None,
    sinks: Float[ArrayLike, " H_q"] | None = None,
    segment_ids_q: Int[ArrayLike, "B T_q"] | None = None,
    segment_pos_q: Int[ArrayLike, "B T_q"] | None = None,
    segment_ids_kv: Int[ArrayLike, "B T_kv"] | None = None,
    segment_pos_kv: Int[ArrayLike, "B T_kv"] | None = None,
) -> Float[Array, "B T_q H_q D_v"]:
    """Attention over packed rows whose sequence axis is sharded over a mesh axis.

    Computes what :func:`thdkit.attention` computes on the same tokens, with the same mask and
    window semantics, keeping T / cp tokens of each input per device. Tokens may be in any order
    that keeps each shard a valid layout: plain, or reordered with :func:`thdkit.reorder.striped`
    / :func:`thdkit.reorder.dual_chunk_swap` (the Segments' fields reordered with the tokens; the
    output comes back in the same order and sharding). Differentiable; the gradients match the
    single-device attention's. Masks are rebuilt from ids and positions after every collective,
    so every strategy is exact. A NaN or inf in one document stays in it, as in
    :func:`thdkit.attention`: the rows that read it output NaN and pass no gradient back, every
    other row and gradient is bit-equal to the call without it.

    Strategies (docs/context-parallel.md compares them; :data:`~thdkit.context_parallel.STRATEGIES`
    lists them, :func:`~thdkit.context_parallel.register` adds one):

    - ``"ring"``: cp - 1 dependent ``ppermute`` steps of the key/value shard (skipping steps
      without work); the backward pass is a second ring. Memory: one visiting k/v shard.
    - ``"all_gather"``: one ``all_gather`` of keys, values, ids and positions; each rank attends
      its query shard to the whole row (tile skipping); the backward pass reduce-scatters dk, dv.
      Memory: k/v of the whole row on every device.
    - ``"all_to_all"``: one ``all_to_all`` gives each rank the whole row for H_q / cp query and
      H_kv / cp key/value heads; attention over the row; one ``all_to_all`` back. H_q and H_kv
      must be multiples of cp. Memory: q/k/v/out of the whole row for H / cp heads.

    Args:
        query: float[B, T_q, H_q, D]; sequence axis sharded over ``axis_name``.
        key: float[B, T_kv, H_kv, D]; H_kv divides H_q (grouped-query attention).
        value: float[B, T_kv, H_kv, D_v].
        q_segments: the query rows' :class:`thdkit.Segments`, int[B, T_q] fields, in the order
            of the tokens (e.g. ``jax.tree.map(lambda a: striped(a, cp=cp), segments)``); ids
            and positions are read, document lengths are recomputed from the ids. Required
            (None only with the deprecated arrays below).
        kv_segments: the same for the keys, int[B, T_kv] fields; None for self-attention
            (kv = q, T_kv = T_q).
        mask_type: a :class:`thdkit.MaskType` or its name.
        window_size: ``(left, right)`` sliding window; None, or None/negative on a side, means
            unbounded on that side.
        max_segments_per_seq: S, a static int >= the largest id.
        mesh: the device mesh; other axes (e.g. one sharding the batch) are left to the
            compiler.
        axis_name: the mesh axis the sequence axis is sharded over; its size cp must divide T_q
            and T_kv.
        strategy: a name of :data:`~thdkit.context_parallel.STRATEGIES`: ``"ring"``,
            ``"all_gather"``, ``"all_to_all"`` or a registered one.
        scale: multiplier of the logits; default ``1 / sqrt(D)``.
        implementation: the attention each device runs on its part, one of
            :func:`thdkit.kernels.partial_implementations`; None for the first.
        logits_soft_cap: ``cap`` of the soft cap ``cap * tanh(logit / cap)`` applied to the
            scaled logits before the mask, in float32 (docs/semantics.md, "Soft-capped
            logits"), or None. The strategy and the implementation must implement it.
        sinks: float[H_q], one learned logit per query head that joins every row's softmax
            denominator and attends to nothing (docs/semantics.md, "Attention sinks"), or None;
            replicated to every device, differentiable. Each row's sink joins once, after its
            partial results are merged (:func:`thdkit.kernels.attach_sinks`).
        segment_ids_q: deprecated, int[B, T_q]: pass ``q_segments`` instead.
        segment_pos_q: deprecated, int[B, T_q]: the positions of ``q_segments``.
        segment_ids_kv: deprecated, int[B, T_kv]: pass ``kv_segments`` instead.
        segment_pos_kv: deprecated, int[B, T_kv]: the positions of ``kv_segments``.

    Returns:
        float[B, T_q, H_q, D_v] in the dtype of ``query``; zeros for queries with no allowed key.

    Raises:
        TypeError: non-floating inputs, non-integer ids, a segments argument that is not a
            ``Segments``, a mesh that is not a ``Mesh``.
        ValueError: an unknown strategy, implementation or axis, a cp that does not divide T (or
            what the strategy splits, e.g. the heads for ``"all_to_all"``), no query layout, the
            Segments together with the deprecated arrays, mismatched shapes, bad options (a
            ``logits_soft_cap`` not positive, ``sinks`` not of shape [H_q]), or (concrete
            inputs) a shard that breaks a layout rule, naming the parameter passed
            (``q_segments``, or ``segment_ids_q`` / ``segment_pos_q`` for the arrays), the row
            as (batch index, shard index) and the token.
        NotImplementedError: a soft cap or sinks asked of a strategy that does not declare them
            (``Strategy.features``), naming both, or a soft cap of an implementation that does
            not implement it.

    Warns:
        DeprecationWarning: the layout given as the arrays ``segment_ids_q`` ...; accepted for
            one release, the message names the ``q_segments`` / ``kv_segments`` to pass.

    Example:
        Two documents in a row of eight, striped over two devices (the Segments built on the row
        in document order, then reordered with the tokens). With all logits equal, each token
        averages the values of its document's tokens up to itself:

        >>> import numpy as np
        >>> from thdkit.reorder import striped, unstriped
        >>> mesh = Mesh(np.array(jax.devices()[:2]), ("cp",))
        >>> segments = Segments.from_ids(jnp.array([[1, 1, 1, 1, 1, 2, 2, 2]]))
        >>> qk = jnp.zeros((1, 8, 2, 4))
        >>> v = jnp.broadcast_to(jnp.arange(8.0).reshape(1, 8, 1, 1), (1, 8, 2, 1))
        >>> out = context_parallel_attention(
        ...     qk, qk, striped(v, cp=2, axis=1),
        ...     q_segments=jax.tree.map(lambda a: striped(a, cp=2), segments),
        ...     max_segments_per_seq=2, mesh=mesh, axis_name="cp", strategy="all_to_all")
        >>> unstriped(out, cp=2, axis=1)[0, :, 0, 0]
        Array([0. , 0.5, 1. , 1.5, 2. , 5. , 5.5, 6. ], dtype=float32)
    """
    layout = row_segments(
        q_segments,
        kv_segments,
        segment_ids_q=segment_ids_q,
        segment_pos_q=segment_pos_q,
        segment_ids_kv=segment_ids_kv,
        segment_pos_kv=segment_pos_kv,
        caller="context_parallel_attention",
    )
    return _attention(
        query,
        key,
        value,
        layout,
        mask_type=mask_type,
        window_size=window_size,
        max_segments_per_seq=max_segments_per_seq,
        mesh=mesh,
        axis_name=axis_name,
        strategy=strategy,
        scale=scale,
        implementation=implementation,
        logits_soft_cap=logits_soft_cap,
        sinks=sinks,
    )


def _attention(
    query: Float[ArrayLike, "B T_q H_q D"],
    key: Float[ArrayLike, "B T_kv H_kv D"],
    value: Float[ArrayLike, "B T_kv H_kv D_v"],
    layout: tuple[Segments, Segments | None, tuple[str, str]],
    *,
    mask_type: MaskType | str,
    window_size: tuple[int | None, int | None] | None,
    max_segments_per_seq: int,
    mesh: Mesh,
    axis_name: str,
    strategy: StrategyName,
    scale: float | None,
    implementation: str | None,
    logits_soft_cap: float | None,
    sinks: Float[ArrayLike, " H_q"] | None,
) -> Float[Array, "B T_q H_q D_v"]:
    """The entry points' body, on the layout as :func:`row_segments` returns it."""
    chosen = get(strategy)
    implementation = check_partial_implementation(implementation)
    options = AttentionConfig.parse(
        mask_type=mask_type,
        window_size=window_size,
        max_segments_per_seq=max_segments_per_seq,
        logits_soft_cap=logits_soft_cap,
    )
    cp = check_mesh(mesh, axis_name)
    query, key, value, scale = check_arguments(query, key, value, scale=scale)
    sinks = check_sinks(sinks, heads_q=query.shape[2])
    rows_q, rows_kv, names = layout
    self_attention = rows_kv is None
    kv_ids = None if rows_kv is None else rows_kv.ids
    check_layout_shapes(query, key, rows_q.ids, kv_ids, names=names)
    check_split(query, key, cp, axis_name)
    chosen.check(Shapes.of(query, key, value, cross=not self_attention), cp)
    config = StrategyConfig(
        mesh=mesh,
        axis_name=axis_name,
        mask_type=options.mask_type,
        window_size=options.window_size,
        max_segments_per_seq=options.max_segments_per_seq,
        scale=scale,
        self_attention=self_attention,
        implementation=implementation,
        logits_soft_cap=options.logits_soft_cap,
    )
    # The optional features, refused here rather than ignored: the strategy's, then the local
    # attention's (which sinks do not concern: they join outside it, through its lse).
    prefix = any(r is not None and r.prefix_lengths is not None for r in (rows_q, rows_kv))
    check_features(chosen, config, sinks=sinks is not None, prefix=prefix)
    try:
        base.check_features(base.get(implementation), dataclasses.replace(options, prefix=prefix))
    except NotImplementedError as reason:
        raise no_candidate({implementation: str(reason)}) from None
    if query.shape[0] == 0:
        return jnp.zeros((*query.shape[:3], value.shape[3]), query.dtype)
    for name, rows in zip(names, (rows_q, rows_kv), strict=True):
        if rows is not None and readable(rows.ids, rows.positions):
            validate_shards(
                rows,
                cp=cp,
                num_segments=options.max_segments_per_seq,
                mask=options.mask_type,
                name=name,
            )
    return run_strategy(chosen, config, query, key, value, rows_q, rows_kv, sinks=sinks)


def ring_attention(
    query: Float[ArrayLike, "B T_q H_q D"],
    key: Float[ArrayLike, "B T_kv H_kv D"],
    value: Float[ArrayLike, "B T_kv H_kv D_v"],
    *,
    q_segments: Segments | None = None,
    kv_segments: Segments | None = None,
    mask_type: MaskType | str = "padding_causal",
    window_size: tuple[int | None, int | None] | None = None,
    max_segments_per_seq: int,
    mesh: Mesh,
    axis_name: str,
    scale: float | None = None,
    implementation: str | None = None,
    logits_soft_cap: float | None = None,
    sinks: Float[ArrayLike, " H_q"] | None = None,
    segment_ids_q: Int[ArrayLike, "B T_q"] | None = None,
    segment_pos_q: Int[ArrayLike, "B T_q"] | None = None,
    segment_ids_kv: Int[ArrayLike, "B T_kv"] | None = None,
    segment_pos_kv: Int[ArrayLike, "B T_kv"] | None = None,
) -> Float[Array, "B T_q H_q D_v"]:
    """Ring attention: :func:`context_parallel_attention` with ``strategy="ring"``.

    Args:
        query, key, value, q_segments, kv_segments: as :func:`context_parallel_attention`.
        mask_type, window_size, max_segments_per_seq: as :func:`context_parallel_attention`.
        mesh, axis_name, scale, implementation: as :func:`context_parallel_attention`.
        logits_soft_cap, sinks: as :func:`context_parallel_attention`.
        segment_ids_q: deprecated, int[B, T_q]: pass ``q_segments`` instead.
        segment_pos_q: deprecated, int[B, T_q]: the positions of ``q_segments``.
        segment_ids_kv: deprecated, int[B, T_kv]: pass ``kv_segments`` instead.
        segment_pos_kv: deprecated, int[B, T_kv]: the positions of ``kv_segments``.

    Returns:
        float[B, T_q, H_q, D_v] in the dtype of ``query``, as :func:`context_parallel_attention`.

    Raises:
        TypeError, ValueError, NotImplementedError: as :func:`context_parallel_attention`.

    Warns:
        DeprecationWarning: as :func:`context_parallel_attention`.

    Example:
        Two documents in a row of eight, striped over a ring of two devices, given as
        :class:`thdkit.Segments` reordered with the tokens. With all logits equal, each token
        averages the values of its document's tokens up to itself:

        >>> import numpy as np
        >>> from thdkit.reorder import striped, unstriped
        >>> mesh = Mesh(np.array(jax.devices()[:2]), ("cp",))
        >>> segments = Segments.from_ids(jnp.array([[1, 1, 1, 1, 1, 2, 2, 2]]))
        >>> qk = jnp.zeros((1, 8, 1, 4))
        >>> v = jnp.arange(8.0).reshape(1, 8, 1, 1)
        >>> out = ring_attention(
        ...     qk, qk, striped(v, cp=2, axis=1),
        ...     q_segments=jax.tree.map(lambda a: striped(a, cp=2), segments),
        ...     max_segments_per_seq=2, mesh=mesh, axis_name="cp")
        >>> unstriped(out, cp=2, axis=1)[0, :, 0, 0]
        Array([0. , 0.5, 1. , 1.5, 2. , 5. , 5.5, 6. ], dtype=float32)
    """
    layout = row_segments(
        q_segments,
        kv_segments,
        segment_ids_q=segment_ids_q,
        segment_pos_q=segment_pos_q,
        segment_ids_kv=segment_ids_kv,
        segment_pos_kv=segment_pos_kv,
        caller="ring_attention",
    )
    return _attention(
        query,
        key,
        value,
        layout,
        mask_type=mask_type,
        window_size=window_size,
        max_segments_per_seq=max_segments_per_seq,
        mesh=mesh,
        axis_name=axis_name,
        strategy="ring",
        scale=scale,
        implementation=implementation,
        logits_soft_cap=logits_soft_cap,
        sinks=sinks,
    )
