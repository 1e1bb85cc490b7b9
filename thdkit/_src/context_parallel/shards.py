"""What the context-parallel strategies share: layouts in, shards checked, rows sorted and gathered.

Axis legend: B batch, T row length, S = ``max_segments_per_seq``, cp = size of the
context-parallel mesh axis, n = T / cp tokens per shard.

- Entry checks: :func:`check_mesh`, :func:`check_split`, :func:`row_segments` (the layout,
  :class:`thdkit.Segments` or the deprecated arrays, read once) and :func:`validate_shards`
  (each rank's shard of a concrete row is a valid layout).
- Inside ``shard_map``: :func:`with_document_lengths` (global document lengths by a ``psum``) and
  :func:`gather_row` (the whole row's layout, sorted back into document order).
- Token order: :func:`sort_by_document`, :func:`take_tokens`, :func:`inverse_order`.
- On the host, for the work a strategy describes: :func:`split_row`, :func:`sorted_row`.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jaxtyping import Array, ArrayLike, Int

from thdkit._src import reorder
from thdkit._src.context_parallel.base import StrategyConfig
from thdkit._src.limits import is_concrete
from thdkit._src.mask_types import MaskType
from thdkit._src.segments import Segments, global_lengths, lengths_from_counts, segment_counts
from thdkit._src.validate.inputs import as_layout, as_layouts
from thdkit._src.validate.prefix import check_prefix_lengths
from thdkit._src.validate.rules import validate_layout

__all__ = [
    "DEPRECATED_LAYOUT",
    "check_mesh",
    "check_split",
    "document_lengths",
    "gather_row",
    "inverse_order",
    "readable",
    "row_segments",
    "sort_by_document",
    "sorted_row",
    "split_row",
    "take_tokens",
    "validate_shards",
    "with_document_lengths",
]


def check_mesh(mesh: Any, axis_name: Any) -> int:
    """Checks the mesh and the context-parallel axis; returns cp, the axis size.

    Args:
        mesh: a ``jax.sharding.Mesh``.
        axis_name: one of its axis names.

    Returns:
        ``int``, the size of ``axis_name``.

    Raises:
        TypeError: ``mesh`` is not a ``Mesh``.
        ValueError: ``axis_name`` is not an axis of the mesh.

    Example:
        >>> check_mesh(Mesh(np.array(jax.devices()[:2]), ("cp",)), "cp")
        2
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis_name not in mesh.axis_names:
        raise ValueError(
            f"axis_name {axis_name!r} is not an axis of the mesh; its axes are {mesh.axis_names}"
        )
    return int(mesh.shape[axis_name])


def check_split(query: Array, key: Array, cp: int, axis: str) -> None:
    """Checks that cp divides the sequence lengths of ``query`` and ``key`` ([B, T, H, D]).

    Raises:
        ValueError: naming the array, cp and T.

    Example:
        >>> check_split(jnp.zeros((1, 6, 1, 1)), jnp.zeros((1, 8, 1, 1)), 4, "cp")
        Traceback (most recent call last):
        ...
        ValueError: the size of mesh axis 'cp' (cp=4) must divide the sequence length of query...
    """
    for name, x in (("query", query), ("key", key)):
        if x.shape[1] % cp:
            raise ValueError(
                f"the size of mesh axis {axis!r} (cp={cp}) must divide the sequence length of "
                f"{name}, got T={x.shape[1]}"
            )


def document_lengths(ids: Int[Array, "*B T"], num_segments: int) -> Int[Array, "*B T"]:
    """Each token's document length over its whole row, in any token order (ids above S: 0).

    Example:
        >>> document_lengths(jnp.array([1, 2, 1, 2, 0, 2]), 2)
        Array([2, 3, 2, 3, 0, 3], dtype=int32)
    """
    return lengths_from_counts(ids, segment_counts(ids, num_segments=num_segments))


DEPRECATED_LAYOUT = ("segment_ids_q", "segment_pos_q", "segment_ids_kv", "segment_pos_kv")
"""The layout keywords the context-parallel entry points took before :class:`thdkit.Segments`;
deprecated, accepted for one release (:func:`row_segments`)."""


