"""Attention over packed (THD) rows, masked from segment ids and positions.

Axis legend: B batch, T_q / T_kv query and key/value lengths, H_q / H_kv query and key/value heads
(``H_q`` a multiple of ``H_kv``: GQA/MQA), D query/key head dim, D_v value head dim,
S = ``max_segments_per_seq``.

Query token i attends key token j iff ``allowed[i, j]`` of DESIGN.md (same non-padding segment and
the mask type's ``rel``) and j lies inside the sliding window (:func:`thdkit.reference.in_window`).
Three implementations compute the same function:

- ``"reference"``: dense masked softmax, O(T_q·T_kv) memory; the oracle.
- ``"blockwise"``: online softmax over (block_q, block_kv) tiles. Each query tile visits only the
  contiguous range of key tiles that can hold an allowed pair, read off the key spans of the
  segments at the tile's two ends and narrowed by causality and the window; inside a tile the mask
  is rebuilt from ids, positions and run lengths, so the result is exact for every valid layout
  (ring steps included). A ``jax.custom_vjp`` recomputes the tiles in the backward pass, saving
  only the output and the log-sum-exp: O(T·tile) memory, forward and backward.
- ``"cudnn"``: JAX's cuDNN fused attention fed with the compact metadata of
  :func:`thdkit.seqlens_and_offsets` (GPU only; see :func:`is_representable`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from thdkit.counting import first_at_least
from thdkit.layout import (
    _map_rows,
    as_layouts,
    check_max_segments,
    is_concrete,
    run_lengths,
    validate_concrete,
)
from thdkit.masks import MaskType
from thdkit.metadata import seqlens_and_offsets
from thdkit.reference import Window, _bound, check_window, pair_mask, reference_attention

__all__ = [
    "Implementation",
    "TileRanges",
    "attention",
    "attention_partial",
    "is_representable",
    "tile_ranges",
]

Implementation = Literal["reference", "blockwise", "cudnn"]
_IMPLEMENTATIONS = ("reference", "blockwise", "cudnn")
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
DEFAULT_BLOCK = 128
_USE_BLOCKWISE = "use implementation='blockwise'"


# --- Tile ranges -------------------------------------------------------------------------------


class TileRanges(NamedTuple):
    """The key tiles each query tile visits: ``[lo, hi)`` in units of ``block_kv``.

    Attributes:
        lo: int32[B, ceil(T_q / block_q)]; first key tile visited (0 where none is).
        hi: int32[B, ceil(T_q / block_q)]; one past the last (equal to ``lo`` where none is).
        num_kv_tiles: ceil(T_kv / block_kv), the tiles of one key row.
    """

    lo: Int[Array, "B NQ"]
    hi: Int[Array, "B NQ"]
    num_kv_tiles: int

    def visited_fraction(self) -> Float[Array, ""]:
        """Visited (query tile, key tile) pairs over all of them: float32[]."""
        total = self.lo.size * self.num_kv_tiles
        return jnp.sum(self.hi - self.lo).astype(jnp.float32) / total


def _kv_spans(
    tokens: Int[Array, "B K"],
    q: tuple[Array, Array, Array],
    kv: tuple[Array, Array, Array],
    *,
    mask: MaskType,
    window_size: Window,
) -> tuple[Int[Array, "B K"], Int[Array, "B K"]]:
    """``[lo, hi)``: the key tokens that query tokens ``tokens`` may attend (a superset).

    The key run of the token's segment, narrowed by causality and the left window where the mask
    type guarantees increasing positions. For a segment absent from the key row both ends are
    where its run would start, so the ends never decrease along a query row: the span of a query
    tile is the lo of its first non-padding token to the hi of its last.
    """
    (ids_q, pos_q, rl_q), (ids_kv, pos_kv, rl_kv) = q, kv
    seq_kv = ids_kv.shape[-1]
    seg = jnp.take_along_axis(ids_q, tokens, axis=-1)
    # Padding inherits the id before it, so the key ids become sorted and the start of segment s
    # (or of the first later one, where s is absent) is a binary search.
    sorted_ids = jax.lax.cummax(ids_kv, axis=ids_kv.ndim - 1)
    start = first_at_least(sorted_ids, jnp.zeros_like(seg), jnp.full_like(seg, seq_kv), seg)
    first = jnp.minimum(start, seq_kv - 1)
    present = (start < seq_kv) & (jnp.take_along_axis(ids_kv, first, axis=-1) == seg)
    run = jnp.take_along_axis(run_lengths(ids_kv), first, axis=-1)
    end = jnp.where(present, start + run, start)
    if not mask.uses_positions:
        return start, end
    threshold = jnp.take_along_axis(pos_q, tokens, axis=-1)
    if mask.is_bottom_right:
        # rl_q - pos_q <= rl_kv - pos_kv with run lengths constant along each run.
        rl_at_start = jnp.take_along_axis(rl_kv, first, axis=-1)
        threshold = threshold + rl_at_start - jnp.take_along_axis(rl_q, tokens, axis=-1)
    left = _bound(window_size, 0)
    if left is None:
        return start, first_at_least(pos_kv, start, end, threshold + 1)
    both = first_at_least(
        pos_kv,
        jnp.concatenate([start, start], axis=-1),
        jnp.concatenate([end, end], axis=-1),
        jnp.concatenate([threshold - left, threshold + 1], axis=-1),
    )
    return both[:, : tokens.shape[-1]], both[:, tokens.shape[-1] :]


def _pad_tokens(x: Array, length: int, fill: float = 0) -> Array:
    """Pads axis 1 (the token axis) of ``x`` to ``length`` with ``fill``."""
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, length - x.shape[1])
    return jnp.pad(x, widths, constant_values=fill)


def tile_ranges(
    ids_q: Int[Array, "B T_q"],
    pos_q: Int[Array, "B T_q"],
    rl_q: Int[Array, "B T_q"],
    ids_kv: Int[Array, "B T_kv"],
    pos_kv: Int[Array, "B T_kv"],
    rl_kv: Int[Array, "B T_kv"],
    *,
    mask_type: MaskType,
    window_size: Window,
    block_q: int,
    block_kv: int,
) -> TileRanges:
    """The contiguous range of key tiles each query tile of the blockwise method visits.

    O(T) passes (run lengths, per-tile first/last non-padding token) and a binary search per tile
    end; no [T_q, T_kv] array. Every allowed pair lies inside a visited tile.

    Args:
        ids_q, pos_q, rl_q: int32[B, T_q]; query ids, positions and run (document) lengths.
        ids_kv, pos_kv, rl_kv: int32[B, T_kv]; the same for keys/values.
        mask_type: a parsed ``MaskType``.
        window_size: ``(left, right)`` or None.
        block_q, block_kv: tile sizes (not capped here).

    Returns:
        :class:`TileRanges`.

    Example:
        >>> ids = jnp.array([[1, 1, 1, 1, 2, 2, 2, 2]])
        >>> pos = jnp.array([[0, 1, 2, 3, 0, 1, 2, 3]])
        >>> rl = run_lengths(ids)
        >>> r = tile_ranges(ids, pos, rl, ids, pos, rl, mask_type=MaskType.CAUSAL,
        ...                 window_size=None, block_q=2, block_kv=2)
        >>> r.lo.tolist(), r.hi.tolist(), float(r.visited_fraction())
        ([[0, 0, 2, 2]], [[1, 2, 3, 4]], 0.375)
    """
    batch, seq_q = ids_q.shape
    num_q = -(-seq_q // block_q)
    nonpad = _pad_tokens(ids_q, num_q * block_q).reshape(batch, num_q, block_q) != 0
    base = jnp.arange(num_q, dtype=jnp.int32)[None, :] * block_q
    first = base + jnp.argmax(nonpad, axis=-1).astype(jnp.int32)
    last = base + block_q - 1 - jnp.argmax(nonpad[..., ::-1], axis=-1).astype(jnp.int32)
    last = jnp.minimum(last, seq_q - 1)
    lo, hi = _kv_spans(
        jnp.concatenate([first, last], axis=-1),
        (ids_q, pos_q, rl_q),
        (ids_kv, pos_kv, rl_kv),
        mask=mask_type,
        window_size=window_size,
    )
    lo, hi = lo[:, :num_q], hi[:, num_q:]
    empty = ~jnp.any(nonpad, axis=-1) | (hi <= lo)
    return TileRanges(
        lo=jnp.where(empty, 0, lo // block_kv).astype(jnp.int32),
        hi=jnp.where(empty, 0, -(-hi // block_kv)).astype(jnp.int32),
        num_kv_tiles=-(-ids_kv.shape[-1] // block_kv),
    )


# --- The blockwise kernel ----------------------------------------------------------------------
#
# Tiles are stored head-major, as the batched matmuls read them: query tile r is
# ``q[r]: [H_kv, G, block_q, D]``, key tile c is ``k[c]: [H_kv, block_kv, D]``, the batch folded
# into the tile index. One transpose per input up front is cheaper than transposing a tile at
# every visit (a key tile is visited once per query tile that reaches it); scaling and casting
# happen per tile, so that the transpose is the only pass over the inputs.


class _Tiles(NamedTuple):
    """Static description of one blockwise call (hashable: a ``custom_vjp`` non-diff argument)."""

    mask: MaskType
    window: Window
    scale: float


class _Work(NamedTuple):
    """The visited (query tile, key tile) pairs, flattened in query-tile order: item w belongs to
    query tile r where ``starts[r] <= w < ends[r]`` and visits key tile
    ``kv_first[r] + w - starts[r]``."""

    starts: Int[Array, " R"]
    ends: Int[Array, " R"]
    kv_first: Int[Array, " R"]


def _locate(work: _Work, item: Array) -> tuple[Array, Array]:
    """Query tile and key tile of work item ``item``."""
    row = jnp.sum(work.ends <= item, dtype=jnp.int32)
    return row, work.kv_first[row] + item - work.starts[row]


def _index(x: Array, i: Array) -> Array:
    return jax.lax.dynamic_index_in_dim(x, i, keepdims=False)


def _put(x: Array, i: Array, value: Array) -> Array:
    return jax.lax.dynamic_update_index_in_dim(x, value, i, 0)


def _tile_logits(tiles: _Tiles, q, k, layout_q, layout_kv, r, c):
    """Scaled logits ``[H_kv, G, block_q, block_kv]`` of tile (r, c) and its mask, rebuilt from
    ids, positions and run lengths."""
    q_tile = _index(q, r).astype(jnp.float32)
    k_tile = _index(k, c).astype(jnp.float32)
    logits = tiles.scale * jnp.einsum("hgqd,hkd->hgqk", q_tile, k_tile)
    allowed = pair_mask(
        *(_index(a, r) for a in layout_q),
        *(_index(a, c) for a in layout_kv),
        mask_type=tiles.mask,
        window_size=tiles.window,
    )
    return q_tile, k_tile, logits, allowed[None, None]


def _forward_tiles(tiles: _Tiles, q, k, v, layout_q, layout_kv, work: _Work):
    """Online softmax over the visited tiles: (out, lse) per query tile, float32."""
    stats = q.shape[:-1]
    init = (
        jnp.zeros((*stats, v.shape[-1]), jnp.float32),  # unnormalised output
        jnp.full(stats, -jnp.inf, jnp.float32),  # running max of the logits
        jnp.zeros(stats, jnp.float32),  # running sum of exp(logit - max)
    )

    def visit(item, carry):
        acc, row_max, total = carry
        r, c = _locate(work, item)
        _, _, logits, allowed = _tile_logits(tiles, q, k, layout_q, layout_kv, r, c)
        logits = jnp.where(allowed, logits, -jnp.inf)
        old_max = _index(row_max, r)
        new_max = jnp.maximum(old_max, jnp.max(logits, axis=-1))
        # A row with nothing allowed so far keeps max -inf; exp must then see a finite shift.
        shift = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
        weights = jnp.exp(logits - shift[..., None])
        rescale = jnp.exp(old_max - shift)
        new_total = rescale * _index(total, r) + jnp.sum(weights, axis=-1)
        v_tile = _index(v, c).astype(jnp.float32)
        new_acc = rescale[..., None] * _index(acc, r) + jnp.einsum(
            "hgqk,hkd->hgqd", weights, v_tile
        )
        return _put(acc, r, new_acc), _put(row_max, r, new_max), _put(total, r, new_total)

    acc, row_max, total = jax.lax.fori_loop(0, work.ends[-1], visit, init)
    safe_total = jnp.where(total > 0, total, 1.0)
    lse = jnp.where(total > 0, row_max + jnp.log(safe_total), -jnp.inf)
    return acc / safe_total[..., None], lse


def _backward_tiles(
    tiles: _Tiles, q, k, v, layout_q, layout_kv, work: _Work, out, lse, d_out, d_lse
):
    """Flash-attention backward over the visited tiles, recomputing each tile's weights."""
    # d logit = p * (d_out . v - d_out . out + d_lse); the row term is computed once here.
    row_term = d_lse - jnp.sum(d_out * out, axis=-1)
    safe_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    init = tuple(jnp.zeros(x.shape, jnp.float32) for x in (q, k, v))

    def visit(item, carry):
        dq, dk, dv = carry
        r, c = _locate(work, item)
        q_tile, k_tile, logits, allowed = _tile_logits(tiles, q, k, layout_q, layout_kv, r, c)
        weights = jnp.where(allowed, jnp.exp(logits - _index(safe_lse, r)[..., None]), 0.0)
        do_tile = _index(d_out, r)
        d_weights = jnp.einsum("hgqd,hkd->hgqk", do_tile, _index(v, c).astype(jnp.float32))
        d_logits = tiles.scale * weights * (d_weights + _index(row_term, r)[..., None])
        dq = _put(dq, r, _index(dq, r) + jnp.einsum("hgqk,hkd->hgqd", d_logits, k_tile))
        dk = _put(dk, c, _index(dk, c) + jnp.einsum("hgqk,hgqd->hkd", d_logits, q_tile))
        dv = _put(dv, c, _index(dv, c) + jnp.einsum("hgqk,hgqd->hkd", weights, do_tile))
        return dq, dk, dv

    grads = jax.lax.fori_loop(0, work.ends[-1], visit, init)
    return tuple(g.astype(x.dtype) for g, x in zip(grads, (q, k, v), strict=True))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(tiles: _Tiles, q, k, v, layout_q, layout_kv, work):
    return _forward_tiles(tiles, q, k, v, layout_q, layout_kv, work)


