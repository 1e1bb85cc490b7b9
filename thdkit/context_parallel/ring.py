"""The ring strategy of context parallelism: key/value shards travel around the ring.

Axis legend: B batch, T_q / T_kv row lengths, H_q / H_kv heads, D / D_v head dims,
S = ``max_segments_per_seq``, cp = size of the context-parallel mesh axis, n = T / cp tokens per
shard.

The sequence axis of every input is split into cp contiguous shards, shard r on rank r. Each rank
keeps its query shard; the key/value shard (with its segment ids and positions) travels around the
ring with ``lax.ppermute``, so at step k rank r sees the keys of rank ``(r - k) % cp``. Each step
runs :func:`thdkit.kernels.blockwise.attention_partial`, which masks from ids and positions
directly (so any token order works: plain, striped or dual-chunk-swapped), and the partial results
merge with their log-sum-exps. Masks that compare run lengths (bottom-right) need each token's
*document* length over the whole row; it is the count of the token's id in the row, an
order-independent quantity computed once from per-shard counts and a ``psum`` of S+1 integers.

Steps that cannot contain an allowed pair are skipped with ``lax.cond``. Whether they can is
decided from O(S) numbers per shard, per segment: presence and the span (min, max) of the
quantity the mask compares (position, or run length minus position for bottom-right). A pair of
shards can attend within segment s only if the difference of that quantity, kv minus q, can fall
in the interval the mask and window allow. Without a window the test is exact: a step is skipped
if and only if it has no allowed pair. With a window it is conservative (it never skips a step
that has work, and it may run a step whose only candidate pairs fall in a gap between stripes).

The backward pass is a second ring (a ``jax.custom_vjp``): each step recomputes its partial, pulls
the cotangent back through ``attention_partial`` and adds the key/value gradients to buffers that
travel with the keys, so memory per device stays O(n) instead of holding every visited shard.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from thdkit.kernels.partial import attention_partial
from thdkit.counting import segment_extrema
from thdkit.inputs import as_layouts
from thdkit.limits import check_max_segments
from thdkit.mask_types import MaskType, check_window
from thdkit.segments import Segments, global_lengths, lengths_from_counts, segment_counts

if TYPE_CHECKING:
    from thdkit.context_parallel.api import StrategyConfig

__all__ = [
    "DifferenceBounds",
    "difference_bounds",
    "ring_local",
    "ring_schedule",
    "shard_segments",
]

Window = tuple[int | None, int | None] | None


class DifferenceBounds(NamedTuple):
    """The interval that ``x_kv - x_q`` must fall in for an allowed pair of one segment.

    ``x`` is the position (top-left and unmasked types) or run length minus position
    (bottom-right types); None means unbounded on that side.
    """

    uses_key: bool
    lo: int | None
    hi: int | None


def difference_bounds(mask: MaskType, window: Window) -> DifferenceBounds:
    """The interval of ``x_kv - x_q`` that ``rel`` and the window allow, for one segment.

    Args:
        mask: a parsed ``MaskType``.
        window: ``(left, right)`` as parsed by ``check_window``, or None.

    Returns:
        :class:`DifferenceBounds`.

    Example:
        >>> difference_bounds(MaskType.CAUSAL, (3, None))
        DifferenceBounds(uses_key=False, lo=-3, hi=0)
    """
    left, right = window if window is not None else (None, None)
    if mask.is_bottom_right:
        # rel: rl_q - pos_q <= rl_kv - pos_kv; window: rl_kv - pos_kv <= rl_q - pos_q + left.
        return DifferenceBounds(True, 0, left)
    lo = None if left is None else -left
    if mask.is_causal:
        return DifferenceBounds(False, lo, 0 if right is None else min(0, right))
    return DifferenceBounds(False, lo, right)


class _Spans(NamedTuple):
    """Per row and segment 0..S of one shard: presence and the span of the compared quantity."""

    present: Bool[Array, "*B S1"]
    low: Int[Array, "*B S1"]
    high: Int[Array, "*B S1"]


def _spans(ids: Int[Array, "*B n"], x: Int[Array, "*B n"], num_segments: int) -> _Spans:
    """Presence and min/max of ``x`` per segment of each row (one scatter, O(n + S))."""
    flat = (a.reshape(-1, a.shape[-1]) for a in (ids, x))
    low, high = segment_extrema(*flat, num_segments=num_segments)
    low, high = (a.reshape(*ids.shape[:-1], num_segments + 1) for a in (low, high))
    present = high >= low
    return _Spans(present.at[..., 0].set(False), low, high)


def _may_attend(q: _Spans, kv: _Spans, bounds: DifferenceBounds) -> Bool[Array, "*B S1"]:
    """Per segment, whether some q token and kv token can form an allowed pair."""
    ok = q.present & kv.present
    # Differences x_kv - x_q range over [kv.low - q.high, kv.high - q.low].
    if bounds.hi is not None:
        ok &= kv.low - q.high <= bounds.hi
    if bounds.lo is not None:
        ok &= kv.high - q.low >= bounds.lo
    return ok


def _compared(
    pos: Int[Array, "*B n"], lengths: Int[Array, "*B n"], bounds: DifferenceBounds
) -> Int[Array, "*B n"]:
    return lengths - pos if bounds.uses_key else pos


def ring_schedule(
    *,
    segment_ids_q: ArrayLike,
    segment_pos_q: ArrayLike,
    segment_ids_kv: ArrayLike | None = None,
    segment_pos_kv: ArrayLike | None = None,
    cp: int,
    mask_type: MaskType | str = "padding_causal",
    window_size: tuple[int | None, int | None] | None = None,
    max_segments_per_seq: int,
) -> Bool[Array, "*B cp cp"]:
    """Which ring steps each rank runs, per row, as :func:`thdkit.ring_attention` decides it.

    At step k rank r attends the key shard of rank ``(r - k) % cp``. A step runs when the
    per-segment spans of the two shards admit an allowed pair (exact without a window,
    conservative with one); :func:`thdkit.ring_attention` runs a step on a rank when any row of the
    rank's batch needs it.

    Args:
        segment_ids_q: int[*B, T_q]; ids in the order the ring sees them (already reordered).
        segment_pos_q: int[*B, T_q]; positions, reordered with the ids.
        segment_ids_kv, segment_pos_kv: int[*B, T_kv], or None for self-attention.
        cp: number of ranks; must divide T_q and T_kv.
        mask_type: a :class:`thdkit.MaskType` or its name.
        window_size: ``(left, right)``; None or a negative side means unbounded.
        max_segments_per_seq: S.

    Returns:
        bool[*B, cp, cp]; ``[..., r, k]`` is True where rank r runs step k.

    Raises:
        ValueError: cp does not divide a row length, or a bad option.

    Example:
        One causal document over a plain (not reordered) row: rank r only needs the keys of
        ranks 0..r, i.e. steps 0..r.

        >>> ids, pos = jnp.ones(8, jnp.int32), jnp.arange(8, dtype=jnp.int32)
        >>> ring_schedule(segment_ids_q=ids, segment_pos_q=pos, cp=4,
        ...               max_segments_per_seq=1).astype(int)
        Array([[1, 0, 0, 0],
               [1, 1, 0, 0],
               [1, 1, 1, 0],
               [1, 1, 1, 1]], dtype=int32)
    """
    mask = MaskType.parse(mask_type)
    num_segments = check_max_segments(max_segments_per_seq)
    bounds = difference_bounds(mask, check_window(window_size))
    q, kv = as_layouts(segment_ids_q, segment_pos_q, segment_ids_kv, segment_pos_kv)
    kv = q if kv is None else kv
    if not isinstance(cp, (int, np.integer)) or isinstance(cp, bool) or cp < 1:
        raise ValueError(f"cp must be a positive int, got {cp!r}")
    for name, (ids, _) in (("segment_ids_q", q), ("segment_ids_kv", kv)):
        if ids.shape[-1] % cp:
            raise ValueError(f"cp={cp} must divide the length of {name}, got shape {ids.shape}")

    return _schedule(*q, *kv, cp=int(cp), bounds=bounds, num_segments=num_segments)


@functools.partial(jax.jit, static_argnames=("cp", "bounds", "num_segments"))
def _schedule(
    ids_q: Array,
    pos_q: Array,
    ids_kv: Array,
    pos_kv: Array,
    *,
    cp: int,
    bounds: DifferenceBounds,
    num_segments: int,
) -> Array:
    """The body of :func:`ring_schedule` on whole rows, compiled once per shape and options."""

    def shard_spans(ids: Array, pos: Array) -> _Spans:
        lengths = lengths_from_counts(ids, segment_counts(ids, num_segments=num_segments))
        x = _compared(pos, lengths, bounds)
        split = (*ids.shape[:-1], cp, ids.shape[-1] // cp)
        return _spans(ids.reshape(split), x.reshape(split), num_segments)

    q_spans, kv_spans = shard_spans(ids_q, pos_q), shard_spans(ids_kv, pos_kv)
    pair = (
        jax.tree.map(lambda a: a[..., :, None, :], q_spans),
        jax.tree.map(lambda a: a[..., None, :, :], kv_spans),
    )
    by_source = jnp.any(_may_attend(*pair, bounds), axis=-1)  # [*B, q rank, kv rank]
    ranks = np.arange(cp)
    source = (ranks[:, None] - ranks[None, :]) % cp  # source[r, k] = kv rank seen at step k
    return jnp.take_along_axis(
        by_source, jnp.broadcast_to(jnp.asarray(source), by_source.shape), axis=-1
    )


def shard_segments(
    ids: Int[Array, "B n"], pos: Int[Array, "B n"], static: StrategyConfig
) -> Segments:
    """Inside ``shard_map``: this rank's :class:`thdkit.Segments`, with the global document
    lengths over ``static.axis_name`` (:func:`thdkit.segments.global_lengths`).

    Args:
        ids, pos: int32[B, n]; this rank's shard of the segment ids and positions.
        static: the checked configuration (its axis name and S are read).

    Returns:
        :class:`thdkit.Segments` with int32[B, n] fields.
    """
    lengths = global_lengths(ids, axis_name=static.axis_name, num_segments=static.num_segments)
    return Segments(ids, pos, lengths)


def _merge(
    out: Array, lse: Array, out_k: Array, lse_k: Array
) -> tuple[Float[Array, "B n H Dv"], Float[Array, "B n H"]]:
    """Merges two softmax partials by their log-sum-exps; stable, and -inf safe."""
    m = jnp.maximum(lse, lse_k)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    a, b = jnp.exp(lse - m), jnp.exp(lse_k - m)
    total = a + b
    safe = jnp.where(total > 0, total, 1.0)
    merged = (out * a[..., None] + out_k * b[..., None]) / safe[..., None]
    return merged, jnp.where(total > 0, m + jnp.log(safe), -jnp.inf)


def _build_core(static: StrategyConfig, cp: int) -> Callable[..., Array]:
    """The per-device ring (forward and backward rings) for the given static configuration.

    The returned function takes local shards ``(q, k, v, q_segments, kv_segments, runs)``, the
    :class:`thdkit.Segments` carrying global document lengths and ``runs`` bool[cp] (step k
    runs), and returns the float32 output shard.
    """
    perm = [(j, (j + 1) % cp) for j in range(cp)]

    def rotate(tree: Any) -> Any:
        return jax.tree.map(lambda a: lax.ppermute(a, static.axis_name, perm), tree)

    def partial(q: Array, k: Array, v: Array, layout_q: Segments, layout_kv: Segments):
        return attention_partial(
            q,
            k,
            v,
            q_segments=layout_q,
            kv_segments=layout_kv,
            mask_type=static.mask,
            window_size=static.window,
            scale=static.scale,
            implementation=static.implementation,
        )

    def forward(q, k, v, layout_q, layout_kv, runs):
        batch, n_q, heads, _ = q.shape
        out = jnp.zeros((batch, n_q, heads, v.shape[-1]), jnp.float32)
        lse = jnp.full((batch, n_q, heads), -jnp.inf, jnp.float32)

        def visit(step, out, lse, kv):
            def run(out, lse):
                return _merge(out, lse, *partial(q, kv[0], kv[1], layout_q, kv[2]))

            return lax.cond(runs[step], run, lambda out, lse: (out, lse), out, lse)

        def body(carry, step):
            out, lse, kv = carry
            # Sent before the step's compute so that the transfer can overlap it.
            incoming = rotate(kv)
            out, lse = visit(step, out, lse, kv)
            return (out, lse, incoming), None

        kv = (k, v, layout_kv)
        # The last step needs no transfer, so it is peeled off the loop.
        (out, lse, kv), _ = lax.scan(body, (out, lse, kv), jnp.arange(cp - 1))
        out, lse = visit(cp - 1, out, lse, kv)
        return out, lse

    @jax.custom_vjp
    def core(q, k, v, layout_q, layout_kv, runs):
        return forward(q, k, v, layout_q, layout_kv, runs)[0]

    def core_fwd(q, k, v, layout_q, layout_kv, runs):
        out, lse = forward(q, k, v, layout_q, layout_kv, runs)
        return out, (q, k, v, layout_q, layout_kv, runs, out, lse)

    def core_bwd(residuals, d_out):
        q, k, v, layout_q, layout_kv, runs, out, lse = residuals
        d_out = d_out.astype(jnp.float32)
        # Each partial's weight in the output is exp(lse_k - lse); rows with no key get none.
        lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
        d_out_dot_out = jnp.sum(d_out * out, axis=-1)

        def body(carry, step):
            d_q, kv, d_kv = carry

            def run(d_q, d_kv):
                (out_k, lse_k), pull = jax.vjp(
                    lambda q, k, v: partial(q, k, v, layout_q, kv[2]), q, kv[0], kv[1]
                )
                weight = jnp.where(jnp.isfinite(lse), jnp.exp(lse_k - lse_safe), 0.0)
                # out = sum_k w_k out_k with w_k = exp(lse_k - logsumexp_m lse_m), so
                # d out_k = w_k d_out and d lse_k = w_k <d_out, out_k - out>. Rows whose output
                # is NaN (they read a non-finite input) pass nothing back, as in `attention`.
                d_lse_k = jnp.where(
                    jnp.isfinite(lse),
                    weight * (jnp.sum(d_out * out_k, axis=-1) - d_out_dot_out),
                    0.0,
                )
                d_q_k, d_k_k, d_v_k = pull((weight[..., None] * d_out, d_lse_k))
                return d_q + d_q_k.astype(jnp.float32), (
                    d_kv[0] + d_k_k.astype(jnp.float32),
                    d_kv[1] + d_v_k.astype(jnp.float32),
                )

            d_q, d_kv = lax.cond(runs[step], run, lambda d_q, d_kv: (d_q, d_kv), d_q, d_kv)
            # The gradient buffers travel with the keys; after cp moves they are home again.
            return (d_q, *rotate((kv, d_kv))), None

        def zeros(x: Array) -> Array:
            return jnp.zeros(x.shape, jnp.float32)

        carry = (zeros(q), (k, v, layout_kv), (zeros(k), zeros(v)))
        # cp moves, one more than the keys need: the gradients must get home, and one loop body
        # compiles faster than a peeled last step.
        (d_q, _, (d_k, d_v)), _ = lax.scan(body, carry, jnp.arange(cp))
        return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None, None, None

    core.defvjp(core_fwd, core_bwd)
    return core


def ring_local(static: StrategyConfig) -> Callable[..., Array]:
    """The per-device body of the ring strategy, for ``shard_map`` over ``static.axis_name``.

    Args:
        static: the checked configuration (:class:`thdkit.context_parallel.api.StrategyConfig`).

    Returns:
        The ``local`` function of :class:`thdkit.context_parallel.api.Strategy`.
    """
    axis = static.axis_name
    cp = static.mesh.shape[axis]
    bounds = difference_bounds(static.mask, static.window)
    core = _build_core(static, cp)

    def spans(segments: Segments) -> _Spans:
        x = _compared(segments.positions, segments.lengths, bounds)
        return _spans(segments.ids, x, static.num_segments)

    def local(q, k, v, ids_q, pos_q, ids_kv, pos_kv):
        layout_q = shard_segments(ids_q, pos_q, static)
        layout_kv = layout_q if static.self_attention else shard_segments(ids_kv, pos_kv, static)
        q_spans = spans(layout_q)
        kv_spans = q_spans if static.self_attention else spans(layout_kv)
        # O(cp * B * S) numbers: every rank learns every kv shard's spans once.
        all_kv = jax.tree.map(lambda a: lax.all_gather(a, axis), kv_spans)
        q_all = jax.tree.map(lambda a: a[None], q_spans)
        by_source = jnp.any(_may_attend(q_all, all_kv, bounds), axis=(1, 2))  # bool[cp]
        rank = lax.axis_index(axis)
        runs = by_source[(rank - jnp.arange(cp)) % cp]
        out = core(q, k, v, layout_q, layout_kv, runs)
        return out.astype(q.dtype)

    return local
