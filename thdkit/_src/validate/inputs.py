"""Conversion of user arrays into layouts: dtype, shape and int32-range checks of ids and positions.

Every public function that takes raw ids and positions passes them through :func:`as_layout`
(or :func:`as_layouts` for both sides) once: integer dtypes of any width are accepted, values are
checked against int32 on the host before any cast (docs/semantics.md, "Accepted ranges"), and the
result is int32. The layout rules themselves live in :mod:`thdkit._src.validate.rules`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Int

from thdkit._src.counting import shift
from thdkit._src.host import JAX, ArrayOps
from thdkit._src.limits import INT32, MAX_POSITION, MAX_SEQ_LEN, check_int, is_concrete

__all__ = [
    "as_integers",
    "as_layout",
    "as_layouts",
    "check_cu_seqlens",
    "check_not_below",
    "check_padding_id",
    "check_rows_start_at_zero",
    "checked_pair",
    "field_int32",
    "int32_array",
    "integer_array",
    "position_ids_array",
    "positions_in_runs",
    "positions_name",
    "row_label",
    "to_int32",
]


def as_integers(x: Any, name: str) -> np.ndarray | Array:
    """``x`` as a NumPy or JAX array of integers of its own dtype, or an error naming it.

    The one check that an array argument holds integers. NumPy and JAX arrays (traced too) keep
    their dtype; anything else (nested lists, scalars) becomes a NumPy array, Python ints beyond
    int64 an object array of ints, which :func:`to_int32` reads exactly. Bools are not integers.

    Args:
        x: an integer array-like.
        name: the caller's name of the argument, for messages.

    Returns:
        The NumPy or JAX array, values unchecked.

    Raises:
        TypeError: a non-integer dtype (bool included), an object array of non-integers.
        ValueError: a ragged nested list.

    Example:
        >>> as_integers([[1, 2**70]], "segment_ids").dtype
        dtype('O')
        >>> as_integers([[1, 2], [3]], "segment_ids")
        Traceback (most recent call last):
        ...
        ValueError: segment_ids must be a rectangular integer array (every row the same length): ...
    """
    if not isinstance(x, (np.ndarray, jax.Array)):
        try:
            x = np.asarray(x)
        except ValueError as error:  # ragged nested lists
            raise ValueError(
                f"{name} must be a rectangular integer array (every row the same length): {error}"
            ) from None
    if x.dtype.kind == "O":
        if not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))
            for v in x.reshape(-1)
        ):
            raise TypeError(f"{name} must be an integer array, got an object array of non-integers")
    elif not jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == np.bool_:
        raise TypeError(f"{name} must be an integer array, got dtype {x.dtype}")
    return x


def integer_array(x: Any, what: str) -> np.ndarray | Array:
    """``x`` as an integer NumPy or JAX array of its own dtype (:func:`as_integers`), with its
    shape checked."""
    if x is None:
        raise TypeError(f"{what} is required, got None")
    x = as_integers(x, what)
    if x.ndim == 0:
        raise ValueError(f"{what} must be at least 1-D ([*B, T]), got a scalar")
    if x.shape[-1] == 0:
        raise ValueError(f"{what} must hold at least one token, got shape {x.shape}")
    if x.shape[-1] > MAX_SEQ_LEN:
        raise ValueError(
            f"{what} has T={x.shape[-1]} tokens per row; at most {MAX_SEQ_LEN} "
            "(thdkit.MAX_SEQ_LEN) are accepted"
        )
    return x


def fits_int32(dtype: Any) -> bool:
    if dtype.kind == "O":
        return False
    info = np.iinfo(dtype)
    return info.min >= INT32.min and info.max <= INT32.max


def to_int32(
    x: np.ndarray | Array, *, ops: ArrayOps = JAX
) -> tuple[Array, np.ndarray | Bool[Array, "*B T"] | None]:
    """``x`` as int32, and where its values lie outside int32 (None: the dtype cannot hold any).

    The test runs on the original dtype, before any cast: on the host for concrete values (the
    mask is then a NumPy array; ``jnp.asarray`` of an int64 NumPy array wraps silently when x64
    is off), in the traced computation otherwise. Values outside int32 become 0 in the result,
    a JAX array (``ops=JAX``) or a NumPy one (``ops=NUMPY``, for concrete ``x`` only).
    """
    xp = ops.xp
    if fits_int32(x.dtype):
        return xp.asarray(x).astype(xp.int32), None
    if is_concrete(x):
        values = np.asarray(x)
        outside = values > INT32.max
        if values.dtype.kind == "O" or np.issubdtype(values.dtype, np.signedinteger):
            outside = outside | (values < INT32.min)
        outside = np.asarray(outside, bool)
        return xp.asarray(np.where(outside, 0, values).astype(np.int32)), outside
    outside = x > INT32.max
    if jnp.issubdtype(x.dtype, jnp.signedinteger):
        outside = outside | (x < INT32.min)
    return jnp.where(outside, 0, x).astype(jnp.int32), outside


def checked_pair(
    segment_ids: Any, segment_pos: Any, name: str
) -> tuple[np.ndarray | Array, np.ndarray | Array]:
    """Dtype and shape checks of one side's layout; the arrays keep their dtypes."""
    pos_name = positions_name(name)
    ids = integer_array(segment_ids, name)
    pos = integer_array(segment_pos, pos_name)
    if ids.shape != pos.shape:
        raise ValueError(
            f"{name} and {pos_name} must have the same shape, got {ids.shape} and {pos.shape}"
        )
    return ids, pos


