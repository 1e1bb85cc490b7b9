"""Prefix-LM layouts: per-token prefix flags read into prefix lengths, and their checks.

A document's prefix is its first P tokens by position (docs/semantics.md, "Prefix-LM masks").
Flags mark them (:meth:`thdkit.Segments.with_prefix`, defined here as :func:`with_prefix`);
:class:`thdkit.Segments` carries the resulting per-token P (``prefix_lengths``). Dtypes and
shapes are checked always, values when concrete (on the host, in NumPy: nothing compiles);
under ``jit`` nothing is read.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Int

from thdkit._src.counting import shift
from thdkit._src.host import JAX, NUMPY, ArrayOps, on_host, readable
from thdkit._src.programs import program
from thdkit._src.validate.inputs import first_bad, row_label

__all__ = [
    "check_prefix_flags",
    "check_prefix_lengths",
    "prefix_flags",
    "prefix_lengths_from_flags",
    "prefix_lengths_of",
    "with_prefix",
]


def with_prefix(segments: Any, prefix: Bool[ArrayLike, "*B T"], *, name: str = "prefix") -> Any:
    """These Segments with each document's prefix given by per-token flags.

    :meth:`thdkit.Segments.with_prefix` (``segments`` is the instance). A document's prefix is
    its first P tokens by position: P = 1 + the largest position of a flagged token of the
    document (0 where none is flagged). Inside a prefix attention is bidirectional: a pair of
    tokens of one document both inside its prefix is allowed whatever the mask type and window
    (docs/semantics.md, "Prefix-LM masks"). Works on reordered rows (context-parallel shards of
    whole rows, as ``thdkit.reorder`` makes them): the flags travel with their tokens. Concrete
    flags are checked; under ``jit`` nothing is (flags that are not a prefix then give the P
    above).

    Args:
        segments: the :class:`thdkit.Segments`, int32[*B, T] fields.
        prefix: bool[*B, T], the shape of ``ids``; True on the tokens of each document's prefix,
            False on the others and on padding.
        name: the parameter the flags were passed as, for messages.

    Returns:
        :class:`thdkit.Segments` with the same ids, positions and lengths and int32[*B, T]
        ``prefix_lengths`` (NumPy for NumPy fields and flags, else JAX).

    Raises:
        TypeError: ``prefix`` not a bool array (ints and floats are refused: pass
            ``flags != 0``).
        ValueError: a shape other than ``ids``'s, or (concrete) a flag on padding or a flagged
            token at a later position than an unflagged token of its document, naming the row
            and the token.

    Example:
        >>> from thdkit import Segments
        >>> seg = Segments.from_ids(jnp.array([[1, 1, 1, 1, 2, 2, 2, 0]]))
        >>> seg.with_prefix(jnp.array([[1, 1, 0, 0, 1, 0, 0, 0]], bool)).prefix_lengths
        Array([[2, 2, 2, 2, 1, 1, 1, 0]], dtype=int32)
        >>> seg.with_prefix(jnp.array([[1, 0, 1, 0, 0, 0, 0, 0]], bool))
        Traceback (most recent call last):
        ...
        ValueError: prefix row 0, token 1: not flagged at position 1, but document 1 flags ...
    """
    lengths = prefix_lengths_of(segments.ids, segments.positions, prefix, name=name)
    return dataclasses.replace(segments, prefix_lengths=lengths)


def prefix_lengths_of(
    ids: Int[ArrayLike, "*B T"],
    positions: Int[ArrayLike, "*B T"],
    prefix: Any,
    *,
    name: str,
) -> Int[Array, "*B T"]:
    """The prefix lengths of flags ``prefix`` (:func:`prefix_lengths_from_flags`), the flags
    checked (:func:`prefix_flags`; :func:`check_prefix_flags` when concrete). Host and concrete
    data are read in NumPy (nothing compiles; concrete JAX data gives a JAX result).

    Example:
        >>> prefix_lengths_of(np.array([1, 1, 0]), np.array([0, 1, 2]), [True, False, False],
        ...                   name="prefix")
        array([1, 1, 0], dtype=int32)
    """
    flags = prefix_flags(prefix, ids.shape, name=name)
    fields = (ids, positions, flags)
    to_device = not on_host(*fields) and on_host(*map(readable, fields))
    if to_device:
        fields = tuple(map(readable, fields))
    if not on_host(*fields):
        return _device_prefix_lengths(*fields)
    ids, pos, flags = (np.asarray(a) for a in fields)
    lengths = prefix_lengths_from_flags(ids, pos, flags, ops=NUMPY)
    check_prefix_flags(ids, pos, flags, lengths, name=name)
    return jax.device_put(lengths) if to_device else lengths


def prefix_flags(prefix: Any, shape: tuple[int, ...], *, name: str) -> np.ndarray | jax.Array:
    """``prefix`` checked to be a bool array of ``shape``: a NumPy array for lists.

    Args:
        prefix: bool[*B, T] flags (NumPy, JAX, traced, or a nested list of bools).
        shape: the shape of the ids, ``(*B, T)``.
        name: the parameter, for messages.

    Returns:
        The flags, a NumPy or JAX bool array.

    Raises:
        TypeError: not a bool array (ints and floats included).
        ValueError: a ragged list or a shape other than ``shape``.

    Example:
        >>> prefix_flags([[1, 0]], (1, 2), name="prefix")
        Traceback (most recent call last):
        ...
        TypeError: prefix must be a bool array (True on each document's prefix), got dtype int64...
    """
    if not isinstance(prefix, (np.ndarray, jax.Array)):
        try:
            prefix = np.asarray(prefix)
        except ValueError as error:  # ragged nested lists
            raise ValueError(f"{name} must be a rectangular bool array: {error}") from None
    if prefix.dtype != jnp.bool_:
        raise TypeError(
            f"{name} must be a bool array (True on each document's prefix), got dtype "
            f"{prefix.dtype}; pass flags != 0 for a 0/1 array"
        )
    if tuple(prefix.shape) != tuple(shape):
        raise ValueError(
            f"{name} must have the shape of the segment ids, {tuple(shape)}, got "
            f"{tuple(prefix.shape)}"
        )
    return prefix


def _first_tokens(ids: np.ndarray) -> np.ndarray:
    """Per token of [N, T] ids: the flat index of the first token of its document (same row,
    same id)."""
    key = np.arange(ids.shape[0], dtype=np.int64)[:, None] * (int(ids.max(initial=0)) + 1) + ids
    _, first, inverse = np.unique(key.reshape(-1), return_index=True, return_inverse=True)
    return first[inverse.reshape(-1)].reshape(ids.shape)


def _raise_at(bad: np.ndarray, batch: tuple[int, ...], message: Any) -> None:
    """Raises ``message(row, token)`` for the first true entry of ``bad`` [N, T], if any."""
    if not bad.any():
        return
    row, token = first_bad(bad)
    raise ValueError(message(row, token, row_label(row, batch)))


def check_prefix_flags(
    ids: np.ndarray,
    positions: np.ndarray,
    flags: np.ndarray,
    prefix_lengths: np.ndarray,
    *,
    name: str,
) -> None:
    """Raises for the first token whose flag is not that of a document's prefix.

    A flag on padding, or an unflagged token of a document at a position below that of one of
    its flagged tokens (flags must be on, then off, by position), is an error.

    Args:
        ids, positions: int32[*B, T], a valid layout.
        flags: bool[*B, T].
        prefix_lengths: int32[*B, T], the flags' P per token
            (:func:`thdkit._src.segments.prefix_lengths_from_flags`).
        name: the flags' parameter, for messages.

    Raises:
        ValueError: naming ``name``, the row and the token.

    Example:
        >>> check_prefix_flags(np.array([1, 0]), np.array([0, 0]), np.array([True, True]),
        ...                    np.array([1, 0]), name="prefix")
        Traceback (most recent call last):
        ...
        ValueError: prefix row 0, token 1: flagged, but the token is padding (id 0); ...
    """
    batch, seq_len = ids.shape[:-1], ids.shape[-1]
    ids, pos, flags, length = (
        np.asarray(a).reshape(-1, seq_len) for a in (ids, positions, flags, prefix_lengths)
    )
    on_padding = flags & (ids == 0)
    out_of_order = ~flags & (ids != 0) & (pos < length)

    def message(row: int, token: int, where: str) -> str:
        if on_padding[row, token]:
            return (
                f"{name} {where}, token {token}: flagged, but the token is padding (id 0); only "
                "documents have a prefix"
            )
        return (
            f"{name} {where}, token {token}: not flagged at position {pos[row, token]}, but "
            f"document {ids[row, token]} flags position {length[row, token] - 1}; a prefix is "
            "a document's first tokens (flags on, then off, by position)"
        )

    _raise_at(on_padding | out_of_order, batch, message)


def check_prefix_lengths(
    ids: np.ndarray, lengths: np.ndarray, prefix_lengths: np.ndarray, *, name: str
) -> None:
    """Raises for the first token whose prefix length breaks the rules of the field.

    ``prefix_lengths`` must be 0 on padding, in ``[0, length]`` (the token's document length
    as ``lengths`` holds it) and the same for every token of a document (same row, same id).

    Args:
        ids: int32[*B, T], a valid layout.
        lengths: int32[*B, T], the document lengths.
        prefix_lengths: int32[*B, T].
        name: the field, for messages (e.g. ``"q_segments.prefix_lengths"``).

    Raises:
        ValueError: naming ``name``, the row and the token.

    Example:
        >>> check_prefix_lengths(np.array([[1, 1, 2]]), np.array([[2, 2, 1]]),
        ...                      np.array([[1, 2, 0]]), name="q_segments.prefix_lengths")
        Traceback (most recent call last):
        ...
        ValueError: q_segments.prefix_lengths row 0, token 1: 2 differs from 1 at token 0, ...
    """
    batch, seq_len = ids.shape[:-1], ids.shape[-1]
    ids, lengths, prefix = (
        np.asarray(a).reshape(-1, seq_len).astype(np.int64) for a in (ids, lengths, prefix_lengths)
    )
    first = _first_tokens(ids)
    at_first = prefix.reshape(-1)[first]
    on_padding = (ids == 0) & (prefix != 0)
    negative = prefix < 0
    too_long = (ids != 0) & (prefix > lengths)
    varies = (ids != 0) & (prefix != at_first)

    def message(row: int, token: int, where: str) -> str:
        value = int(prefix[row, token])
        head = f"{name} {where}, token {token}: {value}"
        if on_padding[row, token]:
            return f"{head} on a padding token (id 0); padding has prefix length 0"
        if negative[row, token]:
            return f"{head} is negative; a prefix length is >= 0 (0 = no prefix)"
        if too_long[row, token]:
            return (
                f"{head} exceeds the document's length {int(lengths[row, token])}; a prefix is "
                "part of its document"
            )
        start = int(first[row, token]) - row * seq_len
        return (
            f"{head} differs from {int(at_first[row, token])} at token {start}, the first token "
            f"of document {int(ids[row, token])}; every token of a document has its prefix "
            "length"
        )

    _raise_at(on_padding | negative | too_long | varies, batch, message)


def prefix_lengths_from_flags(
    ids: Int[Array, "*B T"],
    positions: Int[Array, "*B T"],
    flags: Bool[Array, "*B T"],
    *,
    ops: ArrayOps = JAX,
) -> Int[Array, "*B T"]:
    """Each token's document prefix length: 1 + the largest position of a flagged token of its
    document (0 where none is, and on padding).

    Documents are told apart by id within each row, wherever their tokens lie (reordered rows
    included): a stable sort of each row's ids groups them, one scatter-max over the groups finds
    each maximum. O(T log T) for the sort, O(T) otherwise; no [T, S] array.

    Args:
        ids: int32[*B, T]; 0 = padding.
        positions: int32[*B, T].
        flags: bool[*B, T].
        ops: the array module (``JAX`` or ``NUMPY``).

    Returns:
        int32[*B, T].

    Example:
        >>> prefix_lengths_from_flags(np.array([1, 1, 2, 1, 2]), np.array([0, 2, 0, 1, 1]),
        ...                           np.array([1, 0, 1, 1, 0], bool), ops=NUMPY)
        array([2, 2, 1, 2, 1], dtype=int32)
    """
    xp = ops.xp
    shape, seq_len = ids.shape, ids.shape[-1]
    flat_ids = ids.reshape(-1, seq_len)
    rows = flat_ids.shape[0]
    values = xp.where(flags & (ids != 0), positions + 1, 0).astype(np.int32).reshape(-1, seq_len)
    if ops is NUMPY:
        order = np.argsort(flat_ids, axis=-1, kind="stable")
    else:
        order = jnp.argsort(flat_ids, axis=-1, stable=True)
    at = lambda x, i: xp.take_along_axis(x, i, axis=-1)  # noqa: E731
    sorted_ids = at(flat_ids, order)
    starts = shift(sorted_ids, 1, fill=-1, ops=ops) != sorted_ids
    group = xp.cumsum(starts, axis=-1, dtype=np.int32) - 1
    bins = (group + seq_len * xp.arange(rows, dtype=np.int32)[:, None]).reshape(-1)
    top = ops.scatter_max(xp.zeros(rows * seq_len, np.int32), bins, at(values, order).reshape(-1))
    per_sorted = top[bins].reshape(rows, seq_len)
    inverse = xp.argsort(order, axis=-1)
    lengths = at(per_sorted, inverse).reshape(shape)
    return xp.where(ids != 0, lengths, 0).astype(np.int32)


@program
def _device_prefix_lengths(ids: Array, positions: Array, flags: Array) -> Array:
    return prefix_lengths_from_flags(
        jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(flags), ops=JAX
    )
