"""The Pallas method: flash-attention kernels that visit only the key tiles of the tile ranges.

Axis legend: B batch, T_q / T_kv query and key/value lengths, H_q / H_kv heads (G = H_q / H_kv
query heads per key/value head), D / D_v head dims, NQ / NK query / key tiles per row.

Three kernels, each on a grid of independent programs (no state carried between programs, as
Triton needs):

- forward: grid ``(B * NQ, H_q)``; program (b·NQ + r, h) holds query tile r of row b, head h, and
  loops over exactly the key tiles ``ranges.lo[b, r] .. ranges.hi[b, r]`` of the plan's
  :class:`thdkit.attention.TileRanges` (online softmax). Query heads are a grid axis: dots stay
  2-D (Triton), programs stay small (registers) and many (occupancy); the G heads of a group read
  the same key tiles one after another, from cache;
- dq: the same grid and loop, recomputing each tile's weights from the saved log-sum-exp;
- dk/dv: grid ``(B * NK, H_kv)``; program (b·NK + c, j) holds key tile c of key/value head j and
  loops over the query tiles that visit it (:func:`visiting_query_tiles`, O(NQ + NK)) and, per
  query tile, over the G query heads of its group: dk and dv sum over those heads, so they are
  accumulated in the kernel rather than written per query head and reduced afterwards.

Inside a tile the mask is rebuilt from ids, positions and document lengths
(:func:`thdkit.masks.pair_mask`), so the result is exact for every valid layout, ring steps
included, and every masked product is a select. Logits and accumulators are float32; the matmul
operands keep the input dtype (bfloat16/float16 weights are rounded to it before the weighted
sums, as flash attention does).

The tile ranges reach the kernels as inputs on GPU (Triton) and through scalar prefetch
(``PrefetchScalarGridSpec``, SMEM) on TPU; in both the kernels read ``lo_ref[program]``. On CPU
the kernels run in Pallas interpret mode (slow: for tests). Isolation of non-finite values is the
blockwise method's: inputs sanitised once (:func:`thdkit.masks.sanitize`), each tile records
whether an allowed key or value was non-finite, such rows come out NaN and pass no gradient.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from thdkit.attention.tiles import TileRanges, pad_tokens
from thdkit.masks import MaskType, Window, pair_mask, sanitize
from thdkit.segments import Segments

__all__ = [
    "check_arrays",
    "check_config",
    "pallas_attention",
    "run",
    "visiting_query_tiles",
]

_BACKENDS = ("cpu", "gpu", "tpu")
# Triton: every loaded block has a power-of-two size and dots need dims >= 16.
_TRITON_MIN = 16
_TRITON_MAX_HEAD_DIM = 256
# TPU: the kernels hold a whole key/value (or query) row of one head in VMEM, double-buffered.
_TPU_VMEM_BUDGET = 16 * 2**20
_TPU_LANES = 128


class _Config(NamedTuple):
    """Static description of one call (hashable: a ``custom_vjp`` non-diff argument)."""

    mask: MaskType
    window: Window
    scale: float
    block_q: int
    block_kv: int
    num_q: int  # query tiles per row
    num_kv: int  # key tiles per row
    groups: int  # G, query heads per key/value head
    interpret: Any  # pallas_call's: False (compiled), True or interpret params
    backend: str  # "tpu": tile ranges through scalar prefetch; "gpu", "cpu": as inputs


# --- Tile bookkeeping ------------------------------------------------------------------------


def visiting_query_tiles(ranges: TileRanges) -> tuple[Int[Array, "B NK"], Int[Array, "B NK"]]:
    """Per key tile, a contiguous range ``[lo, hi)`` of query tiles holding every visitor.

    Query tile r visits key tile c iff ``ranges.lo[b, r] <= c < ranges.hi[b, r]``. The range of c
    runs from the smallest visiting-capable r (one whose ``hi > c``) to the largest (one whose
    ``lo <= c``): a superset of the visitors for any ranges, and exactly their span where ``lo``
    and ``hi`` never decrease along a row (as :func:`thdkit.attention.tile_ranges` makes them).
    One scatter of NQ values into NK bins and one running min / max: O(NQ + NK) per row.

    Args:
        ranges: :class:`thdkit.attention.TileRanges` with int32[B, NQ] ``lo`` and ``hi``.

    Returns:
        ``(lo, hi)``: int32[B, NK] each, query tile indices; ``lo == hi == 0`` where no query tile
        visits the key tile.

    Example:
        >>> ranges = TileRanges(lo=jnp.array([[0, 0, 2, 0]]), hi=jnp.array([[1, 2, 3, 0]]),
        ...                     num_kv_tiles=4, block_q=2, block_kv=2)
        >>> lo, hi = visiting_query_tiles(ranges)
        >>> lo.tolist(), hi.tolist()
        ([[0, 1, 2, 0]], [[2, 2, 3, 0]])
    """
    lo, hi = ranges.lo, ranges.hi
    batch, num_q = lo.shape
    num_kv = ranges.num_kv_tiles
    visits = hi > lo
    rows = jnp.broadcast_to(jnp.arange(batch, dtype=jnp.int32)[:, None], lo.shape)
    tile = jnp.broadcast_to(jnp.arange(num_q, dtype=jnp.int32)[None, :], lo.shape)
    # Bin num_kv is out of range: the scatter drops the tiles that visit nothing.
    last = jnp.where(visits, hi - 1, num_kv)
    first = jnp.where(visits, lo, num_kv)
    smallest = jnp.full((batch, num_kv), num_q, jnp.int32).at[rows, last].min(tile, mode="drop")
    largest = jnp.zeros((batch, num_kv), jnp.int32).at[rows, first].max(tile + 1, mode="drop")
    q_lo = jax.lax.cummin(smallest, axis=1, reverse=True)  # min r with hi[r] > c
    q_hi = jax.lax.cummax(largest, axis=1)  # max r + 1 with lo[r] <= c
    some = q_hi > q_lo
    return jnp.where(some, q_lo, 0), jnp.where(some, q_hi, 0)


# --- Kernels ---------------------------------------------------------------------------------


def _dot(a: Array, b: Array, *, contract: tuple[int, int]) -> Array:
    """A 2-D matmul contracting ``a``'s dim ``contract[0]`` with ``b``'s ``contract[1]``,
    accumulated in float32 (full precision for float32 operands)."""
    return jax.lax.dot_general(
        a,
        b,
        (((contract[0],), (contract[1],)), ((), ())),
        precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )


def _segments(layout_ref, tokens) -> Segments:
    """The Segments of ``tokens`` (a slice) of a layout block [3, tokens]: ids, positions and
    lengths, one row each."""
    return Segments(layout_ref[0, tokens], layout_ref[1, tokens], layout_ref[2, tokens])


def _slice(index: Array, block: int) -> Any:
    return pl.ds(pl.multiple_of(index * block, block), block)


def _forward_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, *refs, config: _Config):
    """Online softmax of one query tile and head over its key tiles ``lo .. hi``.

    Blocks: q [block_q, D]; k, v [T_kv_pad, D or D_v] (the row of its key/value head); layout
    [3, block_q] and [3, T_kv_pad]; flags [1, block_q], [1, T_kv_pad]. Writes the
    normalised output [block_q, D_v], the log-sum-exp and the poisoned flag [1, block_q].
    """
    q_layout, kv_layout, bad_q_ref, bad_kv_ref, out_ref, lse_ref, poisoned_ref = refs
    program = pl.program_id(0)
    block_q, block_kv = config.block_q, config.block_kv
    q = q_ref[...]
    q_side = _segments(q_layout, slice(None))

    def visit(c, carry):
        acc, row_max, total, hits = carry
        keys = _slice(c, block_kv)
        logits = config.scale * _dot(q, k_ref[keys, :], contract=(1, 1))
        allowed = pair_mask(
            q_side,
            _segments(kv_layout, keys),
            mask_type=config.mask,
            window_size=config.window,
        )
        bad = jnp.where(allowed, bad_kv_ref[0, keys][None, :], 0.0)
        hits = jnp.maximum(hits, jnp.max(bad, axis=1))
        logits = jnp.where(allowed, logits, -jnp.inf)
        new_max = jnp.maximum(row_max, jnp.max(logits, axis=1))
        # A row with nothing allowed so far keeps max -inf; exp must then see a finite shift.
        shift = jnp.where(new_max == -jnp.inf, 0.0, new_max)
        weights = jnp.exp(logits - shift[:, None])
        rescale = jnp.exp(row_max - shift)
        total = rescale * total + jnp.sum(weights, axis=1)
        v = v_ref[keys, :]
        acc = rescale[:, None] * acc + _dot(weights.astype(v.dtype), v, contract=(1, 0))
        return acc, new_max, total, hits

    init = (
        jnp.zeros((block_q, v_ref.shape[-1]), jnp.float32),  # unnormalised output
        jnp.full((block_q,), -jnp.inf, jnp.float32),  # running max of the logits
        jnp.zeros((block_q,), jnp.float32),  # running sum of exp(logit - max)
        jnp.zeros((block_q,), jnp.float32),  # 1 where an allowed key or value was non-finite
    )
    acc, row_max, total, hits = jax.lax.fori_loop(lo_ref[program], hi_ref[program], visit, init)
    visited = total > 0
    safe_total = jnp.where(visited, total, 1.0)
    out_ref[...] = acc / safe_total[:, None]
    lse_ref[0, :] = jnp.where(visited, row_max + jnp.log(safe_total), -jnp.inf)
    poisoned = visited & ((hits > 0) | (bad_q_ref[0, :] > 0))
    poisoned_ref[0, :] = jnp.where(poisoned, 1.0, 0.0)


def _tile_weights(config: _Config, q, k, lse, allowed):
    """Softmax weights of a tile from the saved log-sum-exp: float32[block_q, block_kv]."""
    logits = config.scale * _dot(q, k, contract=(1, 1))
    return jnp.where(allowed, jnp.exp(logits - lse[:, None]), 0.0)


def _tile_logit_grads(config: _Config, weights, d_out, v, row_term, allowed):
    """d logit = scale * p * (d_out . v + row_term) on allowed pairs, 0 elsewhere."""
    d_weights = _dot(d_out, v, contract=(1, 1))
    return jnp.where(allowed, config.scale * weights * (d_weights + row_term[:, None]), 0.0)


def _dq_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, *refs, config: _Config):
    """dq of one query tile and head over its key tiles ``lo .. hi``."""
    q_layout, kv_layout, d_out_ref, lse_ref, term_ref, dq_ref = refs
    program = pl.program_id(0)
    q, d_out = q_ref[...], d_out_ref[...]
    lse, row_term = lse_ref[0, :], term_ref[0, :]
    q_side = _segments(q_layout, slice(None))

    def visit(c, dq):
        keys = _slice(c, config.block_kv)
        k = k_ref[keys, :]
        allowed = pair_mask(
            q_side,
            _segments(kv_layout, keys),
            mask_type=config.mask,
            window_size=config.window,
        )
        weights = _tile_weights(config, q, k, lse, allowed)
        d_logits = _tile_logit_grads(config, weights, d_out, v_ref[keys, :], row_term, allowed)
        return dq + _dot(d_logits.astype(k.dtype), k, contract=(1, 0))

    init = jnp.zeros(q.shape, jnp.float32)
    dq_ref[...] = jax.lax.fori_loop(lo_ref[program], hi_ref[program], visit, init)


def _dkv_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, *refs, config: _Config):
    """dk and dv of one key tile and key/value head over the query tiles ``lo .. hi`` that visit
    it and the G query heads of its group.

    Blocks: q [G, T_q_pad, D], d_out [G, T_q_pad, D_v], lse and row terms [G, 1, T_q_pad] (the
    group's rows); k, v [block_kv, D or D_v]; layout [3, T_q_pad] and [3, block_kv].
    """
    q_layout, kv_layout, d_out_ref, lse_ref, term_ref, dk_ref, dv_ref = refs
    program = pl.program_id(0)
    k, v = k_ref[...], v_ref[...]
    kv_side = _segments(kv_layout, slice(None))

    def visit(r, carry):
        rows = _slice(r, config.block_q)
        allowed = pair_mask(
            _segments(q_layout, rows),
            kv_side,
            mask_type=config.mask,
            window_size=config.window,
        )

        def head(g, carry):
            dk, dv = carry
            q, d_out = q_ref[g, rows, :], d_out_ref[g, rows, :]
            weights = _tile_weights(config, q, k, lse_ref[g, 0, rows], allowed)
            dv = dv + _dot(weights.astype(d_out.dtype), d_out, contract=(0, 0))
            d_logits = _tile_logit_grads(config, weights, d_out, v, term_ref[g, 0, rows], allowed)
            return dk + _dot(d_logits.astype(q.dtype), q, contract=(0, 0)), dv

        return jax.lax.fori_loop(0, config.groups, head, carry)

    init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = jax.lax.fori_loop(lo_ref[program], hi_ref[program], visit, init)
    dk_ref[...], dv_ref[...] = dk, dv


# --- pallas_call plumbing --------------------------------------------------------------------


def _call(
    kernel, config: _Config, *, grid, tiles, inputs, in_specs, out_specs, out_shape, name
) -> Any:
    """Runs ``kernel`` with the tile ranges ``tiles`` (two int32 vectors, one entry per program
    of grid axis 0) first: scalar prefetch on TPU, plain whole-array inputs elsewhere. Compiled,
    GPU kernels go to Triton (JAX's default GPU lowering is Mosaic GPU), TPU kernels to Mosaic
    with every grid axis parallel."""
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas import triton as pltriton

    kernel = functools.partial(kernel, config=config)
    options: dict[str, Any] = dict(out_shape=out_shape, interpret=config.interpret, name=name)
    if config.interpret is False and config.backend == "gpu":
        options["compiler_params"] = pltriton.CompilerParams(num_warps=4, num_stages=2)
    if config.interpret is False and config.backend == "tpu":
        options["compiler_params"] = pltpu.CompilerParams(
            dimension_semantics=("parallel",) * len(grid)
        )
    if config.backend == "tpu":
        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(tiles), grid=grid, in_specs=in_specs, out_specs=out_specs
        )
        return pl.pallas_call(kernel, grid_spec=grid_spec, **options)(*tiles, *inputs)
    whole = [pl.BlockSpec(t.shape, lambda *_: (0,)) for t in tiles]
    return pl.pallas_call(
        kernel, grid=grid, in_specs=[*whole, *in_specs], out_specs=out_specs, **options
    )(*tiles, *inputs)


def _layout_specs(q_block: tuple[int, Any], kv_block: tuple[int, Any], batch_of) -> list[Any]:
    """BlockSpecs of the two layout arrays int32[B, 3, T_pad]: ``q_block`` / ``kv_block`` are
    (size, tile-index function of the program) of each side's token block; ``batch_of`` maps a
    program to its row."""

    def spec(size, index):
        return pl.BlockSpec((None, 3, size), lambda i, h, *_: (batch_of(i), 0, index(i)))

    return [spec(*q_block), spec(*kv_block)]


class _QueryGrid(NamedTuple):
    """BlockSpecs of the grid ``(B * NQ, H_q)`` the forward and dq kernels share: program
    ``(b * NQ + r, h)`` holds query tile r of row b, head h, and the rows of key/value head
    ``h // G``."""

    per_query: Any  # width -> spec of [B, H_q, T_q_pad, width], block [block_q, width]
    per_key: Any  # width -> spec of [B, H_kv, T_kv_pad, width], the whole row
    query_stats: Any  # spec of [B, H_q, 1, T_q_pad], block [1, block_q]
    key_stats: Any  # spec of [B, H_kv, 1, T_kv_pad], the whole row
    layout: list[Any]  # specs of the two layout arrays


def _query_grid(config: _Config, seq_kv: int) -> _QueryGrid:
    nq, bq, groups = config.num_q, config.block_q, config.groups

    def row(i):
        return jax.lax.div(i, nq)

    def tile(i):
        return jax.lax.rem(i, nq)

    return _QueryGrid(
        per_query=lambda width: pl.BlockSpec(
            (None, None, bq, width), lambda i, h, *_: (row(i), h, tile(i), 0)
        ),
        per_key=lambda width: pl.BlockSpec(
            (None, None, seq_kv, width), lambda i, h, *_: (row(i), jax.lax.div(h, groups), 0, 0)
        ),
        query_stats=pl.BlockSpec((None, None, 1, bq), lambda i, h, *_: (row(i), h, 0, tile(i))),
        key_stats=pl.BlockSpec(
            (None, None, 1, seq_kv), lambda i, h, *_: (row(i), jax.lax.div(h, groups), 0, 0)
        ),
        layout=_layout_specs((bq, tile), (seq_kv, lambda i: 0), row),
    )


def _forward(config: _Config, q, k, v, layout: tuple[Array, Array], bad_q, bad_kv, lo, hi):
    """The forward kernel: (out [B, H_q, T_q_pad, D_v], lse and poisoned [B, H_q, 1, T_q_pad]),
    float32, nothing poisoned yet."""
    batch, heads_q, seq_q, dim = q.shape
    dim_v = v.shape[3]
    specs = _query_grid(config, v.shape[2])
    stats = jax.ShapeDtypeStruct((batch, heads_q, 1, seq_q), jnp.float32)
    return _call(
        _forward_kernel,
        config,
        grid=(batch * config.num_q, heads_q),
        tiles=(lo, hi),
        inputs=(q, k, v, *layout, bad_q, bad_kv),
        in_specs=[
            specs.per_query(dim),
            specs.per_key(dim),
            specs.per_key(dim_v),
            *specs.layout,
            specs.query_stats,
            specs.key_stats,
        ],
        out_specs=[specs.per_query(dim_v), specs.query_stats, specs.query_stats],
        out_shape=[jax.ShapeDtypeStruct((batch, heads_q, seq_q, dim_v), jnp.float32), stats, stats],
        name="thdkit_pallas_forward",
    )


def _dq(config: _Config, q, k, v, layout: tuple[Array, Array], d_out, lse, row_term, lo, hi):
    """The dq kernel: float32[B, H_q, T_q_pad, D]."""
    batch, heads_q, _, dim = q.shape
    specs = _query_grid(config, v.shape[2])
    return _call(
        _dq_kernel,
        config,
        grid=(batch * config.num_q, heads_q),
        tiles=(lo, hi),
        inputs=(q, k, v, *layout, d_out, lse, row_term),
        in_specs=[
            specs.per_query(dim),
            specs.per_key(dim),
            specs.per_key(v.shape[3]),
            *specs.layout,
            specs.per_query(v.shape[3]),
            specs.query_stats,
            specs.query_stats,
        ],
        out_specs=specs.per_query(dim),
        out_shape=jax.ShapeDtypeStruct(q.shape, jnp.float32),
        name="thdkit_pallas_dq",
    )


def _dkv(config: _Config, q, k, v, layout: tuple[Array, Array], d_out, lse, row_term, lo, hi):
    """The dk/dv kernel: float32[B, H_kv, T_kv_pad, D] and [B, H_kv, T_kv_pad, D_v]."""
    batch, heads_kv, _, dim = k.shape
    dim_v = v.shape[3]
    seq_q = q.shape[2]
    nk, bk, groups = config.num_kv, config.block_kv, config.groups

    def row(i):
        return jax.lax.div(i, nk)

    def tile(i):
        return jax.lax.rem(i, nk)

    def grouped(x):
        """[B, H_q, ...] -> [B, H_kv, G, ...]: query head h is head h % G of group h // G."""
        return x.reshape(batch, heads_kv, groups, *x.shape[2:])

    def per_group(width):
        return pl.BlockSpec(
            (None, None, groups, seq_q, width), lambda i, h, *_: (row(i), h, 0, 0, 0)
        )

    def per_key(width):
        return pl.BlockSpec((None, None, bk, width), lambda i, h, *_: (row(i), h, tile(i), 0))

    stats = pl.BlockSpec((None, None, groups, 1, seq_q), lambda i, h, *_: (row(i), h, 0, 0, 0))
    return _call(
        _dkv_kernel,
        config,
        grid=(batch * nk, heads_kv),
        tiles=(lo, hi),
        inputs=(grouped(q), k, v, *layout, grouped(d_out), grouped(lse), grouped(row_term)),
        in_specs=[
            per_group(dim),
            per_key(dim),
            per_key(dim_v),
            *_layout_specs((seq_q, lambda i: 0), (bk, tile), row),
            per_group(dim_v),
            stats,
            stats,
        ],
        out_specs=[per_key(dim), per_key(dim_v)],
        out_shape=[
            jax.ShapeDtypeStruct(k.shape, jnp.float32),
            jax.ShapeDtypeStruct(v.shape, jnp.float32),
        ],
        name="thdkit_pallas_dkv",
    )


# --- Custom VJP ------------------------------------------------------------------------------


def _poison(out, lse, poisoned):
    bad = poisoned > 0
    return jnp.where(jnp.moveaxis(bad, 2, 3), jnp.nan, out), jnp.where(bad, jnp.nan, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(config: _Config, q, k, v, layout, bad_q, bad_kv, lo, hi):
    return _poison(*_forward(config, q, k, v, layout, bad_q, bad_kv, lo, hi))


def _flash_fwd(config: _Config, q, k, v, layout, bad_q, bad_kv, lo, hi):
    out, lse, poisoned = _forward(config, q, k, v, layout, bad_q, bad_kv, lo, hi)
    residuals = (q, k, v, layout, lo, hi, out, lse, poisoned)
    return _poison(out, lse, poisoned), residuals


def _flash_bwd(config: _Config, residuals, cotangents):
    q, k, v, layout, lo, hi, out, lse, poisoned = residuals
    bad = poisoned > 0
    # Poisoned rows pass nothing back: their cotangents are selected away.
    d_out = jnp.where(jnp.moveaxis(bad, 2, 3), 0.0, cotangents[0])
    d_lse = jnp.where(bad, 0.0, cotangents[1])
    # d logit = p * (d_out . v - d_out . out + d_lse); the row term is computed once here.
    row_term = d_lse - jnp.moveaxis(jnp.sum(d_out * out, axis=-1, keepdims=True), 3, 2)
    safe_lse = jnp.where(lse == -jnp.inf, 0.0, lse)
    d_out = d_out.astype(q.dtype)
    dq = _dq(config, q, k, v, layout, d_out, safe_lse, row_term, lo, hi)
    ranges = TileRanges(
        lo=lo.reshape(-1, config.num_q),
        hi=hi.reshape(-1, config.num_q),
        num_kv_tiles=config.num_kv,
        block_q=config.block_q,
        block_kv=config.block_kv,
    )
    q_lo, q_hi = visiting_query_tiles(ranges)
    dk, dv = _dkv(
        config, q, k, v, layout, d_out, safe_lse, row_term, q_lo.reshape(-1), q_hi.reshape(-1)
    )
    grads = tuple(g.astype(x.dtype) for g, x in zip((dq, dk, dv), (q, k, v), strict=True))
    return (*grads, None, None, None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


# --- Entry points ----------------------------------------------------------------------------


def _backend_problem(backend: str) -> str | None:
    if backend not in _BACKENDS:
        return f"runs on CPU (interpret mode), GPU (Triton) or TPU (Mosaic), not on {backend}"
    return None


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _check_compiled_tiles(backend: str, ranges: TileRanges, seq_q: int) -> None:
    """NotImplementedError where the compiled kernels cannot take the plan's tile sizes."""
    blocks = dict(block_q=ranges.block_q, block_kv=ranges.block_kv)
    if backend == "gpu":
        wrong = {k: b for k, b in blocks.items() if b < _TRITON_MIN or b & (b - 1)}
        if wrong:
            raise NotImplementedError(
                f"on GPU (Triton) needs tile sizes that are powers of two >= {_TRITON_MIN} "
                f"(after capping to T), got {wrong}; plan with such block_q/block_kv"
            )
    if backend == "tpu":
        tiles = dict(block_q=-(-seq_q // ranges.block_q), block_kv=ranges.num_kv_tiles)
        wrong = {k: b for k, b in blocks.items() if b % _TPU_LANES and tiles[k] > 1}
        if wrong:
            raise NotImplementedError(
                f"on TPU needs tile sizes that are multiples of {_TPU_LANES} (or one tile per "
                f"row), got {wrong}"
            )


def pallas_attention(
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
    interpret: Any = None,
    backend: str | None = None,
) -> tuple[Float[Array, "B T_q H_q D_v"], Float[Array, "B T_q H_q"]]:
    """Flash attention in Pallas kernels over precomputed tile ranges: ``(out, lse)``.

    The same function as :func:`thdkit.attention.blockwise.blockwise_attention` (same
    semantics, isolation of non-finite values and return values), computed by the kernels of
    this module. Differentiable with respect to query, key and value (custom VJP: a dq kernel
    and a dk/dv kernel), including through ``lse``. Nothing of the layout is recomputed; the
    tile sizes are read off ``ranges``.

    Args:
        query: float32/bfloat16/float16[B, T_q, H_q, D].
        key: [B, T_kv, H_kv, D], the query's dtype; ``H_q`` a multiple of ``H_kv``.
        value: [B, T_kv, H_kv, D_v], the query's dtype.
        q_segments: the queries' :class:`thdkit.Segments`, int32[B, T_q] fields (``lengths`` as
            the bottom-right rule reads them: run lengths, or global document lengths in a
            context-parallel shard).
        kv_segments: the keys'/values', int32[B, T_kv] fields.
        ranges: :class:`thdkit.attention.TileRanges` of this layout (``tile_ranges``).
        mask_type: a parsed ``MaskType``.
        window_size: a parsed window (:func:`thdkit.masks.check_window`).
        scale: multiplies the logits.
        interpret: True runs the kernels in Pallas interpret mode, False compiles them; None
            means interpret mode exactly when ``backend`` is ``"cpu"`` (the only mode there). A
            Pallas interpret-params object (``pltpu.InterpretParams()``, which emulates TPU
            memory spaces on CPU) is passed on to ``pallas_call`` as it is.
        backend: the platform whose kernels to build: ``"gpu"`` (tile ranges as kernel inputs;
            compiled by Triton), ``"tpu"`` (tile ranges through scalar prefetch; compiled by
            Mosaic) or ``"cpu"`` (the GPU kernels, interpreted); None means
            ``jax.default_backend()``. Another platform than the default one serves
            ``jax.export`` to that platform, or its interpreter (``"tpu"`` with
            ``interpret=pltpu.InterpretParams()``).

    Returns:
        ``(out, lse)``: float32[B, T_q, H_q, D_v], normalised over the allowed keys (zeros where
        none is); float32[B, T_q, H_q], their log-sum-exp (-inf where none is). Rows that read a
        non-finite query, key or value element are NaN in both.

    Raises:
        ValueError: ``ranges`` that do not fit the arrays (tile counts, batch size), an unknown
            ``backend``.
        NotImplementedError: compiled (not interpret) on CPU, or tile sizes the compiled
            kernels cannot take (GPU: powers of two >= 16; TPU: multiples of 128 or one tile
            per row).

    Example:
        >>> from thdkit.attention import tile_ranges
        >>> side = Segments.from_ids(jnp.array([[1, 1, 2, 2]]))
        >>> ranges = tile_ranges(side, side, mask_type=MaskType.CAUSAL, window_size=None,
        ...                      block_q=2, block_kv=2)
        >>> v = jnp.arange(4.0).reshape(1, 4, 1, 1)
        >>> out, lse = pallas_attention(jnp.zeros((1, 4, 1, 1)), jnp.zeros((1, 4, 1, 1)), v,
        ...     side, side, ranges, mask_type=MaskType.CAUSAL, window_size=None, scale=1.0)
        >>> out[0, :, 0, 0]
        Array([0. , 0.5, 2. , 2.5], dtype=float32)
        >>> jnp.exp(lse[0, :, 0])
        Array([1., 2., 1., 2.], dtype=float32)
    """
    if backend is None:
        backend = jax.default_backend()
    elif backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(_BACKENDS)} or None, got {backend!r}")
    if interpret is None:
        interpret = backend == "cpu"
    interpreting = interpret is not False
    batch, seq_q, heads_q, dim = query.shape
    _, seq_kv, heads_kv, dim_v = value.shape
    block_q, block_kv = ranges.block_q, ranges.block_kv
    num_q, num_kv = -(-seq_q // block_q), -(-seq_kv // block_kv)
    if ranges.lo.shape != (batch, num_q) or ranges.num_kv_tiles != num_kv:
        raise ValueError(
            f"ranges (lo {ranges.lo.shape}, {ranges.num_kv_tiles} key tiles of {block_kv}) do "
            f"not fit B={batch}, T_q={seq_q} in tiles of {block_q} and T_kv={seq_kv}: expected "
            f"lo {(batch, num_q)} and {num_kv} key tiles"
        )
    if not interpreting:
        if backend == "cpu":
            raise NotImplementedError(
                "pallas attention runs compiled on GPU or TPU only; on CPU use interpret mode"
            )
        _check_compiled_tiles(backend, ranges, seq_q)
    if batch == 0:
        return (
            jnp.zeros((0, seq_q, heads_q, dim_v), jnp.float32),
            jnp.zeros((0, seq_q, heads_q), jnp.float32),
        )
    # Triton loads power-of-two blocks: zero columns leave q . k unchanged and are cut off.
    padded_dim, padded_dim_v = dim, dim_v
    if backend == "gpu" and not interpreting:
        padded_dim = _next_power_of_two(max(dim, _TRITON_MIN))
        padded_dim_v = _next_power_of_two(max(dim_v, _TRITON_MIN))
    (query, bad_q), (key, bad_k), (value, bad_v) = (sanitize(x) for x in (query, key, value))

    def head_major(x: Array, length: int, width: int) -> Array:
        """[B, T, H, d] -> [B, H, length, width], zeros appended."""
        x = jnp.pad(pad_tokens(x, length), ((0, 0), (0, 0), (0, 0), (0, width - x.shape[-1])))
        return x.transpose(0, 2, 1, 3)

    def flags(bad: Array, length: int) -> Array:
        """bool[B, T, H] -> float32[B, H, 1, length], 1 where non-finite."""
        return pad_tokens(bad, length).transpose(0, 2, 1)[:, :, None, :].astype(jnp.float32)

    def rows(side: Segments, length: int) -> Array:
        """int32[B, 3, length]: ids, positions and lengths, padding (zeros) appended."""
        fields = (side.ids, side.positions, side.lengths)
        return pad_tokens(jnp.stack(fields, axis=-1).astype(jnp.int32), length).transpose(0, 2, 1)

    seq_q_pad, seq_kv_pad = num_q * block_q, num_kv * block_kv
    config = _Config(
        mask=mask_type,
        window=window_size,
        scale=float(scale),
        block_q=block_q,
        block_kv=block_kv,
        num_q=num_q,
        num_kv=num_kv,
        groups=heads_q // heads_kv,
        interpret=interpret,
        backend=backend,
    )
    out, lse = _flash(
        config,
        head_major(query, seq_q_pad, padded_dim),
        head_major(key, seq_kv_pad, padded_dim),
        head_major(value, seq_kv_pad, padded_dim_v),
        (rows(q_segments, seq_q_pad), rows(kv_segments, seq_kv_pad)),
        flags(bad_q, seq_q_pad),
        flags(bad_k | bad_v, seq_kv_pad),
        ranges.lo.reshape(-1).astype(jnp.int32),
        ranges.hi.reshape(-1).astype(jnp.int32),
    )
    out = out.transpose(0, 2, 1, 3)[:, :seq_q, :, :dim_v]
    lse = lse[:, :, 0, :seq_q].transpose(0, 2, 1)
    return out, lse


def check_config(*, mask_type: MaskType, window_size: Window, self_attention: bool) -> None:
    """Raises NotImplementedError where the backend has no Pallas kernels; every mask type,
    window and cross-attention runs.

    Args:
        mask_type: a parsed ``MaskType``.
        window_size: a parsed window.
        self_attention: whether the key layout is the query's.

    Raises:
        NotImplementedError: the default backend is none of CPU (interpret mode), GPU, TPU.

    Example:
        >>> check_config(mask_type=MaskType.CAUSAL, window_size=(4, 0), self_attention=False)
    """
    del mask_type, window_size, self_attention
    problem = _backend_problem(jax.default_backend())
    if problem:
        raise NotImplementedError(problem)


def check_arrays(query: Array, key: Array, value: Array) -> None:
    """Raises NotImplementedError where the kernels cannot take these arrays on this backend.

    CPU (interpret mode) takes every checked input. GPU (Triton): head dims up to 256 (padded
    to a power of two >= 16 inside). TPU: bfloat16 or float32, and one head's key and value
    rows (and a group's query rows) must fit in VMEM, double-buffered.

    Args:
        query, key, value: the checked attention inputs, [B, T, H, D] / [B, T, H, D_v].

    Raises:
        NotImplementedError: the reason these arrays cannot run here.

    Example:
        >>> x = jnp.zeros((1, 8, 2, 16))
        >>> check_arrays(x, x, x)
    """
    backend = jax.default_backend()
    problem = _backend_problem(backend)
    if problem:
        raise NotImplementedError(problem)
    dims = (query.shape[-1], value.shape[-1])
    if backend == "gpu" and max(dims) > _TRITON_MAX_HEAD_DIM:
        raise NotImplementedError(
            f"on GPU needs head dims of at most {_TRITON_MAX_HEAD_DIM}, got D, D_v = {dims}"
        )
    if backend == "tpu":
        if query.dtype == jnp.float16:
            raise NotImplementedError("on TPU takes bfloat16 or float32, not float16")
        groups = query.shape[2] // key.shape[2]
        # The longest row a kernel holds (keys, or a group's queries in the dk/dv kernel), its
        # vectors plus 16 bytes per token of layout and flags, double-buffered.
        rows = max(key.shape[1], groups * query.shape[1])
        needed = 2 * rows * (sum(dims) * query.dtype.itemsize + 16)
        if needed > _TPU_VMEM_BUDGET:
            raise NotImplementedError(
                f"on TPU holds one head's rows in VMEM: {needed} bytes for T_kv={key.shape[1]}, "
                f"G*T_q={groups * query.shape[1]}, D + D_v={sum(dims)} exceed "
                f"{_TPU_VMEM_BUDGET}"
            )


def run(query: Array, key: Array, value: Array, plan: Any, *, scale: float) -> Array:
    """The candidate's entry: :func:`pallas_attention` on an ``AttentionPlan``'s fields, the
    output cast to the query's dtype.

    Args:
        query, key, value: the checked attention inputs.
        plan: an ``AttentionPlan`` holding tile ranges.
        scale: multiplies the logits.

    Returns:
        [B, T_q, H_q, D_v] in the query's dtype.
    """
    out, _ = pallas_attention(
        query,
        key,
        value,
        plan.q_segments,
        plan.kv_segments,
        plan.ranges,
        mask_type=plan.mask_type,
        window_size=plan.window_size,
        scale=scale,
    )
    return out.astype(query.dtype)
