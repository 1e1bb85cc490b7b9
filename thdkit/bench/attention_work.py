"""What ``thdkit bench attention`` measures its programs against: a cell's work and two matmuls.

A cell's efficiency (the allowed pairs' matmul flops per second over the rate of a 2048³ matmul
timed with them, docs/benchmarks.md) is the product of three measured factors for blockwise:

    efficiency = (allowed / visited) * (f_needed / f_tiles) * tile_rate * in_matmuls

where the visited pairs are the plan's tiles', ``f_needed / f_tiles`` is 4 / 4 forward and 12 / 14
forward + backward (the backward recomputes QKᵀ), the tile matmuls are :func:`tile_matmuls` (the
visited tiles' matmuls alone, timed in the same rounds) and what is not in them is everything
else: the softmax, the masks, the loop. So a cell that misses its target says which of the three
it misses by.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from thdkit._src.mask_types import MaskType, Window
from thdkit._src.segments import Segments
from thdkit.bench.ring import work_per_rank
from thdkit.kernels import plan_attention

__all__ = [
    "MATMUL_SIZE",
    "NEEDED_FLOPS_PER_PAIR",
    "TILE_FLOPS_PER_PAIR",
    "cell_work",
    "matmul_program",
    "matmul_rate",
    "tile_matmuls",
]

Pass = Literal["fwd", "fwd+bwd"]

NEEDED_FLOPS_PER_PAIR = {"fwd": 4, "fwd+bwd": 12}
"""Matmul flops per allowed (query, key) pair, head and head-dim unit: QKᵀ and PV forward; the
backward adds dV, dP, dQ and dK."""

TILE_FLOPS_PER_PAIR = {"fwd": 4, "fwd+bwd": 14}
"""The same per visited pair for :func:`tile_matmuls`: the backward also recomputes QKᵀ."""

MATMUL_SIZE = 2048


def cell_work(
    ids: np.ndarray,
    pos: np.ndarray,
    *,
    mask_type: MaskType | str,
    window_size: Window,
    block_q: int | None,
    block_kv: int | None,
) -> dict[str, Any]:
    """The cell's tiles visited by blockwise's plan, its allowed pairs and sum_s len_s².

    Args:
        ids, pos: int[B, T] segment ids and positions of the cell's rows.
        mask_type, window_size: the cell's mask.
        block_q, block_kv: the tile sizes, or None for the plan's.

    Returns:
        Record fields: ``tiles_visited``, ``block_q``, ``block_kv``, ``tiles_total`` (the
        batch's query tiles times its key tiles), ``tiles_visited_fraction``,
        ``tile_pair_fraction`` (the visited tiles' pairs over B·T²), ``allowed_pairs``,
        ``allowed_pair_fraction`` and ``sum_len_squared_fraction``.

    Example:
        >>> ids = np.array([[1] * 128])
        >>> work = cell_work(ids, np.arange(128)[None], mask_type="padding_causal",
        ...                  window_size=None, block_q=64, block_kv=64)
        >>> work["tiles_visited"], work["allowed_pairs"], work["tile_pair_fraction"]
        (3, 8256, 0.75)
    """
    mask = MaskType.parse(mask_type)
    side = Segments.from_ids(ids, pos)
    plan = plan_attention(
        side, mask_type=mask, window_size=window_size, max_segments_per_seq=int(ids.max()),
        implementation="blockwise", block_q=block_q, block_kv=block_kv,
    )  # fmt: skip
    ranges = plan.aux["blockwise"]
    visited, pairs = int(jnp.sum(ranges.hi - ranges.lo)), ids.size * ids.shape[1]
    allowed = int(work_per_rank(ids, pos, cp=1, mask_type=mask, window_size=window_size).sum())
    return {
        "tiles_visited": visited, "block_q": plan.config.block_q, "block_kv": plan.config.block_kv,
        "tiles_total": ranges.lo.size * ranges.num_kv_tiles,  # (query tile, key tile) pairs
        "tiles_visited_fraction": visited / ranges.lo.size / ranges.num_kv_tiles,
        "tile_pair_fraction": visited * plan.config.block_q * plan.config.block_kv / pairs,
        "allowed_pairs": allowed, "allowed_pair_fraction": allowed / pairs,
        "sum_len_squared_fraction": int(side.lengths.sum()) / pairs,  # Each token adds its length.
    }  # fmt: skip


def matmul_program(q: jax.Array, k: jax.Array, *_: Any) -> jax.Array:
    """``x @ y``, [2048, 2048] each in the cell's dtype (q's and k's values, repeated as needed):
    timed with the cell's programs, it gives their FLOP rate under the same load."""
    x, y = (jnp.resize(a, (MATMUL_SIZE, MATMUL_SIZE)) for a in (q, k))
    return x @ y


def matmul_rate(records: Sequence[Mapping[str, Any]]) -> float | None:
    """The median of the records' ``matmul_flop_rate`` (FLOP/s): the rate of the run."""
    rates = [r["matmul_flop_rate"] for r in records if r["matmul_flop_rate"]]
    return statistics.median(rates) if rates else None


def _tiles(x: jax.Array, block: int) -> jax.Array:
    """[B, T, H, D] -> float32[B * (T // block), H, block, D] (a last partial tile dropped)."""
    batch, seq, heads, dim = x.shape
    num = max(seq // block, 1)
    x = x[:, : num * block] if seq >= block else jnp.resize(x, (batch, block, heads, dim))
    return x.reshape(batch * num, block, heads, dim).transpose(0, 2, 1, 3).astype(jnp.float32)


def tile_matmuls(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *_: Any,
    block_q: int,
    block_kv: int,
    tiles: int,
    passes: Pass,
    chunk: int = 1,
) -> tuple[jax.Array, ...]:
    """Blockwise's tile matmuls and nothing else: ``tiles`` visits of a (query tile, key tile)
    pair, ``chunk`` per loop step (a step's tiles gathered from the inputs and its products added
    back as blockwise's schedule does; one tile is a slice), float32, with QKᵀ and PV forward,
    then a second loop with the backward's recomputed QKᵀ, dP, dQ, dK and dV
    (``passes="fwd+bwd"``; the tile values stand in for the weights and their gradient: no
    softmax, no mask). Visit i pairs query tile ``i mod N_q`` with key tile ``i mod N_kv``; the
    last step runs whole, as blockwise's does.

    Args:
        q, k, v: [B, T, H, D] the cell's inputs (the query stands in for the output's gradient).
        block_q, block_kv: the plan's tile sizes.
        tiles: the number of tiles the plan visits (``cell_work``'s ``tiles_visited``).
        passes: ``"fwd"`` or ``"fwd+bwd"``.
        chunk: tiles per step (blockwise's parallel schedule: ``PAIRS_PER_STEP[backend] //
            (block_q * block_kv)``).

    Returns:
        The accumulators, float32[B * (T // block), H, block, D]: forward the output's tiles;
        forward + backward also dQ, dK and dV.

    Example:
        >>> x = jnp.ones((1, 8, 2, 4))
        >>> (out,) = tile_matmuls(x, x, x, block_q=4, block_kv=4, tiles=3, passes="fwd")
        >>> out.shape, float(out[0, 0, 0, 0])  # tile 0 twice (visits 0 and 2): 2 * 4 * 4
        ((2, 2, 4, 4), 32.0)
    """
    qt, kt, vt = _tiles(q, block_q), _tiles(k, block_kv), _tiles(v, block_kv)

    def pairs(step: jax.Array) -> tuple[jax.Array, jax.Array]:
        items = step * chunk + jnp.arange(chunk, dtype=jnp.int32)
        return items % qt.shape[0], items % kt.shape[0]

    def take(x: jax.Array, index: jax.Array) -> jax.Array:
        if chunk == 1:
            return jax.lax.dynamic_slice_in_dim(x, index[0], 1)
        return jnp.take(x, index, axis=0)

    def add(x: jax.Array, index: jax.Array, value: jax.Array) -> jax.Array:
        if chunk == 1:
            return jax.lax.dynamic_update_slice_in_dim(x, take(x, index) + value, index[0], 0)
        return x.at[index].add(value)

    def forward(step: jax.Array, out: jax.Array) -> jax.Array:
        r, c = pairs(step)
        values = jnp.einsum("phqd,phkd->phqk", take(qt, r), take(kt, c))
        return add(out, r, jnp.einsum("phqk,phkd->phqd", values, take(vt, c)))

    def backward(step: jax.Array, grads: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        dq, dk, dv = grads
        r, c = pairs(step)
        q_tile, k_tile, d_out = take(qt, r), take(kt, c), take(qt, r)
        values = jnp.einsum("phqd,phkd->phqk", q_tile, k_tile)
        d_values = jnp.einsum("phqd,phkd->phqk", d_out, take(vt, c))
        return (
            add(dq, r, jnp.einsum("phqk,phkd->phqd", d_values, k_tile)),
            add(dk, c, jnp.einsum("phqk,phqd->phkd", d_values, q_tile)),
            add(dv, c, jnp.einsum("phqk,phqd->phkd", values, d_out)),
        )

    steps = -(-tiles // chunk)
    out = jax.lax.fori_loop(0, steps, forward, jnp.zeros_like(qt))
    if passes == "fwd":
        return (out,)
    zeros = tuple(jnp.zeros_like(x) for x in (qt, kt, vt))
    return (out, *jax.lax.fori_loop(0, steps, backward, zeros))
