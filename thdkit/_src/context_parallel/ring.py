"""The ring strategy of context parallelism: key/value shards travel around the ring.

Axis legend: B batch, T_q / T_kv row lengths, H_q / H_kv heads, D / D_v head dims,
S = ``max_segments_per_seq``, cp = size of the context-parallel mesh axis, n = T / cp tokens per
shard.

The sequence axis of every input is split into cp contiguous shards, shard r on rank r. Each rank
keeps its query shard; the key/value shard (with its segment ids, positions and document lengths)
travels around the ring with ``lax.ppermute``, so at step k rank r sees the keys of rank
``(r - k) % cp``. Each step runs :func:`thdkit.kernels.attention_partial`, which masks
from ids and positions directly (so any token order works: plain, striped or dual-chunk-swapped),
and the partial results merge with their log-sum-exps (:func:`merge_partials`). Masks that
compare document lengths (bottom-right) read each token's length over the whole row, computed
once from per-shard counts and a ``psum`` of S+1 integers. Steps that cannot contain an allowed
pair are skipped with ``lax.cond`` (:func:`thdkit._src.context_parallel.schedule.rank_schedule`).

The backward pass is a second ring (a ``jax.custom_vjp``): each step recomputes its partial, pulls
the cotangent back through ``attention_partial`` and adds the key/value gradients to buffers that
travel with the keys, so memory per device stays O(n) instead of holding every visited shard.

Soft-capped logits are each step's (``attention_partial(logits_soft_cap=...)``). Attention sinks
join once per row, after the last step, on the merged ``(out, lse)``
(:func:`thdkit.kernels.attach_sinks`): the ring differentiates through its log-sum-exp too.

Isolation: a query row whose partial at any step is poisoned (NaN log-sum-exp: it read a
non-finite query, key or value) stays poisoned through every later merge, out and log-sum-exp
NaN, and passes no gradient back; every other row merges and differentiates exactly as without
the non-finite values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float

from thdkit._src.context_parallel.base import (
    Call,
    LocalBody,
    Shapes,
    Strategy,
    StrategyConfig,
    Traffic,
)
from thdkit._src.context_parallel.schedule import (
    rank_schedule,
    ring_schedule,
)
from thdkit._src.context_parallel.shards import split_row, with_document_lengths
from thdkit._src.kernels.partial import attention_partial
from thdkit._src.kernels.sinks import attach_sinks
from thdkit._src.mask_types import MaskType, Window
from thdkit._src.segments import Segments

__all__ = ["RING", "merge_partials", "ring_local", "ring_traffic", "ring_work"]

Partial = tuple[Float[Array, "B n H Dv"], Float[Array, "B n H"]]


def merge_partials(out: Array, lse: Array, out_k: Array, lse_k: Array) -> Partial:
    """Merges two softmax partials by their log-sum-exps; stable, -inf safe, NaN keeping.

    A row with no key on one side (-inf) takes the other side as it is; a row that is poisoned
    on either side (NaN log-sum-exp) is poisoned in the result, out and log-sum-exp NaN, however
    the other side reads (``exp(NaN)`` would otherwise turn a later finite partial's merge into
    a finite log-sum-exp next to a NaN output).

    Args:
        out, out_k: float32[B, n, H, D_v]; normalised partial outputs.
        lse, lse_k: float32[B, n, H]; their log-sum-exps (-inf: no allowed key, NaN: poisoned).

    Returns:
        ``(out, lse)`` of the union of both partials' keys.

    Example:
        >>> out = jnp.array([[[[1.0]], [[2.0]], [[jnp.nan]]]])
        >>> lse = jnp.array([[[0.0], [-jnp.inf], [jnp.nan]]])
        >>> merged, merged_lse = merge_partials(out, lse, jnp.zeros_like(out), jnp.zeros_like(lse))
        >>> merged[0, :, 0, 0].tolist(), merged_lse[0, :, 0].tolist()
        ([0.5, 0.0, nan], [0.6931471824645996, 0.0, nan])
    """
    poisoned = jnp.isnan(lse) | jnp.isnan(lse_k)
    m = jnp.maximum(lse, lse_k)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    a, b = jnp.exp(lse - m), jnp.exp(lse_k - m)
    total = a + b
    safe = jnp.where(total > 0, total, 1.0)
    merged = (out * a[..., None] + out_k * b[..., None]) / safe[..., None]
    merged_lse = jnp.where(total > 0, m + jnp.log(safe), -jnp.inf)
    return (
        jnp.where(poisoned[..., None], jnp.nan, merged),
        jnp.where(poisoned, jnp.nan, merged_lse),
    )


def _build_core(config: StrategyConfig) -> Callable[..., Partial]:
    """The per-device ring (forward and backward rings) for one configuration.

    The returned function takes local shards ``(q, k, v, q_segments, kv_segments, runs,
    last)``, the :class:`thdkit.Segments` carrying global document lengths, ``runs`` bool[cp]
    (step k runs) and ``last`` int32[] (the last step any rank runs, the same on every rank),
    and returns the merged float32 ``(out, lse)`` of the shard, differentiable through both.
    The keys move ``last`` times forward; backward they move ``last`` times with their
    gradients, which then go home in one move: a batch whose documents are all rank-local moves
    nothing.
    """
    cp = config.cp

    def shift(tree: Any, by: int) -> Any:
        """Each rank's ``tree`` sent ``by`` ranks on round the ring."""
        perm = [(j, (j + by) % cp) for j in range(cp)]
        return jax.tree.map(lambda a: lax.ppermute(a, config.axis_name, perm), tree)

    def rotate(tree: Any) -> Any:
        return shift(tree, 1)

    def home(tree: Any, last: Array) -> Any:
        """Buffers that travelled ``last`` ranks on, sent back in one move (``last`` is the same
        on every rank: every rank takes the same branch)."""
        branches = [lambda t: t] + [lambda t, k=k: shift(t, -k) for k in range(1, cp)]
        return lax.switch(last, branches, tree)

    def partial(q: Array, k: Array, v: Array, q_segments: Segments, kv_segments: Segments):
        return attention_partial(
            q,
            k,
            v,
            q_segments=q_segments,
            kv_segments=kv_segments,
            mask_type=config.mask_type,
            window_size=config.window_size,
            scale=config.scale,
            implementation=config.implementation,
            logits_soft_cap=config.logits_soft_cap,
        )

    def forward(q, k, v, q_segments, kv_segments, runs, last) -> Partial:
        batch, n_q, heads, _ = q.shape
        out = jnp.zeros((batch, n_q, heads, v.shape[-1]), jnp.float32)
        lse = jnp.full((batch, n_q, heads), -jnp.inf, jnp.float32)

        def visit(step, out, lse, kv):
            def run(out, lse):
                return merge_partials(out, lse, *partial(q, kv[0], kv[1], q_segments, kv[2]))

            return lax.cond(runs[step], run, lambda out, lse: (out, lse), out, lse)

        def body(carry):
            step, out, lse, kv = carry
            # Sent before the step's compute so that the transfer can overlap it.
            incoming = rotate(kv)
            out, lse = visit(step, out, lse, kv)
            return step + 1, out, lse, incoming

        kv = (k, v, kv_segments)
        # Steps 0 .. last; the last needs no transfer, so it is peeled off the loop.
        _, out, lse, kv = lax.while_loop(
            lambda carry: carry[0] < last, body, (jnp.int32(0), out, lse, kv)
        )
        return visit(last, out, lse, kv)

    @jax.custom_vjp
    def core(q, k, v, q_segments, kv_segments, runs, last):
        return forward(q, k, v, q_segments, kv_segments, runs, last)

    def core_fwd(q, k, v, q_segments, kv_segments, runs, last):
        out, lse = forward(q, k, v, q_segments, kv_segments, runs, last)
        return (out, lse), (q, k, v, q_segments, kv_segments, runs, last, out, lse)

    def core_bwd(residuals, cotangents):
        q, k, v, q_segments, kv_segments, runs, last, out, lse = residuals
        d_out, d_lse = cotangents
        # Rows with a key and no poison. The others pass nothing back: rows without a key have
        # no gradient, and rows that read a non-finite input (NaN lse) pass none, as in
        # `attention`; their cotangents and outputs are selected away before any product.
        live = jnp.isfinite(lse)
        d_out = jnp.where(live[..., None], d_out.astype(jnp.float32), 0.0)
        out = jnp.where(live[..., None], out, 0.0)
        lse_live = jnp.where(live, lse, 0.0)
        # <d_out, out> - d_lse: the part of each step's d lse_k shared by every step.
        row_term = jnp.sum(d_out * out, axis=-1) - jnp.where(live, d_lse, 0.0)

        def visit(step, d_q, kv, d_kv):
            def run(d_q, d_kv):
                (out_k, lse_k), pull = jax.vjp(
                    lambda q, k, v: partial(q, k, v, q_segments, kv[2]), q, kv[0], kv[1]
                )
                # out = sum_k w_k out_k and lse = logsumexp_m lse_m with
                # w_k = exp(lse_k - lse), so d out_k = w_k d_out and
                # d lse_k = w_k (<d_out, out_k - out> + d_lse). A live row's partials are finite
                # or empty (-inf: weight 0, out_k 0) at every step.
                weight = jnp.where(live, jnp.exp(lse_k - lse_live), 0.0)
                d_out_dot_out_k = jnp.sum(jnp.where(live[..., None], d_out * out_k, 0.0), -1)
                d_lse_k = jnp.where(live, weight * (d_out_dot_out_k - row_term), 0.0)
                d_q_k, d_k_k, d_v_k = pull((weight[..., None] * d_out, d_lse_k))
                return d_q + d_q_k.astype(jnp.float32), (
                    d_kv[0] + d_k_k.astype(jnp.float32),
                    d_kv[1] + d_v_k.astype(jnp.float32),
                )

            return lax.cond(runs[step], run, lambda d_q, d_kv: (d_q, d_kv), d_q, d_kv)

        def body(carry):
            step, d_q, kv, d_kv = carry
            d_q, d_kv = visit(step, d_q, kv, d_kv)
            # The gradient buffers travel with the keys.
            return (step + 1, d_q, *rotate((kv, d_kv)))

        def zeros(x: Array) -> Array:
            return jnp.zeros(x.shape, jnp.float32)

        carry = (jnp.int32(0), zeros(q), (k, v, kv_segments), (zeros(k), zeros(v)))
        _, d_q, kv, d_kv = lax.while_loop(lambda carry: carry[0] < last, body, carry)
        d_q, (d_k, d_v) = visit(last, d_q, kv, d_kv)
        # The gradients of the keys visited last are `last` ranks from home: one move back.
        d_k, d_v = home((d_k, d_v), last)
        grads = d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype)
        return (*grads, None, None, None, None)

    core.defvjp(core_fwd, core_bwd)
    return core


