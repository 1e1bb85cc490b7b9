"""Which ring steps can hold an allowed pair: difference bounds, per-segment spans, the schedule.

Axis legend: B batch, T_q / T_kv row lengths, S = ``max_segments_per_seq``, cp = size of the
context-parallel mesh axis, n = T / cp tokens per shard.

At ring step k rank r attends the key shard of rank ``(r - k) % cp``. Whether a step can contain
an allowed pair is decided from O(S) numbers per shard, per segment: presence and the span (min,
max) of the quantity the mask compares (position, or document length minus position for
bottom-right types). A pair of shards can attend within segment s only if the difference of that
quantity, kv minus q, can fall in the interval the mask and window allow
(:func:`difference_bounds`). Without a window the test is exact: a step is skipped if and only if
it has no allowed pair. With a window it is conservative (it never skips a step that has work,
and it may run a step whose only candidate pairs fall in a gap between stripes).

:func:`ring_schedule` decides for whole rows on the host side of a program (planning,
benchmarks); :func:`rank_schedule` decides inside ``shard_map`` for the ring itself. Both read
the same spans, so they agree.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, ArrayLike, Bool, Int

from thdkit._src.context_parallel.base import StrategyConfig
from thdkit._src.context_parallel.shards import (
    document_lengths,
    readable,
    row_segments,
    validate_shards,
)
from thdkit._src.counting import segment_extrema
from thdkit._src.kernels.config import AttentionConfig
from thdkit._src.limits import check_int
from thdkit._src.mask_types import MaskType, Window
from thdkit._src.programs import program
from thdkit._src.segments import Segments

__all__ = [
    "DifferenceBounds",
    "SegmentSpans",
    "difference_bounds",
    "may_attend",
    "rank_schedule",
    "ring_schedule",
    "segment_spans",
]


class DifferenceBounds(NamedTuple):
    """The interval that ``x_kv - x_q`` must fall in for an allowed pair of one segment.

    ``x`` is the position (top-left and unmasked types) or document length minus position
    (bottom-right types, ``uses_key``); None means unbounded on that side.
    """

    uses_key: bool
    lo: int | None
    hi: int | None

    def compared(self, segments: Segments) -> Int[Array, "*B n"]:
        """``x`` of every token: its position, or its document length minus its position."""
        if self.uses_key:
            return segments.lengths - segments.positions
        return segments.positions


def difference_bounds(mask: MaskType, window: Window) -> DifferenceBounds:
    """The interval of ``x_kv - x_q`` that ``rel`` and the window allow, for one segment.

    Args:
        mask: a parsed ``MaskType``.
        window: ``(left, right)`` as parsed by ``check_window``, or None.

    Returns:
        :class:`DifferenceBounds`.

    Example:
        >>> difference_bounds(MaskType.CAUSAL, (3, None))
        DifferenceBounds(uses_key=False, lo=-3, hi=0)
    """
    left, right = window if window is not None else (None, None)
    if mask.is_bottom_right:
        # rel: rl_q - pos_q <= rl_kv - pos_kv; window: rl_kv - pos_kv <= rl_q - pos_q + left.
        return DifferenceBounds(True, 0, left)
    lo = None if left is None else -left
    if mask.is_causal:
        return DifferenceBounds(False, lo, 0 if right is None else min(0, right))
    return DifferenceBounds(False, lo, right)


class SegmentSpans(NamedTuple):
    """Per row and segment 0..S of one shard: presence, the span of the compared quantity, and
    whether the shard holds a token of the segment's prefix (None: no prefixes)."""

    present: Bool[Array, "*B S1"]
    low: Int[Array, "*B S1"]
    high: Int[Array, "*B S1"]
    prefix: Bool[Array, "*B S1"] | None = None


