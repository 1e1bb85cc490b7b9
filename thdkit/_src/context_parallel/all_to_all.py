"""The all-to-all strategy of context parallelism (Ulysses): heads for tokens, and back.

Axis legend: B batch, T_q / T_kv row lengths, H_q / H_kv heads, D / D_v head dims,
S = ``max_segments_per_seq``, cp = size of the context-parallel mesh axis, n = T / cp tokens per
shard.

One ``all_to_all`` turns each rank's [B, n, H, D] shard into [B, T, H / cp, D]: the whole row for
a slice of the heads (rank r gets query heads ``[r H_q / cp, (r + 1) H_q / cp)`` and the
key/value heads they read under grouped-query attention, since H_q / H_kv divides both slices
alike). The ids and positions of the whole row are gathered (2 · B · T integers) and sorted back
into document order (:func:`thdkit._src.context_parallel.shards.gather_row`: the gathered row is in
shard order, which the tile ranges cannot read); one call of
:func:`thdkit.kernels.attention_partial` attends every head of the rank to the row (one
set of tile ranges for all of them; every rank computes the same). After attention the output is
put back in shard order and a second ``all_to_all`` returns the tokens. The backward pass is the
same two exchanges, transposed.

Soft-capped logits are the attention call's (``attention_partial(logits_soft_cap=...)``).
Attention sinks join before the reverse exchange, while each rank holds the whole row for its own
heads: rank r joins the sinks of its query heads ``[r H_q / cp, (r + 1) H_q / cp)``
(:func:`thdkit.kernels.attach_sinks`); the sinks' gradient is the sum of every rank's.

Memory per device: the q, k, v and output of the whole row for H / cp heads, as many values as
their shards; the tile ranges are O(T) integers.
"""

from __future__ import annotations

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
from thdkit._src.context_parallel.shards import gather_row, inverse_order, sorted_row, take_tokens
from thdkit._src.kernels.partial import attention_partial
from thdkit._src.kernels.sinks import attach_sinks
from thdkit._src.mask_types import MaskType, Window
from thdkit._src.segments import Segments

__all__ = [
    "ALL_TO_ALL",
    "all_to_all_local",
    "all_to_all_traffic",
    "all_to_all_work",
    "check_heads",
]


def check_heads(shapes: Shapes, cp: int) -> None:
    """Checks that cp divides the query and key/value heads, as the exchange splits them.

    Args:
        shapes: the call's :class:`thdkit._src.context_parallel.base.Shapes`.
        cp: the size of the context-parallel axis.

    Raises:
        ValueError: cp does not divide H_q or H_kv, naming them.

    Example:
        >>> check_heads(Shapes(1, 8, 8, 4, 1, 2, 2, 4, False), 2)
        Traceback (most recent call last):
        ...
        ValueError: strategy='all_to_all' splits the heads over cp=2 ranks: H_q=4 and H_kv=1...
    """
    if shapes.heads_q % cp or shapes.heads_kv % cp:
        raise ValueError(
            f"strategy='all_to_all' splits the heads over cp={cp} ranks: H_q={shapes.heads_q} "
            f"and H_kv={shapes.heads_kv} must be multiples of cp; use strategy='ring' or "
            "'all_gather'"
        )


