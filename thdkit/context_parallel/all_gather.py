"""The all-gather strategy of context parallelism: keys and values gathered once.

Axis legend: B batch, T_q / T_kv row lengths, H_q / H_kv heads, D / D_v head dims,
S = ``max_segments_per_seq``, cp = size of the context-parallel mesh axis, n = T / cp tokens per
shard.

Every rank gathers the keys, values, segment ids and positions of the whole row in one
``all_gather`` (the four are independent: one collective step), then attends its own query shard
to the whole row with the blockwise method, which skips the key tiles no query of a tile can
reach. The backward pass is the transpose of the gather, a ``psum_scatter`` (reduce-scatter) of
dk and dv: one step again.

The gathered row is in the order of the shards (reordered, e.g. striped): each shard is a valid
layout but their concatenation is not (a document appears once per shard). Masks are rebuilt from
ids and positions, so the order does not change the result; the tile ranges, though, assume one
run per document, so the gathered keys are first sorted by (segment id, position)
(:func:`sort_by_document`): that is the original document order, a valid layout, and dense tiles.

Memory: the keys and values of the whole row on every device (2 · B · T_kv · H_kv · D values),
against one visiting shard for the ring.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Int

from thdkit.kernels.partial import attention_partial
from thdkit.context_parallel.ring import shard_segments
from thdkit.segments import Segments, lengths_from_counts, segment_counts

if TYPE_CHECKING:
    from thdkit.context_parallel.api import StrategyConfig

__all__ = ["all_gather_local", "sort_by_document", "take_tokens"]


def sort_by_document(
    ids: Int[Array, "B T"], pos: Int[Array, "B T"]
) -> tuple[Int[Array, "B T"], Int[Array, "B T"], Int[Array, "B T"]]:
    """Sorts a row's tokens by (segment id, position): a reordered row back in document order.

    Padding (id 0) comes first; each document becomes one run, in increasing id order, its tokens
    by increasing position (the order of the original row, where positions increase along each
    document). Stable, so tokens with equal keys keep their order.

    Args:
        ids: int32[B, T]; segment ids in any token order.
        pos: int32[B, T]; positions, in the same order.

    Returns:
        ``(ids, pos, order)``: the sorted ids and positions, int32[B, T], and ``order``,
        int32[B, T], the token indices that sort each row (``sorted = x[order]``).

    Example:
        >>> ids, pos, order = sort_by_document(jnp.array([[1, 2, 1, 2, 0]]),
        ...                                    jnp.array([[0, 0, 1, 1, 9]]))
        >>> ids.tolist(), pos.tolist(), order.tolist()
        ([[0, 1, 1, 2, 2]], [[9, 0, 1, 0, 1]], [[4, 0, 2, 1, 3]])
    """
    index = lax.broadcasted_iota(jnp.int32, ids.shape, ids.ndim - 1)
    return lax.sort((ids, pos, index), dimension=ids.ndim - 1, is_stable=True, num_keys=2)


def take_tokens(x: Array, order: Int[Array, "B T"]) -> Array:
    """``x[b, order[b, t], ...]``: the tokens of ``x`` [B, T, ...] in the order ``order``.

    Example:
        >>> take_tokens(jnp.arange(6.0).reshape(1, 3, 2), jnp.array([[2, 0, 1]]))[0].tolist()
        [[4.0, 5.0], [0.0, 1.0], [2.0, 3.0]]
    """
    index = order.reshape(*order.shape, *(1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


def all_gather_local(static: StrategyConfig) -> Callable[..., Array]:
    """The per-device body of the all-gather strategy, for ``shard_map`` over the cp axis.

    Args:
        static: the checked configuration (:class:`thdkit.context_parallel.api.StrategyConfig`).

    Returns:
        The ``local`` function of :class:`thdkit.context_parallel.api.Strategy`.
    """
    axis, num_segments = static.axis_name, static.num_segments

    def local(q, k, v, ids_q, pos_q, ids_kv, pos_kv):
        if static.self_attention:
            ids_kv, pos_kv = ids_q, pos_q
        # One collective step: the four gathers are independent.
        k, v, ids_kv, pos_kv = (
            lax.all_gather(x, axis, axis=1, tiled=True) for x in (k, v, ids_kv, pos_kv)
        )
        counts_kv = segment_counts(ids_kv, num_segments=num_segments)
        if static.self_attention:  # the whole row is here: no collective for the lengths
            q_segments = Segments(ids_q, pos_q, lengths_from_counts(ids_q, counts_kv))
        else:
            q_segments = shard_segments(ids_q, pos_q, static)
        ids_kv, pos_kv, order = sort_by_document(ids_kv, pos_kv)
        out, _ = attention_partial(
            q,
            take_tokens(k, order),
            take_tokens(v, order),
            q_segments=q_segments,
            kv_segments=Segments(ids_kv, pos_kv, lengths_from_counts(ids_kv, counts_kv)),
            mask_type=static.mask,
            window_size=static.window,
            scale=static.scale,
            implementation=static.implementation,
        )
        return out.astype(q.dtype)

    return local
