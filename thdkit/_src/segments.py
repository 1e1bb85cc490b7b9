"""``Segments``: one side's packed layout as a pytree, and the converters real data comes in.

A packed row holds several documents told apart by per-token segment ids (0 = padding, 1..n the
documents, each one run, increasing along the row) and positions (each token's position inside its
document). Attention also needs each token's *document length* (the bottom-right causal rule
compares ``length - position``); computing it once, next to the ids, means no layer recomputes it,
and context-parallel shards can carry the length of the whole document rather than of their slice.

``Segments`` holds those three int32 ``[*B, T]`` arrays (and optional prefix lengths). Build one
per batch with a converter:

- :meth:`Segments.from_ids`: segment ids (0 or -1 marking padding) and optional positions;
- :meth:`Segments.from_cu_seqlens`: cumulative document lengths (FlashAttention / HF varlen);
- :meth:`Segments.from_positions`: position ids that restart at each document (HF
  ``DataCollatorWithFlattening``).

:func:`thdkit._src.validate.segments.validate_segments` checks a ``Segments`` as a whole
(fields, dtypes, shapes and, when concrete, the layout rules and the lengths: run lengths in a
whole row, whole-document lengths in a context-parallel shard).

Being a pytree, it goes through ``jax.jit``, ``jax.lax.scan`` and ``shard_map``, and a token
reorder applies to every field at once: ``jax.tree.map(lambda a: striped(a, cp=4), segments)``
(lengths stay the document lengths, as the bottom-right rule needs in every shard).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Int

from thdkit._src.counting import shift
from thdkit._src.host import JAX, NUMPY, ArrayOps, on_host, readable
from thdkit._src.limits import MAX_SEGMENTS, MAX_SEQ_LEN, check_int, check_max_segments, is_concrete
from thdkit._src.programs import program
from thdkit._src.validate.inputs import (
    as_layout,
    check_cu_seqlens,
    check_not_below,
    check_padding_id,
    check_rows_start_at_zero,
    field_int32,
    int32_array,
    position_ids_array,
    positions_in_runs,
)
from thdkit._src.validate.prefix import with_prefix
from thdkit._src.validate.rules import validate_layout

__all__ = [
    "Segments",
    "global_lengths",
    "lengths_from_counts",
    "run_lengths",
    "segment_counts",
    "segments_from_ids",
]


_FIELDS = ("ids", "positions", "lengths", "prefix_lengths")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Segments:
    """One side's packed layout: segment ids, positions, document lengths and prefixes (a pytree).

    Attributes:
        ids: int32[*B, T]; 0 = padding, 1..n = the document of each token (one run per document,
            ids increasing along the row).
        positions: int32[*B, T]; each token's position inside its document.
        lengths: int32[*B, T]; the length of each token's document (0 on padding): the run length
            in a whole row, the global document length in a context-parallel shard.
        prefix_lengths: int32[*B, T] or None (no prefix anywhere); each token's document prefix
            length P (0 = none, and on padding; :meth:`with_prefix`).

    Fields given as Python lists are converted to int32 NumPy arrays at construction (a value
    outside int32 raises ``ValueError`` naming the field, a non-integer entry ``TypeError``);
    the constructors below also check the layout, the bare constructor does not.

    Example:
        >>> seg = Segments.from_ids(jnp.array([[1, 1, 1, 2, 2, 0, 0, 3]]))
        >>> seg.positions
        Array([[0, 1, 2, 0, 1, 0, 0, 0]], dtype=int32)
        >>> seg.lengths
        Array([[3, 3, 3, 2, 2, 0, 0, 1]], dtype=int32)
    """

    ids: Int[Array, "*B T"]
    positions: Int[Array, "*B T"]
    lengths: Int[Array, "*B T"]
    prefix_lengths: Int[Array, "*B T"] | None = None

    def __post_init__(self) -> None:
        # Python lists become int32 NumPy arrays, their values checked against int32 first;
        # anything else (arrays, tracers, and what pytree utilities put in the fields, such as
        # partition specs) stays as it is. validate_segments checks the fields' types.
        for field in _FIELDS:
            value = getattr(self, field)
            if type(value) is list:
                object.__setattr__(self, field, field_int32(value, f"Segments.{field}"))

    @property
    def seq_len(self) -> int:
        """T, the row length."""
        return self.ids.shape[-1]

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """The batch dims ``*B``."""
        return tuple(self.ids.shape[:-1])

    @classmethod
    def from_ids(
        cls,
        segment_ids: Int[ArrayLike, "*B T"],
        segment_pos: Int[ArrayLike, "*B T"] | None = None,
        *,
        padding_id: int = 0,
        prefix: Bool[ArrayLike, "*B T"] | None = None,
    ) -> Segments:
        """Segments from per-token segment ids and (optionally) positions and prefix flags.

        When the inputs are concrete the layout rules that need neither
        ``max_segments_per_seq`` nor a mask type are checked (each document one run, ids
        increasing, positions in range); :func:`thdkit.plan_attention` and
        :func:`thdkit.seqlens_and_offsets` check the rest. Under ``jit`` nothing is checked (see
        docs/semantics.md, "Accepted ranges, and validation under jit and vmap").

        Args:
            segment_ids: int[*B, T]; ``padding_id`` marks padding, the other values the documents.
            segment_pos: int[*B, T], or None to number each document's tokens 0, 1, 2, ... (and
                padding 0).
            padding_id: 0 (ids 1..n are documents: thdkit's, Grain's and cuDNN's convention) or
                -1 (ids 0..n-1 are documents: splash attention's and kvax's); -1 shifts every id
                up by one.
            prefix: bool[*B, T] or None; True on each document's prefix (:meth:`with_prefix`).

        Returns:
            :class:`Segments` with int32[*B, T] fields.

        Raises:
            TypeError: non-integer arrays (non-bool ``prefix``), or a non-int ``padding_id``.
            ValueError: shapes (scalars, empty rows, ids and positions of different shapes),
                ``padding_id`` other than 0 or -1, an id below ``padding_id``, or (concrete inputs)
                a broken layout rule (or prefix flags), naming the parameter, row and token.

        Example:
            >>> seg = Segments.from_ids(jnp.array([0, 0, 1, 1, -1]), padding_id=-1)
            >>> seg.ids, seg.positions
            (Array([1, 1, 2, 2, 0], dtype=int32), Array([0, 1, 0, 1, 0], dtype=int32))
        """
        return segments_from_ids(segment_ids, segment_pos, padding_id=padding_id, prefix=prefix)

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: Int[ArrayLike, "*B N1"], *, total_len: int) -> Segments:
        """Segments from cumulative document lengths (the FlashAttention / HF varlen format).

        Document k of a row covers tokens ``[cu_seqlens[k], cu_seqlens[k + 1])`` and gets id
        ``k + 1``; tokens from ``cu_seqlens[-1]`` to ``total_len`` are padding. Repeated entries
        (empty documents) leave a gap in the ids, which is allowed.

        Args:
            cu_seqlens: int[N+1] for one row (a flattened token axis) or int[*B, N+1] for
                several; starts at 0 and never decreases.
            total_len: T, a static int >= ``cu_seqlens[..., -1]``.

        Returns:
            :class:`Segments` with int32[*B, T] fields (``[1, T]`` for a 1-D ``cu_seqlens``).

        Raises:
            TypeError: non-integer ``cu_seqlens`` or ``total_len``.
            ValueError: ``total_len`` outside ``[1, MAX_SEQ_LEN]``, ragged rows (a nested list
                whose rows differ in length), fewer than 2 entries, or (concrete inputs) a first
                entry other than 0, a decrease, or an end beyond ``total_len``, naming the row and
                the entry.

        Example:
            >>> seg = Segments.from_cu_seqlens(jnp.array([0, 3, 5]), total_len=7)
            >>> seg.ids, seg.positions
            (Array([[1, 1, 1, 2, 2, 0, 0]], dtype=int32),
             Array([[0, 1, 2, 0, 1, 0, 0]], dtype=int32))
        """
        total_len = check_int(total_len, "total_len", low=1, high=MAX_SEQ_LEN)
        cu = int32_array(cu_seqlens, "cu_seqlens")
        if cu.ndim == 1:
            cu = cu[None]
        if cu.ndim == 0 or cu.shape[-1] < 2:
            raise ValueError(f"cu_seqlens must hold at least 2 entries, got shape {cu.shape}")
        if is_concrete(cu):
            check_cu_seqlens(np.asarray(cu), total_len)
        t = jnp.arange(total_len, dtype=jnp.int32)

        def row(cu_row: Array) -> tuple[Array, Array]:
            ids = jnp.searchsorted(cu_row, t, side="right").astype(jnp.int32)
            inside = t < cu_row[-1]
            start = cu_row[jnp.clip(ids - 1, 0, cu_row.shape[0] - 1)]
            return jnp.where(inside, ids, 0), jnp.where(inside, t - start, 0)

        flat = cu.reshape(-1, cu.shape[-1])
        ids, pos = jax.vmap(row)(flat)
        shape = (*cu.shape[:-1], total_len)
        ids, pos = ids.reshape(shape), pos.reshape(shape)
        return cls(ids, pos, run_lengths(ids))

    @classmethod
    def from_positions(cls, position_ids: Int[ArrayLike, "*B T"]) -> Segments:
        """Segments from position ids that restart at 0 with every document (no padding).

        The format of rows flattened without padding (Hugging Face ``DataCollatorWithFlattening``)
        read as Hugging Face's ``prepare_fa_kwargs_from_position_ids`` reads it: a document starts
        exactly where the position is 0, and runs to the next 0 (positions in between are kept
        as given: ``[0, 1, 2, 1, 2, 3]`` is one document). Documents get ids 1, 2, ... in order;
        no token is padding (a padding token of position 0 is a document of one token, as for
        Hugging Face).

        Every row must start with position 0: Hugging Face reads the flattened batch, so the
        tokens before a row's first 0 belong to no document of that row (with one row, to none;
        with several, to the previous row's last document). Concrete rows that do not start with
        0 raise; under ``jit`` (not checked) their leading tokens form a document of their own.

        Args:
            position_ids: int[*B, T]; positions in ``[0, MAX_POSITION]``, 0 at every row's start.

        Returns:
            :class:`Segments` with int32[*B, T] fields; no token is padding.

        Raises:
            TypeError: a non-integer ``position_ids`` (bool included).
            ValueError: a scalar, an empty row, a row longer than ``MAX_SEQ_LEN``, a ragged
                nested list, or (concrete inputs) a position outside ``[0, MAX_POSITION]`` or a
                row that does not start with 0, naming ``position_ids``, the row and the token.

        Example:
            >>> Segments.from_positions(jnp.array([0, 1, 2, 0, 1, 0])).ids
            Array([1, 1, 1, 2, 2, 3], dtype=int32)
            >>> Segments.from_positions(jnp.array([0, 1, 2, 1, 2, 3])).ids
            Array([1, 1, 1, 1, 1, 1], dtype=int32)
        """
        pos = position_ids_array(position_ids)
        if is_concrete(pos):
            check_rows_start_at_zero(np.asarray(pos))
        first = jnp.broadcast_to(jnp.arange(pos.shape[-1]) == 0, pos.shape)
        # Ids 1, 2, ... by construction: one run each, increasing (rules 3 and 4 hold).
        ids = jnp.cumsum((pos == 0) | first, axis=-1, dtype=jnp.int32)
        return cls(ids, pos, run_lengths(ids))

    with_prefix = with_prefix  # a method: thdkit._src.validate.prefix.with_prefix

    def with_global_lengths(self, *, axis_name: str, max_segments_per_seq: int) -> Segments:
        """Inside ``shard_map``: the lengths of whole documents across the shards of ``axis_name``.

        Each shard counts its tokens of every id 0..S; a ``psum`` of those S+1 counts per row
        gives each document's length over the whole row, whatever the token order (plain,
        striped, dual-chunk swap). Ids above S are not counted (their length reads 0).

        Args:
            axis_name: the mesh axis the sequence is sharded over (bound by ``shard_map``).
            max_segments_per_seq: S, a static int >= the largest id.

        Returns:
            :class:`Segments` with the same ids and positions and global ``lengths``.

        Raises:
            TypeError: ``max_segments_per_seq`` is not a static Python (or NumPy) int, e.g. a
                float, a bool or a traced value.
            ValueError: ``max_segments_per_seq`` outside ``[1, MAX_SEGMENTS]``.

        Example:
            >>> import numpy as np
            >>> from jax.sharding import Mesh, PartitionSpec as P
            >>> mesh = Mesh(np.array(jax.devices()[:2]), ("cp",))
            >>> seg = Segments.from_ids(jnp.array([[1, 1, 1, 2, 2, 2, 2, 0]]))
            >>> local = jax.shard_map(
            ...     lambda s: s.with_global_lengths(axis_name="cp", max_segments_per_seq=2),
            ...     mesh=mesh, in_specs=P(None, "cp"), out_specs=P(None, "cp"))
            >>> local(seg).lengths
            Array([[3, 3, 3, 4, 4, 4, 4, 0]], dtype=int32)
        """
        lengths = global_lengths(
            self.ids, axis_name=axis_name, num_segments=check_max_segments(max_segments_per_seq)
        )
        return dataclasses.replace(self, lengths=lengths)


def segments_from_ids(
    segment_ids: Int[ArrayLike, "*B T"],
    segment_pos: Int[ArrayLike, "*B T"] | None = None,
    *,
    padding_id: int = 0,
    prefix: Bool[ArrayLike, "*B T"] | None = None,
    name: str = "segment_ids",
) -> Segments:
    """:meth:`Segments.from_ids`, its messages naming the ids ``name`` (the caller's parameter:
    ``thdkit.unpad`` passes ``"segments"``); positions are named after it (``segment_pos``).

    Example:
        >>> segments_from_ids([[1, 0, 1]], name="segments")
        Traceback (most recent call last):
        ...
        ValueError: segments row 0, token 2: id 1 starts a second run (a padding hole inside a ...
    """
    padding_id = check_padding_id(padding_id)
    given_pos = segment_pos is not None
    # Concrete JAX layouts are built on the host too (nothing compiles), then put back.
    to_device = not on_host(segment_ids, segment_pos) and on_host(
        readable(segment_ids), readable(segment_pos)
    )
    if to_device:
        segment_ids, segment_pos = readable(segment_ids), readable(segment_pos)
    ops = NUMPY if on_host(segment_ids, segment_pos) else JAX
    ids, pos = as_layout(segment_ids, segment_pos if given_pos else segment_ids, name=name, ops=ops)
    if padding_id == -1:
        if is_concrete(ids):
            check_not_below(ids, -1, name=name, highest=MAX_SEGMENTS - 1)
        ids = ids + 1
    if not given_pos:
        pos = positions_in_runs(ids, ops=ops)
    if is_concrete(ids, pos):
        # S is not known here: ids <= S and rule 6 (mask-dependent) are checked by the plan.
        validate_layout(ids, pos, max_segments_per_seq=None, mask_type="padding", name=name)
    segments = Segments(ids, pos, run_lengths(ids))
    if prefix is not None:
        segments = segments.with_prefix(readable(prefix) if to_device else prefix, name="prefix")
    return jax.device_put(segments) if to_device else segments


def run_lengths(segment_ids: Int[ArrayLike, "*B T"]) -> Int[Array, "*B T"]:
    """Length of the run holding each token; 0 on padding.

    A run is a maximal stretch of equal consecutive ids. For valid layouts this is the length of
    the token's document (in this row or shard). Host data (NumPy arrays, lists) is computed in
    NumPy and compiles nothing (``host``); JAX arrays in one compiled program.

    Args:
        segment_ids: int[*B, T]; 0 = padding.

    Returns:
        int32[*B, T]: a NumPy array for host data, else a JAX array.

    Example:
        >>> run_lengths(jnp.array([1, 1, 1, 0, 2, 2, 0, 0]))
        Array([3, 3, 3, 0, 2, 2, 0, 0], dtype=int32)
        >>> run_lengths(np.array([1, 1, 2]))
        array([2, 2, 1], dtype=int32)
    """
    if on_host(segment_ids):
        return _run_lengths(np.asarray(segment_ids), ops=NUMPY)
    return _device_run_lengths(segment_ids)


def _run_lengths(ids: Array, *, ops: ArrayOps) -> Array:
    xp = ops.xp
    seq_len = ids.shape[-1]
    t = xp.broadcast_to(xp.arange(seq_len, dtype=np.int32), ids.shape)
    starts = shift(ids, 1, fill=-1, ops=ops) != ids
    ends = shift(ids, -1, fill=-1, ops=ops) != ids
    axis = ids.ndim - 1
    first = ops.cummax(xp.where(starts, t, 0), axis)
    # The running minimum from the right, as a running maximum of the negated, reversed row.
    last = -xp.flip(ops.cummax(xp.flip(xp.where(ends, -t, -seq_len), axis), axis), axis)
    return xp.where(ids != 0, last - first + 1, 0).astype(np.int32)


@program
def _device_run_lengths(segment_ids: Array) -> Array:
    return _run_lengths(jnp.asarray(segment_ids), ops=JAX)


def global_lengths(
    ids: Int[Array, "*B n"], *, axis_name: str, num_segments: int
) -> Int[Array, "*B n"]:
    """Inside ``shard_map``: each token's document length over all shards of ``axis_name``.

    The body of :meth:`Segments.with_global_lengths`, for callers that hold bare ids: a ``psum``
    of each shard's :func:`segment_counts`, read back at every token (0 on padding and on ids
    above S).

    Args:
        ids: int32[*B, n]; this shard's segment ids.
        axis_name: the mesh axis the sequence is sharded over.
        num_segments: S.

    Returns:
        int32[*B, n].
    """
    counts = jax.lax.psum(segment_counts(ids, num_segments=num_segments), axis_name)
    return lengths_from_counts(ids, counts)


def lengths_from_counts(ids: Int[Array, "*B n"], counts: Int[Array, "*B S1"]) -> Int[Array, "*B n"]:
    """Each token's document length read off per-row counts of ids 0..S (0 on padding and above S).

    Args:
        ids: int32[*B, n].
        counts: int32[*B, S+1]; e.g. :func:`segment_counts` of the whole row.

    Returns:
        int32[*B, n].

    Example:
        >>> ids = jnp.array([1, 1, 2, 0])
        >>> lengths_from_counts(ids, segment_counts(ids, num_segments=2))
        Array([2, 2, 1, 0], dtype=int32)
    """
    num_segments = counts.shape[-1] - 1
    length = jnp.take_along_axis(counts, jnp.clip(ids, 0, num_segments), axis=-1)
    return jnp.where((ids > 0) & (ids <= num_segments), length, 0)


def segment_counts(ids: Int[Array, "*B T"], *, num_segments: int) -> Int[Array, "*B S1"]:
    """Tokens of each id 0..S per row (ids outside [0, S] are not counted).

    Args:
        ids: int[*B, T].
        num_segments: S.

    Returns:
        int32[*B, S+1].

    Example:
        >>> segment_counts(jnp.array([1, 1, 0, 2, 5]), num_segments=2)
        Array([1, 2, 1], dtype=int32)
    """

    def row(ids_row: Array) -> Array:
        return jnp.zeros(num_segments + 1, jnp.int32).at[ids_row].add(1, mode="drop")

    flat = ids.reshape(-1, ids.shape[-1])
    return jax.vmap(row)(flat).reshape(*ids.shape[:-1], num_segments + 1)