def _segments_layout(segments: Any, name: str) -> tuple[Array, Array]:
    """One side given as :class:`Segments`: its int32 (ids, positions), checked."""
    if not isinstance(segments, Segments):
        raise TypeError(
            f"{name} must be a thdkit.Segments (thdkit.Segments.from_ids(ids, positions)), got "
            f"{type(segments).__name__}"
        )
    return as_layout(segments.ids, segments.positions, name=name)


def _prefix_field(segments: Segments, ids: Array, name: str) -> Array | None:
    """A side's prefix lengths (docs/semantics.md, "Prefix-LM masks"), checked: an integer
    array of the ids' shape, its values checked against the row where concrete."""
    prefix = segments.prefix_lengths
    if prefix is None:
        return None
    field = f"{name}.prefix_lengths"
    dtype = getattr(prefix, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{field} must be an integer array, got {type(prefix).__name__}")
    if prefix.shape != ids.shape:
        raise ValueError(f"{field} must have the ids' shape {ids.shape}, got {prefix.shape}")
    if readable(ids, prefix):
        host_ids = np.asarray(ids)
        counts = [np.unique(row, return_inverse=True, return_counts=True) for row in
                  host_ids.reshape(-1, host_ids.shape[-1])]  # fmt: skip
        lengths = np.stack([c[2][c[1]] for c in counts]).reshape(host_ids.shape)
        check_prefix_lengths(host_ids, lengths, np.asarray(prefix), name=field)
    return prefix if isinstance(prefix, np.ndarray) else jnp.asarray(prefix, jnp.int32)


def _deprecation(caller: str, given: list[str]) -> str:
    """The message of the deprecated layout keywords ``given`` to ``caller``."""
    new = ["q_segments=thdkit.Segments.from_ids(ids, positions)"]
    if any(name.endswith("_kv") for name in given):
        new.append("kv_segments=thdkit.Segments.from_ids(ids_kv, positions_kv)")
    return (
        f"{caller}({', '.join(given)}) is deprecated and goes in the next release: pass "
        f"{' and '.join(new)}; for rows reordered for context parallelism, build the Segments "
        "in document order, then reorder every field with the tokens, e.g. "
        "jax.tree.map(lambda a: thdkit.reorder.striped(a, cp=cp), segments)"
    )


def row_segments(
    q_segments: Segments | None,
    kv_segments: Segments | None = None,
    *,
    segment_ids_q: ArrayLike | None = None,
    segment_pos_q: ArrayLike | None = None,
    segment_ids_kv: ArrayLike | None = None,
    segment_pos_kv: ArrayLike | None = None,
    caller: str,
) -> tuple[Segments, Segments | None, tuple[str, str]]:
    """The layout arguments of a context-parallel entry point as the whole rows'
    :class:`thdkit.Segments`: the one place that reads them, for every entry point.

    The layout is ``q_segments`` / ``kv_segments`` (ids and positions as given; their
    ``lengths`` are not read), or, deprecated for one release, the four keyword arrays
    (:data:`DEPRECATED_LAYOUT`), never a mix. Dtypes, shapes and the int32 range are checked
    (:func:`thdkit._src.validate.inputs.as_layout`), messages naming the parameters the caller
    passed; the layout rules are checked shard by shard by :func:`validate_shards`. Nothing is
    computed over the row: the returned lengths are zeros, read by nobody; the strategies compute
    each shard's document lengths inside their programs (:func:`with_document_lengths`,
    :func:`gather_row`), and :func:`thdkit.ring_schedule` from the ids.

    Args:
        q_segments: the queries' Segments, int[*B, T_q] fields, or None with the arrays.
        kv_segments: the keys' Segments, int[*B, T_kv] fields, or None for self-attention.
        segment_ids_q, segment_pos_q, segment_ids_kv, segment_pos_kv: deprecated; int[*B, T].
        caller: the entry point, which calls this function itself (the warning points at the
            entry point's caller).

    Returns:
        ``(q, kv, names)``: int32[*B, T] Segments (lengths zero, see above); kv None for
        self-attention; the names of the q and kv layout parameters, for messages.

    Raises:
        TypeError: a segments argument that is not a ``Segments``, non-integer arrays.
        ValueError: Segments together with the arrays, no query layout, half a kv layout,
            mismatched shapes or batch dims, values outside int32 (naming the parameter, row and
            token).

    Warns:
        DeprecationWarning: the arrays were given; the message names the Segments to pass.

    Example:
        >>> q, kv, names = row_segments(
        ...     Segments.from_ids(jnp.array([[1, 1, 2, 0]])), caller="ring_attention")
        >>> q.positions.tolist(), kv, names
        ([[0, 1, 0, 0]], None, ('q_segments', 'kv_segments'))
    """
    arrays = (segment_ids_q, segment_pos_q, segment_ids_kv, segment_pos_kv)
    given = [name for name, x in zip(DEPRECATED_LAYOUT, arrays, strict=True) if x is not None]
    if given:
        sides = (("q_segments", q_segments), ("kv_segments", kv_segments))
        both = [name for name, x in sides if x is not None]
        if both:
            raise ValueError(
                "pass the layout either as q_segments / kv_segments (thdkit.Segments) or as the "
                f"deprecated {' / '.join(DEPRECATED_LAYOUT)}, not both; got "
                f"{', '.join(both + given)}"
            )
        if segment_ids_q is None or segment_pos_q is None:
            raise ValueError(
                "pass the query layout: q_segments, a thdkit.Segments (or the deprecated "
                f"segment_ids_q and segment_pos_q together); got only {', '.join(given)}"
            )
        warnings.warn(_deprecation(caller, given), DeprecationWarning, stacklevel=3)
        q, kv = as_layouts(*arrays)
        names = ("segment_ids_q", "segment_ids_kv")
    else:
        if q_segments is None:
            raise ValueError(
                "pass the query layout: q_segments, a thdkit.Segments (e.g. "
                "thdkit.Segments.from_ids(ids, positions))"
            )
        names = ("q_segments", "kv_segments")
        q = _segments_layout(q_segments, names[0])
        kv = None if kv_segments is None else _segments_layout(kv_segments, names[1])
        prefixes = tuple(
            None if side is None else _prefix_field(side, ids, name)
            for side, ids, name in (
                (q_segments, q[0], names[0]),
                (kv_segments, None if kv is None else kv[0], names[1]),
            )
        )
    if kv is not None and kv[0].shape[:-1] != q[0].shape[:-1]:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same batch dims, got shapes {q[0].shape} "
            f"and {kv[0].shape}"
        )

    if given:
        prefixes = (None, None)

    def whole(layout: tuple[Array, Array], prefix: Array | None) -> Segments:
        # Not the document lengths: counting ids over a row sharded across devices is a global
        # computation (a scatter over the sharded axis, which explicitly sharded meshes reject).
        # Each strategy computes them inside its program, per shard, where it needs them.
        return Segments(*layout, jnp.zeros_like(layout[0]), prefix)

    return whole(q, prefixes[0]), None if kv is None else whole(kv, prefixes[1]), names