def _flash_fwd(tiles: _Tiles, q, k, v, layout_q, layout_kv, work):
    out, lse = _forward_tiles(tiles, q, k, v, layout_q, layout_kv, work)
    return (out, lse), (q, k, v, layout_q, layout_kv, work, out, lse)


def _flash_bwd(tiles: _Tiles, residuals, cotangents):
    q, k, v, layout_q, layout_kv, work, out, lse = residuals
    d_out, d_lse = cotangents
    dq, dk, dv = _backward_tiles(tiles, q, k, v, layout_q, layout_kv, work, out, lse, d_out, d_lse)
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _head_major(tiles: Array) -> Array:
    """Moves the token axis of each tile behind the heads: ``[N, block, *heads, D] ->
    [N, *heads, block, D]``.

    Tile by tile: XLA:CPU lowers one whole-array transpose that feeds a loop as two strided
    copies, several times slower than transposing each (cache-resident) tile in turn.
    """
    axes = (*range(1, tiles.ndim - 2), 0, tiles.ndim - 2)
    return jax.lax.map(lambda t: t.transpose(axes), tiles)


@functools.partial(jax.jit, static_argnames=("mask", "window_size", "scale", "block_q", "block_kv"))
def _blockwise(
    query, key, value, layout_q, layout_kv, *, mask, window_size, scale, block_q, block_kv
):
    """Tiles the inputs, runs :func:`_flash` and untiles; differentiable by ordinary AD."""
    batch, seq_q, heads_q, _ = query.shape
    _, seq_kv, heads_kv, dim_v = value.shape
    block_q, block_kv = min(block_q, seq_q), min(block_kv, seq_kv)
    num_q, num_kv = -(-seq_q // block_q), -(-seq_kv // block_kv)
    ranges = tile_ranges(
        *layout_q,
        *layout_kv,
        mask_type=mask,
        window_size=window_size,
        block_q=block_q,
        block_kv=block_kv,
    )
    count = (ranges.hi - ranges.lo).reshape(-1)
    ends = jnp.cumsum(count, dtype=jnp.int32)
    kv_first = ranges.lo + num_kv * jnp.arange(batch, dtype=jnp.int32)[:, None]
    work = _Work(starts=ends - count, ends=ends, kv_first=kv_first.reshape(-1))

    def tile(x: Array, block: int, num: int) -> Array:
        """[B, T, ...] -> [B * num, block, ...]; padding tokens (id 0) fill the last tile."""
        if num * block != x.shape[1]:
            x = _pad_tokens(x, num * block)
        return x.reshape(batch * num, block, *x.shape[2:])

    q = tile(query, block_q, num_q)
    q = _head_major(q.reshape(*q.shape[:2], heads_kv, heads_q // heads_kv, q.shape[-1]))
    k = _head_major(tile(key, block_kv, num_kv))
    v = _head_major(tile(value, block_kv, num_kv))
    tiled_q = tuple(tile(a, block_q, num_q) for a in layout_q)
    tiled_kv = tuple(tile(a, block_kv, num_kv) for a in layout_kv)
    tiles = _Tiles(mask, window_size, float(scale))
    out, lse = _flash(tiles, q, k, v, tiled_q, tiled_kv, work)
    out = out.transpose(0, 3, 1, 2, 4).reshape(batch, num_q * block_q, heads_q, dim_v)
    lse = lse.transpose(0, 3, 1, 2).reshape(batch, num_q * block_q, heads_q)
    return out[:, :seq_q], lse[:, :seq_q]


def attention_partial(
    query: Float[Array, "B T_q H_q D"],
    key: Float[Array, "B T_kv H_kv D"],
    value: Float[Array, "B T_kv H_kv D_v"],
    *,
    ids_q: Int[Array, "B T_q"],
    pos_q: Int[Array, "B T_q"],
    rl_q: Int[Array, "B T_q"],
    ids_kv: Int[Array, "B T_kv"],
    pos_kv: Int[Array, "B T_kv"],
    rl_kv: Int[Array, "B T_kv"],
    mask_type: MaskType,
    window_size: Window,
    scale: float,
    implementation: Literal["blockwise", "reference"] = "blockwise",
    block_q: int = DEFAULT_BLOCK,
    block_kv: int = DEFAULT_BLOCK,
) -> tuple[Float[Array, "B T_q H_q D_v"], Float[Array, "B T_q H_q"]]:
    """Attention over one set of keys, with its log-sum-exp, for merging partial results.

    The building block of :func:`attention` and of ring attention (one call per ring step; the
    partials merge through ``lse``). Nothing is validated: the layouts must be valid (DESIGN.md)
    and ``rl_q`` / ``rl_kv`` constant along each run, as run lengths and global document lengths
    are. Differentiable with respect to ``query``, ``key`` and ``value``, including through
    ``lse``; rows with no allowed key get zero gradients.

    Args:
        query: float[B, T_q, H_q, D].
        key: float[B, T_kv, H_kv, D]; ``H_q`` a multiple of ``H_kv``.
        value: float[B, T_kv, H_kv, D_v].
        ids_q, pos_q: int32[B, T_q]; query segment ids (0 = padding) and positions.
        rl_q: int32[B, T_q]; the length of each query token's document, as the bottom-right rule
            reads it (:func:`thdkit.run_lengths`, or the global lengths in a ring step).
        ids_kv, pos_kv, rl_kv: int32[B, T_kv]; the same for keys/values.
        mask_type: a ``MaskType``.
        window_size: ``(left, right)`` or None; None or negative bounds are unbounded.
        scale: multiplies the logits.
        implementation: ``"blockwise"`` (default) or ``"reference"`` (dense).
        block_q, block_kv: tile sizes of the blockwise method, capped to T_q and T_kv.

    Returns:
        ``(out, lse)``: float32[B, T_q, H_q, D_v], normalised over this call's keys (zeros where no
        key is allowed); float32[B, T_q, H_q], the log-sum-exp of the allowed logits (-inf where
        none is).

    Example:
        >>> ids, pos = jnp.array([[1, 1, 1, 0, 2, 2, 2, 2]]), jnp.array([[0, 1, 2, 3, 0, 1, 2, 3]])
        >>> rl = run_lengths(ids)
        >>> q = k = jnp.zeros((1, 8, 1, 4))
        >>> v = jnp.arange(8.0).reshape(1, 8, 1, 1)
        >>> out, lse = attention_partial(q, k, v, ids_q=ids, pos_q=pos, rl_q=rl, ids_kv=ids,
        ...     pos_kv=pos, rl_kv=rl, mask_type=MaskType.CAUSAL, window_size=None, scale=0.5,
        ...     block_q=4, block_kv=4)
        >>> out[0, :, 0, 0]
        Array([0. , 0.5, 1. , 0. , 4. , 4.5, 5. , 5.5], dtype=float32)
        >>> jnp.exp(lse[0, :, 0])
        Array([1., 2., 3., 0., 1., 2., 3., 4.], dtype=float32)
    """
    mask = MaskType.parse(mask_type)
    # Static (hashed) below: a list would not do.
    window_size = None if window_size is None else tuple(window_size)
    layout_q = (ids_q, pos_q, rl_q)
    layout_kv = (ids_kv, pos_kv, rl_kv)
    if implementation == "reference":
        return reference_attention(
            query,
            key,
            value,
            ids_q=ids_q,
            pos_q=pos_q,
            rl_q=rl_q,
            ids_kv=ids_kv,
            pos_kv=pos_kv,
            rl_kv=rl_kv,
            mask_type=mask,
            window_size=window_size,
            scale=scale,
        )
    if implementation != "blockwise":
        raise ValueError(
            f"unknown implementation {implementation!r} for attention_partial; valid: "
            "'blockwise', 'reference'"
        )
    return _blockwise(
        query,
        key,
        value,
        layout_q,
        layout_kv,
        mask=mask,
        window_size=window_size,
        scale=scale,
        block_q=block_q,
        block_kv=block_kv,
    )


# --- Representability of the compact metadata --------------------------------------------------


def _count_is(
    pos_kv: Int[Array, " T_kv"], start: Array, length: Array, threshold: Array, count: Array
) -> Bool[Array, "..."]:
    """Whether exactly ``count`` keys of ``pos_kv[start:start + length]`` (increasing) are
    ``<= threshold``: the ``count``-th is and the next is not."""
    last = pos_kv.shape[0] - 1
    below = pos_kv[jnp.clip(start + count - 1, 0, last)] <= threshold
    above = pos_kv[jnp.clip(start + count, 0, last)] > threshold
    return ((count == 0) | below) & ((count == length) | above)


def _reproduces_row(
    ids_q,
    pos_q,
    ids_kv,
    pos_kv,
    q_seqlens,
    kv_seqlens,
    q_offsets,
    kv_offsets,
    *,
    mask: MaskType,
    window_left: int | None,
) -> Bool[Array, ""]:
    """One row of :func:`is_representable` from its raw metadata (``window_left``: also the
    index window ``a - left <= c`` of the kernel against the position window, every row
    non-empty).

    Per query token i of a surviving segment, at index a of the segment's active interval: the
    keys the reference allows form a prefix of the key interval (positions increase), as do the
    kernel's (``c <= a + d``), so the two agree iff their lengths do, which two comparisons decide.
    """
    num_segments = q_seqlens.shape[0]
    surviving = q_seqlens > 0
    slot = jnp.cumsum(surviving, dtype=jnp.int32) - 1
    index = jnp.clip(ids_q - 1, 0, num_segments - 1)
    len_q = jnp.where(ids_q > 0, q_seqlens[index], 0)
    len_kv = kv_seqlens[index]
    start_q = q_offsets[jnp.clip(slot[index], 0, num_segments)]
    start_kv = kv_offsets[jnp.clip(slot[index], 0, num_segments)]
    row = jnp.arange(ids_q.shape[0], dtype=jnp.int32) - start_q
    active = (len_q > 0) & (row >= 0) & (row < len_q)
    threshold = pos_q
    diagonal = row
    if mask.is_bottom_right:
        rl_kv = run_lengths(ids_kv)[jnp.clip(start_kv, 0, ids_kv.shape[0] - 1)]
        threshold = pos_q + rl_kv - run_lengths(ids_q)
        diagonal = row + len_kv - len_q
    upper = jnp.clip(diagonal + 1, 0, len_kv)
    ok = _count_is(pos_kv, start_kv, len_kv, threshold, upper)
    if window_left is not None:
        lower = jnp.clip(diagonal - window_left, 0, len_kv)
        ok &= _count_is(pos_kv, start_kv, len_kv, threshold - window_left - 1, lower)
        ok &= upper > lower
    return jnp.all(~active | ok)


@functools.partial(jax.jit, static_argnames=("mask", "num_segments", "window_left"))
def _reproduces(
    q: tuple[Array, Array],
    kv: tuple[Array, Array] | None,
    *,
    mask: MaskType,
    num_segments: int,
    window_left: int | None,
) -> Bool[Array, "*B"]:
    """:func:`is_representable` on checked layouts, optionally with a left window."""
    if not mask.uses_positions and window_left is None:
        return jnp.ones(q[0].shape[:-1], bool)
    kv_given = {} if kv is None else {"segment_ids_kv": kv[0], "segment_pos_kv": kv[1]}
    raw = seqlens_and_offsets(
        segment_ids_q=q[0],
        segment_pos_q=q[1],
        **kv_given,
        mask_type=mask,
        max_segments_per_seq=num_segments,
        compact=False,
    )
    kv = q if kv is None else kv
    row_fn = functools.partial(_reproduces_row, mask=mask, window_left=window_left)
    return _map_rows(row_fn, *q, *kv, *raw)


def is_representable(
    *,
    segment_ids_q: ArrayLike,
    segment_pos_q: ArrayLike,
    segment_ids_kv: ArrayLike | None = None,
    segment_pos_kv: ArrayLike | None = None,
    mask_type: MaskType | str,
    max_segments_per_seq: int,
) -> Bool[Array, "*B"]:
    """Per row, whether compact metadata read by a varlen kernel reproduces ``allowed[]`` exactly.

    The kernel reading: the k-th segment's query rows ``[qo, qo + lq)`` attend its key rows
    ``[ko, ko + lk)``, top-left causal ``c <= a``, bottom-right ``c <= a + lk - lq`` (a, c: row and
    column inside the segment's active intervals). Always true for no_mask/padding; for causal and
    bottom-right types, true iff for every active query row a the allowed keys, a prefix of the key
    interval, have exactly the kernel's length (``min(a + 1, lk)`` for causal). So it holds for
    self-attention, for cross-attention whose key documents start at the same position as the
    query ones and are at least as long, and for striped (stripe 1) ring steps, but not in general
    for stripe > 1 or dual_chunk_swap ring steps of causal masks. O(T), jit-compatible; layouts
    are validated when concrete.

    Args:
        segment_ids_q, segment_pos_q, segment_ids_kv, segment_pos_kv, mask_type,
            max_segments_per_seq: as for :func:`thdkit.seqlens_and_offsets`.

    Returns:
        bool[*B].

    Raises:
        TypeError, ValueError: as :func:`thdkit.seqlens_and_offsets`.

    Example:
        Example 2 of DESIGN.md, a striped ring step (stripe 1), is representable; in a stripe-2
        step query position 4 may attend key positions 2 and 3, but the kernel's row 0 only
        column 0:

        >>> ids = jnp.array([1, 1, 2, 2])
        >>> is_representable(segment_ids_q=ids, segment_pos_q=jnp.array([0, 2, 0, 2]),
        ...     segment_ids_kv=ids, segment_pos_kv=jnp.array([1, 3, 1, 3]),
        ...     mask_type="padding_causal", max_segments_per_seq=2)
        Array(True, dtype=bool)
        >>> ids = jnp.array([1, 1, 1, 1])
        >>> is_representable(segment_ids_q=ids, segment_pos_q=jnp.array([0, 1, 4, 5]),
        ...     segment_ids_kv=ids, segment_pos_kv=jnp.array([2, 3, 6, 7]),
        ...     mask_type="padding_causal", max_segments_per_seq=1)
        Array(False, dtype=bool)
    """
    mask = MaskType.parse(mask_type)
    num_segments = check_max_segments(max_segments_per_seq)
    q, kv = as_layouts(segment_ids_q, segment_pos_q, segment_ids_kv, segment_pos_kv)
    validate_concrete(q, kv, max_segments_per_seq=num_segments, mask_type=mask)
    return _reproduces(q, kv, mask=mask, num_segments=num_segments, window_left=None)


# --- cuDNN -------------------------------------------------------------------------------------


def _cudnn_problem(
    query: Array, value: Array, mask: MaskType, window_size: Window, self_attention: bool
) -> str | None:
    """Why JAX's cuDNN kernel cannot run this configuration; None when it can."""
    if jax.default_backend() != "gpu":
        return f"needs a CUDA GPU with cuDNN; the default backend is {jax.default_backend()}"
    try:
        from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

        version = cudnn_attention.check_cudnn_version()
    except Exception as error:  # Import or library problems all mean "not available".
        return f"cannot load cuDNN fused attention ({error})"
    if query.dtype not in _CUDNN_DTYPES:
        return f"takes bfloat16 or float16 inputs, got {query.dtype}"
    dims = (query.shape[-1], value.shape[-1])
    if any(d % 8 or d > 256 for d in dims):
        return f"needs head dims that are multiples of 8 and at most 256, got D, D_v = {dims}"
    capability = getattr(jax.devices()[0], "compute_capability", "0.0")
    if tuple(int(x) for x in str(capability).split(".")[:2]) < (9, 0):
        return f"packed layouts need compute capability >= 9.0, got {capability}"
    if dims[0] != dims[1] and version < 91000:
        return f"needs cuDNN >= 9.10 for D_v != D, got version {version}"
    if mask.is_bottom_right and not self_attention:
        return "has no bottom-right mask (self-attention maps it to causal, cross-attention can't)"
    if window_size is not None and not mask.uses_positions:
        return "applies sliding windows with a causal mask only"
    return None


def _inside(offsets: Int[Array, "B S"], lengths: Int[Array, "B S"], seq_len: int) -> Array:
    """bool[B, T]: whether each token lies in one of the intervals ``[offset, offset + length)``."""

    def row(offsets, lengths):
        edges = jnp.zeros(seq_len + 1, jnp.int32)
        edges = edges.at[jnp.where(lengths > 0, offsets, seq_len + 1)].add(1, mode="drop")
        edges = edges.at[jnp.where(lengths > 0, offsets + lengths, seq_len + 1)].add(
            -1, mode="drop"
        )
        return jnp.cumsum(edges[:-1]) > 0

    return jax.vmap(row)(offsets, lengths)


def _cudnn(query, key, value, q, kv, *, mask, window_size, scale, num_segments):
    """JAX's cuDNN fused attention on the compact metadata; the caller checked support."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

    kv_given = {} if kv is None else {"segment_ids_kv": kv[0], "segment_pos_kv": kv[1]}
    meta = seqlens_and_offsets(
        segment_ids_q=q[0],
        segment_pos_q=q[1],
        **kv_given,
        mask_type=mask,
        max_segments_per_seq=num_segments,
        compact=True,
    )
    # JAX reads the offsets only with more than one slot per row; an empty slot is harmless.
    slots = max(num_segments, 2)

    def pad_slots(x: Array, size: int, fill: int) -> Array:
        return jnp.pad(x, ((0, 0), (0, size - x.shape[1])), constant_values=fill)

    q_offsets = pad_slots(meta.q_offsets, slots + 1, -1)
    kv_offsets = pad_slots(meta.kv_offsets, slots + 1, -1)
    q_lengths = pad_slots(meta.q_seqlens, slots, 0)
    kv_lengths = pad_slots(meta.kv_seqlens, slots, 0)
    # JAX moves every row's non-negative entries to the front of one flat list; -1 marks the empty
    # slots so that seqlens stay aligned with offsets (cuDNN itself then sees trailing zeros).
    q_seqlen = jnp.where(q_offsets[:, :-1] >= 0, q_lengths, -1)
    kv_seqlen = jnp.where(kv_offsets[:, :-1] >= 0, kv_lengths, -1)
    active_q = _inside(q_offsets[:, :-1], q_lengths, query.shape[1])[:, :, None, None]
    active_kv = _inside(kv_offsets[:, :-1], kv_lengths, key.shape[1])[:, :, None, None]
    # Rows outside every segment are never written by the kernel: select zeros for them, and mask
    # the inputs so that their gradients are zeros as well.
    left = _bound(window_size, 0)
    out = cudnn_attention.dot_product_attention(
        jnp.where(active_q, query, 0),
        jnp.where(active_kv, key, 0),
        jnp.where(active_kv, value, 0),
        q_seqlen=q_seqlen,
        kv_seqlen=kv_seqlen,
        q_offsets=q_offsets,
        kv_offsets=kv_offsets,
        scale=scale,
        mask_type=(
            cudnn_attention.MaskType.PADDING_CAUSAL
            if mask.uses_positions
            else cudnn_attention.MaskType.PADDING
        ),
        qkv_layout="BTNH",
        sliding_window_length=None if left is None else left + 1,
    )
    return jnp.where(active_q, out, 0).astype(query.dtype)


# --- The public entry point --------------------------------------------------------------------


def _check_arrays(query: Any, key: Any, value: Any) -> tuple[Array, Array, Array]:
    """Dtype and shape checks of query/key/value; returns them as arrays."""
    arrays = []
    for name, x in (("query", query), ("key", key), ("value", value)):
        x = jnp.asarray(x)
        if x.dtype not in _DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got dtype {x.dtype}")
        if x.ndim != 4:
            raise ValueError(f"{name} must have rank 4 ([B, T, H, D]), got shape {x.shape}")
        arrays.append(x)
    query, key, value = arrays
    if not query.dtype == key.dtype == value.dtype:
        raise TypeError(
            "query, key and value must share one dtype, got "
            f"{query.dtype}, {key.dtype} and {value.dtype}"
        )
    if not query.shape[0] == key.shape[0] == value.shape[0]:
        raise ValueError(
            f"query, key and value must have the same batch size B, got shapes {query.shape}, "
            f"{key.shape} and {value.shape}"
        )
    if key.shape[:3] != value.shape[:3]:
        raise ValueError(
            "key and value must agree in B, T_kv and H_kv, got shapes "
            f"{key.shape} and {value.shape}"
        )
    if query.shape[3] != key.shape[3]:
        raise ValueError(
            f"query and key must have the same head dim D, got {query.shape[3]} and {key.shape[3]}"
        )
    if query.shape[2] % key.shape[2]:
        raise ValueError(
            f"the query heads H_q={query.shape[2]} must be a multiple of the key/value heads "
            f"H_kv={key.shape[2]}"
        )
    return query, key, value


def _check_options(scale: Any, dim: int, block_q: Any, block_kv: Any) -> float:
    """Checks the static options; returns the scale."""
    for name, block in (("block_q", block_q), ("block_kv", block_kv)):
        if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
            raise ValueError(f"{name} must be a positive int, got {block!r}")
    if scale is None:
        return 1.0 / math.sqrt(dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)):
        raise TypeError(f"scale must be a Python float or None, got {type(scale).__name__}")
    return float(scale)


def _check_layout_shape(side: tuple[Array, Array], name: str, batch: int, seq: int, of: str):
    if side[0].shape != (batch, seq):
        raise ValueError(
            f"{name} must have shape [B, T] = {(batch, seq)} to match {of}, got {side[0].shape}"
        )


def attention(
    query: Float[ArrayLike, "B T_q H_q D"],
    key: Float[ArrayLike, "B T_kv H_kv D"],
    value: Float[ArrayLike, "B T_kv H_kv D_v"],
    *,
    segment_ids_q: Int[ArrayLike, "B T_q"],
    segment_pos_q: Int[ArrayLike, "B T_q"],
    segment_ids_kv: Int[ArrayLike, "B T_kv"] | None = None,
    segment_pos_kv: Int[ArrayLike, "B T_kv"] | None = None,
    mask_type: MaskType | str = "padding_causal",
    window_size: tuple[int | None, int | None] | None = None,
    max_segments_per_seq: int,
    scale: float | None = None,
    implementation: Implementation | None = None,
    block_q: int = DEFAULT_BLOCK,
    block_kv: int = DEFAULT_BLOCK,
) -> Float[Array, "B T_q H_q D_v"]:
    """Scaled dot-product attention over packed rows, masked by segment ids and positions.

    Softmax over the keys allowed by ``allowed[i, j]`` of DESIGN.md (same non-padding document,
    and the mask type's rule on positions) intersected with the sliding window; query rows with no
    allowed key give zeros (and zero gradients). Float32 accumulation in every implementation.

    Args:
        query: float32/bfloat16/float16[B, T_q, H_q, D].
        key: [B, T_kv, H_kv, D], the query's dtype; ``H_q`` a multiple of ``H_kv``: query head h
            reads key/value head ``h // (H_q // H_kv)``.
        value: [B, T_kv, H_kv, D_v], the query's dtype.
        segment_ids_q: int[B, T_q]; 0 = padding, 1..S = the document of each query token.
        segment_pos_q: int[B, T_q]; each query token's position inside its document.
        segment_ids_kv, segment_pos_kv: int[B, T_kv], or both None for self-attention (then
            ``T_kv == T_q`` and the kv layout is the query's).
        mask_type: a :class:`thdkit.MaskType` or its name.
        window_size: ``(left, right)`` or None; None or negative bounds are unbounded. Top-left
            types and no_mask/padding keep ``pos_q - left <= pos_kv <= pos_q + right``;
            bottom-right types keep ``rl_q - pos_q + left >= rl_kv - pos_kv`` (no right bound).
        max_segments_per_seq: S, a static int >= the largest id.
        scale: multiplies the logits; None means ``1 / sqrt(D)``.
        implementation: ``"reference"`` (dense, O(T_q·T_kv) memory), ``"blockwise"`` (tiled,
            O(T·tile) memory, exact for every valid layout), ``"cudnn"`` (GPU; compact metadata,
            see :func:`is_representable`), or None: cuDNN on a GPU when it supports the
            configuration and the layout is representable, otherwise blockwise.
        block_q, block_kv: tile sizes of the blockwise method, capped to T_q and T_kv.

    Returns:
        [B, T_q, H_q, D_v] in the query's dtype.

    Raises:
        TypeError: non-float or mixed dtypes, non-integer layouts, a non-int window bound or
            ``max_segments_per_seq``, a non-float ``scale``.
        ValueError: ranks, batch/length/head mismatches, a bad ``window_size`` form or block size,
            an unknown ``mask_type`` or ``implementation`` (the message lists the valid ones), or
            (concrete layouts) a layout that breaks a rule, naming the parameter, row and token.
        NotImplementedError: ``"cudnn"`` with a configuration or layout it cannot express.
        RuntimeError: ``"cudnn"`` without a CUDA GPU.

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
    mask = MaskType.parse(mask_type)
    num_segments = check_max_segments(max_segments_per_seq)
    if implementation is not None and implementation not in _IMPLEMENTATIONS:
        raise ValueError(
            f"unknown implementation {implementation!r}; valid: "
            f"{', '.join(map(repr, _IMPLEMENTATIONS))} or None"
        )
    query, key, value = _check_arrays(query, key, value)
    batch, seq_q, _, dim = query.shape
    seq_kv = key.shape[1]
    window = check_window(window_size)
    scale = _check_options(scale, dim, block_q, block_kv)
    q, kv = as_layouts(segment_ids_q, segment_pos_q, segment_ids_kv, segment_pos_kv)
    _check_layout_shape(q, "segment_ids_q", batch, seq_q, "query")
    if kv is None and seq_kv != seq_q:
        raise ValueError(
            f"self-attention (no segment_ids_kv) needs T_kv == T_q, got key length {seq_kv} "
            f"and query length {seq_q}; pass segment_ids_kv and segment_pos_kv"
        )
    if kv is not None:
        _check_layout_shape(kv, "segment_ids_kv", batch, seq_kv, "key")
    validate_concrete(q, kv, max_segments_per_seq=num_segments, mask_type=mask)

    run = functools.partial(
        _run,
        query,
        key,
        value,
        q,
        kv,
        mask=mask,
        window=window,
        scale=scale,
        block_q=block_q,
        block_kv=block_kv,
        num_segments=num_segments,
    )
    if implementation in ("reference", "blockwise"):
        return run(implementation=implementation)
    problem = _cudnn_problem(query, value, mask, window, self_attention=kv is None)
    if implementation == "cudnn":
        if problem is not None:
            error = RuntimeError if jax.default_backend() != "gpu" else NotImplementedError
            raise error(f"implementation='cudnn' {problem}; {_USE_BLOCKWISE}")
        if is_concrete(*q) and (kv is None or is_concrete(*kv)):
            exact = _reproduces(
                q, kv, mask=mask, num_segments=num_segments, window_left=_bound(window, 0)
            )
            if not bool(jnp.all(exact)):
                rows = np.flatnonzero(~np.asarray(exact)).tolist()
                raise NotImplementedError(
                    "implementation='cudnn': compact metadata cannot express this layout "
                    f"(rows {rows}); {_USE_BLOCKWISE}"
                )
        return run(implementation="cudnn")
    return run(implementation="blockwise" if problem is not None else "auto")


@functools.partial(
    jax.jit,
    static_argnames=(
        "mask",
        "window",
        "scale",
        "block_q",
        "block_kv",
        "num_segments",
        "implementation",
    ),
)
def _run(
    query,
    key,
    value,
    q,
    kv,
    *,
    mask,
    window,
    scale,
    block_q,
    block_kv,
    num_segments,
    implementation: Literal["reference", "blockwise", "cudnn", "auto"],
):
    """:func:`attention` after its checks; jitted so that eager calls compile once.

    ``"auto"`` picks cuDNN where the compact metadata reproduces the mask, per call.
    """
    kv_side = q if kv is None else kv
    rl_q = run_lengths(q[0])
    rl_kv = rl_q if kv is None else run_lengths(kv_side[0])
    layouts = dict(
        ids_q=q[0], pos_q=q[1], rl_q=rl_q, ids_kv=kv_side[0], pos_kv=kv_side[1], rl_kv=rl_kv
    )

    def partial(impl: Literal["blockwise", "reference"]) -> Array:
        out, _ = attention_partial(
            query,
            key,
            value,
            **layouts,
            mask_type=mask,
            window_size=window,
            scale=scale,
            implementation=impl,
            block_q=block_q,
            block_kv=block_kv,
        )
        return out.astype(query.dtype)

    def cudnn() -> Array:
        return _cudnn(
            query,
            key,
            value,
            q,
            kv,
            mask=mask,
            window_size=window,
            scale=scale,
            num_segments=num_segments,
        )

    if implementation == "cudnn":
        return cudnn()
    if implementation != "auto":
        return partial(implementation)
    exact = jnp.all(
        _reproduces(q, kv, mask=mask, num_segments=num_segments, window_left=_bound(window, 0))
    )
    return jax.lax.cond(exact, cudnn, lambda: partial("blockwise"))
