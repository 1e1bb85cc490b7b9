"""The predicates that build a mask from ids, positions and document lengths.

The pairwise predicate :func:`rel`, the sliding window test :func:`in_window` and
:func:`pair_mask`, the mask of a tile (or of a whole row) that every attention implementation
applies (docs/semantics.md). The mask types and windows themselves are
:mod:`thdkit._src.mask_types`.

Every mask type of thdkit restricts attention to pairs of tokens of the same non-padding segment
(``allowed[i, j] = ids_q[i] == ids_kv[j] != 0 and rel(i, j)``); the types differ only in ``rel``:

=============================  =========================================================
mask type                      rel(i, j)
=============================  =========================================================
no_mask, padding               true
causal, padding_causal         ``pos_q[i] >= pos_kv[j]`` (top-left aligned)
causal_bottom_right,           ``rl_q[i] - pos_q[i] <= rl_kv[j] - pos_kv[j]``
padding_causal_bottom_right    (bottom-right aligned; rl = run length of the token's run)
=============================  =========================================================

Prefix-LM masks (Segments with ``prefix_lengths``): a pair of the same document is also allowed
where both tokens lie in the document's prefix, ``pos_q[i] < P_q[i] and pos_kv[j] < P_kv[j]``,
whatever ``rel`` and the window say (:func:`in_prefix`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jaxtyping import Array, Bool, Int

from thdkit._src.mask_types import MaskType, Window, window_bound

if TYPE_CHECKING:
    from thdkit._src.segments import Segments

__all__ = [
    "in_prefix",
    "in_window",
    "pair_mask",
    "rel",
]


def rel(
    mask_type: MaskType,
    pos_q: Int[Array, "..."],
    pos_kv: Int[Array, "..."],
    rl_q: Int[Array, "..."],
    rl_kv: Int[Array, "..."],
) -> Bool[Array, "..."] | bool:
    """The pairwise predicate of ``mask_type``, broadcasting its arguments.

    Args:
        mask_type: a parsed ``MaskType``.
        pos_q, pos_kv: positions of the query and key tokens inside their documents.
        rl_q, rl_kv: run lengths of the query and key tokens (read by bottom-right types only).

    Returns:
        bool array of the broadcast shape, or the Python ``True`` for the types without ``rel``.

    Example:
        >>> import jax.numpy as jnp
        >>> rel(MaskType.CAUSAL, jnp.arange(3)[:, None], jnp.arange(3)[None, :], 3, 3).astype(int)
        Array([[1, 0, 0],
               [1, 1, 0],
               [1, 1, 1]], dtype=int32)
    """
    if mask_type.is_causal:
        return pos_q >= pos_kv
    if mask_type.is_bottom_right:
        # Each side lies in [-MAX_POSITION, MAX_SEQ_LEN]: no int32 overflow.
        return rl_q - pos_q <= rl_kv - pos_kv
    return True


def in_window(
    mask_type: MaskType,
    window_size: Window,
    pos_q: Int[Array, "..."],
    pos_kv: Int[Array, "..."],
    rl_q: Int[Array, "..."],
    rl_kv: Int[Array, "..."],
) -> Bool[Array, "..."] | bool:
    """Whether key tokens lie inside the queries' sliding window, broadcasting the arguments.

    Top-left types (causal, padding_causal) and no_mask/padding: ``pos_q - left <= pos_kv <=
    pos_q + right``. Bottom-right types: ``rl_q - pos_q + left >= rl_kv - pos_kv`` (the window
    slides along the bottom-right diagonal; ``right`` does not apply). Written in difference form
    (``pos_kv - pos_q >= -left``), so positions in ``[0, 2**30 - 1]``, lengths up to ``2**30`` and
    any bound below ``2**31 - 1`` stay inside int32.

    Args:
        mask_type: a parsed ``MaskType``.
        window_size: ``(left, right)`` or None (see :func:`check_window`).
        pos_q, pos_kv: int32 positions inside the documents.
        rl_q, rl_kv: int32 run (document) lengths, read by the bottom-right types only.

    Returns:
        bool array of the broadcast shape, or the Python ``True`` when nothing is bounded.

    Example:
        >>> import jax.numpy as jnp
        >>> pos = jnp.arange(4)
        >>> in_window(MaskType.CAUSAL, (1, None), pos[:, None], pos[None, :], 4, 4).astype(int)
        Array([[1, 1, 1, 1],
               [1, 1, 1, 1],
               [0, 1, 1, 1],
               [0, 0, 1, 1]], dtype=int32)
    """
    left, right = window_bound(window_size, 0), window_bound(window_size, 1)
    inside: Bool[Array, "..."] | bool = True
    if mask_type.is_bottom_right:
        if left is not None:
            inside = (rl_kv - pos_kv) - (rl_q - pos_q) <= left
        return inside
    if left is not None:
        inside = pos_kv - pos_q >= -left
    if right is not None:
        inside = inside & (pos_kv - pos_q <= right)
    return inside


def in_prefix(
    pos_q: Int[Array, "..."],
    pos_kv: Int[Array, "..."],
    prefix_q: Int[Array, "..."],
    prefix_kv: Int[Array, "..."],
) -> Bool[Array, "..."]:
    """Whether both tokens lie in their documents' prefixes, broadcasting the arguments.

    Args:
        pos_q, pos_kv: int32 positions inside the documents.
        prefix_q, prefix_kv: int32 prefix lengths of the tokens' documents (0 = none).

    Returns:
        bool array of the broadcast shape: ``pos_q < prefix_q and pos_kv < prefix_kv``.

    Example:
        >>> import jax.numpy as jnp
        >>> pos = jnp.arange(3)
        >>> in_prefix(pos[:, None], pos[None, :], 2, 2).astype(int)
        Array([[1, 1, 0],
               [1, 1, 0],
               [0, 0, 0]], dtype=int32)
    """
    return (pos_q < prefix_q) & (pos_kv < prefix_kv)


def pair_mask(
    q: Segments,
    kv: Segments,
    *,
    mask_type: MaskType,
    window_size: Window,
) -> Bool[Array, "*B T_q T_kv"]:
    """``allowed[..., i, j]`` with explicit document lengths, intersected with the sliding window.

    With ``Segments`` built from whole rows and no window this is ``allowed[]`` of
    docs/semantics.md; ring steps pass the global document lengths instead, which the
    bottom-right rule needs there. Tiles of a layout are ``jax.tree.map`` slices of its Segments.
    Where both sides carry ``prefix_lengths``, a pair of one document inside its prefix is
    allowed too, whatever the mask type and window (:func:`in_prefix`).

    Args:
        q: the queries' :class:`thdkit.Segments`, int32[*B, T_q] fields.
        kv: the keys'/values' :class:`thdkit.Segments`, int32[*B, T_kv] fields.
        mask_type: a parsed ``MaskType``.
        window_size: ``(left, right)`` or None (see :func:`in_window`).

    Returns:
        bool[*B, T_q, T_kv].

    Example:
        >>> from thdkit import Segments
        >>> seg = Segments.from_ids(jnp.array([1, 1, 1]))
        >>> pair_mask(seg, seg, mask_type=MaskType.CAUSAL, window_size=(1, 0)).astype(int)
        Array([[1, 0, 0],
               [1, 1, 0],
               [0, 1, 1]], dtype=int32)
        >>> pre = seg.with_prefix(jnp.array([True, True, False]))
        >>> pair_mask(pre, pre, mask_type=MaskType.CAUSAL, window_size=(0, 0)).astype(int)
        Array([[1, 1, 0],
               [1, 1, 0],
               [0, 0, 1]], dtype=int32)
    """
    ids_q, pos_q, rl_q = (a[..., :, None] for a in (q.ids, q.positions, q.lengths))
    ids_kv, pos_kv, rl_kv = (a[..., None, :] for a in (kv.ids, kv.positions, kv.lengths))
    same = (ids_q == ids_kv) & (ids_q != 0)
    ruled = rel(mask_type, pos_q, pos_kv, rl_q, rl_kv) & in_window(
        mask_type, window_size, pos_q, pos_kv, rl_q, rl_kv
    )
    if q.prefix_lengths is not None and kv.prefix_lengths is not None:
        ruled = ruled | in_prefix(
            pos_q, pos_kv, q.prefix_lengths[..., :, None], kv.prefix_lengths[..., None, :]
        )
    return same & ruled