def ring_local(config: StrategyConfig) -> LocalBody:
    """The per-device body of the ring strategy, for ``shard_map`` over ``config.axis_name``.

    Args:
        config: the checked configuration.

    Returns:
        The ``local`` body of :class:`thdkit.context_parallel.Strategy`: float32 output; the
        sinks, where given, join the merged result of the last step.
    """
    core, cp = _build_core(config), config.cp

    def local(
        q, k, v, q_segments: Segments, kv_segments: Segments, *, sinks: Array | None = None
    ) -> Array:
        same = kv_segments is q_segments
        q_segments = with_document_lengths(q_segments, config)
        kv_segments = q_segments if same else with_document_lengths(kv_segments, config)
        runs = rank_schedule(q_segments, kv_segments, config)
        # The last step any rank runs: after it no key needs to move on.
        steps = jnp.arange(cp, dtype=jnp.int32)
        last = lax.pmax(jnp.max(jnp.where(runs, steps, 0)), config.axis_name)
        out, lse = core(q, k, v, q_segments, kv_segments, runs, last)
        if sinks is not None:
            out, _ = attach_sinks(out, lse, sinks)
        return out

    return local


def ring_traffic(s: Shapes, cp: int) -> Traffic:
    """The ring's bytes per device at most: ``(cp - 1) B n_kv (kv b + 12)`` forward (k, v, ids,
    positions and lengths, cp - 1 moves); backward ``(cp - 1) B n_kv (kv (b + 4) + 12) + B n_kv
    kv 4`` (cp - 1 moves of k, v, the layout and the float32 dk, dv, then dk, dv home in one);
    ``kv = H_kv (D + D_v)``. The ring stops after the last step any rank needs (``last``, from
    the layout): it then moves ``last`` instead of ``cp - 1`` times, and none for rank-local
    documents (``thdkit bench ring`` reports the step).

    Example:
        >>> ring_traffic(Shapes(1, 8, 8, 1, 1, 1, 1, 4, False), 2)
        Traffic(forward=80, backward=144, steps_forward=1, steps_backward=2)
    """
    n_kv = s.seq_kv // cp
    kv = s.heads_kv * (s.dim + s.dim_v)
    forward = (cp - 1) * s.batch * n_kv * (kv * s.itemsize + 12)
    backward = (cp - 1) * s.batch * n_kv * (kv * (s.itemsize + 4) + 12) + s.batch * n_kv * kv * 4
    return Traffic(forward, backward, cp - 1, cp)


