"""Attention over one set of keys with its log-sum-exp: the building block of context parallelism.

Each context-parallel strategy computes attention in pieces (a ring step, a gathered row) and
merges the pieces through their log-sum-exps. :func:`attention_partial` returns ``(out, lse)``
from any implementation of the registry that can (``partial`` in
:class:`thdkit.kernels.base.Implementation`).
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
from jaxtyping import Array, Float

from thdkit.kernels import pallas
from thdkit.kernels.blockwise import blockwise_attention
from thdkit.kernels.tiles import DEFAULT_BLOCK, tile_ranges
from thdkit.mask_types import MaskType, Window, check_window
from thdkit.reference import reference_attention
from thdkit.segments import Segments

__all__ = ["attention_partial"]


def attention_partial(
    query: Float[Array, "B T_q H_q D"],
    key: Float[Array, "B T_kv H_kv D"],
    value: Float[Array, "B T_kv H_kv D_v"],
    *,
    q_segments: Segments,
    kv_segments: Segments,
    mask_type: MaskType,
    window_size: Window,
    scale: float,
    implementation: Literal["blockwise", "pallas", "reference"] = "blockwise",
    block_q: int = DEFAULT_BLOCK,
    block_kv: int = DEFAULT_BLOCK,
) -> tuple[Float[Array, "B T_q H_q D_v"], Float[Array, "B T_q H_q"]]:
    """Attention over one set of keys, with its log-sum-exp, for merging partial results.

    The building block of ring attention (one call per ring step; the partials merge through
    ``lse``). Nothing is validated: the layouts must be valid (docs/semantics.md) and the
    ``lengths`` constant along each run, as run lengths and global document lengths are.
    Differentiable with respect to ``query``, ``key`` and ``value``, including through ``lse``;
    rows with no allowed key get zero gradients.

    Isolation: a row with at least one allowed key whose own query, or one of whose allowed keys
    or values, holds a NaN or inf gets NaN in ``out`` and ``lse`` and passes no gradient back (it
    adds zeros to every gradient; non-finite input elements get zero gradients). Every other row
    and every gradient it produces are bit-equal to the same call without the non-finite values.

    Args:
        query: float[B, T_q, H_q, D].
        key: float[B, T_kv, H_kv, D]; ``H_q`` a multiple of ``H_kv``.
        value: float[B, T_kv, H_kv, D_v].
        q_segments: the queries' :class:`thdkit.Segments`, int32[B, T_q] fields; ``lengths`` as
            the bottom-right rule reads them (run lengths, or the global document lengths in a
            context-parallel shard: :meth:`thdkit.Segments.with_global_lengths`).
        kv_segments: the same for keys/values, int32[B, T_kv] fields.
        mask_type: a ``MaskType`` or its name.
        window_size: ``(left, right)`` or None (:func:`thdkit.mask_types.check_window`).
        scale: multiplies the logits.
        implementation: ``"blockwise"`` (default), ``"pallas"`` (the kernels of
            :mod:`thdkit.kernels.pallas`) or ``"reference"`` (dense).
        block_q, block_kv: tile sizes of the blockwise method, capped to T_q and T_kv.

    Returns:
        ``(out, lse)``: float32[B, T_q, H_q, D_v], normalised over this call's keys (zeros where no
        key is allowed); float32[B, T_q, H_q], the log-sum-exp of the allowed logits (-inf where
        none is).

    Raises:
        ValueError: an unknown ``implementation``.

    Example:
        >>> seg = Segments.from_ids(jnp.array([[1, 1, 1, 0, 2, 2, 2, 2]]))
        >>> q = k = jnp.zeros((1, 8, 1, 4))
        >>> v = jnp.arange(8.0).reshape(1, 8, 1, 1)
        >>> out, lse = attention_partial(q, k, v, q_segments=seg, kv_segments=seg,
        ...     mask_type=MaskType.CAUSAL, window_size=None, scale=0.5, block_q=4, block_kv=4)
        >>> out[0, :, 0, 0]
        Array([0. , 0.5, 1. , 0. , 4. , 4.5, 5. , 5.5], dtype=float32)
        >>> jnp.exp(lse[0, :, 0])
        Array([1., 2., 3., 0., 1., 2., 3., 4.], dtype=float32)
    """
    mask = MaskType.parse(mask_type)
    window = check_window(window_size)
    if implementation == "reference":
        return reference_attention(
            query,
            key,
            value,
            q_segments=q_segments,
            kv_segments=kv_segments,
            mask_type=mask,
            window_size=window,
            scale=scale,
        )
    if implementation not in ("blockwise", "pallas"):
        raise ValueError(
            f"unknown implementation {implementation!r} for attention_partial; valid: "
            "'blockwise', 'pallas', 'reference'"
        )
    return _partial_blockwise(
        query,
        key,
        value,
        q_segments,
        kv_segments,
        mask_type=mask,
        window_size=window,
        scale=float(scale),
        block_q=block_q,
        block_kv=block_kv,
        method=implementation,
    )


@functools.partial(
    jax.jit,
    static_argnames=("mask_type", "window_size", "scale", "block_q", "block_kv", "method"),
)
def _partial_blockwise(
    query,
    key,
    value,
    layout_q,
    layout_kv,
    *,
    mask_type,
    window_size,
    scale,
    block_q,
    block_kv,
    method,
):
    """Tile ranges, then the flash loop (``method``: blockwise or pallas); jitted so that eager
    calls compile once."""
    ranges = tile_ranges(
        layout_q,
        layout_kv,
        mask_type=mask_type,
        window_size=window_size,
        block_q=min(block_q, query.shape[1]),
        block_kv=min(block_kv, key.shape[1]),
    )
    flash = blockwise_attention if method == "blockwise" else pallas.pallas_attention
    return flash(
        query,
        key,
        value,
        layout_q,
        layout_kv,
        ranges,
        mask_type=mask_type,
        window_size=window_size,
        scale=scale,
    )


def partial_implementations() -> tuple[str, ...]:
    """The implementations :func:`attention_partial` can run, default first.

    Example:
        >>> partial_implementations()[0]
        'blockwise'
    """
    return ("blockwise", "pallas", "reference")


def check_partial_implementation(implementation: object) -> str:
    """``implementation`` checked against :func:`partial_implementations`; None gives the default.

    Raises:
        ValueError: an implementation that cannot return ``(out, lse)``, naming the valid ones.

    Example:
        >>> check_partial_implementation(None)
        'blockwise'
    """
    names = partial_implementations()
    if implementation is None:
        return names[0]
    if not isinstance(implementation, str) or implementation not in names:
        raise ValueError(
            f"implementation={implementation!r} cannot run context-parallel attention; valid: "
            f"{', '.join(map(repr, names))} or None"
        )
    return implementation