def as_layout(
    segment_ids: ArrayLike, segment_pos: ArrayLike, *, name: str, ops: ArrayOps = JAX
) -> tuple[Int[Array, "*B T"], Int[Array, "*B T"]]:
    """Checks dtypes, shapes and (concrete values) the int32 range of one side's layout.

    Args:
        segment_ids, segment_pos: integer array-likes of one shape ``[*B, T]``.
        name: the name of the ids parameter, used in messages (e.g. ``"segment_ids_q"``).
        ops: :data:`thdkit._src.host.JAX` (JAX results) or :data:`thdkit._src.host.NUMPY` (NumPy
            results; concrete inputs only).

    Returns:
        ``(ids, pos)``, int32[*B, T] each.

    Raises:
        TypeError: an array is not of an integer dtype (bool included).
        ValueError: an array is a scalar, empty along T or longer than ``MAX_SEQ_LEN`` along it;
            the two shapes differ; or (concrete values) a value lies outside int32, named with
            its row and token.

    Example:
        >>> as_layout(np.array([1, 2**32 + 2], np.int64), np.array([0, 0]), name="segment_ids_q")
        Traceback (most recent call last):
        ...
        ValueError: segment_ids_q row 0, token 1: id 4294967298 is outside the int32 range...
    """
    pos_name = positions_name(name)
    ids, pos = checked_pair(segment_ids, segment_pos, name)
    out = []
    for what, kind, x in ((name, "id", ids), (pos_name, "position", pos)):
        x32, outside = to_int32(x, ops=ops)
        if isinstance(outside, np.ndarray) and outside.any():
            row, token = first_bad(outside)
            value = int(np.asarray(x).reshape(-1, x.shape[-1])[row, token])
            raise ValueError(
                f"{what} {row_label(row, x.shape[:-1])}, token {token}: {kind} {value} is "
                f"outside the int32 range; {_RANGES[kind]}"
            )
        out.append(x32)
    return out[0], out[1]


_RANGES = {
    "id": "ids lie in [0, S] (0 = padding; S = max_segments_per_seq, or thdkit.MAX_SEGMENTS)",
    "position": f"positions lie in [0, {MAX_POSITION}] (thdkit.MAX_POSITION)",
}


