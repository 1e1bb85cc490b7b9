"""The blockwise method: online softmax over the visited (query tile, key tile) pairs.

Each query tile visits only its range of key tiles (:mod:`thdkit._src.kernels.tiles`); inside a
tile the mask is rebuilt from ids, positions and document lengths
(:func:`thdkit.kernels.pair_mask`), so the result is exact for every valid layout, ring steps
included. A ``jax.custom_vjp`` recomputes
the tiles in the backward pass, saving only the output and each row's largest logit and sum of
exponentials (so that the largest weight is recomputed exactly, at any magnitude of the logits:
:mod:`thdkit._src.kernels.flash_vjp`): O(T·tile) memory.

Isolation: the inputs are sanitised once (:func:`thdkit._src.isolation.sanitize`); every tile also
counts, per query row, the allowed keys whose key or value was non-finite (a ``[q, k] x [k]``
contraction of the tile's mask with the key flags), and the rows that count one, or whose own
query was non-finite, come out NaN (:mod:`thdkit._src.kernels.flash_vjp`). Every masked product is a
select.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from thdkit._src.host import JAX, ArrayOps
from thdkit._src.isolation import sanitize
from thdkit._src.kernels import soft_cap
from thdkit._src.kernels.base import Implementation
from thdkit._src.kernels.config import AttentionConfig
from thdkit._src.kernels.flash_vjp import flash_vjp, match_varying, varying_axes
from thdkit._src.kernels.tiles import TileRanges, pad_tokens, tile_ranges
from thdkit._src.mask_types import MaskType, Window
from thdkit._src.masks import pair_mask
from thdkit._src.segments import Segments

__all__ = [
    "PAIRS_PER_STEP",
    "Blockwise",
    "Schedule",
    "blockwise_attention",
    "step_tiles",
]

# Tiles are stored head-major, as the batched matmuls read them: query tile r is
# ``q[r]: [H_kv, G, block_q, D]``, key tile c is ``k[c]: [H_kv, block_kv, D]``, the batch folded
# into the tile index. One transpose per input up front is cheaper than transposing a tile at
# every visit (a key tile is visited once per query tile that reaches it); scaling and casting
# happen per tile, so that the transpose is the only pass over the inputs.


Schedule = Literal["parallel", "serial"]
"""How the visited tiles are walked: ``"parallel"`` (default) visits a chunk of them per step with
batched matmuls, ``PAIRS_PER_STEP`` token pairs' worth; ``"serial"`` visits one per step."""

PAIRS_PER_STEP = {"cpu": 128 * 128, "gpu": 16 * 128 * 128, "tpu": 16 * 128 * 128}
"""Token pairs the parallel schedule visits per step, by backend: ``chunk * block_q * block_kv``.
Larger steps amortise the per-step cost; on CPU the batched gathers cost more than that saves
beyond one 128 x 128 tile's worth (docs/attention.md, "Blockwise"), on accelerators 16 tiles of
128 x 128 keep the device busy."""