def all_to_all_local(config: StrategyConfig) -> LocalBody:
    """The per-device body of the all-to-all strategy, for ``shard_map`` over the cp axis.

    Args:
        config: the checked configuration.

    Returns:
        The ``local`` body of :class:`thdkit.context_parallel.Strategy`, output in the query's
        dtype; the sinks, where given, join each rank's heads before the reverse exchange.
    """
    axis = config.axis_name

    def to_heads(x: Array) -> Array:
        """[B, n, H, D] (tokens of this rank) -> [B, T, H / cp, D] (heads of this rank)."""
        return lax.all_to_all(x, axis, split_axis=2, concat_axis=1, tiled=True)

    def to_tokens(x: Array) -> Array:
        return lax.all_to_all(x, axis, split_axis=1, concat_axis=2, tiled=True)

    def own_heads(sinks: Array, heads: int) -> Array:
        """The sinks of this rank's ``heads`` query heads (the slice ``to_heads`` gave it)."""
        return lax.dynamic_slice_in_dim(sinks, lax.axis_index(axis) * heads, heads)

    def local(
        q, k, v, q_segments: Segments, kv_segments: Segments, *, sinks: Array | None = None
    ) -> Array:
        q_row, q_order = gather_row(q_segments, config)
        kv_row, kv_order = (q_row, q_order)
        if kv_segments is not q_segments:
            kv_row, kv_order = gather_row(kv_segments, config)
        out, lse = attention_partial(
            take_tokens(to_heads(q), q_order),
            take_tokens(to_heads(k), kv_order),
            take_tokens(to_heads(v), kv_order),
            q_segments=q_row,
            kv_segments=kv_row,
            mask_type=config.mask_type,
            window_size=config.window_size,
            scale=config.scale,
            implementation=config.implementation,
            logits_soft_cap=config.logits_soft_cap,
        )
        if sinks is not None:
            out, _ = attach_sinks(out, lse, own_heads(sinks, out.shape[2]))
        # Back to shard order, then back to this rank's tokens (in the query's dtype: the
        # exchange moves as many bytes as the queries).
        out = take_tokens(out.astype(q.dtype), inverse_order(q_order))
        return to_tokens(out)

    return local


def all_to_all_traffic(s: Shapes, cp: int) -> Traffic:
    """The all-to-all's bytes per device: forward ``(cp - 1) / cp B (n_q H_q (D + D_v) + n_kv kv)
    b`` (q, k, v in, out back) plus ``(cp - 1) B (n_q [+ n_kv if cross]) 8`` (the row's ids and
    positions); backward the same exchanges without the layout; ``kv = H_kv (D + D_v)``.

    Example:
        >>> all_to_all_traffic(Shapes(1, 8, 8, 2, 2, 1, 1, 4, False), 2)
        Traffic(forward=96.0, backward=64.0, steps_forward=2, steps_backward=2)
    """
    n_q, n_kv = s.seq_q // cp, s.seq_kv // cp
    kv = s.heads_kv * (s.dim + s.dim_v)
    data = s.batch * (n_q * s.heads_q * (s.dim + s.dim_v) + n_kv * kv) * s.itemsize
    layout = (cp - 1) * s.batch * (n_q + (n_kv if s.cross else 0)) * 8
    return Traffic((cp - 1) / cp * data + layout, (cp - 1) / cp * data, 2, 2)


def all_to_all_work(
    q: Segments,
    kv: Segments,
    *,
    cp: int,
    mask_type: MaskType,
    window_size: Window,
    max_segments_per_seq: int,
) -> list[list[Call]]:
    """Every rank attends the whole row, sorted into document order, for H / cp heads.

    Example:
        >>> row = Segments.from_ids(jnp.ones((1, 8), jnp.int32))
        >>> calls = all_to_all_work(row, row, cp=4, mask_type=MaskType.CAUSAL,
        ...                         window_size=None, max_segments_per_seq=1)
        >>> [(c.q.seq_len, c.heads_split) for rank in calls for c in rank]
        [(8, 4), (8, 4), (8, 4), (8, 4)]
    """
    del mask_type, window_size, max_segments_per_seq
    q_row, kv_row = sorted_row(q), sorted_row(kv)
    return [[Call(q_row, kv_row, cp)] for _ in range(cp)]


ALL_TO_ALL = Strategy(
    name="all_to_all",
    local=all_to_all_local,
    traffic=all_to_all_traffic,
    work=all_to_all_work,
    check=check_heads,
    features=frozenset({"logits_soft_cap", "sinks", "prefix"}),
)
"""Heads exchanged for tokens (Ulysses): two collective steps each way; cp must divide H_q and
H_kv; memory: as much as the shards."""