def as_layouts(
    segment_ids_q: ArrayLike,
    segment_pos_q: ArrayLike | None,
    segment_ids_kv: ArrayLike | None,
    segment_pos_kv: ArrayLike | None,
    *,
    ops: ArrayOps = JAX,
    number_positions: bool = False,
) -> tuple[tuple[Array, Array], tuple[Array, Array] | None]:
    """Checks both sides' layouts (:func:`as_layout`); kv None means self-attention.

    Args:
        segment_ids_q, segment_pos_q: the queries' layout, integer array-likes ``[*B, T_q]``.
        segment_ids_kv, segment_pos_kv: the keys', ``[*B, T_kv]``, or both None.
        ops: :data:`thdkit._src.host.JAX` (JAX results) or :data:`thdkit._src.host.NUMPY` (NumPy
            results; concrete inputs only).
        number_positions: whether the positions may be left out: with ``segment_pos_q=None``
            (and ``segment_pos_kv=None``) each document's tokens are numbered 0, 1, 2, ... on
            both sides (:func:`positions_in_runs`). Positions come for both sides or for neither.

    Returns:
        ``(q, kv)``: ``(ids, pos)`` int32 pairs; kv is None when neither kv array is given.

    Raises:
        TypeError, ValueError: as :func:`as_layout`; only one of the kv arrays given; q and kv
            with different batch dims; ``segment_pos_kv`` without ``segment_pos_q``.

    Example:
        >>> q, kv = as_layouts([1, 1, 0, 2], None, None, None, number_positions=True)
        >>> q[1].tolist(), kv
        ([0, 1, 0, 0], None)
    """
    if number_positions and segment_pos_q is None:
        if segment_pos_kv is not None:
            raise ValueError(
                "segment_pos_kv was given without segment_pos_q: pass the positions of both "
                "sides, or of neither (each document's tokens are then numbered 0, 1, 2, ...)"
            )
        # The ids stand in for the positions (their checks come first), then are numbered.
        q, kv = as_layouts(segment_ids_q, segment_ids_q, segment_ids_kv, segment_ids_kv, ops=ops)
        q = (q[0], positions_in_runs(q[0], ops=ops))
        kv = None if kv is None else (kv[0], positions_in_runs(kv[0], ops=ops))
        return q, kv
    q = as_layout(segment_ids_q, segment_pos_q, name="segment_ids_q", ops=ops)
    if (segment_ids_kv is None) != (segment_pos_kv is None):
        given = "segment_ids_kv" if segment_pos_kv is None else "segment_pos_kv"
        raise ValueError(
            f"only {given} was given: pass both segment_ids_kv and segment_pos_kv for "
            "cross-attention, or neither for self-attention"
        )
    if segment_ids_kv is None:
        return q, None
    kv = as_layout(segment_ids_kv, segment_pos_kv, name="segment_ids_kv", ops=ops)
    if kv[0].shape[:-1] != q[0].shape[:-1]:
        raise ValueError(
            "segment_ids_q and segment_ids_kv must have the same batch dims, got "
            f"{q[0].shape[:-1]} and {kv[0].shape[:-1]} (shapes {q[0].shape}, {kv[0].shape})"
        )
    return q, kv


def positions_in_runs(ids: Int[Array, "*B T"], *, ops: ArrayOps = JAX) -> Int[Array, "*B T"]:
    """Each token's index inside its run of equal ids (0 on padding, id 0): the positions a
    layout has when each document's tokens are numbered 0, 1, 2, ...

    Example:
        >>> from thdkit._src.host import NUMPY
        >>> positions_in_runs(np.array([1, 1, 1, 0, 2, 2]), ops=NUMPY)
        array([0, 1, 2, 0, 0, 1], dtype=int32)
    """
    xp = ops.xp
    t = xp.broadcast_to(xp.arange(ids.shape[-1], dtype=np.int32), ids.shape)
    start = ops.cummax(xp.where(ids != shift(ids, 1, fill=-1, ops=ops), t, 0), ids.ndim - 1)
    return xp.where(ids != 0, t - start, 0).astype(np.int32)


def positions_name(ids_name: str) -> str:
    """The positions parameter that goes with an ids parameter (segment_ids_q -> segment_pos_q)."""
    if "segment_ids" in ids_name:
        return ids_name.replace("segment_ids", "segment_pos")
    return f"{ids_name} positions"


def first_bad(bad: np.ndarray) -> tuple[int, int]:
    """``(flat row, token)`` of the first true entry of ``bad`` [*B, T] (one must be true).

    Example:
        >>> first_bad(np.array([[False, False], [False, True]]))
        (1, 1)
    """
    return divmod(int(np.flatnonzero(bad.reshape(-1))[0]), bad.shape[-1])


def row_label(flat_row: int, batch: tuple[int, ...]) -> str:
    """``row 3`` or ``row (1, 0)``: a flattened row index written in the batch dims."""
    if len(batch) <= 1:
        return f"row {flat_row}"
    return f"row {tuple(int(r) for r in np.unravel_index(flat_row, batch))}"


def int32_array(x: ArrayLike, name: str) -> Array:
    """``x`` as int32 after checking its dtype and (concrete values) the int32 range.

    The range is read on the original values (NumPy int64, Python ints of any size, JAX int64
    arrays under x64), before any cast: a value outside int32 raises, never wraps.
    """
    return jnp.asarray(_in_int32(x, name)).astype(jnp.int32)


def field_int32(value: Any, name: str) -> np.ndarray:
    """A Python (nested) list as an int32 NumPy array, its values checked before the cast.

    Args:
        value: a rectangular nested list of ints (any size; checked against int32 first).
        name: the field, for messages (e.g. ``"Segments.ids"``).

    Returns:
        int32 NumPy array of the list's shape.

    Raises:
        TypeError: entries that are not integers (bools included).
        ValueError: a ragged list, or a value outside int32 (naming its index).

    Example:
        >>> field_int32([[1, 1, 2]], "Segments.ids")
        array([[1, 1, 2]], dtype=int32)
    """
    return np.asarray(_in_int32(value, name), np.int32)


