"""The core every context-parallel entry point calls: a strategy's body under ``shard_map``.

Axis legend: B batch, T_q / T_kv row lengths, H_q / H_kv heads, D / D_v head dims, cp = size of
the context-parallel mesh axis, n = T / cp tokens per shard.

The entry points (:mod:`thdkit._src.context_parallel.api`) check and convert their arguments once;
:func:`run_strategy` takes the result, :class:`thdkit.Segments` of the whole rows, and runs the
strategy's per-device body on each rank's shards, one jitted program per strategy and static
configuration.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float

from thdkit._src.context_parallel.base import Strategy, StrategyConfig
from thdkit._src.segments import Segments, run_lengths

__all__ = ["run_strategy"]


@functools.lru_cache(maxsize=64)
def _program(
    strategy: Strategy, config: StrategyConfig, sinks: bool, prefix: bool
) -> Callable[..., Array]:
    """The jitted, shard-mapped strategy for one static configuration (keyed by the strategy
    itself, so that a name registered anew never reuses another strategy's program); with
    ``prefix``, the program takes both sides' prefix lengths after the layout; with ``sinks``,
    the program takes them last, replicated, and passes them to the body."""
    body = strategy.local(config)

    def local(q, k, v, ids_q, pos_q, ids_kv, pos_kv, *rest):
        prefix_q, prefix_kv = rest[:2] if prefix else (None, None)
        joined = rest[2:] if prefix else rest
        # Each shard as a layout on its own (its run lengths: strategies derive the lengths of
        # whole documents as they need them; unused lengths are compiled away). Prefix lengths
        # are per document, the same in every shard.
        q_segments = Segments(ids_q, pos_q, run_lengths(ids_q), prefix_q)
        kv_segments = q_segments
        if not config.self_attention:
            kv_segments = Segments(ids_kv, pos_kv, run_lengths(ids_kv), prefix_kv)
        # The keyword only with sinks: a body written without them runs unchanged.
        options = dict(sinks=joined[0]) if sinks else {}
        return body(q, k, v, q_segments, kv_segments, **options).astype(q.dtype)

    axis = config.axis_name
    tokens = P(None, axis)
    heads = P(None, axis, None, None)
    # The sinks are replicated: each rank's gradient to them is summed over the axis.
    replicated = (P(),) if sinks else ()
    prefixes = (tokens, tokens) if prefix else ()
    mapped = jax.shard_map(
        local,
        mesh=config.mesh,
        in_specs=(heads, heads, heads, tokens, tokens, tokens, tokens, *prefixes, *replicated),
        out_specs=heads,
        # Manual over the context-parallel axis only: other mesh axes (e.g. a sharded batch)
        # stay automatic.
        axis_names=frozenset({axis}),
        # Per-rank variance is not tracked: loop carries inside attention_partial start out
        # rank-invariant. The collectives' transposes are still the right ones (all_gather ->
        # psum_scatter, all_to_all -> all_to_all), and the ring has its own custom_vjp.
        check_vma=False,
    )
    return jax.jit(mapped)


def run_strategy(
    strategy: Strategy,
    config: StrategyConfig,
    query: Float[Array, "B T_q H_q D"],
    key: Float[Array, "B T_kv H_kv D"],
    value: Float[Array, "B T_kv H_kv D_v"],
    q_segments: Segments,
    kv_segments: Segments | None,
    *,
    sinks: Float[Array, " H_q"] | None = None,
) -> Float[Array, "B T_q H_q D_v"]:
    """Runs ``strategy`` on checked arguments: the sequence axes split into cp shards.

    Nothing is checked here (the entry points check everything once); the segments' ids and
    positions are read, their lengths are not (each strategy derives the document lengths it
    needs inside the program, per shard: a row sharded over devices is never reduced here).

    Args:
        strategy: the strategy.
        config: its static configuration (``config.self_attention``: ``kv_segments`` is None).
        query: [B, T_q, H_q, D]; the sequence axis is split over ``config.axis_name``.
        key: [B, T_kv, H_kv, D].
        value: [B, T_kv, H_kv, D_v].
        q_segments: the query rows, int32[B, T_q] fields (with prefix lengths where the
            documents have prefixes).
        kv_segments: the key rows, int32[B, T_kv] fields, or None for self-attention.
        sinks: float32[H_q], the attention sinks (replicated to every rank, passed to the body
            as its ``sinks`` keyword), or None.

    Returns:
        [B, T_q, H_q, D_v] in the dtype of ``query``, sharded as ``query``.
    """
    kv = q_segments if kv_segments is None else kv_segments
    layout = (q_segments.ids, q_segments.positions, kv.ids, kv.positions)
    sides = (q_segments.prefix_lengths, kv.prefix_lengths)
    prefix = any(x is not None for x in sides)
    # A side without a prefix has prefix lengths 0: no token is in a prefix.
    prefixes = (
        tuple(
            x if x is not None else jnp.zeros_like(s.ids)
            for x, s in zip(sides, (q_segments, kv), strict=True)
        )
        if prefix
        else ()
    )
    joined = () if sinks is None else (sinks,)
    program = _program(strategy, config, sinks is not None, prefix)
    return program(query, key, value, *layout, *prefixes, *joined)
