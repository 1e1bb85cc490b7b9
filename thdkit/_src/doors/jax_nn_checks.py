"""Checks of ``jax.nn.dot_product_attention``'s arguments, and their messages in the caller's words.

Axis legend (``jax.nn``'s letters): B batch, T query length, S key/value length, N query heads,
K key/value heads, H head dim.

:func:`as_arrays` checks query, key and value (ranks, dtypes, shapes); :func:`integer_argument`
and :func:`int32_values` read integer arguments (ids, positions, seq lengths) and check their
values against int32 before any cast (docs/semantics.md, "Accepted ranges"). The layout rules
themselves are the core's (:mod:`thdkit._src.validate.rules`, docs/semantics.md, "Valid layouts"):
:func:`describe_layout_error` says what broke in the vocabulary of ``jax.nn``'s call: the
argument as the caller passed it (``segment_ids``, ``segment_positions``, ``segment_ids[1]`` for
the key/value half of a pair, ``query``), the row and the token, the ids as the caller numbered
them (``padding_id``), and how to fix it.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from thdkit._src.host import JAX, NUMPY, on_host, readable
from thdkit._src.kernels.arguments import JAX_NN_AXES, check_float, check_shapes
from thdkit._src.limits import MAX_POSITION, MAX_SEGMENTS, check_int
from thdkit._src.validate.inputs import as_integers, row_label, to_int32
from thdkit._src.validate.rules import LayoutError

__all__ = [
    "as_arrays",
    "check_local_window",
    "describe_layout_error",
    "int32_values",
    "integer_argument",
    "shape_error",
]

# --- Arrays ------------------------------------------------------------------------------------


def _rank_error(name: str, shape: tuple[int, ...], *, rank: int, unbatched: bool) -> str:
    if name == "query":
        merge = (
            "; merge the extra leading dims into B (query.reshape(-1, *query.shape[-3:]), and "
            "key and value likewise)"
        )
        return (
            f"query must have rank 4 [B, T, N, H] or 3 [T, N, H] (unbatched), got shape "
            f"{shape}{merge if len(shape) > 4 else ''}"
        )
    form = {"key": "[B, S, K, H]", "value": "[B, S, K, H_v]"}[name]
    form, like = (
        (form.replace("B, ", ""), "unbatched, like query") if unbatched else (form, "like query")
    )
    return f"{name} must have rank {rank} {form} ({like}), got shape {shape}"


def as_arrays(query: Any, key: Any, value: Any) -> tuple[Array, Array, Array, bool]:
    """Query, key and value checked as ``jax.nn`` takes them, as [B, ...] arrays.

    Ranks, dtypes and shapes are checked; T or S may be 0.

    Args:
        query: float32/bfloat16/float16[B, T, N, H] or [T, N, H] (unbatched).
        key: [B, S, K, H] (rank as ``query``), the query's dtype; N a multiple of K.
        value: [B, S, K, H_v], the query's dtype.

    Returns:
        ``(query, key, value, unbatched)``: rank-4 arrays (an unbatched call gains B = 1) and
        whether the call was unbatched.

    Raises:
        TypeError: a non-float or mixed dtype.
        ValueError: ranks and shapes, naming the argument.

    Example:
        >>> as_arrays(jnp.zeros((1, 2, 3, 4, 5)), None, None)
        Traceback (most recent call last):
        ...
        ValueError: query must have rank 4 [B, T, N, H] or 3 [T, N, H] (unbatched), got shape...
    """
    query = jnp.asarray(query)
    if query.ndim not in (3, 4):
        raise ValueError(_rank_error("query", query.shape, rank=4, unbatched=False))
    unbatched = query.ndim == 3
    arrays = {"query": query}
    for name, x in (("key", key), ("value", value)):
        x = jnp.asarray(x)
        if x.ndim != query.ndim:
            raise ValueError(_rank_error(name, x.shape, rank=query.ndim, unbatched=unbatched))
        arrays[name] = x
    for name, x in arrays.items():
        check_float(x, name)
    query, key, value = (x[None] if unbatched else x for x in arrays.values())
    check_shapes(query, key, value, axes=JAX_NN_AXES, empty_rows=True)
    return query, key, value, unbatched


# --- Integer arguments ---------------------------------------------------------------------


def integer_argument(x: Any, name: str) -> np.ndarray | Array:
    """``x`` as an integer array of its own dtype, concrete values on the host (read once).

    Args:
        x: an integer array-like: a NumPy or JAX array (traced too), a nested list.
        name: the caller's name of the argument, for messages.

    Returns:
        A NumPy array (lists, and concrete JAX arrays read back; Python ints beyond int64 give
        an object array) or the traced array as it is.

    Raises:
        TypeError: a non-integer dtype (bool included).
        ValueError: a ragged nested list.

    Example:
        >>> integer_argument([[1, 2**40]], "segment_ids").dtype
        dtype('int64')
    """
    return as_integers(readable(x), name)


def int32_values(x: np.ndarray | Array, name: str, *, kind: str) -> np.ndarray | Array:
    """``x`` as int32 after the range check on its own dtype: never wraps.

    Args:
        x: from :func:`integer_argument`: [B] seq lengths or [B, T] ids or positions.
        name: the caller's name of the argument, for messages.
        kind: ``"id"``, ``"position"`` or ``"length"`` (a length names its row, not a token).

    Returns:
        int32, NumPy for host data; traced values are not read (docs/semantics.md, "Accepted
        ranges").

    Raises:
        ValueError: a concrete value outside int32, naming the row and token.

    Example:
        >>> int32_values(np.array([[1, 2**32 + 1]]), "segment_ids", kind="id")
        Traceback (most recent call last):
        ...
        ValueError: segment_ids row 0, token 1: id 4294967297 is outside the int32 range; ...
    """
    x32, outside = to_int32(x, ops=NUMPY if on_host(x) else JAX)
    if isinstance(outside, np.ndarray) and outside.any():
        flat = int(np.flatnonzero(outside.reshape(-1))[0])
        value = int(np.asarray(x).reshape(-1)[flat])
        if kind == "length":
            where = f"{name} row {flat}"
            fix = "a length counts the tokens of its row"
        else:
            row, token = divmod(flat, x.shape[-1])
            where = f"{name} {row_label(row, x.shape[:-1])}, token {token}"
            fix = (
                "ids are 0 (padding) or 1..max_segments_per_seq"
                if kind == "id"
                else f"positions lie in [0, {MAX_POSITION}]"
            )
        raise ValueError(f"{where}: {kind} {value} is outside the int32 range; {fix}")
    return x32


def check_local_window(local_window_size: Any) -> tuple[int, int] | None:
    """``jax.nn``'s window: an int (symmetric) or a pair of non-negative ints, or None.

    Raises:
        TypeError: a bound that is not an int.
        ValueError: not an int or a pair, or a negative bound.

    Example:
        >>> check_local_window(3), check_local_window((2, 0))
        ((3, 3), (2, 0))
    """
    if local_window_size is None:
        return None
    pair = (
        (local_window_size, local_window_size)
        if not isinstance(local_window_size, (tuple, list))
        else tuple(local_window_size)
    )
    if len(pair) != 2:
        raise ValueError(
            f"local_window_size must be an int or a pair (left, right), got {local_window_size!r}"
        )
    bounds = []
    for side, bound in zip(("left", "right"), pair, strict=True):
        try:
            bounds.append(check_int(bound, f"local_window_size {side} bound", low=0))
        except ValueError as error:
            raise ValueError(
                f"{error} (thdkit reads a negative bound as unbounded; pass None for no window)"
            ) from None
    return bounds[0], bounds[1]


# --- Layout messages -------------------------------------------------------------------------


def _id_problem(
    error: LayoutError, value: int, earlier: int, *, num_segments: int, padding_id: int
) -> str:
    """What is wrong with one id (the caller's numbering) and how to fix it."""
    first = 1 + padding_id  # the caller's first document id
    if error is LayoutError.ID_OUTSIDE_INT32:
        return f"id {value} is outside the int32 range; renumber the documents {first}, ..."
    if error is LayoutError.NEGATIVE_ID:
        if padding_id:
            return (
                f"id {value} is below padding_id=-1; ids are -1 (padding) or documents "
                f"0..{num_segments - 1}"
            )
        return (
            f"id {value} is negative; ids are 0 (padding) or documents 1..{num_segments}. Ids "
            "that number documents from 0 and mark padding with -1 need padding_id=-1"
        )
    if error is LayoutError.ID_ABOVE_MAX:
        needed = value + 1 - first
        if needed > MAX_SEGMENTS:
            return (
                f"id {value} is too large: at most {MAX_SEGMENTS} (thdkit.MAX_SEGMENTS) "
                f"documents a row; renumber the documents {first}, {first + 1}, ... in order"
            )
        return (
            f"id {value} exceeds max_segments_per_seq={num_segments} (the largest id it allows "
            f"is {num_segments - 1 + first}); pass max_segments_per_seq={needed} or more (None "
            f"reads it from the ids), or renumber the documents {first}, {first + 1}, ..."
        )
    zero_is_a_document = (
        "; with padding_id=-1, 0 is a document, not padding: if 0 marks padding, pass padding_id=0"
        if padding_id and 0 in (value, earlier)
        else ""
    )
    if error is LayoutError.SECOND_RUN:
        return (
            f"id {value} starts a second run; each document must be one run of consecutive "
            f"tokens (a padding hole inside a document?): give each document its own id"
            f"{zero_is_a_document}"
        )
    return (
        f"id {value} follows id {earlier}; document ids must increase along the row: renumber "
        f"the documents in the order they appear{zero_is_a_document}"
    )


def _position_problem(error: LayoutError, value: int, previous: int, document: int) -> str:
    """What is wrong with one position and how to fix it."""
    numbered = "(omitting segment_positions numbers every document's tokens 0, 1, 2, ...)"
    if error is LayoutError.POSITION_OUTSIDE_INT32:
        return f"position {value} is outside the int32 range; positions lie in [0, {MAX_POSITION}]"
    if error is LayoutError.NEGATIVE_POSITION:
        return f"position {value} is negative; positions count from 0 in each document {numbered}"
    if error is LayoutError.POSITION_ABOVE_MAX:
        return (
            f"position {value} exceeds thdkit.MAX_POSITION = {MAX_POSITION}; positions restart "
            f"at 0 in each document {numbered}"
        )
    return (
        f"position {value} does not increase along the document of id {document} (previous "
        f"position {previous}); is_causal=True needs strictly increasing positions inside each "
        f"document, e.g. 0, 1, 2, ... {numbered}"
    )


def describe_layout_error(
    error: LayoutError,
    *,
    ids_name: str,
    pos_name: str,
    row: int,
    token: int,
    ids: np.ndarray,
    caller_ids: np.ndarray,
    pos: np.ndarray,
    num_segments: int,
    padding_id: int,
) -> str:
    """The message of the first broken layout rule of one row.

    Args:
        error: the rule (:class:`thdkit.LayoutError`, never ``OK``).
        ids_name, pos_name: the caller's names of the ids and positions (``segment_ids``,
            ``segment_positions[1]``, ...).
        row, token: where (the row's index in B, the token's in T).
        ids: int32[T], the row's ids in thdkit's numbering (0 = padding, documents from 1).
        caller_ids: int32[T], the same row as the caller numbered it (``padding_id``).
        pos: int32[T], the row's positions.
        num_segments: S, ``max_segments_per_seq``.
        padding_id: the caller's ``padding_id`` (0 or -1).

    Returns:
        ``"{name} row {row}, token {token}: {what broke}; {how to fix it}"``.

    Example:
        >>> ids = np.array([1, 1, 0, 1])
        >>> describe_layout_error(LayoutError.SECOND_RUN, ids_name="segment_ids",
        ...     pos_name="segment_positions", row=0, token=3, ids=ids, caller_ids=ids,
        ...     pos=np.array([0, 1, 0, 0]), num_segments=1, padding_id=0)
        'segment_ids row 0, token 3: id 1 starts a second run; each document must be one...'
    """
    value = int(caller_ids[token])
    if error in (LayoutError.ID_OUTSIDE_INT32, LayoutError.NEGATIVE_ID, LayoutError.ID_ABOVE_MAX):
        problem = _id_problem(error, value, value, num_segments=num_segments, padding_id=padding_id)
        return f"{ids_name} row {row}, token {token}: {problem}"
    if error in (LayoutError.SECOND_RUN, LayoutError.IDS_NOT_INCREASING):
        earlier = int(caller_ids[int(np.argmax(ids[:token]))])  # the largest id before
        problem = _id_problem(
            error, value, earlier, num_segments=num_segments, padding_id=padding_id
        )
        return f"{ids_name} row {row}, token {token}: {problem}"
    previous = int(pos[token - 1]) if token else 0
    problem = _position_problem(error, int(pos[token]), previous, value)
    return f"{pos_name} row {row}, token {token}: {problem}"


def shape_error(
    name: str,
    shape: tuple[int, ...],
    array: str,
    array_shape: tuple[int, ...],
    *,
    unbatched: bool,
) -> str:
    """The message of ``segment_ids`` / ``segment_positions`` that does not fit its array.

    Args:
        name: the caller's name (``segment_ids``, ``segment_positions[1]``, ...).
        shape: its [B, T] shape (a batch dim added when unbatched).
        array: ``"query"`` or ``"key"``, the array the side's T comes from.
        array_shape: that array's [B, T, N, H] shape (a batch dim added when unbatched).
        unbatched: whether the call was unbatched (the message shows the caller's shapes).

    Returns:
        The message: which batch or token count differs, a query that looks like
        [B, N, T, H] (heads before tokens) told so, a cross-attention call told to pass a pair.

    Example:
        >>> print(shape_error("segment_ids", (1, 8), "query", (1, 2, 8, 4), unbatched=False))
        query of shape (1, 2, 8, 4) is read as [B, T, N, H] with T = 2, but segment_ids has 8 ...
    """
    letters = "[B, T, N, H]" if array == "query" else "[B, S, K, H]"
    swapped = "[B, N, T, H]" if array == "query" else "[B, K, S, H]"
    if unbatched:
        letters, swapped = letters.replace("B, ", ""), swapped.replace("B, ", "")
        shape, array_shape = shape[1:], array_shape[1:]
    seq_axis = 0 if unbatched else 1
    seq, given = array_shape[seq_axis], shape[-1]
    letter = "T" if array == "query" else "S"
    if not unbatched and shape[0] != array_shape[0]:
        return (
            f"{name} has B = {shape[0]} rows (shape {shape}) but {array} has B = "
            f"{array_shape[0]} (shape {array_shape}); they must match"
        )
    if given == array_shape[seq_axis + 1] != seq:
        order = "(1, 0, 2)" if unbatched else "(0, 2, 1, 3)"
        return (
            f"{array} of shape {array_shape} is read as {letters} with {letter} = {seq}, but "
            f"{name} has {given} tokens a row (shape {shape}): {array} looks like {swapped} "
            f"(heads before tokens); jax.nn's layout is {letters}: pass "
            f"{array}.transpose{order}, and the same for the other arrays"
        )
    cross = (
        "; for cross-attention pass a tuple (query ids, key/value ids)"
        if array == "key" and "[" not in name
        else ""
    )
    return (
        f"{name} has {given} tokens a row (shape {shape}) but {array} has {letter} = {seq} "
        f"(shape {array_shape}, {letters}); they must match{cross}"
    )