def _in_int32(x: Any, name: str) -> Any:
    """``x`` (an array, or a NumPy array for a list) once its dtype and, when concrete, its
    values are checked against int32: int32 NumPy for concrete values, the tracer as it is."""
    x = as_integers(x, name)
    if isinstance(x, jax.core.Tracer):
        return x
    host = np.asarray(x)
    outside = np.asarray((host < INT32.min) | (host > INT32.max), bool)
    if outside.any():
        index = tuple(int(i) for i in np.unravel_index(int(np.argmax(outside)), host.shape))
        raise ValueError(f"{name} at {index}: {int(host[index])} is outside the int32 range")
    return host.astype(np.int32)


def check_padding_id(padding_id: Any) -> int:
    """``padding_id`` as :meth:`thdkit.Segments.from_ids` reads it: 0 or -1.

    Args:
        padding_id: a Python or NumPy int (not a bool).

    Returns:
        0 or -1, an ``int``.

    Raises:
        TypeError: not an int.
        ValueError: not 0 or -1.

    Example:
        >>> check_padding_id(np.int64(-1))
        -1
    """
    try:
        return check_int(padding_id, "padding_id", low=-1, high=0, kind="0 or -1")
    except ValueError:
        raise ValueError(
            "padding_id must be 0 or -1 (0: ids 1..n are documents; -1: ids 0..n-1 are "
            f"documents and -1 is padding), got {padding_id}"
        ) from None


def check_not_below(ids: Array, lowest: int, *, name: str, highest: int | None = None) -> None:
    """Raises for the first id below ``lowest`` (the padding id) or above ``highest``."""
    host = np.asarray(ids).reshape(-1, ids.shape[-1])
    bad = np.argwhere(host < lowest)
    if bad.size:
        row, token = (int(i) for i in bad[0])
        raise ValueError(
            f"{name} row {row}, token {token}: id {int(host[row, token])} is below the "
            f"padding id {lowest}"
        )
    bad = np.argwhere(host > highest) if highest is not None else bad
    if bad.size:
        row, token = (int(i) for i in bad[0])
        raise ValueError(
            f"{name} row {row}, token {token}: id {int(host[row, token])} exceeds {highest}, "
            f"the largest id with padding id {lowest}"
        )


def check_cu_seqlens(cu: np.ndarray, total_len: int) -> None:
    for row, entries in enumerate(cu.reshape(-1, cu.shape[-1])):
        where = f"cu_seqlens row {row}"
        if entries[0] != 0:
            raise ValueError(f"{where}, entry 0: must be 0, got {int(entries[0])}")
        drops = np.flatnonzero(np.diff(entries) < 0)
        if drops.size:
            k = int(drops[0]) + 1
            raise ValueError(
                f"{where}, entry {k}: {int(entries[k])} is below the entry before it "
                f"({int(entries[k - 1])}); cu_seqlens never decreases"
            )
        if entries[-1] > total_len:
            raise ValueError(
                f"{where}, entry {len(entries) - 1}: the last document ends at "
                f"{int(entries[-1])}, beyond total_len={total_len}"
            )


def position_ids_array(position_ids: ArrayLike) -> Array:
    """``position_ids`` as int32 after its checks; errors speak of positions, never ids."""
    name = "position_ids"
    x = as_integers(position_ids, name)
    if is_concrete(x) and x.ndim >= 1 and x.size:
        host = np.asarray(x)
        bad = (host < 0) | (host > MAX_POSITION)
        if bad.any():
            row, token = first_bad(bad)
            value = int(host.reshape(-1, host.shape[-1])[row, token])
            info = np.iinfo(np.int32)
            if not info.min <= value <= info.max:
                problem = f"position {value} is outside the int32 range"
            elif value < 0:
                problem = f"position {value} is negative"
            else:
                problem = f"position {value} exceeds thdkit.MAX_POSITION = {MAX_POSITION}"
            raise ValueError(
                f"{name} {row_label(row, host.shape[:-1])}, token {token}: {problem}; "
                f"positions lie in [0, {MAX_POSITION}]"
            )
    pos, _ = as_layout(x, x, name=name)  # dtype and shape checks; the values passed above
    return pos


def check_rows_start_at_zero(pos: np.ndarray) -> None:
    """Raises for the first row of ``position_ids`` that does not start with position 0."""
    firsts = pos.reshape(-1, pos.shape[-1])[:, 0]
    bad = np.flatnonzero(firsts != 0)
    if bad.size:
        row = int(bad[0])
        raise ValueError(
            f"position_ids {row_label(row, pos.shape[:-1])}, token 0: position {int(firsts[row])}"
            " where a row must start with 0; a document starts where the position is 0 (as in "
            "Hugging Face's prepare_fa_kwargs_from_position_ids), so the tokens before this "
            "row's first 0 would belong to no document of the row"
        )
