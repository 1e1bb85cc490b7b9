"""The attention entry point: argument checks, the plan, and the ordered choice of implementation.

Axis legend: B batch, T_q / T_kv query and key/value lengths, H_q / H_kv query and key/value heads
(``H_q`` a multiple of ``H_kv``: GQA/MQA), D query/key head dim, D_v value head dim,
S = ``max_segments_per_seq``.

A plan (:func:`plan_attention`) is computed once per packed layout, outside the model's layers:
it holds the layout (:class:`thdkit.segments.Segments` of both sides), whatever the chosen
implementation reads (tile ranges, compact metadata) and, statically, the implementation chosen.
:func:`attention` reads it and computes nothing of the layout again. Implementations are
candidates tried in order at trace time (cuDNN, then blockwise; ``"reference"`` only when asked);
each either can run or raises ``NotImplementedError`` with its reason, and when none can, one error
lists every reason.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from thdkit.inputs import as_layouts
from thdkit.kernels import blockwise, cudnn, pallas
from thdkit.kernels.arguments import check_arguments, check_layout_shapes
from thdkit.kernels.tiles import TileRanges, default_block, tile_ranges
from thdkit.layout import validate_layout
from thdkit.limits import check_int, check_max_segments, is_concrete
from thdkit.mask_types import MaskType, Window, check_window
from thdkit.metadata import SeqMeta, seqlens_and_offsets
from thdkit.reference import reference_attention
from thdkit.segments import Segments, run_lengths

__all__ = [
    "AttentionPlan",
    "Candidate",
    "Implementation",
    "attention",
    "plan_attention",
]

Implementation = Literal["reference", "blockwise", "cudnn", "pallas"]


# --- Candidates --------------------------------------------------------------------------------


class Candidate(NamedTuple):
    """One implementation of the ordered choice.

    Attributes:
        check_config: ``(*, mask_type, window_size, self_attention) -> None``; raises
            NotImplementedError with the reason it cannot run a configuration (plan time).
        check_arrays: ``(query, key, value) -> None``; raises NotImplementedError where it
            cannot take these arrays (call time).
        run: ``(query, key, value, plan, *, scale) -> out`` in the query's dtype.
        needs: the plan fields it reads: any of ``"ranges"``, ``"metadata"``.
    """

    check_config: Callable[..., None]
    check_arrays: Callable[..., None]
    run: Callable[..., Array]
    needs: frozenset[str]


def _run_reference(query: Array, key: Array, value: Array, plan: Any, *, scale: float) -> Array:
    out, _ = reference_attention(
        query,
        key,
        value,
        q_segments=plan.q_segments,
        kv_segments=plan.kv_segments,
        mask_type=plan.mask_type,
        window_size=plan.window_size,
        scale=scale,
    )
    return out.astype(query.dtype)


CANDIDATES: dict[str, Candidate] = {
    "cudnn": Candidate(cudnn.check_config, cudnn.check_arrays, cudnn.run, frozenset({"metadata"})),
    "blockwise": Candidate(
        blockwise.check_config, blockwise.check_arrays, blockwise.run, frozenset({"ranges"})
    ),
    "reference": Candidate(
        blockwise.check_config, blockwise.check_arrays, _run_reference, frozenset()
    ),
    "pallas": Candidate(
        pallas.check_config, pallas.check_arrays, pallas.run, frozenset({"ranges"})
    ),
}
"""Every implementation by name."""

AUTO = ("cudnn", "blockwise")
"""The order in which ``implementation=None`` tries the candidates."""


def _check_implementation(implementation: Any) -> None:
    if implementation is not None and (
        not isinstance(implementation, str) or implementation not in CANDIDATES
    ):
        raise ValueError(
            f"unknown implementation {implementation!r}; valid: "
            f"{', '.join(map(repr, CANDIDATES))} or None"
        )


# --- The plan ----------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    """Everything :func:`attention` needs of one packed layout, computed once per batch.

    A pytree: it passes through ``jax.jit`` (as an argument or closed over), ``jax.lax.scan`` and
    ``shard_map``; the configuration is static (hashed into compilations).

    Attributes:
        q_segments: :class:`thdkit.segments.Segments` of the queries, int32[B, T_q] fields.
        kv_segments: of the keys/values (the query's for self-attention).
        ranges: :class:`thdkit.kernels.TileRanges` when the blockwise method may run, else None.
        metadata: compact :class:`thdkit.SeqMeta` when cuDNN runs, else None.
        spans: ``(lo, hi)`` int32[B, T_q], each query's allowed key interval, when cuDNN runs
            (it poisons rows from it), else None.
        representable: bool[B] where cuDNN runs on a checked (not self-attention) layout, else
            None.
        implementation: the candidate chosen (static).
        fallback: where cuDNN was chosen automatically, ``"blockwise"``: run when the arrays rule
            cuDNN out (dtype, head dims); else None (static).
        mask_type, window_size, max_segments_per_seq, block_q, block_kv, self_attention: the
            configuration (static; the blocks capped to T).
    """

    q_segments: Segments
    kv_segments: Segments
    ranges: TileRanges | None
    metadata: SeqMeta | None
    spans: tuple[Int[Array, "B T_q"], Int[Array, "B T_q"]] | None
    representable: Bool[Array, " B"] | None
    implementation: str = dataclasses.field(metadata=dict(static=True))
    fallback: str | None = dataclasses.field(metadata=dict(static=True))
    mask_type: MaskType = dataclasses.field(metadata=dict(static=True))
    window_size: Window = dataclasses.field(metadata=dict(static=True))
    max_segments_per_seq: int = dataclasses.field(metadata=dict(static=True))
    block_q: int = dataclasses.field(metadata=dict(static=True))
    block_kv: int = dataclasses.field(metadata=dict(static=True))
    self_attention: bool = dataclasses.field(metadata=dict(static=True))


def _as_segments(segments: Any, name: str) -> Segments:
    if not isinstance(segments, Segments):
        raise TypeError(
            f"{name} must be a thdkit.segments.Segments (Segments.from_ids(ids, positions)), "
            f"got {type(segments).__name__}"
        )
    if segments.ids.ndim != 2:
        raise ValueError(f"{name} must have [B, T] fields, got shape {segments.ids.shape}")
    return segments


def plan_attention(
    q_segments: Segments,
    kv_segments: Segments | None = None,
    *,
    mask_type: MaskType | str,
    window_size: tuple[int | None, int | None] | None = None,
    max_segments_per_seq: int,
    block_q: int | None = None,
    block_kv: int | None = None,
    implementation: Implementation | None = None,
) -> AttentionPlan:
    """The plan of one packed layout: compute it once per batch, pass it to every layer.

    Validates each side when concrete (:func:`thdkit.validate_layout` with S and the mask type),
    chooses the implementation (the first candidate of cuDNN, blockwise that can run; the one
    asked for otherwise) and computes what it reads: tile ranges for blockwise (also for an
    automatic cuDNN choice, its fallback), compact metadata and key spans for cuDNN. cuDNN needs
    the compact metadata to express the layout: always true for self-attention without a window;
    otherwise checked here on concrete layouts, and refused for traced ones.

    Args:
        q_segments: :class:`thdkit.segments.Segments` of the queries, int32[B, T_q] fields.
        kv_segments: of the keys/values, int32[B, T_kv] fields, or None for self-attention.
        mask_type: a :class:`thdkit.MaskType` or its name.
        window_size: ``(left, right)`` or None; a bound that is None, negative or ``>= 2**31 - 1``
            is unbounded (see :func:`attention`).
        max_segments_per_seq: S, a static int >= the largest id.
        block_q, block_kv: tile sizes of the blockwise method, capped to T_q and T_kv; None
            chooses them from the mean document length (:func:`thdkit.kernels.default_block`).
        implementation: ``"reference"``, ``"blockwise"``, ``"cudnn"``, ``"pallas"``, or None for
            the first of cuDNN and blockwise that can run.

    Returns:
        :class:`AttentionPlan`.

    Raises:
        TypeError: segments that are not ``Segments``, a non-int window bound or S.
        ValueError: mismatched batch sizes, bad options (naming them), a layout breaking a rule
            (naming parameter, row and token).
        NotImplementedError: the implementation asked for cannot run; the message lists why.

    Example:
        >>> from thdkit.segments import Segments
        >>> seg = Segments.from_ids(jnp.array([[1, 1, 1, 0, 2, 2, 2, 2]]),
        ...                         jnp.array([[0, 1, 2, 3, 0, 1, 2, 3]]))
        >>> plan = plan_attention(seg, mask_type="padding_causal", max_segments_per_seq=2,
        ...                       block_q=4, block_kv=4)
        >>> plan.implementation, plan.ranges.lo.tolist(), plan.ranges.hi.tolist()
        ('blockwise', [[0, 1]], [[1, 2]])
    """
    return _plan(
        q_segments,
        kv_segments,
        mask_type=mask_type,
        window_size=window_size,
        max_segments_per_seq=max_segments_per_seq,
        block_q=block_q,
        block_kv=block_kv,
        implementation=implementation,
        names=("q_segments", "kv_segments"),
    )


def _plan(
    q_segments,
    kv_segments,
    *,
    mask_type,
    window_size,
    max_segments_per_seq,
    block_q,
    block_kv,
    implementation,
    names: tuple[str, str],
) -> AttentionPlan:
    """:func:`plan_attention`, its messages naming the layout parameters ``names``."""
    mask = MaskType.parse(mask_type)
    window = check_window(window_size)
    num_segments = check_max_segments(max_segments_per_seq)
    _check_implementation(implementation)
    q = _as_segments(q_segments, names[0])
    self_attention = kv_segments is None
    kv = q if self_attention else _as_segments(kv_segments, names[1])
    sizes = ((block_q, "block_q", q.seq_len), (block_kv, "block_kv", kv.seq_len))
    block_q, block_kv = (
        check_int(block, name, low=1) if block is not None else default_block(seq, num_segments)
        for block, name, seq in sizes
    )
    if kv.ids.shape[0] != q.ids.shape[0]:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same batch size B, got "
            f"{q.ids.shape} and {kv.ids.shape}"
        )
    sides = ((names[0], q),) if self_attention else tuple(zip(names, (q, kv), strict=True))
    for name, side in sides:
        if is_concrete(side.ids, side.positions):
            validate_layout(
                side.ids,
                side.positions,
                max_segments_per_seq=num_segments,
                mask_type=mask,
                name=name,
            )
    config = dict(mask_type=mask, window_size=window, self_attention=self_attention)
    reasons = {}
    chosen = None
    representable = None
    for name in AUTO if implementation is None else (implementation,):
        try:
            CANDIDATES[name].check_config(**config)
            if name == "cudnn":
                representable = cudnn.check_layout(
                    q,
                    None if self_attention else kv,
                    mask_type=mask,
                    window_size=window,
                    num_segments=num_segments,
                )
        except NotImplementedError as reason:
            reasons[name] = str(reason)
            continue
        chosen = name
        break
    if chosen is None:
        listed = "; ".join(f"{name}: {reason}" for name, reason in reasons.items())
        raise NotImplementedError(f"no implementation can run this attention ({listed})")
    fallback = "blockwise" if chosen == "cudnn" and implementation is None else None
    needs = CANDIDATES[chosen].needs | (CANDIDATES[fallback].needs if fallback else frozenset())
    block_q, block_kv = min(block_q, q.seq_len), min(block_kv, kv.seq_len)
    ranges = metadata = spans = None
    if "ranges" in needs:
        ranges = tile_ranges(
            q, kv, mask_type=mask, window_size=window, block_q=block_q, block_kv=block_kv
        )
    if "metadata" in needs:
        kv_given = (
            {} if self_attention else dict(segment_ids_kv=kv.ids, segment_pos_kv=kv.positions)
        )
        metadata = seqlens_and_offsets(
            segment_ids_q=q.ids,
            segment_pos_q=q.positions,
            **kv_given,
            mask_type=mask,
            max_segments_per_seq=num_segments,
        )
        spans = cudnn.spans_of(q, kv, mask_type=mask, window_size=window)
    return AttentionPlan(
        q_segments=q,
        kv_segments=kv,
        ranges=ranges,
        metadata=metadata,
        spans=spans,
        representable=representable,
        implementation=chosen,
        fallback=fallback,
        mask_type=mask,
        window_size=window,
        max_segments_per_seq=num_segments,
        block_q=block_q,
        block_kv=block_kv,
        self_attention=self_attention,
    )


# --- The entry point ---------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("implementation", "scale"))
def _run(query, key, value, plan, *, implementation: str, scale: float):
    """The chosen candidate; jitted so that eager calls compile once."""
    return CANDIDATES[implementation].run(query, key, value, plan, scale=scale)


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
    implementation: Implementation | None = None,
    block_q: int | None = None,
    block_kv: int | None = None,
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
        segment_pos_q: int[B, T_q]; each query token's position inside its document.
        segment_ids_kv, segment_pos_kv: int[B, T_kv], or both None for self-attention (then
            ``T_kv == T_q`` and the kv layout is the query's).
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

    Returns:
        [B, T_q, H_q, D_v] in the query's dtype (empty for B = 0).

    Raises:
        TypeError: non-float or mixed dtypes, non-integer layouts, a non-int window bound or
            ``max_segments_per_seq``, a non-real ``scale``.
        ValueError: ranks, batch/length/head mismatches, zero heads or head dims, a non-finite
            ``scale``, a bad ``window_size`` form or block size, an unknown ``mask_type`` or
            ``implementation``, ``plan`` together with layout keywords, or (concrete layouts) a
            layout that breaks a rule, naming the parameter, row and token.
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
    """
    query, key, value, scale = check_arguments(query, key, value, scale=scale)
    batch, seq_q, heads_q, _ = query.shape
    seq_kv = key.shape[1]
    if plan is not None:
        given = [
            name
            for name, x in zip(
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
            if x is not None
        ]
        if given:
            raise ValueError(
                "pass either plan or the layout keywords, not both; got plan and "
                + ", ".join(given)
            )
        if not isinstance(plan, AttentionPlan):
            raise TypeError(f"plan must be an AttentionPlan, got {type(plan).__name__}")
    else:
        if max_segments_per_seq is None:
            raise TypeError("max_segments_per_seq is required with the layout keywords")
        q_layout, kv_layout = as_layouts(
            segment_ids_q, segment_pos_q, segment_ids_kv, segment_pos_kv
        )
        check_layout_shapes(query, key, q_layout[0], None if kv_layout is None else kv_layout[0])
        if batch == 0:
            return jnp.zeros((0, seq_q, heads_q, value.shape[3]), query.dtype)
        # Validated (naming these keywords) by _plan; built directly, not checked twice.
        q_segments = Segments(*q_layout, run_lengths(q_layout[0]))
        kv_segments = None if kv_layout is None else Segments(*kv_layout, run_lengths(kv_layout[0]))
        plan = _plan(
            q_segments,
            kv_segments,
            names=("segment_ids_q", "segment_ids_kv"),
            mask_type="padding_causal" if mask_type is None else mask_type,
            window_size=window_size,
            max_segments_per_seq=max_segments_per_seq,
            block_q=block_q,
            block_kv=block_kv,
            implementation=implementation,
        )
    # The keyword form was checked above; a given plan is checked here.
    for name, side, seq, of in (
        ("plan.q_segments", plan.q_segments, seq_q, "query"),
        ("plan.kv_segments", plan.kv_segments, seq_kv, "key"),
    ):
        if side.ids.shape != (batch, seq):
            raise ValueError(
                f"{name} has shape [B, T] = {side.ids.shape}; it must be {(batch, seq)} to "
                f"match {of}"
            )
    if batch == 0:
        return jnp.zeros((0, seq_q, heads_q, value.shape[3]), query.dtype)
    chosen = plan.implementation
    try:
        CANDIDATES[chosen].check_arrays(query, key, value)
    except NotImplementedError as reason:
        if plan.fallback is None:
            raise NotImplementedError(
                f"implementation={chosen!r} {reason}; use implementation='blockwise'"
            ) from None
        chosen = plan.fallback
    return _run(query, key, value, plan, implementation=chosen, scale=scale)
