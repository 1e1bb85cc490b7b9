"""Per-segment lengths and offsets for varlen attention: ``SeqMeta``, the dispatcher, the linear
method, and the flat (cu_seqlens) form.

Axis legend used in this package: B batch dims (any number), T_q / T_kv row lengths of queries and
keys/values, S = ``max_segments_per_seq``.

The linear method. Under the layout rules every segment is one run, so everything the reference
needs per segment is read off the run's two endpoints: the run's length, and (positions strictly
increasing along it) its smallest and largest position. The tokens that stay active form one
interval of the run (a suffix on the q side, a prefix on the kv side, or the whole run), bounded by
a threshold on positions:

- padding / no_mask: the whole run, if the segment is present on both sides;
- causal: q iff ``pos_q >= pos_kv[first_kv]``; kv iff ``pos_kv <= pos_q[last_q]``;
- bottom-right (``rl - pos`` compared): q iff ``pos_q >= pos_kv[first_kv] + len_q - len_kv``;
  kv iff ``pos_kv <= pos_q[last_q] + len_kv - len_q``.

So one scatter per side finds the endpoints (O(T) time, O(S) memory), a vectorised binary search
over each run finds the interval ends (O(S log T)), and the rest is O(S).

The linear method is written once over an array module (:class:`thdkit._src.host.ArrayOps`): JAX
inputs run it as a jitted program (compiled once per shape), NumPy inputs (and Python lists) run
the same code in NumPy on the host, compiling nothing (:mod:`thdkit._src.host`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Int

from thdkit._src import counting
from thdkit._src.host import JAX, NUMPY, ArrayOps, on_host, readable
from thdkit._src.limits import check_bool, check_max_segments
from thdkit._src.mask_types import MaskType
from thdkit._src.one_hot import one_hot_row
from thdkit._src.programs import program
from thdkit._src.reference import dense_row
from thdkit._src.segments import Segments
from thdkit._src.seqmeta import SeqMeta
from thdkit._src.validate.inputs import as_layouts
from thdkit._src.validate.rules import validate_concrete

__all__ = [
    "Method",
    "linear_rows",
    "segments_metadata",
    "seqlens_and_offsets",
]

Method = Literal["linear", "one_hot", "dense"]


Rows = tuple[Int[Array, "N T"], Int[Array, "N T"]]


def _endpoints(
    ids: Int[Array, "N T"], num_segments: int, ops: ArrayOps = JAX
) -> tuple[Array, Array]:
    """First and last token index of each id 1..S per row (T and -1 where absent): int32[N, S]."""
    xp = ops.xp
    seq_len = ids.shape[-1]
    t = xp.broadcast_to(xp.arange(seq_len, dtype=xp.int32), ids.shape)
    first, last = counting.segment_extrema(ids, t, num_segments=num_segments, ops=ops)
    return xp.minimum(first[:, 1:], seq_len), xp.maximum(last[:, 1:], -1)


def linear_rows(
    q: Rows,
    kv: Rows | None,
    *,
    mask_type: MaskType,
    num_segments: int,
    ops: ArrayOps = JAX,
) -> tuple[Array, Array, Array, Array]:
    """Raw metadata of N rows by the linear method (kv None means kv = q).

    Args:
        q: ``(ids int32[N, T_q], pos int32[N, T_q])``.
        kv: the same for keys/values, or None for self-attention.
        mask_type: a parsed ``MaskType``.
        num_segments: S.
        ops: the array module: :data:`thdkit._src.host.JAX` (traced; the default) or
            :data:`thdkit._src.host.NUMPY` (NumPy arrays in and out, on the host).

    Returns:
        ``(q_seqlens int32[N, S], kv_seqlens int32[N, S], q_offsets int32[N, S+1],
        kv_offsets int32[N, S+1])``.

    Example:
        >>> from thdkit._src.host import NUMPY
        >>> row = (np.array([[1, 1, 1, 2, 2, 0, 0, 3]], np.int32),
        ...        np.array([[0, 1, 2, 0, 1, 2, 0, 0]], np.int32))
        >>> linear_rows(row, None, mask_type=MaskType.PADDING_CAUSAL, num_segments=4,
        ...             ops=NUMPY)[2]
        array([[ 0,  3,  7, -1, -1]], dtype=int32)
    """
    xp = ops.xp
    ids_q, pos_q = q
    first_q, last_q = _endpoints(ids_q, num_segments, ops)
    if kv is None:
        pos_kv, first_kv, last_kv = pos_q, first_q, last_q
    else:
        pos_kv = kv[1]
        first_kv, last_kv = _endpoints(kv[0], num_segments, ops)
    both = (last_q >= 0) & (last_kv >= 0)
    end_q, end_kv = last_q + 1, last_kv + 1
    start_q = first_q
    if mask_type.uses_positions:
        min_pos_kv = counting.gather_rows(
            pos_kv, xp.clip(first_kv, 0, pos_kv.shape[-1] - 1), ops=ops
        )
        max_pos_q = counting.gather_rows(pos_q, xp.clip(last_q, 0, pos_q.shape[-1] - 1), ops=ops)
        # Bottom-right compares rl - pos; with rl the run length this shifts the thresholds.
        shift = (end_q - first_q) - (end_kv - first_kv) if mask_type.is_bottom_right else 0
        q_search = (first_q, end_q, min_pos_kv + shift)
        kv_search = (first_kv, end_kv, max_pos_q - shift + 1)
        if kv is None:
            # Same positions on both sides: one search over both sets of intervals.
            found = counting.first_at_least(
                pos_q,
                *(xp.concatenate(pair, axis=-1) for pair in zip(q_search, kv_search, strict=True)),
                ops=ops,
            )
            start_q, end_kv = xp.split(found, 2, axis=-1)
        else:
            start_q = counting.first_at_least(pos_q, *q_search, ops=ops)
            end_kv = counting.first_at_least(pos_kv, *kv_search, ops=ops)
    q_seqlens = xp.where(both, end_q - start_q, 0)
    kv_seqlens = xp.where(both, end_kv - first_kv, 0)
    offsets = ops.map_rows(
        functools.partial(counting.compact, size=num_segments + 1, fill=-1, ops=ops)
    )
    return (
        q_seqlens,
        kv_seqlens,
        offsets(start_q, q_seqlens > 0),
        offsets(first_kv, kv_seqlens > 0),
    )


def _as_rows(layout: tuple[Array, Array]) -> Rows:
    """Flattens the batch dims of ``(ids, pos)``: ``[*B, T] -> [N, T]``."""
    return tuple(a.reshape(-1, a.shape[-1]) for a in layout)


def _rows_from_row_fn(
    row_fn: Callable[..., tuple[Array, Array]],
) -> Callable[..., tuple[Array, ...]]:
    """Lifts a method that finds one row's active tokens to N rows of raw metadata (vmap).

    ``row_fn((ids_q, pos_q), (ids_kv, pos_kv), *, mask_type, ...) -> (q_active, kv_active)``;
    the active ids of each side then go through :func:`thdkit._src.counting.count_and_offsets`.
    """

    def row(q: tuple[Array, Array], kv: tuple[Array, Array], **options) -> tuple[Array, ...]:
        q_active, kv_active = row_fn(q, kv, **options)
        num_segments = options["num_segments"]
        q_seqlens, q_offsets = counting.count_and_offsets(
            jnp.where(q_active, q[0], 0), num_segments=num_segments
        )
        kv_seqlens, kv_offsets = counting.count_and_offsets(
            jnp.where(kv_active, kv[0], 0), num_segments=num_segments
        )
        return q_seqlens, kv_seqlens, q_offsets, kv_offsets

    def rows_fn(q: Rows, kv: Rows | None, **options) -> tuple[Array, ...]:
        one_row = functools.partial(row, **options)
        kv = q if kv is None else kv
        return jax.vmap(lambda *r: one_row(r[:2], r[2:]))(*q, *kv)

    return rows_fn


def _dense_active(
    q: tuple[Array, Array], kv: tuple[Array, Array], *, mask_type: MaskType, num_segments: int
) -> tuple[Array, Array]:
    del num_segments  # the dense method needs no segment bound
    return dense_row(q, kv, mask_type=mask_type)


_METHODS: dict[str, Callable[..., tuple[Array, ...]]] = {
    "linear": linear_rows,
    "one_hot": _rows_from_row_fn(one_hot_row),
    "dense": _rows_from_row_fn(_dense_active),
}


def seqlens_and_offsets(
    *,
    segment_ids_q: ArrayLike,
    segment_pos_q: ArrayLike | None = None,
    segment_ids_kv: ArrayLike | None = None,
    segment_pos_kv: ArrayLike | None = None,
    mask_type: MaskType | str = "padding_causal",
    max_segments_per_seq: int,
    compact: bool = True,
    method: Method = "linear",
) -> SeqMeta:
    """Per-segment lengths and offsets of packed rows, after masking, for varlen attention.

    Exactly equal to the O(T_q·T_kv) reference of docs/semantics.md for every valid layout, every
    mask type and every method. When the inputs are concrete, both sides are validated
    (:func:`thdkit.validate_layout`). Under ``jit`` and inside ``vmap`` the inputs are tracers:
    only dtypes, shapes and options are checked, not values (ids, positions and the layout
    rules); check those with :func:`thdkit.check_layout` and ``checkify``, or
    :func:`thdkit.layout_error_codes`.

    Host path: when every layout array given is a NumPy array or a Python list (none a
    ``jax.Array``), the validation and the linear method run in NumPy on the calling CPU and
    nothing is compiled, which suits a data pipeline that meets a new shape every batch. The
    result is then a ``SeqMeta`` of **NumPy** int32 arrays, bit-equal to the device path's, and
    the errors are the same. JAX arrays (concrete or traced) take the device path: a jitted
    program, compiled once per shape, giving JAX arrays. (``method="one_hot"`` and ``"dense"``,
    the baselines, run on the device even for NumPy inputs, and return NumPy arrays too.)

    Args:
        segment_ids_q: int[*B, T_q]; 0 = padding, 1..S = the document of each query token.
        segment_pos_q: int[*B, T_q]; each query token's position inside its document, or None
            to number each document's tokens 0, 1, 2, ... (as :meth:`thdkit.Segments.from_ids`;
            right for rows in document order, not for context-parallel shards). Positions come
            for both sides or for neither.
        segment_ids_kv: int[*B, T_kv] or None; None means self-attention (kv = q).
        segment_pos_kv: int[*B, T_kv] or None; given together with ``segment_ids_kv`` when
            ``segment_pos_q`` is given, None when it is not.
        mask_type: a :class:`thdkit.MaskType` or its name (aliases accepted).
        max_segments_per_seq: S, a static int in ``[1, MAX_SEGMENTS]``, >= the largest id;
            sizes the outputs.
        compact: True (default) gives the format varlen kernels read (surviving segments first,
            seqlens padded with 0); False the raw format (seqlens indexed by id - 1). A Python
            or NumPy bool.
        method: "linear" (O(T + S), default), "one_hot" (O(T·S)) or "dense" (O(T_q·T_kv)).

    Returns:
        :class:`SeqMeta`; seqlens int32[*B, S], offsets int32[*B, S+1] (-1 after the last
        segment): NumPy arrays for NumPy (or list) inputs, JAX arrays for JAX inputs.

    Raises:
        TypeError: a non-integer array, a bad ``max_segments_per_seq``, ``mask_type``,
            ``method`` or ``compact`` type.
        ValueError: shape or batch mismatches, half-given kv (or ``segment_pos_kv`` without
            ``segment_pos_q``), ``max_segments_per_seq`` out of
            range, unknown ``mask_type`` or ``method``, or (concrete inputs) a value outside the
            accepted ranges or a layout that breaks a rule: the message names the parameter, row
            and token.

    Example:
        >>> ids = jnp.array([1, 1, 1, 2, 2, 0, 0, 3])
        >>> pos = jnp.array([0, 1, 2, 0, 1, 2, 0, 0])
        >>> meta = seqlens_and_offsets(segment_ids_q=ids, segment_pos_q=pos,
        ...                            max_segments_per_seq=4)
        >>> meta.q_seqlens, meta.q_offsets
        (Array([3, 2, 1, 0], dtype=int32), Array([ 0,  3,  7, -1, -1], dtype=int32))

        NumPy inputs stay on the host (nothing compiled) and give NumPy arrays:

        >>> host = seqlens_and_offsets(segment_ids_q=np.asarray(ids),
        ...                            segment_pos_q=[0, 1, 2, 0, 1, 2, 0, 0],
        ...                            max_segments_per_seq=4)
        >>> host.q_seqlens, host.q_offsets
        (array([3, 2, 1, 0], dtype=int32), array([ 0,  3,  7, -1, -1], dtype=int32))

        Without positions each document is numbered 0, 1, 2, ... (the padding mask reads none):

        >>> seqlens_and_offsets(segment_ids_q=[1, 1, 0, 2], mask_type="padding",
        ...                     max_segments_per_seq=2).q_seqlens
        array([2, 1], dtype=int32)

        Under jit, the options are static:

        >>> fn = jax.jit(seqlens_and_offsets, static_argnames=(
        ...     "mask_type", "max_segments_per_seq", "compact", "method"))
        >>> fn(segment_ids_q=ids, segment_pos_q=pos, max_segments_per_seq=4).kv_seqlens
        Array([3, 2, 1, 0], dtype=int32)
    """
    mask = MaskType.parse(mask_type)
    num_segments = check_max_segments(max_segments_per_seq)
    if not isinstance(method, str):
        raise TypeError(
            f"method must be a string (one of {', '.join(_METHODS)}), got {type(method).__name__}"
        )
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(_METHODS)}")
    compact = check_bool(compact, "compact")
    given = (segment_ids_q, segment_pos_q, segment_ids_kv, segment_pos_kv)
    host = on_host(*given)
    # Concrete JAX layouts are read back and computed on the host too (nothing compiles); the
    # result goes back to the device.
    to_device = not host and method == "linear" and on_host(*map(readable, given))
    if to_device:
        given, host = tuple(map(readable, given)), True
    q, kv = as_layouts(*given, ops=NUMPY if host else JAX, number_positions=True)
    validate_concrete(q, kv, max_segments_per_seq=num_segments, mask_type=mask)
    options = dict(mask=mask, num_segments=num_segments, compact=compact)
    if not host:
        return _compute(q, kv, method=method, **options)
    if method == "linear":
        meta = _compute_on_host(q, kv, **options)
        return SeqMeta(*jax.device_put(tuple(meta))) if to_device else meta
    # The O(T·S) and O(T²) baselines run on the device; their results come back as NumPy.
    return jax.device_get(_compute(q, kv, method=method, **options))


def segments_metadata(
    q: Segments,
    kv: Segments | None = None,
    *,
    mask_type: MaskType,
    max_segments_per_seq: int,
    compact: bool = True,
    method: Method = "linear",
) -> SeqMeta:
    """:func:`seqlens_and_offsets` of checked :class:`thdkit.Segments`: no validation.

    The core every entry point that holds Segments calls (a plan, an implementation's
    auxiliary data); the layouts must be valid (docs/semantics.md). Segments with
    ``prefix_lengths`` (prefix-LM masks) have no varlen metadata and are refused.

    Args:
        q: the queries' Segments, int32[*B, T_q] fields.
        kv: the keys', int32[*B, T_kv] fields, or None for self-attention.
        mask_type: a parsed :class:`thdkit.MaskType`.
        max_segments_per_seq: S, a checked int.
        compact, method: as for :func:`seqlens_and_offsets`.

    Returns:
        :class:`SeqMeta`.

    Raises:
        ValueError: a side carries ``prefix_lengths``.

    Example:
        >>> seg = Segments.from_ids(jnp.array([[1, 1, 1, 2, 2, 0, 0, 3]]),
        ...                         jnp.array([[0, 1, 2, 0, 1, 2, 0, 0]]))
        >>> segments_metadata(seg, mask_type=MaskType.PADDING_CAUSAL,
        ...                   max_segments_per_seq=4).q_offsets
        Array([[ 0,  3,  7, -1, -1]], dtype=int32)
    """
    for name, side in (("q", q), ("kv", kv)):
        if side is not None and side.prefix_lengths is not None:
            raise ValueError(
                f"the {name} Segments carry prefix_lengths (a prefix-LM mask), which varlen "
                "metadata cannot describe: a document's prefix attends keys after its queries, "
                "which no (offset, length) pair of a causal varlen kernel expresses"
            )
    return _compute(
        (q.ids, q.positions),
        None if kv is None else (kv.ids, kv.positions),
        method=method,
        mask=mask_type,
        num_segments=max_segments_per_seq,
        compact=compact,
    )


def _metadata_of(
    q: tuple[Array, Array],
    kv: tuple[Array, Array] | None,
    *,
    rows_fn: Callable[[Rows, Rows | None], tuple[Array, ...]],
    num_segments: int,
    compact: bool,
    ops: ArrayOps,
) -> SeqMeta:
    """Raw metadata of the flattened rows by ``rows_fn``, compacted if asked, batch dims back."""
    batch = q[0].shape[:-1]
    q_seqlens, kv_seqlens, q_offsets, kv_offsets = rows_fn(
        _as_rows(q), None if kv is None else _as_rows(kv)
    )
    if compact:
        to_front = ops.map_rows(
            lambda s: counting.compact(s, s > 0, size=num_segments, fill=0, ops=ops)
        )
        q_seqlens, kv_seqlens = to_front(q_seqlens), to_front(kv_seqlens)
    return SeqMeta(
        *(a.reshape(*batch, a.shape[-1]) for a in (q_seqlens, kv_seqlens, q_offsets, kv_offsets))
    )


@program(static_argnames=("method", "mask", "num_segments", "compact"))
def _compute(
    q: tuple[Array, Array],
    kv: tuple[Array, Array] | None,
    *,
    method: str,
    mask: MaskType,
    num_segments: int,
    compact: bool,
) -> SeqMeta:
    """The checked call of :func:`seqlens_and_offsets`, compiled once per shape when eager."""
    rows_fn = functools.partial(_METHODS[method], mask_type=mask, num_segments=num_segments)
    return _metadata_of(q, kv, rows_fn=rows_fn, num_segments=num_segments, compact=compact, ops=JAX)


def _compute_on_host(
    q: tuple[np.ndarray, np.ndarray],
    kv: tuple[np.ndarray, np.ndarray] | None,
    *,
    mask: MaskType,
    num_segments: int,
    compact: bool,
) -> SeqMeta:
    """:func:`_compute` of the linear method in NumPy: the same code, NumPy arrays, no XLA."""
    rows_fn = functools.partial(linear_rows, mask_type=mask, num_segments=num_segments, ops=NUMPY)
    return _metadata_of(
        q, kv, rows_fn=rows_fn, num_segments=num_segments, compact=compact, ops=NUMPY
    )
