"""``jax.nn.dot_product_attention``'s layout arguments as thdkit's: what the call's layout is.

Axis legend (``jax.nn``'s letters): B batch, T query length, S key/value length, N query heads,
K key/value heads, H head dim.

:func:`layout_of` reads ``is_causal``, ``query_seq_lengths``, ``key_value_seq_lengths``,
``local_window_size``, ``segment_ids``, ``segment_positions``, ``plan``, ``max_segments_per_seq``,
``padding_id`` and ``logits_soft_cap`` into a :class:`CallLayout`: a plan's fields, or the
Segments and options that plan one. Every value is checked against int32 before any cast
(docs/semantics.md, "Accepted ranges"), and every error names the argument the caller passed
(``segment_ids[1]`` for the key/value half of a pair) and, for layout errors, the row and the
token, with the fix (:mod:`thdkit._src.doors.jax_nn_checks`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from thdkit._src.doors.jax_nn_checks import (
    check_local_window,
    describe_layout_error,
    int32_values,
    integer_argument,
    shape_error,
)
from thdkit._src.doors.keywords import plan_attention
from thdkit._src.kernels.config import check_soft_cap
from thdkit._src.kernels.plan import AttentionPlan
from thdkit._src.limits import MAX_SEGMENTS, check_bool, check_max_segments
from thdkit._src.mask_types import MaskType
from thdkit._src.segments import Segments
from thdkit._src.validate.inputs import check_padding_id
from thdkit._src.validate.rules import LayoutError, layout_error_codes, validate_layout

__all__ = ["CallLayout", "Side", "layout_of"]


class CallLayout(NamedTuple):
    """What the attention reads of the layout: a plan's fields, or what builds one.

    ``q`` is None when the query or the key/value side has no tokens (T = 0 or S = 0): nothing
    is attended, and no Segments exist (they need T >= 1).
    """

    q: Segments | None
    kv: Segments | None  # None for self-attention (one layout for both sides)
    mask_type: MaskType
    window: tuple[int | None, int | None] | None
    max_segments_per_seq: int
    plan: AttentionPlan | None  # the caller's plan, or None
    logits_soft_cap: float | None = None  # the caller's, or the plan's

    def planned(self, implementation: str | None) -> AttentionPlan:
        """The caller's plan, or one of this layout for ``implementation``: building it
        validates the layout (concrete layouts; :func:`thdkit.plan_attention`)."""
        if self.plan is not None:
            return self.plan
        return plan_attention(
            self.q,
            self.kv,
            mask_type=self.mask_type,
            window_size=self.window,
            max_segments_per_seq=self.max_segments_per_seq,
            implementation=implementation,
            logits_soft_cap=self.logits_soft_cap,
        )


class Side(NamedTuple):
    """One side's layout arguments as the caller passed them, for messages and checks."""

    ids: np.ndarray | Array | None  # int32 (after the range check), None: one document a row
    pos: np.ndarray | Array | None
    ids_name: str  # "segment_ids", or "segment_ids[0]" / "segment_ids[1]" for a pair
    pos_name: str
    lengths: Array | np.ndarray | None  # query_seq_lengths or key_value_seq_lengths, int32


def _lengths(lengths: Any, name: str, batch: int) -> np.ndarray | Array | None:
    if lengths is None:
        return None
    lengths = integer_argument(lengths, name)
    if lengths.shape != (batch,):
        raise ValueError(
            f"{name} must have shape [B] = ({batch},) (B from query), got {lengths.shape}"
        )
    return int32_values(lengths, name, kind="length")


# --- segment_ids / segment_positions -----------------------------------------------------------


def _halves(x: Any, name: str) -> tuple[tuple[Any, str], tuple[Any, str]]:
    """One array (both sides) or a tuple ``(query, key_value)``, each with its caller's name.
    A list is one array (a nested list of rows), never a pair."""
    if not isinstance(x, tuple):
        return (x, name), (x, name)
    if len(x) != 2:
        raise ValueError(
            f"{name} as a tuple must be a pair (query, key_value), got {len(x)} entries; pass "
            "one array for self-attention"
        )
    return (x[0], f"{name}[0]"), (x[1], f"{name}[1]")


def _side_array(
    x: Any, name: str, *, kind: str, unbatched: bool, array: str, shape: tuple[int, ...]
) -> np.ndarray | Array | None:
    """One side's ids or positions: integer, rank and shape checked against ``array`` (query
    or key, of [B, T, ...] ``shape``), then int32 after the range check."""
    if x is None:
        return None
    x = integer_argument(x, name)
    want = 1 if unbatched else 2
    if x.ndim != want:
        form = "[T], as query is unbatched ([T, N, H])" if unbatched else "[B, T]"
        pair = "; pass a (query, key_value) pair as a tuple" if x.ndim == want + 1 else ""
        raise ValueError(f"{name} must have rank {want} ({form}), got shape {x.shape}{pair}")
    x = x[None] if unbatched else x
    if x.shape != shape[:2]:
        raise ValueError(shape_error(name, x.shape, array, shape, unbatched=unbatched))
    return int32_values(x, name, kind=kind)


