"""Segment layouts: argument checks, the layout rules, and run lengths.

A *layout* is the pair ``(segment_ids, segment_pos)`` of one side (queries or keys/values), both
``int[*B, T]``: ``segment_ids`` is 0 for padding and 1..S for the document a token belongs to,
``segment_pos`` the token's position inside its document. The rules a layout must satisfy
(DESIGN.md, "Valid layouts"), per row:

1. ids and positions are integer arrays of one shape, at least 1-D (leading dims are batch dims);
2. ``0 <= id <= S`` (S = ``max_segments_per_seq``);
3. each non-zero id occupies exactly one run (no padding hole inside a document, no id reused);
4. non-zero ids increase from run to run;
5. positions are ``>= 0``;
6. for causal and bottom-right mask types, positions strictly increase along each run.

Eagerly, :func:`validate_layout` raises for the first broken rule, naming the parameter, the row
and the token. Under ``jit`` nothing can raise on values: :func:`layout_error_codes` returns per-row
codes instead, and :func:`check_layout` turns them into a ``jax.experimental.checkify`` check.
"""

from __future__ import annotations

import enum
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify
from jaxtyping import Array, ArrayLike, Int

from thdkit.masks import MaskType

__all__ = [
    "LayoutError",
    "LayoutErrors",
    "check_layout",
    "layout_error_codes",
    "run_lengths",
    "validate_layout",
]


class LayoutError(enum.IntEnum):
    """Per-row error codes of :func:`layout_error_codes`; 0 means the row is valid."""

    OK = 0
    NEGATIVE_ID = 1
    ID_ABOVE_MAX = 2
    SECOND_RUN = 3
    IDS_NOT_INCREASING = 4
    NEGATIVE_POSITION = 5
    POSITIONS_NOT_INCREASING = 6


class LayoutErrors(NamedTuple):
    """Per-row result of :func:`layout_error_codes`.

    Attributes:
        code: int32[*B]; a :class:`LayoutError` value, 0 where the row is valid.
        token: int32[*B]; index of the first offending token of the row, -1 where it is valid.
    """

    code: Int[Array, "*B"]
    token: Int[Array, "*B"]


def is_concrete(*arrays: Any) -> bool:
    """True when no argument is a JAX tracer, so values can be read on the host."""
    return not any(isinstance(a, jax.core.Tracer) for a in arrays)


def check_max_segments(max_segments_per_seq: Any) -> int:
    """Returns ``max_segments_per_seq`` as a static positive ``int``, or raises.

    Raises:
        TypeError: it is not a Python (or NumPy) integer, e.g. a traced value or a float.
        ValueError: it is ``<= 0``.
    """
    if isinstance(max_segments_per_seq, bool) or not isinstance(
        max_segments_per_seq, (int, np.integer)
    ):
        raise TypeError(
            "max_segments_per_seq must be a static Python int (it sizes the outputs), "
            f"got {type(max_segments_per_seq).__name__}"
        )
    if max_segments_per_seq <= 0:
        raise ValueError(f"max_segments_per_seq must be >= 1, got {max_segments_per_seq}")
    return int(max_segments_per_seq)


def as_layout(
    segment_ids: ArrayLike, segment_pos: ArrayLike, *, name: str
) -> tuple[Int[Array, "*B T"], Int[Array, "*B T"]]:
    """Checks dtypes and shapes of one side's layout and returns it as int32 arrays.

    Args:
        segment_ids, segment_pos: integer array-likes of one shape ``[*B, T]``.
        name: the name of the ids parameter, used in messages (e.g. ``"segment_ids_q"``).

    Raises:
        TypeError: an array is not of an integer dtype (bool included).
        ValueError: an array is a scalar or empty along T, or the two shapes differ.
    """
    pos_name = positions_name(name)
    arrays = []
    for what, x in ((name, segment_ids), (pos_name, segment_pos)):
        if x is None:
            raise TypeError(f"{what} is required, got None")
        dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
        if not jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_):
            raise TypeError(f"{what} must be an integer array, got dtype {dtype}")
        x = jnp.asarray(x)
        if x.ndim == 0:
            raise ValueError(f"{what} must be at least 1-D ([*B, T]), got a scalar")
        if x.shape[-1] == 0:
            raise ValueError(f"{what} must hold at least one token, got shape {x.shape}")
        arrays.append(x.astype(jnp.int32))
    ids, pos = arrays
    if ids.shape != pos.shape:
        raise ValueError(
            f"{name} and {pos_name} must have the same shape, got {ids.shape} and {pos.shape}"
        )
    return ids, pos


