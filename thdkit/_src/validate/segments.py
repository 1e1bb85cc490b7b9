"""A :class:`thdkit.Segments` validated as a whole: fields, dtypes, shapes, the layout rules and
the document lengths (docs/semantics.md, "Valid layouts").

Every public function that takes Segments calls :func:`validate_segments` once, when the values
are concrete; the constructors of :class:`thdkit.Segments` build layouts that pass it.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from thdkit._src.host import readable
from thdkit._src.limits import MAX_SEQ_LEN, check_bool, check_max_segments, is_concrete
from thdkit._src.mask_types import MaskType
from thdkit._src.segments import Segments
from thdkit._src.validate.inputs import as_layout, first_bad, row_label
from thdkit._src.validate.prefix import check_prefix_lengths
from thdkit._src.validate.rules import validate_layout

__all__ = ["as_segments", "validate_segments"]

_FIELDS = ("ids", "positions", "lengths", "prefix_lengths")


def as_segments(segments: Any, name: str, *, rows: bool = False) -> Segments:
    """``segments`` checked to be a :class:`Segments` whose fields are arrays; values unread.

    The first check of every entry point that takes Segments (and of :func:`validate_segments`).

    Args:
        segments: what the caller passed.
        name: the parameter it was passed as, for messages.
        rows: whether the fields must be [B, T] (one batch dim).

    Returns:
        ``segments``.

    Raises:
        TypeError: not a :class:`Segments`, or a field that is not a JAX or NumPy array.
        ValueError: ``rows`` and fields that are not [B, T].

    Example:
        >>> as_segments(Segments.from_ids(jnp.array([1, 1, 2])), "q_segments", rows=True)
        Traceback (most recent call last):
        ...
        ValueError: q_segments must have [B, T] fields, got shape (3,)
    """
    if not isinstance(segments, Segments):
        raise TypeError(
            f"{name} must be a thdkit.Segments (e.g. Segments.from_ids(ids, positions)), "
            f"got {type(segments).__name__}"
        )
    for field in _FIELDS:
        value = getattr(segments, field)
        if field == "prefix_lengths" and value is None:
            continue  # no prefix anywhere
        if not isinstance(value, (jax.Array, np.ndarray)):
            raise TypeError(
                f"{name}.{field} must be a JAX or NumPy array (or a list, converted when the "
                f"Segments is built), got {type(value).__name__}"
            )
    if rows and segments.ids.ndim != 2:
        raise ValueError(f"{name} must have [B, T] fields, got shape {segments.ids.shape}")
    return segments


def validate_segments(
    segments: Segments,
    *,
    name: str,
    max_segments_per_seq: int | None = None,
    mask_type: MaskType | str | None = None,
    global_lengths: bool = False,
) -> None:
    """Checks a :class:`Segments` as a whole: its fields, and their values when concrete.

    Always (also under ``jit``, ``vmap`` and ``shard_map``, where the fields are traced):

    - ``segments`` is a :class:`Segments` and each field a JAX or NumPy array;
    - ``lengths`` (and ``prefix_lengths`` when not None) is int32 and has the shape of ``ids``;
    - ids and positions have integer dtypes and one shape, at least 1-D, with
      ``1 <= T <= MAX_SEQ_LEN`` (:func:`thdkit._src.validate.rules.as_layout`);
    - ``max_segments_per_seq`` and ``mask_type``, when given, are valid.

    On concrete values only (nothing traced is read; a concrete ``Segments`` closed over by a
    jitted function is concrete):

    - ids and positions follow the layout rules (:func:`thdkit.validate_layout` with S and the
      mask type: ids in ``[0, S]``, one run per document, ids increasing, positions in
      ``[0, MAX_POSITION]`` and, for causal and bottom-right masks, increasing along each run);
      its messages name ids ``{name}`` and positions ``{name} positions``;
    - ``lengths`` (named ``{name}.lengths``) is 0 exactly on padding (id 0) and constant inside
      each run; with ``global_lengths=False`` (a whole row) it equals the run's length; with
      ``global_lengths=True`` (a context-parallel shard, lengths of whole documents as
      :meth:`Segments.with_global_lengths` computes them) it is at least the run's length and
      at most ``MAX_SEQ_LEN``;
    - ``prefix_lengths``, when not None (named ``{name}.prefix_lengths``), is 0 on padding, in
      ``[0, length]`` and the same for every token of a document.

    Args:
        segments: the :class:`Segments` to check, int32[*B, T] fields.
        name: the parameter it was passed as, for messages (e.g. ``"q_segments"``).
        max_segments_per_seq: S, the largest id allowed; None means ``MAX_SEGMENTS``.
        mask_type: a :class:`thdkit.MaskType` or its name; None checks only the rules that hold
            for every mask type (positions need not increase along runs).
        global_lengths: whether ``lengths`` are the whole documents' lengths of a shard.

    Raises:
        TypeError: ``segments`` is not a :class:`Segments`, a field is not an array, ids or
            positions not of an integer dtype, ``lengths`` or ``prefix_lengths`` not int32,
            ``name`` not a str, ``global_lengths`` not a bool, a bad ``max_segments_per_seq`` or
            ``mask_type``.
        ValueError: shapes that differ (or a scalar, or an empty row), a bad
            ``max_segments_per_seq`` or ``mask_type`` value, or a broken rule: one message naming
            the field, the row (its index in the batch dims) and the token.

    Example:
        >>> seg = Segments.from_ids(jnp.array([[1, 1, 1, 1, 2, 2, 0, 0]]))
        >>> validate_segments(seg, name="q_segments")
        >>> bad = Segments(seg.ids, seg.positions, seg.lengths.at[0, 3].set(3))
        >>> validate_segments(bad, name="q_segments")
        Traceback (most recent call last):
        ...
        ValueError: q_segments.lengths row 0, token 3: 3 inside a run of length 4; ...
        >>> shard = Segments(seg.ids, seg.positions, seg.lengths * 2)  # whole documents: 8, 4
        >>> validate_segments(shard, name="q_segments", global_lengths=True)
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    global_lengths = check_bool(global_lengths, "global_lengths")
    as_segments(segments, name)
    ids, pos, lengths = segments.ids, segments.positions, segments.lengths
    prefix = segments.prefix_lengths
    for field, value, what in (
        ("lengths", lengths, "each token's document length"),
        ("prefix_lengths", prefix, "each token's document prefix length"),
    ):
        if value is None:
            continue
        if value.dtype != np.int32:
            raise TypeError(f"{name}.{field} must be int32 ({what}), got dtype {value.dtype}")
        if value.shape != ids.shape:
            raise ValueError(
                f"{name}.{field} must have the shape of {name}.ids, {tuple(ids.shape)}, got "
                f"{tuple(value.shape)}"
            )
    num_segments = (
        None if max_segments_per_seq is None else check_max_segments(max_segments_per_seq)
    )
    mask = MaskType.PADDING if mask_type is None else MaskType.parse(mask_type)
    if not is_concrete(ids, pos):
        as_layout(ids, pos, name=name)  # dtypes and shapes only
        return
    # Read back once, the rules run on the host (thdkit._src.host): nothing compiles.
    ids, pos = readable(ids), readable(pos)
    validate_layout(ids, pos, max_segments_per_seq=num_segments, mask_type=mask, name=name)
    if is_concrete(lengths):
        _check_lengths(np.asarray(ids), np.asarray(lengths), name, global_lengths=global_lengths)
        if prefix is not None and is_concrete(prefix):
            check_prefix_lengths(
                np.asarray(ids),
                np.asarray(lengths),
                np.asarray(readable(prefix)),
                name=f"{name}.prefix_lengths",
            )