def segment_spans(segments: Segments, bounds: DifferenceBounds, num_segments: int) -> SegmentSpans:
    """Presence and min/max of the compared quantity per segment of each row (O(n + S)).

    Args:
        segments: one shard per row, int32[*B, n] fields (global document lengths).
        bounds: what is compared (:meth:`DifferenceBounds.compared`).
        num_segments: S.

    Returns:
        :class:`SegmentSpans`, [*B, S+1] fields; segment 0 (padding) is never present.

    Example:
        >>> seg = Segments.from_ids(jnp.array([1, 1, 0, 2]))
        >>> segment_spans(seg, difference_bounds(MaskType.CAUSAL, None), 2).present.tolist()
        [False, True, True]
    """
    ids, x = segments.ids, bounds.compared(segments)
    flat = (a.reshape(-1, a.shape[-1]) for a in (ids, x))
    low, high = segment_extrema(*flat, num_segments=num_segments)
    low, high = (a.reshape(*ids.shape[:-1], num_segments + 1) for a in (low, high))
    present = (high >= low).at[..., 0].set(False)
    prefix = None
    if segments.prefix_lengths is not None:
        inside = (segments.positions < segments.prefix_lengths).astype(jnp.int32)
        flat = (a.reshape(-1, a.shape[-1]) for a in (ids, inside))
        _, any_inside = segment_extrema(*flat, num_segments=num_segments)
        prefix = present & (any_inside.reshape(present.shape) > 0)
    return SegmentSpans(present, low, high, prefix)


def may_attend(q: SegmentSpans, kv: SegmentSpans, bounds: DifferenceBounds) -> Bool[Array, "*B S1"]:
    """Per segment, whether some q token and kv token can form an allowed pair.

    Example:
        >>> bounds = difference_bounds(MaskType.CAUSAL, None)
        >>> spans = lambda pos: segment_spans(Segments.from_ids(jnp.ones(2, int), pos), bounds, 1)
        >>> may_attend(spans(jnp.array([0, 1])), spans(jnp.array([2, 3])), bounds).tolist()
        [False, False]
    """
    ok = q.present & kv.present
    # Differences x_kv - x_q range over [kv.low - q.high, kv.high - q.low].
    if bounds.hi is not None:
        ok &= kv.low - q.high <= bounds.hi
    if bounds.lo is not None:
        ok &= kv.high - q.low >= bounds.lo
    # Two tokens of one document's prefix attend each other whatever the rule.
    if q.prefix is not None and kv.prefix is not None:
        ok |= q.prefix & kv.prefix
    return ok


def _source_ranks(cp: int) -> np.ndarray:
    """int[cp, cp]: ``[r, k]`` = the kv rank whose keys rank r holds at ring step k."""
    ranks = np.arange(cp)
    return (ranks[:, None] - ranks[None, :]) % cp


def ring_schedule(
    *,
    q_segments: Segments | None = None,
    kv_segments: Segments | None = None,
    cp: int,
    mask_type: MaskType | str = "padding_causal",
    window_size: tuple[int | None, int | None] | None = None,
    max_segments_per_seq: int,
    segment_ids_q: Int[ArrayLike, "*B T_q"] | None = None,
    segment_pos_q: Int[ArrayLike, "*B T_q"] | None = None,
    segment_ids_kv: Int[ArrayLike, "*B T_kv"] | None = None,
    segment_pos_kv: Int[ArrayLike, "*B T_kv"] | None = None,
) -> Bool[Array, "*B cp cp"]:
    """Which ring steps each rank runs, per row, as :func:`thdkit.ring_attention` decides it.

    At step k rank r attends the key shard of rank ``(r - k) % cp``. A step runs when the
    per-segment spans of the two shards admit an allowed pair (exact without a window,
    conservative with one); :func:`thdkit.ring_attention` runs a step on a rank when any row of the
    rank's batch needs it. Concrete layouts are validated shard by shard, as the ring validates
    them.

    Args:
        q_segments: the query rows' :class:`thdkit.Segments`, int[*B, T_q] fields, in the order
            the ring sees them (already reordered); ids and positions are read, lengths
            recomputed. Required (None only with the deprecated arrays below).
        kv_segments: the same for the keys, int[*B, T_kv] fields; None for self-attention.
        cp: number of ranks, a positive int; must divide T_q and T_kv.
        mask_type: a :class:`thdkit.MaskType` or its name.
        window_size: ``(left, right)``; None or a negative side means unbounded.
        max_segments_per_seq: S.
        segment_ids_q: deprecated, int[*B, T_q]: pass ``q_segments`` instead.
        segment_pos_q: deprecated, int[*B, T_q]: the positions of ``q_segments``.
        segment_ids_kv: deprecated, int[*B, T_kv]: pass ``kv_segments`` instead.
        segment_pos_kv: deprecated, int[*B, T_kv]: the positions of ``kv_segments``.

    Returns:
        bool[*B, cp, cp]; ``[..., r, k]`` is True where rank r runs step k.

    Raises:
        TypeError: a non-int cp, non-integer layouts, a segments argument that is not a
            ``Segments``.
        ValueError: cp < 1 or not dividing a row length, a bad option, no query layout, the
            Segments together with the deprecated arrays, or (concrete layouts) a shard that
            breaks a layout rule, naming the parameter passed, the row (batch index, shard
            index) and the token.

    Warns:
        DeprecationWarning: the layout given as the arrays ``segment_ids_q`` ...; accepted for
            one release, the message names the ``q_segments`` / ``kv_segments`` to pass.

    Example:
        One causal document over a plain (not reordered) row: rank r only needs the keys of
        ranks 0..r, i.e. steps 0..r.

        >>> segments = Segments.from_ids(jnp.ones((1, 8), jnp.int32))
        >>> ring_schedule(q_segments=segments, cp=4, max_segments_per_seq=1)[0].astype(int)
        Array([[1, 0, 0, 0],
               [1, 1, 0, 0],
               [1, 1, 1, 0],
               [1, 1, 1, 1]], dtype=int32)
    """
    q, kv, names = row_segments(
        q_segments,
        kv_segments,
        segment_ids_q=segment_ids_q,
        segment_pos_q=segment_pos_q,
        segment_ids_kv=segment_ids_kv,
        segment_pos_kv=segment_pos_kv,
        caller="ring_schedule",
    )
    config = AttentionConfig.parse(
        mask_type=mask_type, window_size=window_size, max_segments_per_seq=max_segments_per_seq
    )
    num_segments = config.max_segments_per_seq
    bounds = difference_bounds(config.mask_type, config.window_size)
    cp = check_int(cp, "cp", low=1)
    sides = ((names[0], q),) + (() if kv is None else ((names[1], kv),))
    for name, side in sides:
        if side.seq_len % cp:
            raise ValueError(
                f"cp={cp} must divide the length of {name}, got shape {side.ids.shape}"
            )
    for name, side in sides:
        if readable(side.ids, side.positions):
            validate_shards(
                side, cp=cp, num_segments=num_segments, mask=config.mask_type, name=name
            )
    return _schedule(q, q if kv is None else kv, cp=cp, bounds=bounds, num_segments=num_segments)


