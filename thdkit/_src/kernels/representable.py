"""Whether compact metadata, read as a varlen kernel (cuDNN) reads it, reproduces the mask."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Int

from thdkit._src.kernels.config import AttentionConfig
from thdkit._src.mask_types import MaskType
from thdkit._src.metadata import segments_metadata
from thdkit._src.programs import program
from thdkit._src.segments import Segments, run_lengths
from thdkit._src.validate.inputs import as_layouts
from thdkit._src.validate.rules import validate_concrete

__all__ = ["is_representable", "representable_rows"]

# Bounds at or beyond a row's length act alike: clipping keeps the arithmetic inside int32.
_LENGTH_MAX = 2**30


def _count_is(
    pos_kv: Int[Array, " T_kv"], start: Array, length: Array, threshold: Array, count: Array
) -> Bool[Array, "..."]:
    """Whether exactly ``count`` keys of ``pos_kv[start:start + length]`` (increasing) are
    ``<= threshold``: the ``count``-th is and the next is not."""
    last = pos_kv.shape[0] - 1
    below = pos_kv[jnp.clip(start + count - 1, 0, last)] <= threshold
    above = pos_kv[jnp.clip(start + count, 0, last)] > threshold
    return ((count == 0) | below) & ((count == length) | above)


def _reproduces_row(
    ids_q,
    pos_q,
    lengths_q,
    ids_kv,
    pos_kv,
    lengths_kv,
    q_seqlens,
    kv_seqlens,
    q_offsets,
    kv_offsets,
    *,
    mask: MaskType,
    window_left: int | None,
) -> Bool[Array, ""]:
    """One row of :func:`is_representable` from its raw metadata (``window_left``: also the
    index window ``a - left <= c`` of the kernel against the position window, every row
    non-empty).

    Per query token i of a surviving segment, at index a of the segment's active interval: the
    keys the reference allows form a prefix of the key interval (positions increase), as do the
    kernel's (``c <= a + d``), so the two agree iff their lengths do, which two comparisons decide.
    """
    num_segments = q_seqlens.shape[0]
    surviving = q_seqlens > 0
    slot = jnp.cumsum(surviving, dtype=jnp.int32) - 1
    index = jnp.clip(ids_q - 1, 0, num_segments - 1)
    len_q = jnp.where(ids_q > 0, q_seqlens[index], 0)
    len_kv = kv_seqlens[index]
    start_q = q_offsets[jnp.clip(slot[index], 0, num_segments)]
    start_kv = kv_offsets[jnp.clip(slot[index], 0, num_segments)]
    row = jnp.arange(ids_q.shape[0], dtype=jnp.int32) - start_q
    active = (len_q > 0) & (row >= 0) & (row < len_q)
    threshold = pos_q
    diagonal = row
    if mask.is_bottom_right:
        rl_kv = lengths_kv[jnp.clip(start_kv, 0, ids_kv.shape[0] - 1)]
        threshold = pos_q - (lengths_q - rl_kv)
        diagonal = row + len_kv - len_q
    upper = jnp.clip(diagonal + 1, 0, len_kv)
    ok = _count_is(pos_kv, start_kv, len_kv, threshold, upper)
    if window_left is not None:
        left = min(window_left, _LENGTH_MAX - 1)
        lower = jnp.clip(diagonal - left, 0, len_kv)
        # Keys with pos_kv <= threshold - left - 1, compared without forming it.
        ok &= _count_is(pos_kv + left + 1, start_kv, len_kv, threshold, lower)
        ok &= upper > lower
    return jnp.all(~active | ok)


@program(static_argnames=("mask_type", "num_segments", "window_left"))
def representable_rows(
    q: Segments,
    kv: Segments | None,
    *,
    mask_type: MaskType,
    num_segments: int,
    window_left: int | None,
) -> Bool[Array, "*B"]:
    """:func:`is_representable` of checked Segments, optionally with a left window.

    With ``window_left`` the kernel's index window ``c >= a - left`` must also reproduce the
    position window ``pos_kv >= pos_q - left``, and no kernel row may end up empty. Nothing is
    validated: the metadata comes from :func:`thdkit._src.metadata.segments_metadata`.

    Args:
        q: the queries' :class:`thdkit.Segments`, int32[*B, T_q] fields, already checked (the
            lengths are the run lengths, as a plan's).
        kv: the same for keys/values, or None for self-attention.
        mask_type: a parsed ``MaskType``.
        num_segments: S, a static int.
        window_left: the left window bound, or None.

    Returns:
        bool[*B].

    Example:
        >>> seg = Segments.from_ids(jnp.array([[1, 1, 1, 1]]))
        >>> representable_rows(seg, None, mask_type=MaskType.CAUSAL, num_segments=1,
        ...                    window_left=1)
        Array([ True], dtype=bool)
    """
    if not mask_type.uses_positions and window_left is None:
        return jnp.ones(q.ids.shape[:-1], bool)
    raw = segments_metadata(
        q, kv, mask_type=mask_type, max_segments_per_seq=num_segments, compact=False
    )
    kv = q if kv is None else kv
    row_fn = functools.partial(_reproduces_row, mask=mask_type, window_left=window_left)
    arrays = (q.ids, q.positions, q.lengths, kv.ids, kv.positions, kv.lengths, *raw)
    batch = q.ids.shape[:-1]
    flat = [a.reshape(-1, a.shape[-1]) for a in arrays]
    return jax.vmap(row_fn)(*flat).reshape(batch)


def is_representable(
    *,
    segment_ids_q: ArrayLike,
    segment_pos_q: ArrayLike,
    segment_ids_kv: ArrayLike | None = None,
    segment_pos_kv: ArrayLike | None = None,
    mask_type: MaskType | str,
    max_segments_per_seq: int,
) -> Bool[Array, "*B"]:
    """Per row, whether compact metadata read by a varlen kernel reproduces ``allowed[]`` exactly.

    The kernel reading: the k-th segment's query rows ``[qo, qo + lq)`` attend its key rows
    ``[ko, ko + lk)``, top-left causal ``c <= a``, bottom-right ``c <= a + lk - lq`` (a, c: row and
    column inside the segment's active intervals). Always true for no_mask/padding; for causal and
    bottom-right types, true iff for every active query row a the allowed keys, a prefix of the key
    interval, have exactly the kernel's length (``min(a + 1, lk)`` for causal). So it holds
    exactly for self-attention, for cross-attention whose key documents start at the same position
    as the query ones and are at least as long, and for striped (stripe 1) ring steps, but not in
    general for stripe > 1 or dual_chunk_swap ring steps of causal masks. O(T), jit-compatible;
    layouts are validated when concrete.

    Args:
        segment_ids_q, segment_pos_q: as for :func:`thdkit.seqlens_and_offsets`.
        segment_ids_kv, segment_pos_kv: as for :func:`thdkit.seqlens_and_offsets`.
        mask_type, max_segments_per_seq: as for :func:`thdkit.seqlens_and_offsets`.

    Returns:
        bool[*B].

    Raises:
        TypeError, ValueError: as :func:`thdkit.seqlens_and_offsets`.

    Example:
        Example 2 of docs/semantics.md, a striped ring step (stripe 1), is representable; in a
        stripe-2 step query position 4 may attend key positions 2 and 3, but the kernel's row 0
        only column 0:

        >>> ids = jnp.array([1, 1, 2, 2])
        >>> is_representable(segment_ids_q=ids, segment_pos_q=jnp.array([0, 2, 0, 2]),
        ...     segment_ids_kv=ids, segment_pos_kv=jnp.array([1, 3, 1, 3]),
        ...     mask_type="padding_causal", max_segments_per_seq=2)
        Array(True, dtype=bool)
        >>> ids = jnp.array([1, 1, 1, 1])
        >>> is_representable(segment_ids_q=ids, segment_pos_q=jnp.array([0, 1, 4, 5]),
        ...     segment_ids_kv=ids, segment_pos_kv=jnp.array([2, 3, 6, 7]),
        ...     mask_type="padding_causal", max_segments_per_seq=1)
        Array(False, dtype=bool)
    """
    config = AttentionConfig.parse(
        mask_type=mask_type, window_size=None, max_segments_per_seq=max_segments_per_seq
    )
    mask, num_segments = config.mask_type, config.max_segments_per_seq
    q, kv = as_layouts(segment_ids_q, segment_pos_q, segment_ids_kv, segment_pos_kv)
    validate_concrete(q, kv, max_segments_per_seq=num_segments, mask_type=mask)
    q, kv = (None if side is None else Segments(*side, run_lengths(side[0])) for side in (q, kv))
    return representable_rows(q, kv, mask_type=mask, num_segments=num_segments, window_left=None)