def as_layouts(
    segment_ids_q: ArrayLike,
    segment_pos_q: ArrayLike,
    segment_ids_kv: ArrayLike | None,
    segment_pos_kv: ArrayLike | None,
) -> tuple[tuple[Array, Array], tuple[Array, Array] | None]:
    """Checks both sides' layouts (:func:`as_layout`); kv None means self-attention.

    Returns:
        ``(q, kv)``: ``(ids, pos)`` int32 pairs; kv is None when neither kv array is given.

    Raises:
        TypeError, ValueError: as :func:`as_layout`; only one of the kv arrays given; q and kv
            with different batch dims.
    """
    q = as_layout(segment_ids_q, segment_pos_q, name="segment_ids_q")
    if (segment_ids_kv is None) != (segment_pos_kv is None):
        given = "segment_ids_kv" if segment_pos_kv is None else "segment_pos_kv"
        raise ValueError(
            f"only {given} was given: pass both segment_ids_kv and segment_pos_kv for "
            "cross-attention, or neither for self-attention"
        )
    if segment_ids_kv is None:
        return q, None
    kv = as_layout(segment_ids_kv, segment_pos_kv, name="segment_ids_kv")
    if kv[0].shape[:-1] != q[0].shape[:-1]:
        raise ValueError(
            "segment_ids_q and segment_ids_kv must have the same batch dims, got "
            f"{q[0].shape[:-1]} and {kv[0].shape[:-1]} (shapes {q[0].shape}, {kv[0].shape})"
        )
    return q, kv


def validate_concrete(
    q: tuple[Array, Array],
    kv: tuple[Array, Array] | None,
    *,
    max_segments_per_seq: int,
    mask_type: MaskType,
) -> None:
    """Runs :func:`validate_layout` on each side whose values are concrete (not traced)."""
    for name, side in (("segment_ids_q", q), ("segment_ids_kv", kv)):
        if side is not None and is_concrete(*side):
            validate_layout(
                *side, max_segments_per_seq=max_segments_per_seq, mask_type=mask_type, name=name
            )


def positions_name(ids_name: str) -> str:
    """The positions parameter that goes with an ids parameter (segment_ids_q -> segment_pos_q)."""
    if "segment_ids" in ids_name:
        return ids_name.replace("segment_ids", "segment_pos")
    return f"{ids_name} positions"


def run_lengths(segment_ids: Int[Array, "*B T"]) -> Int[Array, "*B T"]:
    """Length of the run holding each token; 0 on padding.

    A run is a maximal stretch of equal consecutive ids. For valid layouts this is the length of
    the token's document (in this row or shard).

    Args:
        segment_ids: int[*B, T]; 0 = padding.

    Returns:
        int32[*B, T].

    Example:
        >>> run_lengths(jnp.array([1, 1, 1, 0, 2, 2, 0, 0]))
        Array([3, 3, 3, 0, 2, 2, 0, 0], dtype=int32)
    """
    ids = jnp.asarray(segment_ids)
    t = jnp.broadcast_to(jnp.arange(ids.shape[-1], dtype=jnp.int32), ids.shape)
    starts = _shift(ids, 1, fill=-1) != ids
    ends = _shift(ids, -1, fill=-1) != ids
    first = jax.lax.cummax(jnp.where(starts, t, 0), axis=ids.ndim - 1)
    last = jax.lax.cummin(jnp.where(ends, t, ids.shape[-1]), axis=ids.ndim - 1, reverse=True)
    return jnp.where(ids != 0, last - first + 1, 0).astype(jnp.int32)


def _shift(x: Array, by: int, *, fill: int) -> Array:
    """Shifts ``x`` along its last axis by ``by`` places (right if positive), filling in."""
    pad = jnp.full((*x.shape[:-1], abs(by)), fill, x.dtype)
    if by > 0:
        return jnp.concatenate([pad, x[..., :-by]], axis=-1)
    return jnp.concatenate([x[..., -by:], pad], axis=-1)