@program(static_argnames=("cp", "bounds", "num_segments"))
def _schedule(
    q: Segments, kv: Segments, *, cp: int, bounds: DifferenceBounds, num_segments: int
) -> Array:
    """The body of :func:`ring_schedule` on whole rows, compiled once per shape and options."""

    def shard_spans(row: Segments) -> SegmentSpans:
        lengths = document_lengths(row.ids, num_segments)
        split = (*row.ids.shape[:-1], cp, row.seq_len // cp)
        row = dataclasses.replace(row, lengths=lengths)
        return segment_spans(jax.tree.map(lambda a: a.reshape(split), row), bounds, num_segments)

    pair = (
        jax.tree.map(lambda a: a[..., :, None, :], shard_spans(q)),
        jax.tree.map(lambda a: a[..., None, :, :], shard_spans(kv)),
    )
    by_source = jnp.any(may_attend(*pair, bounds), axis=-1)  # [*B, q rank, kv rank]
    source = jnp.broadcast_to(jnp.asarray(_source_ranks(cp)), by_source.shape)
    return jnp.take_along_axis(by_source, source, axis=-1)


def rank_schedule(
    q_segments: Segments, kv_segments: Segments, config: StrategyConfig
) -> Bool[Array, " cp"]:
    """Inside ``shard_map``: which ring steps this rank runs (any row of its batch needs it).

    Every rank learns every kv shard's spans once (an ``all_gather`` of O(cp·B·S) numbers).

    Args:
        q_segments: this rank's queries, int32[B, n_q] fields with global document lengths.
        kv_segments: this rank's keys, int32[B, n_kv] fields with global document lengths (the
            same object under self-attention).
        config: the strategy's configuration.

    Returns:
        bool[cp]; ``[k]`` is True where this rank runs step k.
    """
    axis, cp = config.axis_name, config.cp
    bounds = difference_bounds(config.mask_type, config.window_size)
    q_spans = segment_spans(q_segments, bounds, config.max_segments_per_seq)
    same = kv_segments is q_segments
    kv_spans = q_spans if same else segment_spans(kv_segments, bounds, config.max_segments_per_seq)
    all_kv = jax.tree.map(lambda a: lax.all_gather(a, axis), kv_spans)
    q_all = jax.tree.map(lambda a: a[None], q_spans)
    by_source = jnp.any(may_attend(q_all, all_kv, bounds), axis=(1, 2))  # bool[cp]
    return by_source[(lax.axis_index(axis) - jnp.arange(cp)) % cp]