def ring_work(
    q: Segments,
    kv: Segments,
    *,
    cp: int,
    mask_type: MaskType,
    window_size: Window,
    max_segments_per_seq: int,
) -> list[list[Call]]:
    """Rank r attends its query shard to the key shard of rank ``(r - k) % cp`` at every step k
    the schedule runs (:func:`thdkit.ring_schedule`).

    Example:
        >>> row = Segments.from_ids(jnp.ones((1, 8), jnp.int32))
        >>> calls = ring_work(row, row, cp=4, mask_type=MaskType.CAUSAL, window_size=None,
        ...                   max_segments_per_seq=1)
        >>> [len(rank) for rank in calls]
        [1, 2, 3, 4]
    """
    runs = ring_schedule(
        q_segments=q,
        kv_segments=kv,
        cp=cp,
        mask_type=mask_type,
        window_size=window_size,
        max_segments_per_seq=max_segments_per_seq,
    )
    runs = np.asarray(runs).any(axis=0)  # A rank runs a step when any row of its batch needs it.
    q_shards, kv_shards = split_row(q, cp), split_row(kv, cp)
    return [
        [Call(q_shards[r], kv_shards[(r - k) % cp], 1) for k in range(cp) if runs[r, k]]
        for r in range(cp)
    ]


RING = Strategy(
    name="ring",
    local=ring_local,
    traffic=ring_traffic,
    work=ring_work,
    features=frozenset({"logits_soft_cap", "sinks", "prefix"}),
)
"""Key/value shards travel around the ring: cp - 1 dependent steps, skipping steps without work;
memory: one visiting shard."""
