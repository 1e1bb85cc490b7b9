"""The all-to-all strategy of context parallelism (Ulysses): heads for tokens, and back.

Axis legend: B batch, T_q / T_kv row lengths, H_q / H_kv heads, D / D_v head dims,
S = ``max_segments_per_seq``, cp = size of the context-parallel mesh axis, n = T / cp tokens per
shard.

One ``all_to_all`` turns each rank's [B, n, H, D] shard into [B, T, H / cp, D]: the whole row for
a slice of the heads (rank r gets query heads ``[r H_q / cp, (r + 1) H_q / cp)`` and the
key/value heads they read under grouped-query attention, since H_q / H_kv divides both slices
alike). The ids and positions of the whole row are gathered (2 · B · T integers), sorted back
into document order (:func:`thdkit.context_parallel.all_gather.sort_by_document`: the gathered
row is in shard order, which the tile ranges cannot read) and planned once
(:func:`thdkit.plan_attention`, shared by every head of the rank; every rank computes the same
plan). After attention the output is put back in shard order and a second ``all_to_all`` returns
the tokens. The backward pass is the same two exchanges, transposed.

Memory per device: the q, k, v and output of the whole row for H / cp heads, as many values as
their shards; the plan is O(T) integers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array

from thdkit.kernels.api import attention, plan_attention
from thdkit.context_parallel.all_gather import sort_by_document, take_tokens
from thdkit.segments import Segments, lengths_from_counts, segment_counts

if TYPE_CHECKING:
    from thdkit.context_parallel.api import StrategyConfig

__all__ = ["all_to_all_local", "check_heads"]


def check_heads(query: Array, key: Array, cp: int) -> None:
    """Checks that cp divides the query and key/value heads, as the exchange splits them.

    Args:
        query: [B, T_q, H_q, D].
        key: [B, T_kv, H_kv, D].
        cp: the size of the context-parallel axis.

    Raises:
        ValueError: cp does not divide H_q or H_kv, naming them.

    Example:
        >>> check_heads(jnp.zeros((1, 8, 4, 2)), jnp.zeros((1, 8, 1, 2)), 2)
        Traceback (most recent call last):
        ...
        ValueError: strategy='all_to_all' splits the heads over cp=2 ranks: H_q=4 and H_kv=1...
    """
    heads_q, heads_kv = query.shape[2], key.shape[2]
    if heads_q % cp or heads_kv % cp:
        raise ValueError(
            f"strategy='all_to_all' splits the heads over cp={cp} ranks: H_q={heads_q} and "
            f"H_kv={heads_kv} must be multiples of cp; use strategy='ring' or 'all_gather'"
        )


def all_to_all_local(static: StrategyConfig) -> Callable[..., Array]:
    """The per-device body of the all-to-all strategy, for ``shard_map`` over the cp axis.

    Args:
        static: the checked configuration (:class:`thdkit.context_parallel.api.StrategyConfig`).

    Returns:
        The ``local`` function of :class:`thdkit.context_parallel.api.Strategy`.
    """
    axis, num_segments = static.axis_name, static.num_segments

    def to_heads(x: Array) -> Array:
        """[B, n, H, D] (tokens of this rank) -> [B, T, H / cp, D] (heads of this rank)."""
        return lax.all_to_all(x, axis, split_axis=2, concat_axis=1, tiled=True)

    def to_tokens(x: Array) -> Array:
        return lax.all_to_all(x, axis, split_axis=1, concat_axis=2, tiled=True)

    def whole_row(ids: Array, pos: Array) -> tuple[Segments, Array]:
        """The row's segments in document order, and the order that sorts the gathered row."""
        ids, pos = (lax.all_gather(x, axis, axis=1, tiled=True) for x in (ids, pos))
        ids, pos, order = sort_by_document(ids, pos)
        lengths = lengths_from_counts(ids, segment_counts(ids, num_segments=num_segments))
        # Not Segments.from_ids: the layout is valid by construction (each shard was checked
        # where it was concrete), and traced here.
        return Segments(ids, pos, lengths), order

    def local(q, k, v, ids_q, pos_q, ids_kv, pos_kv):
        q_segments, q_order = whole_row(ids_q, pos_q)
        kv_segments, kv_order = (None, q_order)
        if not static.self_attention:
            kv_segments, kv_order = whole_row(ids_kv, pos_kv)
        plan = plan_attention(
            q_segments,
            kv_segments,
            mask_type=static.mask,
            window_size=static.window,
            max_segments_per_seq=num_segments,
            implementation=static.implementation,
        )
        out = attention(
            take_tokens(to_heads(q), q_order),
            take_tokens(to_heads(k), kv_order),
            take_tokens(to_heads(v), kv_order),
            plan=plan,
            scale=static.scale,
        )
        # Back to shard order: the inverse permutation of q_order.
        _, inverse = lax.sort((q_order, _iota(q_order)), dimension=1, num_keys=1)
        return to_tokens(take_tokens(out, inverse))

    return local


def _iota(x: Array) -> Array:
    return lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
