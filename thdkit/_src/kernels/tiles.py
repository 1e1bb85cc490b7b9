"""Tile ranges: the contiguous range of key tiles each query tile of the blockwise method visits.

Computed in O(T) from ids, positions and document lengths (no ``[T_q, T_kv]`` array): the key
span of the segments at a query tile's two ends, narrowed by causality and the window. Written
once over an :class:`thdkit._src.host.ArrayOps`: on the device (traced, the default) or in NumPy on
host layouts, with equal results and no compilation.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from thdkit._src.counting import first_at_least
from thdkit._src.host import JAX, ArrayOps
from thdkit._src.mask_types import MaskType, Window, window_bound
from thdkit._src.segments import Segments, run_lengths

__all__ = [
    "DEFAULT_BLOCK",
    "LARGE_BLOCK",
    "MIN_BLOCK",
    "TileRanges",
    "default_block",
    "kv_spans",
    "pad_tokens",
    "tile_ranges",
]

DEFAULT_BLOCK = 128
"""The largest tile :func:`default_block` chooses but for long documents on CPU, and the tile of
ring steps."""

LARGE_BLOCK = 512
"""The tile :func:`default_block` chooses on CPU where documents average at least 8 of them:
XLA:CPU runs a matmul of that size on every core (one of 128 on one), which roughly halves the
forward on one long document; the backward, whose elementwise work grows with the visited
pairs, gains less and loses on shorter documents (docs/attention.md, "Blockwise")."""

MIN_BLOCK = 32
"""The smallest tile :func:`default_block` chooses."""

# Positions lie in [0, 2**30 - 1] (docs/semantics.md, accepted ranges): a search threshold
# clipped to [0, 2**30] finds the same key, and keeps every later expression inside int32.
_THRESHOLD_MAX = 2**30


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TileRanges:
    """The key tiles each query tile visits: ``[lo, hi)`` in units of ``block_kv``.

    A pytree: ``lo`` and ``hi`` are its arrays, the sizes static.

    Attributes:
        lo: int32[B, ceil(T_q / block_q)]; first key tile visited (0 where none is).
        hi: int32[B, ceil(T_q / block_q)]; one past the last (equal to ``lo`` where none is).
        num_kv_tiles: ceil(T_kv / block_kv), the tiles of one key row.
        block_q, block_kv: the tile sizes.
    """

    lo: Int[Array, "B NQ"]
    hi: Int[Array, "B NQ"]
    num_kv_tiles: int = dataclasses.field(metadata=dict(static=True))
    block_q: int = dataclasses.field(metadata=dict(static=True))
    block_kv: int = dataclasses.field(metadata=dict(static=True))

    def visited_fraction(self) -> Float[Array, ""]:
        """Visited (query tile, key tile) pairs over all of them: float32[]."""
        total = self.lo.size * self.num_kv_tiles
        return jnp.sum(self.hi - self.lo).astype(jnp.float32) / total


def default_block(seq_len: int, max_segments_per_seq: int, *, backend: str | None = None) -> int:
    """The tile size for rows of ``seq_len`` tokens holding up to S documents.

    The power of two nearest the mean document length ``seq_len / S``, within
    ``[MIN_BLOCK, DEFAULT_BLOCK]``: short documents get small tiles, so that a tile holds few
    pairs of different documents (with 32-token documents, 128-token tiles visit about 8x the
    allowed pairs, 32-token tiles about 2.6x), long ones the largest tile. On CPU, documents
    averaging at least 4,096 tokens get 512-token tiles (docs/attention.md, "Blockwise").

    Args:
        seq_len: T, tokens per row.
        max_segments_per_seq: S, documents per row at most.
        backend: the backend the tiles run on; None for ``jax.default_backend()``.

    Returns:
        A power of two in ``[MIN_BLOCK, DEFAULT_BLOCK]``, or 512.

    Example:
        >>> default_block(8192, 1, backend="gpu"), default_block(8192, 16), default_block(8192, 256)
        (128, 128, 32)
        >>> default_block(8192, 1, backend="cpu")
        512
    """
    mean = seq_len / max(1, max_segments_per_seq)
    if (backend or jax.default_backend()) == "cpu" and mean >= 8 * LARGE_BLOCK:
        return LARGE_BLOCK
    nearest = 2 ** round(math.log2(max(mean, 1)))
    return min(DEFAULT_BLOCK, max(MIN_BLOCK, nearest))


def kv_spans(
    tokens: Int[Array, "B K"],
    q: Segments,
    kv: Segments,
    *,
    mask_type: MaskType,
    window_size: Window,
    ops: ArrayOps = JAX,
) -> tuple[Int[Array, "B K"], Int[Array, "B K"]]:
    """``[lo, hi)``: the key tokens that query tokens ``tokens`` may attend.

    The key run of the token's segment, narrowed by causality and the left window where the mask
    type guarantees increasing positions: exactly the allowed keys of the token for causal and
    bottom-right types and for no_mask/padding without a window, a superset otherwise (the right
    bound of a window is not applied). For a segment absent from the key row both ends are where
    its run would start, so the ends never decrease along a query row: the span of a query tile is
    the lo of its first non-padding token to the hi of its last. With prefix-LM masks
    (``prefix_lengths`` on both sides) a token inside its document's prefix spans from the run's
    first key to at least the end of the key prefix: exact without a left window (a superset
    with one, the hull of the two intervals); the ends of prefix tokens may then exceed those of
    later tokens (cross attention with a longer key prefix), which :func:`tile_ranges` reads.

    Args:
        tokens: int32[B, K]; indices of query tokens, per row.
        q: the queries' :class:`thdkit.Segments`, int32[B, T_q] fields.
        kv: the keys' :class:`thdkit.Segments`, int32[B, T_kv] fields.
        mask_type: a parsed ``MaskType``.
        window_size: a parsed window (``check_window``).
        ops: the array module (``JAX`` or, on NumPy fields,
            ``NUMPY``).

    Returns:
        ``(lo, hi)``: int32[B, K] each, key token indices.

    Example:
        >>> side = Segments.from_ids(jnp.array([[1, 1, 1, 2, 2]]))
        >>> lo, hi = kv_spans(jnp.array([[1, 4]]), side, side, mask_type=MaskType.CAUSAL,
        ...                   window_size=None)
        >>> lo.tolist(), hi.tolist()
        ([[0, 3]], [[2, 5]])
    """
    xp = ops.xp
    ids_q, pos_q, rl_q = q.ids, q.positions, q.lengths
    ids_kv, pos_kv, rl_kv = kv.ids, kv.positions, kv.lengths
    seq_kv = ids_kv.shape[-1]
    at = lambda x, i: xp.take_along_axis(x, i, axis=-1)  # noqa: E731
    seg = at(ids_q, tokens)
    # Padding inherits the id before it, so the key ids become sorted and the start of segment s
    # (or of the first later one, where s is absent) is a binary search.
    sorted_ids = ops.cummax(ids_kv, ids_kv.ndim - 1)
    start = first_at_least(sorted_ids, xp.zeros_like(seg), xp.full_like(seg, seq_kv), seg, ops=ops)
    first = xp.minimum(start, seq_kv - 1)
    present = (start < seq_kv) & (at(ids_kv, first) == seg)
    run = at(run_lengths(ids_kv), first)
    end = xp.where(present, start + run, start)
    if not mask_type.uses_positions:
        return start, end
    # Allowed keys: pos_kv <= threshold (rel) and pos_kv >= threshold - left (window).
    threshold = at(pos_q, tokens)
    if mask_type.is_bottom_right:
        # rl_q - pos_q <= rl_kv - pos_kv with document lengths constant along each run.
        threshold = threshold - (at(rl_q, tokens) - at(rl_kv, first))
    above = xp.clip(threshold, -1, _THRESHOLD_MAX - 1) + 1
    left = window_bound(window_size, 0)
    # Prefix-LM masks: a query token inside its document's prefix also attends the keys of the
    # document's key prefix, the run's first keys up to the first at position >= P_kv.
    prefix = q.prefix_lengths is not None and kv.prefix_lengths is not None
    bounds = [above]
    if prefix:
        bounds.append(xp.clip(at(kv.prefix_lengths, first), 0, _THRESHOLD_MAX))
    if left is not None:
        # threshold - left where positive, else 0 (the same search); no int32 overflow.
        bounds.append(xp.minimum(xp.maximum(threshold, left) - left, _THRESHOLD_MAX))
    found = first_at_least(
        pos_kv,
        xp.concatenate([start] * len(bounds), axis=-1),
        xp.concatenate([end] * len(bounds), axis=-1),
        xp.concatenate(bounds, axis=-1),
        ops=ops,
    )
    k = tokens.shape[-1]
    hi = found[:, :k]
    lo = found[:, -k:] if left is not None else start
    if prefix:
        prefix_end = found[:, k : 2 * k]
        inside = (at(pos_q, tokens) < at(q.prefix_lengths, tokens)) & (prefix_end > start)
        hi = xp.where(inside, xp.maximum(hi, prefix_end), hi)
        lo = xp.where(inside, start, lo)
    return lo, hi


def pad_tokens(x: Array, length: int, fill: float = 0, *, ops: ArrayOps = JAX) -> Array:
    """Pads axis 1 (the token axis) of ``x`` at its end to ``length`` with ``fill``.

    Args:
        x: [B, T, ...] of any dtype.
        length: the new token count, at least T.
        fill: the value of the added entries.
        ops: the array module (``JAX`` or ``NUMPY``).

    Returns:
        [B, length, ...], ``x``'s dtype.

    Example:
        >>> pad_tokens(jnp.array([[1, 2]]), 4).tolist()
        [[1, 2, 0, 0]]
    """
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, length - x.shape[1])
    return ops.xp.pad(x, widths, constant_values=fill)


def tile_ranges(
    q: Segments,
    kv: Segments,
    *,
    mask_type: MaskType,
    window_size: Window,
    block_q: int,
    block_kv: int,
    ops: ArrayOps = JAX,
) -> TileRanges:
    """The contiguous range of key tiles each query tile of the blockwise method visits.

    O(T) passes (run lengths, per-tile first/last non-padding token) and a binary search per tile
    end; no [T_q, T_kv] array. Every allowed pair lies inside a visited tile. With prefix-LM
    masks (``prefix_lengths`` on both sides) the spans of each tile's first and last tokens
    inside a prefix join those of its first and last tokens.

    Args:
        q: the queries' :class:`thdkit.Segments`, int32[B, T_q] fields.
        kv: the keys'/values' :class:`thdkit.Segments`, int32[B, T_kv] fields.
        mask_type: a parsed ``MaskType``.
        window_size: ``(left, right)`` or None.
        block_q, block_kv: tile sizes (not capped here).
        ops: the array module: ``JAX`` (traced, the default) or, on Segments
            of NumPy fields, ``NUMPY`` (NumPy ``lo`` and ``hi``, equal to the
            device ones; nothing compiles).

    Returns:
        :class:`TileRanges`.

    Example:
        >>> seg = Segments.from_ids(jnp.array([[1, 1, 1, 1, 2, 2, 2, 2]]))
        >>> r = tile_ranges(seg, seg, mask_type=MaskType.CAUSAL, window_size=None, block_q=2,
        ...                 block_kv=2)
        >>> r.lo.tolist(), r.hi.tolist(), float(r.visited_fraction())
        ([[0, 0, 2, 2]], [[1, 2, 3, 4]], 0.375)
        >>> from thdkit._src.host import NUMPY
        >>> host = Segments.from_ids(np.array([[1, 1, 1, 1, 2, 2, 2, 2]]))
        >>> tile_ranges(host, host, mask_type=MaskType.CAUSAL, window_size=None, block_q=2,
        ...             block_kv=2, ops=NUMPY).hi
        array([[1, 2, 3, 4]], dtype=int32)
    """
    xp = ops.xp
    batch, seq_q = q.ids.shape
    num_q = -(-seq_q // block_q)
    nonpad = pad_tokens(q.ids, num_q * block_q, ops=ops).reshape(batch, num_q, block_q) != 0
    lo, hi, empty = _tile_ends(q, kv, nonpad, mask_type, window_size, block_q, ops)
    return TileRanges(
        lo=xp.where(empty, 0, lo // block_kv).astype(np.int32),
        hi=xp.where(empty, 0, -(-hi // block_kv)).astype(np.int32),
        num_kv_tiles=-(-kv.seq_len // block_kv),
        block_q=block_q,
        block_kv=block_kv,
    )


def _tile_ends(
    q: Segments,
    kv: Segments,
    nonpad: Array,
    mask_type: MaskType,
    window_size: Window,
    block_q: int,
    ops: ArrayOps,
) -> tuple[Array, Array, Array]:
    """Key token ``[lo, hi)`` of each query tile, and which tiles visit nothing.

    The ends of the spans increase along the row, except that a token inside its document's
    prefix may reach further: so the tile's ends are those of its first and last non-padding
    tokens and, with prefixes, of its first and last tokens inside a prefix (a prefix token's
    span starts at its document's first key, and reaches the end of the key prefix, which
    grows from document to document).
    """
    xp = ops.xp
    batch, num_q, _ = nonpad.shape
    seq_q = q.ids.shape[-1]
    masks = [nonpad]
    prefix = q.prefix_lengths is not None and kv.prefix_lengths is not None
    if prefix:
        inside = q.positions < q.prefix_lengths
        masks.append(nonpad & (pad_tokens(inside, num_q * block_q, ops=ops).reshape(nonpad.shape)))
    base = xp.arange(num_q, dtype=np.int32)[None, :] * block_q
    ends = []
    for mask in masks:
        first = base + xp.argmax(mask, axis=-1).astype(np.int32)
        last = base + block_q - 1 - xp.argmax(mask[..., ::-1], axis=-1).astype(np.int32)
        ends += [first, xp.minimum(last, seq_q - 1)]
    lo, hi = kv_spans(
        xp.concatenate(ends, axis=-1), q, kv, mask_type=mask_type, window_size=window_size, ops=ops
    )
    lo, hi = (x.reshape(batch, len(ends), num_q) for x in (lo, hi))
    tile_lo, tile_hi = lo[:, 0], hi[:, 1]
    if prefix:
        has = xp.any(masks[1], axis=-1)
        tile_lo = xp.where(has, xp.minimum(tile_lo, lo[:, 2]), tile_lo)
        tile_hi = xp.where(has, xp.maximum(tile_hi, hi[:, 3]), tile_hi)
    return tile_lo, tile_hi, ~xp.any(nonpad, axis=-1) | (tile_hi <= tile_lo)