def layout_error_codes(
    segment_ids: Int[Array, "*B T"],
    segment_pos: Int[Array, "*B T"],
    *,
    max_segments_per_seq: int,
    mask_type: MaskType | str = "padding_causal",
) -> LayoutErrors:
    """Per-row error codes of the layout rules; jit- and vmap-compatible.

    For each row, the first token (in index order) that breaks a rule, and the code of that rule
    (the lowest code where a token breaks several).

    Args:
        segment_ids: int[*B, T]; 0 = padding, 1..S = documents.
        segment_pos: int[*B, T]; positions inside documents.
        max_segments_per_seq: S, the static largest id.
        mask_type: rule 6 (increasing positions) applies to causal and bottom-right types only.

    Returns:
        :class:`LayoutErrors` with ``code`` and ``token``, each int32[*B].

    Example:
        >>> ids = jnp.array([[1, 1, 0, 1, 2, 2], [1, 1, 2, 2, 0, 0]])
        >>> pos = jnp.array([[0, 1, 2, 0, 0, 1], [0, 1, 0, 1, 2, 0]])
        >>> errors = layout_error_codes(ids, pos, max_segments_per_seq=2)
        >>> errors.code.tolist(), errors.token.tolist()
        ([3, 0], [3, -1])
    """
    mask = MaskType.parse(mask_type)
    num_segments = check_max_segments(max_segments_per_seq)
    ids, pos = as_layout(segment_ids, segment_pos, name="segment_ids")
    row_fn = functools.partial(_row_error_codes, num_segments=num_segments, mask=mask)
    code, token = _map_rows(row_fn, ids, pos)
    return LayoutErrors(code, token)


def _map_rows(row_fn, *arrays: Array):
    """Applies a function of single rows (``[T]`` arrays) to ``[*B, T]`` arrays with vmap."""
    batch = arrays[0].shape[:-1]
    flat = [a.reshape(-1, a.shape[-1]) for a in arrays]
    out = jax.vmap(row_fn)(*flat)
    return jax.tree.map(lambda o: o.reshape(*batch, *o.shape[1:]), out)


def _row_error_codes(ids: Array, pos: Array, *, num_segments: int, mask: MaskType):
    t = jnp.arange(ids.shape[-1], dtype=jnp.int32)
    prev_ids = _shift(ids, 1, fill=0)
    is_start = (ids != 0) & (ids != prev_ids)
    in_range = jnp.clip(ids, 0, num_segments + 1)
    first_start = (
        jnp.full(num_segments + 2, ids.shape[-1], jnp.int32)
        .at[in_range]
        .min(jnp.where(is_start, t, ids.shape[-1]))
    )
    second_run = is_start & (first_start[in_range] < t)
    run_max_before = _shift(jax.lax.cummax(jnp.where(is_start, ids, 0)), 1, fill=0)
    not_increasing = is_start & (ids < run_max_before)
    positions_stall = (ids != 0) & ~is_start & (pos <= _shift(pos, 1, fill=0))
    broken = [
        (LayoutError.NEGATIVE_ID, ids < 0),
        (LayoutError.ID_ABOVE_MAX, ids > num_segments),
        (LayoutError.SECOND_RUN, second_run),
        (LayoutError.IDS_NOT_INCREASING, not_increasing),
        (LayoutError.NEGATIVE_POSITION, pos < 0),
    ]
    if mask.uses_positions:
        broken.append((LayoutError.POSITIONS_NOT_INCREASING, positions_stall))
    code_per_token = jnp.zeros_like(ids)
    for code, where in reversed(broken):
        code_per_token = jnp.where(where, int(code), code_per_token)
    bad = code_per_token != 0
    token = jnp.argmax(bad).astype(jnp.int32)
    any_bad = jnp.any(bad)
    return jnp.where(any_bad, code_per_token[token], 0), jnp.where(any_bad, token, -1)


@functools.partial(jax.jit, static_argnames=("num_segments", "mask"))
def _jitted_error_codes(ids: Array, pos: Array, num_segments: int, mask: MaskType):
    return layout_error_codes(ids, pos, max_segments_per_seq=num_segments, mask_type=mask)


