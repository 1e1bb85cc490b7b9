"""How many bytes each context-parallel strategy moves, counted from the shapes it sends.

A closed form per strategy (its ``traffic`` in :class:`thdkit.context_parallel.Strategy`;
tests hold each against the collectives traced in the real programs), for choosing a strategy
before running one: ring attention moves the key/value shards cp - 1 times, all-gather once,
all-to-all moves queries, keys and values (and outputs back) but only ``(cp - 1) / cp`` of them.
Axis legend: B batch, T_q / T_kv row lengths, H_q / H_kv heads, D / D_v head dims, cp ranks,
``n = T / cp`` tokens per shard, b bytes per element.
"""

from __future__ import annotations

from collections.abc import Callable

from thdkit._src.context_parallel import builtins  # noqa: F401  (fills STRATEGIES)
from thdkit._src.context_parallel.base import Shapes, Traffic, get

__all__ = ["RECEIVED", "Shapes", "Traffic", "collective_bytes"]


RECEIVED: dict[str, Callable[[int], float]] = {
    "ppermute": lambda cp: 1.0,
    "all_gather": lambda cp: cp - 1.0,
    "reduce_scatter": lambda cp: (cp - 1) / cp,
    "all_to_all": lambda cp: (cp - 1) / cp,
    "psum": lambda cp: 2 * (cp - 1) / cp,
}
"""Bytes a device receives per byte of a collective's operand (ring algorithms): a ppermute
moves its operand, an all-gather the cp - 1 other shards, a reduce-scatter and an all-to-all
(cp - 1) / cp of their operand, an all-reduce twice that."""


def collective_bytes(strategy: str, s: Shapes, *, cp: int) -> Traffic:
    """Bytes each device receives through a strategy's collectives, forward and backward.

    Counted from the arrays each strategy sends (int32 ids, positions, document lengths: 4 bytes
    a token); the O(B·S) per-segment counts and spans are left out. With ``n = T / cp`` and
    ``kv = H_kv (D + D_v)`` values per key token:

    - ring: forward ``(cp - 1) B n_kv (kv b + 12)``; backward (cp moves of k, v, the layout and
      the float32 dk, dv) ``cp B n_kv (kv (b + 4) + 12)``.
    - all_gather: forward ``(cp - 1) B n_kv (kv b + 8)``; backward (reduce-scatter of dk, dv)
      ``(cp - 1) B n_kv kv b``.
    - all_to_all: forward ``(cp - 1) / cp B (n_q H_q (D + D_v) + n_kv kv) b`` (q, k, v in, out
      back) plus ``(cp - 1) B (n_q [+ n_kv if cross]) 8`` (the row's ids and positions);
      backward ``(cp - 1) / cp B (n_q H_q (D + D_v) + n_kv kv) b``.
    - any registered strategy: its own ``traffic`` formula.

    Args:
        strategy: a name of :data:`thdkit.context_parallel.STRATEGIES`.
        s: the global shapes of the call.
        cp: the size of the context-parallel axis.

    Returns:
        :class:`Traffic`: bytes received per device forward and backward, dependent steps.

    Raises:
        ValueError: an unknown strategy, or one without a cost model (``traffic`` None).

    Example:
        >>> s = Shapes(batch=1, seq_q=8192, seq_kv=8192, heads_q=32, heads_kv=32, dim=128,
        ...            dim_v=128, itemsize=2, cross=False)
        >>> ring, a2a = (collective_bytes(x, s, cp=8) for x in ("ring", "all_to_all"))
        >>> round(a2a.forward / ring.forward, 3), ring.steps_forward, a2a.steps_forward
        (0.25, 7, 2)
    """
    traffic = get(strategy).traffic
    if traffic is None:
        raise ValueError(f"strategy {strategy!r} has no cost model (traffic=None)")
    return traffic(s, cp)