def _sides(
    segment_ids: Any,
    segment_positions: Any,
    lengths: tuple[Any, Any],
    *,
    query_shape: tuple[int, ...],
    key_shape: tuple[int, ...],
    unbatched: bool,
) -> tuple[Side, Side]:
    sides = []
    for (ids, ids_name), (pos, pos_name), side_lengths, array, shape in zip(
        _halves(segment_ids, "segment_ids"),
        _halves(segment_positions, "segment_positions"),
        lengths,
        ("query", "key"),
        (query_shape, key_shape),
        strict=True,
    ):
        if pos is not None and ids is None:
            raise ValueError(
                f"{pos_name} needs {ids_name} too (each token's document); pass segment_ids"
            )
        checks = dict(unbatched=unbatched, array=array, shape=shape)
        sides.append(
            Side(
                _side_array(ids, ids_name, kind="id", **checks),
                _side_array(pos, pos_name, kind="position", **checks),
                ids_name,
                pos_name,
                side_lengths,
            )
        )
    return sides[0], sides[1]


def _host(*arrays: Any) -> bool:
    """Whether every given array is a NumPy array (concrete values were read back once)."""
    return all(a is None or isinstance(a, np.ndarray) for a in arrays)


def _thdkit_ids(side: Side, *, batch: int, seq_len: int, padding_id: int) -> Any:
    """The side's ids in thdkit's numbering (0 = padding, documents from 1), ones without
    ``segment_ids``, cut at the seq lengths (jax.nn's padding at the row ends)."""
    xp = np if _host(side.ids, side.lengths) else jnp
    if side.ids is None:
        ids = xp.ones((batch, seq_len), xp.int32)
    elif padding_id:  # -1: ids 0..n-1 are documents 1..n; the top of int32 stays out of range
        top = np.iinfo(np.int32).max
        ids = xp.where(side.ids < top, side.ids + 1, side.ids)
    else:
        ids = side.ids
    if side.lengths is not None:
        inside = xp.arange(seq_len, dtype=xp.int32)[None, :] < side.lengths[:, None]
        ids = xp.where(inside, ids, xp.zeros_like(ids))
    return ids


def _validate(
    side: Side, ids: Any, *, num_segments: int, mask_type: MaskType, padding_id: int
) -> None:
    """The layout rules on concrete ids (the core's checks); the first broken one raises in
    the caller's words (:func:`thdkit._src.doors.jax_nn_checks.describe_layout_error`)."""
    if not _host(ids, side.pos):
        return  # traced: not read (docs/semantics.md, validation under jit)
    pos = np.zeros_like(ids) if side.pos is None else side.pos
    mask = mask_type if side.pos is not None else MaskType.PADDING
    options = dict(max_segments_per_seq=num_segments, mask_type=mask)
    try:
        validate_layout(ids, pos, name=side.ids_name, **options)
    except ValueError:
        checks = layout_error_codes(ids, pos, **options)
        codes = np.asarray(checks.code).reshape(-1)
        if not codes.any():
            raise
        row = int(np.flatnonzero(codes)[0])
        token = int(np.asarray(checks.token).reshape(-1)[row])
        message = describe_layout_error(
            LayoutError(int(codes[row])),
            ids_name=side.ids_name,
            pos_name=side.pos_name,
            row=row,
            token=token,
            ids=ids[row],
            caller_ids=ids[row] if side.ids is None else side.ids[row],
            pos=pos[row],
            num_segments=num_segments,
            padding_id=padding_id,
        )
        raise ValueError(message) from None


def _segments(side: Side, ids: Any) -> Segments:
    segments = Segments.from_ids(ids, side.pos)
    return jax.device_put(segments) if _host(segments.ids) else segments


def _num_segments(max_segments_per_seq: Any, ids: list[Any], *, seq_len: int) -> int:
    """S: the caller's, or the largest concrete id (1 without ids; at most MAX_SEGMENTS, so a
    larger id is reported as the layout error it is), or the row length when the ids are traced
    (a row of T tokens holds at most T documents numbered 1..n)."""
    if max_segments_per_seq is not None:
        return check_max_segments(max_segments_per_seq)
    if not _host(*ids):
        return min(seq_len, MAX_SEGMENTS)
    return min(max([1, *(int(np.max(a, initial=0)) for a in ids)]), MAX_SEGMENTS)


# --- The layout --------------------------------------------------------------------------------