def step_tiles(block_q: int, block_kv: int, *, most: int, backend: str | None = None) -> int:
    """Tiles the parallel schedule visits per step: ``PAIRS_PER_STEP[backend]`` pairs' worth of
    ``block_q x block_kv`` tiles, at least one and at most ``most``.

    Args:
        block_q, block_kv: the tile sizes.
        most: no step needs more (the batch's query tiles times its key tiles).
        backend: None for ``jax.default_backend()``.

    Returns:
        The chunk, an int in ``[1, max(most, 1)]``.

    Example:
        >>> [step_tiles(block, block, most=1000, backend="cpu") for block in (32, 128, 512)]
        [16, 1, 1]
        >>> step_tiles(128, 128, most=9, backend="gpu")
        9
    """
    pairs = PAIRS_PER_STEP.get(backend or jax.default_backend(), PAIRS_PER_STEP["gpu"])
    return max(1, min(most, pairs // (block_q * block_kv)))


class _Tiles(NamedTuple):
    """Static description of one blockwise call (hashable: a ``custom_vjp`` non-diff argument)."""

    mask: MaskType
    window: Window
    scale: float
    chunk: int  # work items per step; 1 walks them one at a time (the serial schedule)
    cap: float | None = None  # the logits' soft cap

    @property
    def unit(self) -> float:
        """What multiplies the tile values into logits (:func:`~.soft_cap.unit`)."""
        return soft_cap.unit(scale=self.scale, cap=self.cap)


class _Work(NamedTuple):
    """The visited (query tile, key tile) pairs, flattened in query-tile order: item w belongs to
    query tile r where ``starts[r] <= w < ends[r]`` and visits key tile
    ``kv_first[r] + w - starts[r]``."""

    starts: Int[Array, " R"]
    ends: Int[Array, " R"]
    kv_first: Int[Array, " R"]


def _locate(work: _Work, item: Array) -> tuple[Array, Array]:
    """Query tile and key tile of work item ``item`` (a scalar, or ``[P]`` items)."""
    row = jnp.searchsorted(work.ends, item, side="right", method="compare_all")
    row = jnp.minimum(row, work.ends.shape[0] - 1).astype(jnp.int32)
    return row, work.kv_first[row] + item - work.starts[row]


def _index(x: Array, i: Array) -> Array:
    """The tiles ``i`` (``[P]`` indices, in range) of ``x``: ``[P, ...]``. One tile is a
    dynamic slice, which XLA:CPU runs far faster than a gather (likewise below)."""
    if i.shape[0] == 1:
        return jax.lax.dynamic_slice_in_dim(x, i[0], 1)
    return jnp.take(x, i, axis=0, mode="clip")


def _set(x: Array, i: Array, value: Array) -> Array:
    """``x`` with the tiles ``i`` (distinct, in range) replaced by ``value``."""
    if i.shape[0] == 1:
        return jax.lax.dynamic_update_slice_in_dim(x, value, i[0], 0)
    return x.at[i].set(value)


def _add(x: Array, i: Array, value: Array) -> Array:
    """``x`` with ``value`` added to the tiles ``i`` (in range; repeats add up)."""
    if i.shape[0] == 1:
        return _set(x, i, _index(x, i) + value)
    return x.at[i].add(value)


def _tile_logits(tiles: _Tiles, q, k, layout_q, layout_kv, r, c):
    """The tile values (:func:`~.soft_cap.tile_values`: logits over ``tiles.unit``) ``[*P, H_kv,
    G, block_q, block_kv]`` of tiles (r, c) and their mask ``[*P, 1, 1, block_q, block_kv]``,
    rebuilt from ids, positions and document lengths."""
    q_tile = _index(q, r).astype(jnp.float32)
    k_tile = _index(k, c).astype(jnp.float32)
    dots = jnp.einsum("...hgqd,...hkd->...hgqk", q_tile, k_tile)
    dots = soft_cap.tile_values(dots, scale=tiles.scale, cap=tiles.cap)
    # Built once per tile, behind a branch: left to fusion, XLA:CPU recomputes the mask inside
    # every consumer, once per head. (r >= 0 always holds.) Both branches vary over the mesh
    # axes the layout and tile indices do, inside a shard_map.
    axes = varying_axes(layout_q, layout_kv, r, c)
    allowed = jax.lax.cond(
        r[0] >= 0,
        lambda: match_varying(
            pair_mask(
                jax.tree.map(lambda a: _index(a, r), layout_q),
                jax.tree.map(lambda a: _index(a, c), layout_kv),
                mask_type=tiles.mask,
                window_size=tiles.window,
            ),
            axes,
        ),
        lambda: match_varying(
            jnp.zeros((*r.shape, q_tile.shape[-2], k_tile.shape[-2]), bool), axes
        ),
    )
    return q_tile, k_tile, dots, allowed[..., None, None, :, :]


def _exponents(tiles: _Tiles, dots: Array, shift: Array) -> Array:
    """:func:`~.soft_cap.exponents` of the tile values."""
    return soft_cap.exponents(dots, shift, scale=tiles.scale, cap=tiles.cap)


def _chunk(work: _Work, step: Array, chunk: int) -> tuple[Array, Array, Array]:
    """Work items ``step * chunk + [0, chunk)``: query tiles, key tiles and which are real (the
    last step may run past the end; its extra items point at the last query tile)."""
    items = step * chunk + jnp.arange(chunk, dtype=jnp.int32)
    row, col = _locate(work, items)
    return row, col, items < work.ends[-1]


def _key_hits(allowed: Array, bad: Array) -> Array:
    """Per query row, the allowed keys whose key or value was non-finite: ``[*P, H_kv, block_q]``
    from the mask ``[*P, 1, 1, block_q, block_kv]`` and the key flags ``[*P, H_kv, block_kv]``."""
    return jnp.einsum(
        "...qk,...hk->...hq", allowed[..., 0, 0, :, :].astype(jnp.float32), bad.astype(jnp.float32)
    )


def _steps(work: _Work, chunk: int) -> Array:
    return (work.ends[-1] + chunk - 1) // chunk


def _forward_tiles(tiles: _Tiles, q, k, v, layout_q, layout_kv, bad_q, bad_kv, work: _Work):
    """Online softmax over the visited tiles: (out, lse, poisoned, (row max, row sum)) per query
    tile, float32; the row max is of the logits over ``tiles.unit`` (:func:`_exponents`).

    Each step visits ``tiles.chunk`` work items. Items of one query tile are consecutive, so a
    chunk touches at most ``chunk`` query tiles, numbered by ``slot``: their running statistics are
    gathered once, merged with every item of the chunk (a segment max, then segment sums) and
    written back. Unused slots read and write a spare last row.
    """
    rows, chunk = q.shape[0], tiles.chunk
    stats = (rows + 1, *q.shape[1:-1])
    init = (
        jnp.zeros((*stats, v.shape[-1]), jnp.float32),  # unnormalised output
        jnp.full(stats, -jnp.inf, jnp.float32),  # running max of the logits over the unit
        jnp.zeros(stats, jnp.float32),  # running sum of exp(logit - max)
        jnp.zeros((stats[0], stats[1], stats[3]), jnp.float32),  # allowed non-finite keys
    )
    # Inside a shard_map the carry varies over the mesh axes of everything it is combined with.
    init = match_varying(init, varying_axes(q, k, v, layout_q, layout_kv, bad_q, bad_kv, work))

    def combine(x: Array, slot: Array) -> Array:
        """Per slot, the sum of its items."""
        if chunk == 1:
            return x
        return jax.ops.segment_sum(x, slot, num_segments=chunk, indices_are_sorted=True)

    def visit(step, carry):
        acc, row_max, total, hits = carry
        row, col, real = _chunk(work, step, chunk)
        _, _, dots, allowed = _tile_logits(tiles, q, k, layout_q, layout_kv, row, col)
        allowed = allowed & real[:, None, None, None, None]
        new_row = jnp.concatenate([jnp.zeros(1, bool), row[1:] != row[:-1]])
        slot = jnp.cumsum(new_row, dtype=jnp.int32)
        dest = jnp.full(chunk, rows, jnp.int32).at[slot].set(row)
        dots = jnp.where(allowed, dots, -jnp.inf)
        old_max = _index(row_max, dest)
        item_max = jnp.max(dots, axis=-1)
        new_max = jnp.maximum(old_max, item_max) if chunk == 1 else old_max.at[slot].max(item_max)
        # A row with nothing allowed so far keeps max -inf; exp must then see a finite shift.
        shift = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
        weights = jnp.exp(_exponents(tiles, dots, shift[slot][..., None]))
        rescale = jnp.exp(_exponents(tiles, old_max, shift))
        v_tile = _index(v, col).astype(jnp.float32)
        products = jnp.einsum("phgqk,phkd->phgqd", weights, v_tile)
        new_hits = _key_hits(allowed, _index(bad_kv, col))
        return (
            _set(acc, dest, rescale[..., None] * _index(acc, dest) + combine(products, slot)),
            _set(row_max, dest, new_max),
            _set(total, dest, rescale * _index(total, dest) + combine(jnp.sum(weights, -1), slot)),
            _add(hits, dest, combine(new_hits, slot)),
        )

    acc, row_max, total, hits = (
        x[:rows] for x in jax.lax.fori_loop(0, _steps(work, chunk), visit, init)
    )
    safe_total = jnp.where(total > 0, total, 1.0)
    lse = jnp.where(total > 0, tiles.unit * row_max + jnp.log(safe_total), -jnp.inf)
    poisoned = ((hits > 0)[:, :, None, :] | bad_q) & (total > 0)
    return acc / safe_total[..., None], lse, poisoned, (row_max, total)


def _backward_tiles(tiles: _Tiles, inputs, d_out, row_term, row_max, row_sum):
    """Flash-attention backward over the visited tiles, recomputing each tile's weights from the
    forward's row maxima and sums (exactly ``1 / row_sum`` at a row's largest logit); each step
    scatter-adds the gradients of ``tiles.chunk`` work items (:mod:`~.flash_vjp`)."""
    q, k, v, layout_q, layout_kv, _, _, work = inputs
    init = tuple(jnp.zeros(x.shape, jnp.float32) for x in (q, k, v))
    init = match_varying(init, varying_axes(inputs, d_out, row_term, row_max, row_sum))
    inverse_sum = 1.0 / row_sum

    def visit(step, carry):
        dq, dk, dv = carry
        row, col, real = _chunk(work, step, tiles.chunk)
        q_tile, k_tile, dots, allowed = _tile_logits(tiles, q, k, layout_q, layout_kv, row, col)
        allowed = allowed & real[:, None, None, None, None]
        # Clamped at 0: a recomputed dot can never weigh more than the forward's largest.
        exponents = jnp.minimum(_exponents(tiles, dots, _index(row_max, row)[..., None]), 0.0)
        weights = jnp.exp(exponents) * _index(inverse_sum, row)[..., None]
        weights = jnp.where(allowed, weights, 0.0)
        do_tile = _index(d_out, row)
        d_weights = jnp.einsum("phgqd,phkd->phgqk", do_tile, _index(v, col).astype(jnp.float32))
        d_logits = jnp.where(
            allowed,
            soft_cap.d_dots(dots, scale=tiles.scale, cap=tiles.cap)
            * weights
            * (d_weights + _index(row_term, row)[..., None]),
            0.0,
        )
        dq = _add(dq, row, jnp.einsum("phgqk,phkd->phgqd", d_logits, k_tile))
        dk = _add(dk, col, jnp.einsum("phgqk,phgqd->phkd", d_logits, q_tile))
        dv = _add(dv, col, jnp.einsum("phgqk,phgqd->phkd", weights, do_tile))
        return dq, dk, dv

    return jax.lax.fori_loop(0, _steps(work, tiles.chunk), visit, init)


_flash = flash_vjp(_forward_tiles, _backward_tiles)


def _prepare(tiles: Array) -> tuple[Array, Array]:
    """Sanitised tiles with the token axis behind the heads, and their non-finite flags, in one
    pass: ``[N, block, *heads, D] -> ([N, *heads, block, D], bool[N, *heads, block])``.

    Tile by tile: XLA:CPU lowers one whole-array transpose that feeds a loop as two strided
    copies, several times slower than transposing each (cache-resident) tile in turn.
    """
    rank = tiles.ndim - 1  # of one tile
    heads = tuple(range(1, rank - 1))

    def one(tile: Array) -> tuple[Array, Array]:
        clean, bad = sanitize(tile)
        return clean.transpose((*heads, 0, rank - 1)), bad.transpose((*heads, 0))

    return jax.lax.map(one, tiles)


def blockwise_attention(
    query: Float[Array, "B T_q H_q D"],
    key: Float[Array, "B T_kv H_kv D"],
    value: Float[Array, "B T_kv H_kv D_v"],
    q_segments: Segments,
    kv_segments: Segments,
    ranges: TileRanges,
    *,
    mask_type: MaskType,
    window_size: Window,
    scale: float,
    logits_soft_cap: float | None = None,
    schedule: Schedule = "parallel",
) -> tuple[Float[Array, "B T_q H_q D_v"], Float[Array, "B T_q H_q"]]:
    """The flash loop over precomputed tile ranges: ``(out, lse)`` as :func:`attention_partial`.

    The tile sizes are read off ``ranges``; nothing of the layout is recomputed.
    Differentiable with respect to query, key and value.

    Args:
        query, key, value: as for :func:`attention_partial`.
        q_segments, kv_segments: as for :func:`attention_partial`.
        ranges: :class:`thdkit.kernels.TileRanges` of this layout and these tile sizes.
        mask_type: a parsed ``MaskType``.
        window_size: a parsed window (:func:`thdkit._src.mask_types.check_window`).
        scale: multiplies the logits.
        logits_soft_cap: ``cap`` of ``cap * tanh(logit / cap)``, applied after the scale and
            before the mask, or None for none.
        schedule: ``"parallel"`` visits ``PAIRS_PER_STEP[backend] // (block_q * block_kv)``
            tiles per step with batched matmuls, ``"serial"`` one tile per step.

    Returns:
        ``(out, lse)``: float32[B, T_q, H_q, D_v] and float32[B, T_q, H_q].

    Example:
        >>> side = Segments.from_ids(jnp.array([[1, 1, 2, 2]]))
        >>> ranges = tile_ranges(side, side, mask_type=MaskType.CAUSAL, window_size=None,
        ...                      block_q=2, block_kv=2)
        >>> v = jnp.arange(4.0).reshape(1, 4, 1, 1)
        >>> out, _ = blockwise_attention(jnp.zeros((1, 4, 1, 1)), jnp.zeros((1, 4, 1, 1)), v,
        ...     side, side, ranges, mask_type=MaskType.CAUSAL, window_size=None, scale=1.0)
        >>> out[0, :, 0, 0]
        Array([0. , 0.5, 2. , 2.5], dtype=float32)
    """
    batch, seq_q, heads_q, _ = query.shape
    _, _, heads_kv, dim_v = value.shape
    num_q, num_kv = ranges.lo.shape[-1], ranges.num_kv_tiles
    block_q, block_kv = ranges.block_q, ranges.block_kv
    count = (ranges.hi - ranges.lo).reshape(-1)
    ends = jnp.cumsum(count, dtype=jnp.int32)
    kv_first = ranges.lo + num_kv * jnp.arange(batch, dtype=jnp.int32)[:, None]
    work = _Work(starts=ends - count, ends=ends, kv_first=kv_first.reshape(-1))

    def tile(x: Array, block: int, num: int) -> Array:
        """[B, T, ...] -> [B * num, block, ...]; padding tokens (id 0) fill the last tile."""
        if num * block != x.shape[1]:
            x = pad_tokens(x, num * block)
        return x.reshape(batch * num, block, *x.shape[2:])

    q, bad_q = _prepare(
        tile(query, block_q, num_q).reshape(
            batch * num_q, block_q, heads_kv, heads_q // heads_kv, query.shape[-1]
        )
    )
    (k, bad_k), (v, bad_v) = (_prepare(tile(x, block_kv, num_kv)) for x in (key, value))
    bad_kv = bad_k | bad_v
    tiled_q = jax.tree.map(lambda a: tile(a, block_q, num_q), q_segments)
    tiled_kv = jax.tree.map(lambda a: tile(a, block_kv, num_kv), kv_segments)
    most = batch * num_q * num_kv  # no step needs more items than there are tiles
    chunk = 1 if schedule == "serial" else step_tiles(block_q, block_kv, most=most)
    cap = None if logits_soft_cap is None else float(logits_soft_cap)
    tiles = _Tiles(mask_type, window_size, float(scale), chunk, cap)
    out, lse = _flash(tiles, q, k, v, tiled_q, tiled_kv, bad_q, bad_kv, work)
    out = out.transpose(0, 3, 1, 2, 4).reshape(batch, num_q * block_q, heads_q, dim_v)
    lse = lse.transpose(0, 3, 1, 2).reshape(batch, num_q * block_q, heads_q)
    return out[:, :seq_q], lse[:, :seq_q]


class Blockwise(Implementation):
    """The tiled flash loop in plain JAX: every configuration, every backend, O(T·tile) memory.

    Its auxiliary data is the layout's :class:`thdkit.kernels.TileRanges`.
    """

    name = "blockwise"
    features = frozenset({"logits_soft_cap", "prefix"})
    prepares_on_host = True

    def prepare(
        self, q: Segments, kv: Segments, config: AttentionConfig, *, ops: ArrayOps = JAX
    ) -> TileRanges:
        return tile_ranges(
            q,
            kv,
            mask_type=config.mask_type,
            window_size=config.window_size,
            block_q=config.block_q,
            block_kv=config.block_kv,
            ops=ops,
        )

    def forward(self, query, key, value, q, kv, aux, config, *, scale):
        return blockwise_attention(
            query,
            key,
            value,
            q,
            kv,
            aux,
            mask_type=config.mask_type,
            window_size=config.window_size,
            scale=scale,
            logits_soft_cap=config.logits_soft_cap,
        )
