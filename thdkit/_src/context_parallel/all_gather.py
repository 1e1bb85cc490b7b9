"""The all-gather strategy of context parallelism: keys and values gathered once.

Axis legend: B batch, T_q / T_kv row lengths, H_q / H_kv heads, D / D_v head dims,
S = ``max_segments_per_seq``, cp = size of the context-parallel mesh axis, n = T / cp tokens per
shard.

Every rank gathers the keys, values, segment ids and positions of the whole row in one
``all_gather`` (the four are independent: one collective step), then attends its own query shard
to the whole row with :func:`thdkit.kernels.attention_partial`, which skips the key
tiles no query of a tile can reach. The backward pass is the transpose of the gather, a
``psum_scatter`` (reduce-scatter) of dk and dv: one step again.

The gathered row is in the order of the shards (reordered, e.g. striped): each shard is a valid
layout but their concatenation is not (a document appears once per shard). Masks are rebuilt from
ids and positions, so the order does not change the result; the tile ranges, though, assume one
run per document, so the gathered keys are first sorted by (segment id, position)
(:func:`thdkit._src.context_parallel.shards.gather_row`): that is the original document order, a
valid layout, and dense tiles.

Soft-capped logits are the attention call's (``attention_partial(logits_soft_cap=...)``);
attention sinks join the call's ``(out, lse)`` (:func:`thdkit.kernels.attach_sinks`), the whole
row's result for this rank's queries.

Memory: the keys and values of the whole row on every device (2 · B · T_kv · H_kv · D values),
against one visiting shard for the ring.
"""

from __future__ import annotations

import dataclasses

from jax import lax
from jaxtyping import Array

from thdkit._src.context_parallel.base import (
    Call,
    LocalBody,
    Shapes,
    Strategy,
    StrategyConfig,
    Traffic,
)
from thdkit._src.context_parallel.shards import (
    gather_row,
    sorted_row,
    split_row,
    take_tokens,
    with_document_lengths,
)
from thdkit._src.kernels.partial import attention_partial
from thdkit._src.kernels.sinks import attach_sinks
from thdkit._src.mask_types import MaskType, Window
from thdkit._src.segments import Segments, lengths_from_counts, segment_counts

__all__ = ["ALL_GATHER", "all_gather_local", "all_gather_traffic", "all_gather_work"]


def all_gather_local(config: StrategyConfig) -> LocalBody:
    """The per-device body of the all-gather strategy, for ``shard_map`` over the cp axis.

    Args:
        config: the checked configuration.

    Returns:
        The ``local`` body of :class:`thdkit.context_parallel.Strategy`: float32 output; the
        sinks, where given, join the result over the whole row.
    """

    def local(
        q, k, v, q_segments: Segments, kv_segments: Segments, *, sinks: Array | None = None
    ) -> Array:
        self_attention = kv_segments is q_segments
        # One collective step: the four gathers (k, v, ids, positions) are independent.
        k, v = (lax.all_gather(x, config.axis_name, axis=1, tiled=True) for x in (k, v))
        kv_row, order = gather_row(kv_segments, config)
        if self_attention:  # the whole row is here: no collective for the lengths
            counts = segment_counts(kv_row.ids, num_segments=config.max_segments_per_seq)
            lengths = lengths_from_counts(q_segments.ids, counts)
            q_segments = dataclasses.replace(q_segments, lengths=lengths)
        else:
            q_segments = with_document_lengths(q_segments, config)
        out, lse = attention_partial(
            q,
            take_tokens(k, order),
            take_tokens(v, order),
            q_segments=q_segments,
            kv_segments=kv_row,
            mask_type=config.mask_type,
            window_size=config.window_size,
            scale=config.scale,
            implementation=config.implementation,
            logits_soft_cap=config.logits_soft_cap,
        )
        if sinks is not None:
            out, _ = attach_sinks(out, lse, sinks)
        return out

    return local


def all_gather_traffic(s: Shapes, cp: int) -> Traffic:
    """The all-gather's bytes per device: forward ``(cp - 1) B n_kv (kv b + 8)`` (k, v, ids and
    positions of the other shards); backward ``(cp - 1) B n_kv kv b`` (reduce-scatter of dk,
    dv); ``kv = H_kv (D + D_v)``; one step each way.

    Example:
        >>> all_gather_traffic(Shapes(1, 8, 8, 1, 1, 1, 1, 4, False), 2)
        Traffic(forward=64, backward=32, steps_forward=1, steps_backward=1)
    """
    n_kv = s.seq_kv // cp
    kv = s.heads_kv * (s.dim + s.dim_v)
    forward = (cp - 1) * s.batch * n_kv * (kv * s.itemsize + 8)
    return Traffic(forward, (cp - 1) * s.batch * n_kv * kv * s.itemsize, 1, 1)


def all_gather_work(
    q: Segments,
    kv: Segments,
    *,
    cp: int,
    mask_type: MaskType,
    window_size: Window,
    max_segments_per_seq: int,
) -> list[list[Call]]:
    """Rank r attends its query shard to the whole row, sorted into document order.

    Example:
        >>> row = Segments.from_ids(jnp.ones((1, 8), jnp.int32))
        >>> calls = all_gather_work(row, row, cp=4, mask_type=MaskType.CAUSAL,
        ...                         window_size=None, max_segments_per_seq=1)
        >>> [(c.q.seq_len, c.kv.seq_len) for rank in calls for c in rank]
        [(2, 8), (2, 8), (2, 8), (2, 8)]
    """
    del mask_type, window_size, max_segments_per_seq
    whole = sorted_row(kv)
    return [[Call(shard, whole, 1)] for shard in split_row(q, cp)]


ALL_GATHER = Strategy(
    name="all_gather",
    local=all_gather_local,
    traffic=all_gather_traffic,
    work=all_gather_work,
    features=frozenset({"logits_soft_cap", "sinks", "prefix"}),
)
"""Keys and values gathered once, one collective step each way; memory: the whole row's keys and
values on every device."""
