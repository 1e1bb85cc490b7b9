"""The Pallas kernels of :mod:`thdkit._src.kernels.pallas` and the ``pallas_call`` plumbing that
launches them: forward, dq and dk/dv, each over precomputed tile ranges.

Axis legend as in :mod:`thdkit._src.kernels.pallas`. The launchers take head-major, token-padded
arrays (``[B, H, T_pad, D]``), the layouts stacked as int32[B, 3, T_pad] (ids, positions, document
lengths) and the tile ranges flattened to one entry per program of grid axis 0; they return
float32 results with nothing poisoned (the caller applies the isolation rule).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array

from thdkit._src.kernels import soft_cap
from thdkit._src.kernels.flash_vjp import match_varying, varying_axes
from thdkit._src.mask_types import MaskType, Window
from thdkit._src.masks import pair_mask
from thdkit._src.segments import Segments

__all__ = ["KernelConfig", "run_dkv", "run_dq", "run_forward"]


class KernelConfig(NamedTuple):
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
    cap: float | None = None  # the logits' soft cap

    @property
    def unit(self) -> float:
        """What multiplies the tile values into logits (:func:`~.soft_cap.unit`)."""
        return soft_cap.unit(scale=self.scale, cap=self.cap)


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


def _dots(config: KernelConfig, q: Array, k: Array) -> Array:
    """A tile's values (:func:`~.soft_cap.tile_values`: logits over ``config.unit``),
    float32[block_q, block_kv]."""
    return soft_cap.tile_values(_dot(q, k, contract=(1, 1)), scale=config.scale, cap=config.cap)


def _exponents(config: KernelConfig, dots: Array, shift: Array) -> Array:
    """:func:`~.soft_cap.exponents` of the tile values."""
    return soft_cap.exponents(dots, shift, scale=config.scale, cap=config.cap)


def _segments(layout_ref, tokens) -> Segments:
    """The Segments of ``tokens`` (a slice) of a layout block [3, tokens]: ids, positions and
    lengths, one row each."""
    return Segments(layout_ref[0, tokens], layout_ref[1, tokens], layout_ref[2, tokens])


def _slice(index: Array, block: int) -> Any:
    return pl.ds(pl.multiple_of(index * block, block), block)


def _forward_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, *refs, config: KernelConfig):
    """Online softmax of one query tile and head over its key tiles ``lo .. hi``.

    Blocks: q [block_q, D]; k, v [T_kv_pad, D or D_v] (the row of its key/value head); layout
    [3, block_q] and [3, T_kv_pad]; flags [1, block_q], [1, T_kv_pad]. Writes the
    normalised output [block_q, D_v], and per query row [1, block_q] the log-sum-exp, the
    poisoned flag, the largest logit over ``config.unit`` and the sum of the exponentials.
    """
    q_layout, kv_layout, bad_q_ref, bad_kv_ref, out_ref, lse_ref, poisoned_ref = refs[:7]
    max_ref, sum_ref = refs[7:]
    program = pl.program_id(0)
    block_q, block_kv = config.block_q, config.block_kv
    q = q_ref[...]
    q_side = _segments(q_layout, slice(None))

    def visit(c, carry):
        acc, row_max, total, hits = carry
        keys = _slice(c, block_kv)
        dots = _dots(config, q, k_ref[keys, :])
        allowed = pair_mask(
            q_side,
            _segments(kv_layout, keys),
            mask_type=config.mask,
            window_size=config.window,
        )
        bad = jnp.where(allowed, bad_kv_ref[0, keys][None, :], 0.0)
        hits = jnp.maximum(hits, jnp.max(bad, axis=1))
        dots = jnp.where(allowed, dots, -jnp.inf)
        new_max = jnp.maximum(row_max, jnp.max(dots, axis=1))
        # A row with nothing allowed so far keeps max -inf; exp must then see a finite shift.
        shift = jnp.where(new_max == -jnp.inf, 0.0, new_max)
        weights = jnp.exp(_exponents(config, dots, shift[:, None]))
        rescale = jnp.exp(_exponents(config, row_max, shift))
        total = rescale * total + jnp.sum(weights, axis=1)
        v = v_ref[keys, :]
        acc = rescale[:, None] * acc + _dot(weights.astype(v.dtype), v, contract=(1, 0))
        return acc, new_max, total, hits

    init = (
        jnp.zeros((block_q, v_ref.shape[-1]), jnp.float32),  # unnormalised output
        jnp.full((block_q,), -jnp.inf, jnp.float32),  # running max of the logits / unit
        jnp.zeros((block_q,), jnp.float32),  # running sum of exp(logit - max)
        jnp.zeros((block_q,), jnp.float32),  # 1 where an allowed key or value was non-finite
    )
    acc, row_max, total, hits = jax.lax.fori_loop(lo_ref[program], hi_ref[program], visit, init)
    visited = total > 0
    safe_total = jnp.where(visited, total, 1.0)
    out_ref[...] = acc / safe_total[:, None]
    lse_ref[0, :] = jnp.where(visited, config.unit * row_max + jnp.log(safe_total), -jnp.inf)
    poisoned = visited & ((hits > 0) | (bad_q_ref[0, :] > 0))
    poisoned_ref[0, :] = jnp.where(poisoned, 1.0, 0.0)
    max_ref[0, :] = row_max
    sum_ref[0, :] = total


def _tile_weights(config: KernelConfig, q, k, row_max, inverse_sum, allowed):
    """Softmax weights of a tile from the forward's row maxima and (inverse) sums, exactly
    ``1 / sum`` at a row's largest logit, and the tile values of :func:`_dots` they come from:
    float32[block_q, block_kv] each."""
    values = _dots(config, q, k)
    # Clamped at 0: a recomputed dot can never weigh more than the forward's largest.
    exponents = jnp.minimum(_exponents(config, values, row_max[:, None]), 0.0)
    return jnp.where(allowed, jnp.exp(exponents) * inverse_sum[:, None], 0.0), values


def _tile_logit_grads(config: KernelConfig, weights, values, d_out, v, row_term, allowed):
    """d dot = d logit / d dot * p * (d_out . v + row_term) on allowed pairs, 0 elsewhere
    (:func:`~.soft_cap.d_dots` at the tile values)."""
    d_weights = _dot(d_out, v, contract=(1, 1))
    d_logits = weights * (d_weights + row_term[:, None])
    scale, cap = config.scale, config.cap
    return jnp.where(allowed, soft_cap.d_dots(values, scale=scale, cap=cap) * d_logits, 0.0)


def _dq_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, *refs, config: KernelConfig):
    """dq of one query tile and head over its key tiles ``lo .. hi``."""
    q_layout, kv_layout, d_out_ref, max_ref, inverse_ref, term_ref, dq_ref = refs
    program = pl.program_id(0)
    q, d_out = q_ref[...], d_out_ref[...]
    row_max, inverse_sum, row_term = max_ref[0, :], inverse_ref[0, :], term_ref[0, :]
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
        weights, values = _tile_weights(config, q, k, row_max, inverse_sum, allowed)
        d_logits = _tile_logit_grads(
            config, weights, values, d_out, v_ref[keys, :], row_term, allowed
        )
        return dq + _dot(d_logits.astype(k.dtype), k, contract=(1, 0))

    init = jnp.zeros(q.shape, jnp.float32)
    dq_ref[...] = jax.lax.fori_loop(lo_ref[program], hi_ref[program], visit, init)


def _dkv_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, *refs, config: KernelConfig):
    """dk and dv of one key tile and key/value head over the query tiles ``lo .. hi`` that visit
    it and the G query heads of its group.

    Blocks: q [G, T_q_pad, D], d_out [G, T_q_pad, D_v], row maxima, inverse sums and row terms
    [G, 1, T_q_pad] (the group's rows); k, v [block_kv, D or D_v]; layout [3, T_q_pad] and
    [3, block_kv].
    """
    q_layout, kv_layout, d_out_ref, max_ref, inverse_ref, term_ref, dk_ref, dv_ref = refs
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
            weights, values = _tile_weights(
                config, q, k, max_ref[g, 0, rows], inverse_ref[g, 0, rows], allowed
            )
            dv = dv + _dot(weights.astype(d_out.dtype), d_out, contract=(0, 0))
            d_logits = _tile_logit_grads(
                config, weights, values, d_out, v, term_ref[g, 0, rows], allowed
            )
            return dk + _dot(d_logits.astype(q.dtype), q, contract=(0, 0)), dv

        return jax.lax.fori_loop(0, config.groups, head, carry)

    init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = jax.lax.fori_loop(lo_ref[program], hi_ref[program], visit, init)
    dk_ref[...], dv_ref[...] = dk, dv


# --- pallas_call plumbing --------------------------------------------------------------------


def _call(
    kernel, config: KernelConfig, *, grid, tiles, inputs, in_specs, out_specs, out_shape, name
) -> Any:
    """Runs ``kernel`` with the tile ranges ``tiles`` (two int32 vectors, one entry per program
    of grid axis 0) first: scalar prefetch on TPU, plain whole-array inputs elsewhere. Compiled,
    GPU kernels go to Triton (JAX's default GPU lowering is Mosaic GPU), TPU kernels to Mosaic
    with every grid axis parallel. Inside a ``jax.shard_map`` the inputs and results vary over
    the mesh axes any input varies over (``pallas_call`` needs them stated)."""
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas import triton as pltriton

    axes = varying_axes(tiles, inputs)
    if axes:
        tiles, inputs = match_varying((tiles, inputs), axes)
        out_shape = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(
                s.shape, s.dtype, manual_axis_type=jax.sharding.ManualAxisType(varying=axes)
            ),
            out_shape,
        )
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


def _query_grid(config: KernelConfig, seq_kv: int) -> _QueryGrid:
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


def run_forward(config: KernelConfig, q, k, v, layout: tuple[Array, Array], bad_q, bad_kv, lo, hi):
    """The forward kernel: (out [B, H_q, T_q_pad, D_v], then lse, poisoned, row max over
    ``config.unit`` and row sum, each [B, H_q, 1, T_q_pad]), float32, nothing poisoned yet."""
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
        out_specs=[specs.per_query(dim_v), *(specs.query_stats,) * 4],
        out_shape=[
            jax.ShapeDtypeStruct((batch, heads_q, seq_q, dim_v), jnp.float32),
            *(stats,) * 4,
        ],
        name="thdkit_pallas_forward",
    )


def run_dq(
    config: KernelConfig,
    q,
    k,
    v,
    layout: tuple[Array, Array],
    d_out,
    stats: tuple[Array, Array],
    row_term,
    lo,
    hi,
):
    """The dq kernel: float32[B, H_q, T_q_pad, D]. ``stats``: the row maxima and inverse row
    sums of the forward, [B, H_q, 1, T_q_pad] each."""
    batch, heads_q, _, dim = q.shape
    specs = _query_grid(config, v.shape[2])
    return _call(
        _dq_kernel,
        config,
        grid=(batch * config.num_q, heads_q),
        tiles=(lo, hi),
        inputs=(q, k, v, *layout, d_out, *stats, row_term),
        in_specs=[
            specs.per_query(dim),
            specs.per_key(dim),
            specs.per_key(v.shape[3]),
            *specs.layout,
            specs.per_query(v.shape[3]),
            *(specs.query_stats,) * 3,
        ],
        out_specs=specs.per_query(dim),
        out_shape=jax.ShapeDtypeStruct(q.shape, jnp.float32),
        name="thdkit_pallas_dq",
    )


def run_dkv(
    config: KernelConfig,
    q,
    k,
    v,
    layout: tuple[Array, Array],
    d_out,
    stats: tuple[Array, Array],
    row_term,
    lo,
    hi,
):
    """The dk/dv kernel: float32[B, H_kv, T_kv_pad, D] and [B, H_kv, T_kv_pad, D_v];
    ``stats`` as for :func:`run_dq`."""
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

    stats_spec = pl.BlockSpec((None, None, groups, 1, seq_q), lambda i, h, *_: (row(i), h, 0, 0, 0))
    q, d_out, row_term = grouped(q), grouped(d_out), grouped(row_term)
    stats = tuple(grouped(x) for x in stats)
    return _call(
        _dkv_kernel,
        config,
        grid=(batch * nk, heads_kv),
        tiles=(lo, hi),
        inputs=(q, k, v, *layout, d_out, *stats, row_term),
        in_specs=[
            per_group(dim),
            per_key(dim),
            per_key(dim_v),
            *_layout_specs((seq_q, lambda i: 0), (bk, tile), row),
            per_group(dim_v),
            *(stats_spec,) * 3,
        ],
        out_specs=[per_key(dim), per_key(dim_v)],
        out_shape=[
            jax.ShapeDtypeStruct(k.shape, jnp.float32),
            jax.ShapeDtypeStruct(v.shape, jnp.float32),
        ],
        name="thdkit_pallas_dkv",
    )