def _check_lengths(
    ids: np.ndarray, lengths: np.ndarray, name: str, *, global_lengths: bool
) -> None:
    """Raises for the first token whose length breaks the rules of :func:`validate_segments`."""
    batch, seq_len = ids.shape[:-1], ids.shape[-1]
    ids, lengths = ids.reshape(-1, seq_len), lengths.reshape(-1, seq_len).astype(np.int64)
    starts = np.ones(ids.shape, bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    run = np.cumsum(starts.reshape(-1)) - 1  # The run of each token, over all rows.
    run_len = np.where(ids != 0, np.bincount(run)[run].reshape(ids.shape), 0)
    first = np.flatnonzero(starts.reshape(-1))[run].reshape(ids.shape)  # Its run's first token.
    at_start = lengths.reshape(-1)[first]
    padding = (ids == 0) & (lengths != 0)
    if global_lengths:
        varies = (ids != 0) & (lengths != at_start)
        short = (ids != 0) & (lengths < run_len)
        long = (ids != 0) & (lengths > MAX_SEQ_LEN)
        bad = padding | varies | short | long
    else:
        varies = short = long = np.zeros(ids.shape, bool)
        bad = lengths != run_len
    if not bad.any():
        return
    row, token = first_bad(bad)
    value, run_length = int(lengths[row, token]), int(run_len[row, token])
    where = f"{name}.lengths {row_label(row, batch)}, token {token}"
    if ids[row, token] == 0:
        problem = f"{value} on a padding token (id 0); padding tokens have length 0"
    elif varies[row, token] and not short[row, token]:
        start = int(first[row, token]) - row * seq_len
        problem = (
            f"{value} differs from {int(at_start[row, token])} at token {start}, where the "
            f"run of id {int(ids[row, token])} starts; every token of a document has its length"
        )
    elif long[row, token]:
        problem = f"{value} exceeds thdkit.MAX_SEQ_LEN = {MAX_SEQ_LEN}"
    elif global_lengths:
        problem = (
            f"{value} inside a run of length {run_length}; a whole document (global_lengths) is "
            "at least as long as its run in this shard"
        )
    else:
        problem = (
            f"{value} inside a run of length {run_length}; lengths are the run lengths in a "
            "whole row (Segments.from_ids computes them; shards take "
            "Segments.with_global_lengths and global_lengths=True)"
        )
    raise ValueError(f"{where}: {problem}")
