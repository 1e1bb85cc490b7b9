"""The layout rules: eager validation, error codes under jit, and the checkify check.

A *layout* is the pair ``(segment_ids, segment_pos)`` of one side (queries or keys/values), both
``int[*B, T]``: ``segment_ids`` is 0 for padding and 1..S for the document a token belongs to,
``segment_pos`` the token's position inside its document. The rules a layout must satisfy
(docs/semantics.md, "Valid layouts" and "Accepted ranges"), per row:

1. ids and positions are integer arrays of one shape, at least 1-D (leading dims are batch dims),
   with ``1 <= T <= MAX_SEQ_LEN`` tokens per row;
2. ``0 <= id <= S`` (S = ``max_segments_per_seq``, at most ``MAX_SEGMENTS``);
3. each non-zero id occupies exactly one run (no padding hole inside a document, no id reused);
4. non-zero ids increase from run to run;
5. ``0 <= position <= MAX_POSITION``;
6. for causal and bottom-right mask types, positions strictly increase along each run.

These ranges keep every sum and difference the package forms (``pos + 1``, ``rl - pos``,
``pos_q - pos_kv``, ...) inside int32.

Eagerly, :func:`validate_layout` raises for the first broken rule, naming the parameter, the row
and the token. Under ``jit`` and ``vmap`` the values are traced and nothing can raise on them:
:func:`layout_error_codes` returns per-row codes instead, and :func:`check_layout` turns them into
a ``jax.experimental.checkify`` check.

The rules are written once, over an array module (:class:`thdkit._src.host.ArrayOps`): JAX layouts
are checked by a jitted program, NumPy layouts (and Python lists) by the same code in NumPy on
the host, without compiling anything (:mod:`thdkit._src.host`).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify
from jaxtyping import Array, ArrayLike, Bool, Int

from thdkit._src.counting import shift
from thdkit._src.host import JAX, NUMPY, ArrayOps, on_host
from thdkit._src.limits import MAX_POSITION, MAX_SEGMENTS, is_concrete, segment_bound
from thdkit._src.mask_types import MaskType
from thdkit._src.programs import program
from thdkit._src.validate.inputs import as_layout, checked_pair, positions_name, row_label, to_int32

__all__ = [
    "LayoutError",
    "RowChecks",
    "check_layout",
    "layout_error_codes",
    "looks_reordered",
    "map_rows",
    "validate_concrete",
    "validate_layout",
]


class LayoutError(enum.IntEnum):
    """Per-row codes of :func:`layout_error_codes`; 0 means the row is valid.

    Listed in precedence order: where one token breaks several rules, the first listed wins.
    """

    OK = 0
    ID_OUTSIDE_INT32 = 8
    NEGATIVE_ID = 1
    ID_ABOVE_MAX = 2
    SECOND_RUN = 3
    IDS_NOT_INCREASING = 4
    POSITION_OUTSIDE_INT32 = 9
    NEGATIVE_POSITION = 5
    POSITION_ABOVE_MAX = 7
    POSITIONS_NOT_INCREASING = 6


class RowChecks(NamedTuple):
    """Per-row results of the layout checks (:func:`layout_error_codes`).

    Attributes:
        code: int32[*B]; a :class:`LayoutError` value, 0 where the row is valid.
        token: int32[*B]; index of the first offending token of the row, -1 where it is valid.
    """

    code: Int[Array, "*B"]
    token: Int[Array, "*B"]


def validate_concrete(
    q: tuple[Array, Array],
    kv: tuple[Array, Array] | None,
    *,
    max_segments_per_seq: int | None,
    mask_type: MaskType,
) -> None:
    """Runs :func:`validate_layout` on each side whose values are concrete (not traced)."""
    for name, side in (("segment_ids_q", q), ("segment_ids_kv", kv)):
        if side is not None and is_concrete(*side):
            validate_layout(
                *side, max_segments_per_seq=max_segments_per_seq, mask_type=mask_type, name=name
            )


def map_rows(row_fn: Callable[..., Any], *arrays: Array) -> Any:
    """Applies a function of single rows (``[T]`` arrays) to ``[*B, T]`` arrays with vmap.

    The batch dims are flattened for the vmap and restored on every output leaf.

    Args:
        row_fn: takes one ``[T_i]`` row of each array and returns a pytree of arrays.
        arrays: ``[*B, T_i]`` arrays with the same batch dims ``*B`` (any number, B = 0 too).

    Returns:
        ``row_fn``'s pytree with ``*B`` prepended to every leaf's shape.

    Example:
        >>> map_rows(lambda row: row.sum(), jnp.arange(12).reshape(2, 2, 3))
        Array([[ 3, 12],
               [21, 30]], dtype=int32)
    """
    batch = arrays[0].shape[:-1]
    flat = [a.reshape(math.prod(batch), a.shape[-1]) for a in arrays]
    out = jax.vmap(row_fn)(*flat)
    return jax.tree.map(lambda o: o.reshape(*batch, *o.shape[1:]), out)


def layout_error_codes(
    segment_ids: Int[Array, "*B T"],
    segment_pos: Int[Array, "*B T"],
    *,
    max_segments_per_seq: int | None,
    mask_type: MaskType | str = "padding_causal",
) -> RowChecks:
    """Per-row error codes of the layout rules; works eagerly and under jit and vmap.

    For each row, the first token (in index order) that breaks a rule, and the code of that rule
    (the first in :class:`LayoutError`'s order where a token breaks several). Values outside
    int32 (wide dtypes: int64 with x64 on, uint32, uint64) are detected on the original dtype,
    before the cast to int32. Memory and time O(T) per row, independent of S.

    Args:
        segment_ids: int[*B, T]; 0 = padding, 1..S = documents.
        segment_pos: int[*B, T]; positions inside documents.
        max_segments_per_seq: S, the static largest id; None means ``MAX_SEGMENTS``.
        mask_type: rule 6 (increasing positions) applies to causal and bottom-right types only.

    Returns:
        :class:`RowChecks` with ``code`` and ``token``, each int32[*B].

    Raises:
        TypeError, ValueError: bad dtypes, shapes or options, as :func:`validate_layout`.

    Example:
        >>> ids = jnp.array([[1, 1, 0, 1, 2, 2], [1, 1, 2, 2, 0, 0]])
        >>> pos = jnp.array([[0, 1, 2, 0, 0, 1], [0, 1, 0, 1, 2, 0]])
        >>> checks = layout_error_codes(ids, pos, max_segments_per_seq=2)
        >>> checks.code.tolist(), checks.token.tolist()
        ([3, 0], [3, -1])
    """
    mask = MaskType.parse(mask_type)
    num_segments = segment_bound(max_segments_per_seq)
    return _error_codes(segment_ids, segment_pos, num_segments=num_segments, mask=mask, ops=JAX)


def _error_codes(
    segment_ids: Any,
    segment_pos: Any,
    *,
    num_segments: int,
    mask: MaskType,
    ops: ArrayOps,
) -> RowChecks:
    """:func:`layout_error_codes` of checked options, on the array module ``ops``."""
    ids, pos = checked_pair(segment_ids, segment_pos, "segment_ids")
    ids, ids_outside = to_int32(ids, ops=ops)
    pos, pos_outside = to_int32(pos, ops=ops)
    batch, seq_len = ids.shape[:-1], ids.shape[-1]
    outside = [None if o is None else o.reshape(-1, seq_len) for o in (ids_outside, pos_outside)]
    code, token = _row_checks(
        ids.reshape(-1, seq_len),
        pos.reshape(-1, seq_len),
        *outside,
        num_segments=num_segments,
        mask=mask,
        ops=ops,
    )
    return RowChecks(code.reshape(batch), token.reshape(batch))


def _row_checks(
    ids: Int[Array, "N T"],
    pos: Int[Array, "N T"],
    ids_outside: Bool[Array, "N T"] | None,
    pos_outside: Bool[Array, "N T"] | None,
    *,
    num_segments: int,
    mask: MaskType,
    ops: ArrayOps = JAX,
) -> tuple[Int[Array, " N"], Int[Array, " N"]]:
    """The code and token of the first broken rule of each of N rows (see RowChecks).

    Rules 3 and 4 are read off the run starts alone: non-zero ids must strictly increase from run
    start to run start, so a start whose id equals the largest id of the earlier runs starts a
    second run, and a smaller one breaks the order. No array is sized by S. The same code runs
    on JAX (traced) and on NumPy (the host path), by ``ops``.
    """
    xp = ops.xp
    prev_ids = shift(ids, 1, fill=0, ops=ops)
    is_start = (ids != 0) & (ids != prev_ids)
    max_before = shift(ops.cummax(xp.where(is_start, ids, 0), 1), 1, fill=0, ops=ops)
    broken = {
        LayoutError.ID_OUTSIDE_INT32: ids_outside,
        LayoutError.NEGATIVE_ID: ids < 0,
        LayoutError.ID_ABOVE_MAX: ids > num_segments,
        LayoutError.SECOND_RUN: is_start & (ids == max_before),
        LayoutError.IDS_NOT_INCREASING: is_start & (ids < max_before),
        LayoutError.POSITION_OUTSIDE_INT32: pos_outside,
        LayoutError.NEGATIVE_POSITION: pos < 0,
        LayoutError.POSITION_ABOVE_MAX: pos > MAX_POSITION,
        LayoutError.POSITIONS_NOT_INCREASING: (
            (ids != 0) & ~is_start & (pos <= shift(pos, 1, fill=0, ops=ops))
            if mask.uses_positions
            else None
        ),
    }
    if xp is np and not any(where.any() for where in broken.values() if where is not None):
        # Host layouts are mostly valid: one pass per rule, and no per-token codes to build.
        return np.zeros(ids.shape[0], ids.dtype), np.full(ids.shape[0], -1, np.int32)
    code_per_token = xp.zeros_like(ids)
    for code, where in reversed(broken.items()):
        if where is not None:
            code_per_token = xp.where(where, int(code), code_per_token)
    bad = code_per_token != 0
    token = xp.argmax(bad, axis=1).astype(xp.int32)
    any_bad = xp.any(bad, axis=1)
    first_code = xp.take_along_axis(code_per_token, token[:, None], axis=1)[:, 0]
    return xp.where(any_bad, first_code, 0), xp.where(any_bad, token, -1)


@program(static_argnames=("num_segments", "mask"))
def _jitted_error_codes(ids: Array, pos: Array, num_segments: int, mask: MaskType) -> RowChecks:
    return layout_error_codes(ids, pos, max_segments_per_seq=num_segments, mask_type=mask)


def validate_layout(
    segment_ids: ArrayLike,
    segment_pos: ArrayLike,
    *,
    max_segments_per_seq: int | None,
    mask_type: MaskType | str = "padding_causal",
    name: str = "segment_ids",
) -> None:
    """Checks a concrete layout against the rules and raises on the first violation.

    Runs eagerly only: under ``jit`` and inside ``vmap`` the values are tracers, which cannot be
    read; use :func:`layout_error_codes` or :func:`check_layout` there. NumPy arrays and Python
    lists are checked in NumPy on the host, compiling nothing; JAX arrays by a jitted program
    (compiled once per shape). Both give the same errors.

    Args:
        segment_ids: int[*B, T]; 0 = padding, 1..S = documents.
        segment_pos: int[*B, T]; positions inside documents, in ``[0, MAX_POSITION]``.
        max_segments_per_seq: S, the largest id allowed; None means ``MAX_SEGMENTS`` (no bound
            beyond the accepted range).
        mask_type: rule 6 (strictly increasing positions along runs) applies to causal and
            bottom-right types only.
        name: how to call the ids parameter in messages; positions take the matching name
            (``segment_ids_q`` -> ``segment_pos_q``).

    Raises:
        TypeError: a non-integer dtype, a traced input, or a bad ``max_segments_per_seq`` /
            ``mask_type``.
        ValueError: a shape problem, a bad ``max_segments_per_seq`` value, or a broken rule: the
            message names the parameter, the row (its index in the batch dims) and the token.
            A row breaking rule 3, 4 or 6 that :func:`looks_reordered` (striped or
            dual-chunk-swapped for context parallelism) also gets where such rows go.

    Example:
        >>> validate_layout(jnp.array([1, 1, 0, 1, 2, 2]), jnp.array([0, 1, 2, 0, 0, 1]),
        ...                 max_segments_per_seq=2)
        Traceback (most recent call last):
        ...
        ValueError: segment_ids row 0, token 3: id 1 starts a second run ...
    """
    mask = MaskType.parse(mask_type)
    num_segments = segment_bound(max_segments_per_seq)
    if not is_concrete(segment_ids, segment_pos):
        raise TypeError(
            f"validate_layout needs concrete {name}, got a traced array; under jit or vmap use "
            "thdkit.layout_error_codes or thdkit.check_layout (jax.experimental.checkify)"
        )
    if on_host(segment_ids, segment_pos):
        ids, pos = as_layout(segment_ids, segment_pos, name=name, ops=NUMPY)
        code, token = _error_codes(ids, pos, num_segments=num_segments, mask=mask, ops=NUMPY)
    else:
        # Concrete arrays closed over by a jitted function are checked now, not staged into it.
        with jax.ensure_compile_time_eval():
            ids, pos = as_layout(segment_ids, segment_pos, name=name)
            code, token = jax.device_get(_jitted_error_codes(ids, pos, num_segments, mask))
    bad_rows = np.flatnonzero(np.asarray(code).reshape(-1))
    if bad_rows.size == 0:
        return
    flat_row = int(bad_rows[0])
    t = int(np.asarray(token).reshape(-1)[flat_row])
    ids_row = np.asarray(ids).reshape(-1, ids.shape[-1])[flat_row]
    pos_row = np.asarray(pos).reshape(-1, ids.shape[-1])[flat_row]
    error = LayoutError(int(np.asarray(code).reshape(-1)[flat_row]))
    row = row_label(flat_row, ids.shape[:-1])
    raise ValueError(_describe(error, name, row, t, ids_row, pos_row, max_segments_per_seq))


_REORDERED = (
    "; a row reordered for context parallelism (striped / dual_chunk_swap) must be passed in "
    "document order, or as it is to thdkit.context_parallel_attention / ring_attention, which "
    "check it shard by shard"
)


def looks_reordered(ids: np.ndarray, pos: np.ndarray) -> bool:
    """Whether a row that breaks rule 3, 4 or 6 looks like a row reordered for context
    parallelism (striped or dual-chunk-swapped) rather than a plain mistake.

    A reordered row holds every document once, spread over several runs: no position repeats
    inside a document, and either a document's positions fall back in row order (a later
    stripe or chunk holds earlier tokens) or a run steps its positions by more than one (a
    stripe holds every cp-th token). A padding hole (the document restarts at 0), an id reused
    by two documents (both start at 0) and documents out of order (each consecutive) do not.

    Args:
        ids, pos: one row, int[T].

    Returns:
        bool; the layout errors add the advice for reordered rows only where it is True.

    Example:
        >>> looks_reordered(np.array([1, 1, 2, 1, 1, 2]), np.array([0, 2, 1, 1, 3, 0]))
        True
        >>> looks_reordered(np.array([1, 1, 0, 1]), np.array([0, 1, 0, 0]))
        False
    """
    ids, pos = np.asarray(ids).astype(np.int64), np.asarray(pos).astype(np.int64)
    real = np.flatnonzero(ids != 0)
    by_position = real[np.lexsort((pos[real], ids[real]))]
    doc, p = ids[by_position], pos[by_position]
    if np.any((doc[1:] == doc[:-1]) & (p[1:] == p[:-1])):
        return False  # a position repeats inside a document: two documents, not one spread out
    in_row_order = real[np.argsort(ids[real], kind="stable")]
    doc, p = ids[in_row_order], pos[in_row_order]
    falls_back = np.any((doc[1:] == doc[:-1]) & (p[1:] < p[:-1]))
    same_run = (ids[1:] == ids[:-1]) & (ids[1:] != 0)
    strided = np.any(same_run & (pos[1:] - pos[:-1] > 1))
    return bool(falls_back or strided)


def _describe(
    error: LayoutError,
    name: str,
    row: str,
    t: int,
    ids: np.ndarray,
    pos: np.ndarray,
    max_segments_per_seq: int | None,
) -> str:
    pos_name = positions_name(name)
    v = int(ids[t])
    where = f"{name} {row}, token {t}"
    bound = MAX_SEGMENTS if max_segments_per_seq is None else max_segments_per_seq
    if error is LayoutError.NEGATIVE_ID:
        return f"{where}: id {v} is negative; ids are 0 (padding) or 1..{bound}"
    if error is LayoutError.ID_ABOVE_MAX:
        if max_segments_per_seq is None:
            return f"{where}: id {v} exceeds thdkit.MAX_SEGMENTS = {MAX_SEGMENTS}"
        return f"{where}: id {v} exceeds max_segments_per_seq={max_segments_per_seq}"
    hint = _REORDERED if looks_reordered(ids, pos) else ""
    if error is LayoutError.SECOND_RUN:
        return f"{where}: id {v} starts a second run (a padding hole inside a document?){hint}"
    if error is LayoutError.IDS_NOT_INCREASING:
        earlier = int(np.max(ids[:t]))
        return (
            f"{where}: id {v} follows id {earlier}; non-zero ids must increase from run to run"
            f"{hint}"
        )
    where = f"{pos_name} {row}, token {t}"
    p = int(pos[t])
    if error is LayoutError.NEGATIVE_POSITION:
        return f"{where}: position {p} is negative"
    if error is LayoutError.POSITION_ABOVE_MAX:
        return f"{where}: position {p} exceeds thdkit.MAX_POSITION = {MAX_POSITION}"
    return (
        f"{where}: position {p} does not increase along the run of id {v} "
        f"(previous position {int(pos[t - 1])}); causal and bottom-right masks need strictly "
        f"increasing positions inside each document{hint}"
    )


def check_layout(
    segment_ids: Int[Array, "*B T"],
    segment_pos: Int[Array, "*B T"],
    *,
    max_segments_per_seq: int | None,
    mask_type: MaskType | str = "padding_causal",
    name: str = "segment_ids",
) -> None:
    """Adds a ``jax.experimental.checkify`` check that the layout is valid (for jit and vmap).

    Wrap the calling function with ``checkify.checkify`` and call ``err.throw()`` (or inspect
    ``err.get()``) on the result; this works under ``jit``, inside ``vmap`` (also
    ``checkify.checkify(jax.vmap(f))``) and eagerly. The error names the first bad row (flattened
    over the batch dims of the arrays passed here: inside ``vmap``, of one mapped slice), its
    first offending token and the :class:`LayoutError` code. An empty batch always passes.

    Args:
        segment_ids, segment_pos, max_segments_per_seq, mask_type, name: as for
            :func:`validate_layout`.

    Raises:
        TypeError, ValueError: bad dtypes, shapes or options (at trace time).

    Example:
        >>> from jax.experimental import checkify
        >>> def f(ids, pos):
        ...     check_layout(ids, pos, max_segments_per_seq=2)
        ...     return ids
        >>> err, _ = jax.jit(checkify.checkify(f))(jnp.array([1, 0, 1]), jnp.array([0, 1, 0]))
        >>> "row 0, token 2" in err.get()
        True
    """
    checks = layout_error_codes(
        segment_ids, segment_pos, max_segments_per_seq=max_segments_per_seq, mask_type=mask_type
    )
    codes = checks.code.reshape(-1)
    if codes.size == 0:
        return
    row = jnp.argmax(codes != 0)
    legend = ", ".join(f"{e.value}={e.name}" for e in LayoutError if e)
    checkify.check(
        jnp.all(codes == 0),
        f"{name}: invalid layout in row {{row}}, token {{token}}: code {{code}} ({legend})",
        row=row,
        token=checks.token.reshape(-1)[row],
        code=codes[row],
    )