def _plan_layout(
    plan: Any, *, given: dict[str, Any], is_causal: bool, shapes: Any, logits_soft_cap: Any
) -> CallLayout:
    """The layout of a caller's plan, which fixes everything the keywords would say; a
    ``logits_soft_cap`` given with it must be the plan's."""
    if not isinstance(plan, AttentionPlan):
        raise TypeError(f"plan must be a thdkit.AttentionPlan, got {type(plan).__name__}")
    passed = [name for name, x in given.items() if x is not None]
    if passed:
        raise ValueError(
            "the plan fixes the layout, the mask and the window; do not pass "
            + ", ".join(passed)
            + " with plan"
        )
    if is_causal and not plan.config.mask_type.is_causal:
        raise ValueError(
            f"is_causal=True (top-left causal) but the plan's mask_type is "
            f"{plan.config.mask_type.value!r}; plan with mask_type='padding_causal'"
        )
    planned = (plan.q_segments.ids.shape, plan.kv_segments.ids.shape)
    if planned != shapes:
        raise ValueError(
            f"the plan's layout has shapes {planned[0]} (query) and {planned[1]} (key/value); "
            f"the arrays need [B, T] = {shapes[0]} and [B, S] = {shapes[1]}"
        )
    cap = check_soft_cap(logits_soft_cap)
    if cap is not None and cap != plan.config.logits_soft_cap:
        raise ValueError(
            f"logits_soft_cap={cap} differs from the plan's ({plan.config.logits_soft_cap}): "
            "the cap is part of the plan; pass it to thdkit.plan_attention(logits_soft_cap=...)"
        )
    return CallLayout(
        plan.q_segments,
        None if plan.config.self_attention else plan.kv_segments,
        plan.config.mask_type,
        plan.config.window_size,
        plan.config.max_segments_per_seq,
        plan,
        plan.config.logits_soft_cap,
    )


def layout_of(
    *,
    query_shape: tuple[int, int, int, int],
    key_shape: tuple[int, int, int, int],
    unbatched: bool,
    is_causal: Any,
    query_seq_lengths: Any,
    key_value_seq_lengths: Any,
    local_window_size: Any,
    segment_ids: Any,
    segment_positions: Any,
    plan: Any,
    max_segments_per_seq: Any,
    padding_id: Any,
    logits_soft_cap: Any = None,
) -> CallLayout:
    """The call's layout: the plan's, or the Segments, mask and window the keywords describe.

    ``query_shape`` and ``key_shape`` are the arrays' [B, T, N, H] and [B, S, K, H] shapes
    (after :func:`thdkit._src.doors.jax_nn_checks.as_arrays`); the other arguments are the public
    functions' own, passed by name.

    Raises:
        TypeError, ValueError: as :func:`thdkit.dot_product_attention` for these keywords.
    """
    is_causal = check_bool(is_causal, "is_causal")
    padding_id = check_padding_id(padding_id)
    cap = check_soft_cap(logits_soft_cap)
    if plan is not None:
        given = dict(
            query_seq_lengths=query_seq_lengths,
            key_value_seq_lengths=key_value_seq_lengths,
            local_window_size=local_window_size,
            segment_ids=segment_ids,
            segment_positions=segment_positions,
            max_segments_per_seq=max_segments_per_seq,
            padding_id=padding_id or None,
        )
        shapes = (query_shape[:2], key_shape[:2])
        return _plan_layout(
            plan, given=given, is_causal=is_causal, shapes=shapes, logits_soft_cap=logits_soft_cap
        )
    batch, seq_q, seq_kv = query_shape[0], query_shape[1], key_shape[1]
    window = check_local_window(local_window_size)
    lengths = (
        _lengths(query_seq_lengths, "query_seq_lengths", batch),
        _lengths(key_value_seq_lengths, "key_value_seq_lengths", batch),
    )
    q_side, kv_side = _sides(
        segment_ids,
        segment_positions,
        lengths,
        query_shape=query_shape,
        key_shape=key_shape,
        unbatched=unbatched,
    )
    mask_type = MaskType.PADDING_CAUSAL if is_causal else MaskType.PADDING
    sides = [(s, n) for s, n in ((q_side, seq_q), (kv_side, seq_kv)) if n > 0]
    ids = [_thdkit_ids(s, batch=batch, seq_len=n, padding_id=padding_id) for s, n in sides]
    num_segments = _num_segments(max_segments_per_seq, ids, seq_len=max(seq_q, seq_kv))
    for (side, _), side_ids in zip(sides, ids, strict=True):
        _validate(
            side, side_ids, num_segments=num_segments, mask_type=mask_type, padding_id=padding_id
        )
    if len(sides) < 2:  # T = 0 or S = 0: nothing to attend, no Segments
        return CallLayout(None, None, mask_type, window, num_segments, None, cap)
    # One layout for both sides (self-attention: cuDNN needs no representability check) when
    # nothing tells them apart: the same ids, positions and lengths (None, or the same array).
    shared = (
        seq_q == seq_kv
        and not isinstance(segment_ids, tuple)
        and not isinstance(segment_positions, tuple)
        and query_seq_lengths is key_value_seq_lengths
    )
    q = _segments(q_side, ids[0])
    kv = None if shared else _segments(kv_side, ids[1])
    return CallLayout(q, kv, mask_type, window, num_segments, None, cap)