def readable(*arrays: Array) -> bool:
    """Whether this process can read every value: concrete, and (multi-host) fully addressable."""
    return is_concrete(*arrays) and all(getattr(a, "is_fully_addressable", True) for a in arrays)


def validate_shards(
    segments: Segments, *, cp: int, num_segments: int, mask: MaskType, name: str
) -> None:
    """Validates each rank's shard of a concrete row (a reordered row is not itself valid).

    Args:
        segments: the whole rows, int32[*B, T] (T a multiple of cp); lengths are not read.
        cp: the number of shards.
        num_segments: S.
        mask: the mask type (rule 6 applies to causal and bottom-right types).
        name: the ids parameter, for messages.

    Raises:
        ValueError: the first broken layout rule, naming the parameter, the row as
            (batch index, shard index) and the token inside the shard.

    Example:
        >>> seg = Segments.from_ids(jnp.array([[1, 1, 1, 2]]))
        >>> validate_shards(seg, cp=2, num_segments=1, mask=MaskType.CAUSAL, name="q_segments")
        Traceback (most recent call last):
        ...
        ValueError: q_segments row (0, 1), token 1: id 2 exceeds max_segments_per_seq=1 [row = ...
    """
    # Read on the host, also when jit closes over the arrays.
    ids, pos = (np.asarray(a) for a in (segments.ids, segments.positions))
    split = (*ids.shape[:-1], cp, ids.shape[-1] // cp)
    try:
        validate_layout(
            ids.reshape(split),
            pos.reshape(split),
            max_segments_per_seq=num_segments,
            mask_type=mask,
            name=name,
        )
    except ValueError as error:
        raise ValueError(
            f"{error} [row = (batch index, shard index); token counts within the shard of "
            f"{split[-1]} tokens]"
        ) from None


def with_document_lengths(segments: Segments, config: StrategyConfig) -> Segments:
    """Inside ``shard_map``: this rank's segments with the lengths of the whole documents.

    A ``psum`` over ``config.axis_name`` of each shard's per-id counts
    (:func:`thdkit._src.segments.global_lengths`): B·(S+1) integers, whatever the token order.

    Args:
        segments: this rank's shard, int32[B, n] fields.
        config: the strategy's configuration (its axis name and S are read).

    Returns:
        :class:`thdkit.Segments` with the same ids and positions, global ``lengths``.
    """
    lengths = global_lengths(
        segments.ids, axis_name=config.axis_name, num_segments=config.max_segments_per_seq
    )
    return dataclasses.replace(segments, lengths=lengths)


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


def inverse_order(order: Int[Array, "B T"]) -> Int[Array, "B T"]:
    """The permutation that undoes ``order``: ``take_tokens(take_tokens(x, order), inverse)``
    is ``x``.

    Example:
        >>> inverse_order(jnp.array([[2, 0, 1]])).tolist()
        [[1, 2, 0]]
    """
    index = lax.broadcasted_iota(jnp.int32, order.shape, order.ndim - 1)
    return lax.sort((order, index), dimension=order.ndim - 1, num_keys=1)[1]


def gather_row(segments: Segments, config: StrategyConfig) -> tuple[Segments, Int[Array, "B T"]]:
    """Inside ``shard_map``: the whole row's layout in document order, and the order that sorts
    the gathered row.

    One ``all_gather`` of the ids and one of the positions (tiled along the token axis, in shard
    order), :func:`sort_by_document` (the gathered row of a reordered layout holds each document
    once per shard, which the tile ranges cannot read), and the document lengths from the row's
    counts. Gather other per-token arrays the same way and put them in the returned order with
    :func:`take_tokens`.

    Args:
        segments: this rank's shard, int32[B, n] fields.
        config: the strategy's configuration (its axis name and S are read).

    Returns:
        ``(row, order)``: :class:`thdkit.Segments` int32[B, T] of the sorted row, and
        int32[B, T], the gathered token each sorted position holds.
    """
    ids, pos = (
        lax.all_gather(x, config.axis_name, axis=1, tiled=True)
        for x in (segments.ids, segments.positions)
    )
    ids, pos, order = sort_by_document(ids, pos)
    prefix = segments.prefix_lengths
    if prefix is not None:
        prefix = take_tokens(lax.all_gather(prefix, config.axis_name, axis=1, tiled=True), order)
    lengths = document_lengths(ids, config.max_segments_per_seq)
    return Segments(ids, pos, lengths, prefix), order


def split_row(row: Segments, cp: int) -> list[Segments]:
    """On the host: the cp contiguous shards of a row's :class:`thdkit.Segments` ([B, T] fields).

    Example:
        >>> [s.ids.tolist() for s in split_row(Segments.from_ids(jnp.array([[1, 1, 2, 2]])), 2)]
        [[[1, 1]], [[2, 2]]]
    """
    return [jax.tree.map(lambda a, r=r: reorder.shard(a, cp=cp, rank=r), row) for r in range(cp)]


def sorted_row(row: Segments) -> Segments:
    """A row's :class:`thdkit.Segments` in document order (:func:`sort_by_document`), lengths
    moved with their tokens.

    Example:
        >>> row = Segments(jnp.array([[2, 1, 2]]), jnp.array([[0, 0, 1]]), jnp.array([[2, 1, 2]]))
        >>> sorted_row(row).ids.tolist()
        [[1, 2, 2]]
    """
    ids, pos, order = sort_by_document(jnp.asarray(row.ids), jnp.asarray(row.positions))
    moved = (
        None if x is None else jnp.take_along_axis(jnp.asarray(x), order, axis=1)
        for x in (row.lengths, row.prefix_lengths)
    )
    return Segments(ids, pos, *moved)