def validate_layout(
    segment_ids: ArrayLike,
    segment_pos: ArrayLike,
    *,
    max_segments_per_seq: int,
    mask_type: MaskType | str = "padding_causal",
    name: str = "segment_ids",
) -> None:
    """Checks a concrete layout against the rules and raises on the first violation.

    Args:
        segment_ids: int[*B, T]; 0 = padding, 1..S = documents.
        segment_pos: int[*B, T]; positions inside documents.
        max_segments_per_seq: S, the largest id allowed.
        mask_type: rule 6 (strictly increasing positions along runs) applies to causal and
            bottom-right types only.
        name: how to call the ids parameter in messages; positions take the matching name
            (``segment_ids_q`` -> ``segment_pos_q``).

    Raises:
        TypeError: a non-integer dtype, a traced input (use :func:`check_layout` under jit), or a
            bad ``max_segments_per_seq``/``mask_type``.
        ValueError: a shape problem, or a broken rule: the message names the parameter, the row
            (its index in the batch dims) and the token.

    Example:
        >>> validate_layout(jnp.array([1, 1, 0, 1, 2, 2]), jnp.array([0, 1, 2, 0, 0, 1]),
        ...                 max_segments_per_seq=2)
        Traceback (most recent call last):
        ...
        ValueError: segment_ids row 0, token 3: id 1 starts a second run ...
    """
    mask = MaskType.parse(mask_type)
    num_segments = check_max_segments(max_segments_per_seq)
    ids, pos = as_layout(segment_ids, segment_pos, name=name)
    if not is_concrete(ids, pos):
        raise TypeError(
            f"validate_layout needs concrete {name}, got a traced array; under jit use "
            "thdkit.layout_error_codes or thdkit.check_layout (jax.experimental.checkify)"
        )
    code, token = jax.device_get(_jitted_error_codes(ids, pos, num_segments, mask))
    bad_rows = np.flatnonzero(np.asarray(code).reshape(-1))
    if bad_rows.size == 0:
        return
    flat_row = int(bad_rows[0])
    row = np.unravel_index(flat_row, code.shape) if code.ndim else ()
    t = int(np.asarray(token).reshape(-1)[flat_row])
    ids_row = np.asarray(ids).reshape(-1, ids.shape[-1])[flat_row]
    pos_row = np.asarray(pos).reshape(-1, ids.shape[-1])[flat_row]
    error = LayoutError(int(np.asarray(code).reshape(-1)[flat_row]))
    raise ValueError(_describe(error, name, _row_label(row), t, ids_row, pos_row, num_segments))


def _row_label(row: tuple[int, ...]) -> str:
    if len(row) == 0:
        return "row 0"
    if len(row) == 1:
        return f"row {int(row[0])}"
    return f"row {tuple(int(r) for r in row)}"


def _describe(
    error: LayoutError,
    name: str,
    row: str,
    t: int,
    ids: np.ndarray,
    pos: np.ndarray,
    num_segments: int,
) -> str:
    pos_name = positions_name(name)
    v = int(ids[t])
    where = f"{name} {row}, token {t}"
    if error is LayoutError.NEGATIVE_ID:
        return f"{where}: id {v} is negative; ids are 0 (padding) or 1..{num_segments}"
    if error is LayoutError.ID_ABOVE_MAX:
        return f"{where}: id {v} exceeds max_segments_per_seq={num_segments}"
    if error is LayoutError.SECOND_RUN:
        return f"{where}: id {v} starts a second run (a padding hole inside a document?)"
    if error is LayoutError.IDS_NOT_INCREASING:
        earlier = int(np.max(ids[:t]))
        return f"{where}: id {v} follows id {earlier}; non-zero ids must increase from run to run"
    where = f"{pos_name} {row}, token {t}"
    if error is LayoutError.NEGATIVE_POSITION:
        return f"{where}: position {int(pos[t])} is negative"
    return (
        f"{where}: position {int(pos[t])} does not increase along the run of id {v} "
        f"(previous position {int(pos[t - 1])}); causal and bottom-right masks need strictly "
        "increasing positions inside each document"
    )


def check_layout(
    segment_ids: Int[Array, "*B T"],
    segment_pos: Int[Array, "*B T"],
    *,
    max_segments_per_seq: int,
    mask_type: MaskType | str = "padding_causal",
    name: str = "segment_ids",
) -> None:
    """Adds a ``jax.experimental.checkify`` check that the layout is valid (for use under jit).

    Wrap the calling function with ``checkify.checkify`` and call ``err.throw()`` (or inspect
    ``err.get()``) on the result. The error names the first bad row (flattened over the batch
    dims), its first offending token and the :class:`LayoutError` code.

    Args:
        segment_ids, segment_pos, max_segments_per_seq, mask_type, name: as for
            :func:`validate_layout`.

    Example:
        >>> from jax.experimental import checkify
        >>> def f(ids, pos):
        ...     check_layout(ids, pos, max_segments_per_seq=2)
        ...     return ids
        >>> err, _ = jax.jit(checkify.checkify(f))(jnp.array([1, 0, 1]), jnp.array([0, 1, 0]))
        >>> "row 0, token 2" in err.get()
        True
    """
    errors = layout_error_codes(
        segment_ids, segment_pos, max_segments_per_seq=max_segments_per_seq, mask_type=mask_type
    )
    codes = errors.code.reshape(-1)
    row = jnp.argmax(codes != 0)
    legend = ", ".join(f"{e.value}={e.name}" for e in LayoutError if e)
    checkify.check(
        jnp.all(codes == 0),
        f"{name}: invalid layout in row {{row}}, token {{token}}: code {{code}} ({legend})",
        row=row,
        token=errors.token.reshape(-1)[row],
        code=codes[row],
    )
