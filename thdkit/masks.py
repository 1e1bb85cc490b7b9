"""Mask types and the predicates that build a mask from ids, positions and document lengths.

The names and aliases of the six mask types, the pairwise predicate ``rel``, sliding windows
(:func:`check_window`, :func:`window_bound`, :func:`in_window`) and :func:`pair_mask`, the mask of
a tile (or of a whole row) that every attention implementation applies (docs/semantics.md).

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
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

if TYPE_CHECKING:
    from thdkit.segments import Segments

__all__ = [
    "UNBOUNDED",
    "MaskType",
    "Window",
    "check_window",
    "in_window",
    "pair_mask",
    "poison",
    "rel",
    "sanitize",
    "window_bound",
]


class MaskType(enum.Enum):
    """The six mask types, named as in cuDNN / Transformer Engine.

    Example:
        >>> MaskType.parse("causal_padding")
        <MaskType.PADDING_CAUSAL: 'padding_causal'>
    """

    NO_MASK = "no_mask"
    PADDING = "padding"
    CAUSAL = "causal"
    PADDING_CAUSAL = "padding_causal"
    CAUSAL_BOTTOM_RIGHT = "causal_bottom_right"
    PADDING_CAUSAL_BOTTOM_RIGHT = "padding_causal_bottom_right"

    @property
    def is_causal(self) -> bool:
        """True for the top-left causal types (``pos_q >= pos_kv``)."""
        return self in (MaskType.CAUSAL, MaskType.PADDING_CAUSAL)

    @property
    def is_bottom_right(self) -> bool:
        """True for the bottom-right causal types (``rl_q - pos_q <= rl_kv - pos_kv``)."""
        return self in (MaskType.CAUSAL_BOTTOM_RIGHT, MaskType.PADDING_CAUSAL_BOTTOM_RIGHT)

    @property
    def uses_positions(self) -> bool:
        """True where ``rel`` reads positions, so they must strictly increase along each run."""
        return self.is_causal or self.is_bottom_right

    @classmethod
    def parse(cls, mask_type: MaskType | str) -> MaskType:
        """Returns the ``MaskType`` for a member or one of its names or aliases.

        Raises:
            ValueError: ``mask_type`` is an unknown name; the message lists the valid ones.
            TypeError: ``mask_type`` is neither a ``MaskType`` nor a string.
        """
        if isinstance(mask_type, MaskType):
            return mask_type
        if not isinstance(mask_type, str):
            raise TypeError(
                f"mask_type must be a thdkit.MaskType or its name, got {type(mask_type).__name__}"
            )
        try:
            return _BY_NAME[mask_type.strip().lower()]
        except KeyError:
            valid = ", ".join(sorted(_BY_NAME))
            raise ValueError(f"unknown mask_type {mask_type!r}; valid names: {valid}") from None


_ALIASES = {
    "causal_padding": MaskType.PADDING_CAUSAL,
    "bottom_right_causal": MaskType.CAUSAL_BOTTOM_RIGHT,
    "causal_padding_bottom_right": MaskType.PADDING_CAUSAL_BOTTOM_RIGHT,
    "bottom_right_causal_padding": MaskType.PADDING_CAUSAL_BOTTOM_RIGHT,
    "bottom_right_padding_causal": MaskType.PADDING_CAUSAL_BOTTOM_RIGHT,
}
_BY_NAME = {m.value: m for m in MaskType} | _ALIASES


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


# --- Sliding windows ---------------------------------------------------------------------------

UNBOUNDED = 2**31 - 1
"""A window bound at or above this (like None or a negative bound) leaves its side unbounded."""

Window = tuple[int | None, int | None] | None
"""A parsed sliding window ``(left, right)``: non-negative ints below :data:`UNBOUNDED`, None for
an unbounded side; None when both sides are unbounded."""


def check_window(window_size: Any) -> Window:
    """``window_size`` as ``(left, right)`` with None for unbounded sides, or None.

    A bound that is None, negative or at least :data:`UNBOUNDED` (``2**31 - 1``) is unbounded;
    every kept bound is below it, so the mask's int32 arithmetic cannot overflow.

    Args:
        window_size: None, or a pair of Python/NumPy ints or None.

    Returns:
        The parsed :data:`Window`.

    Raises:
        ValueError: not None and not a pair.
        TypeError: a bound that is neither an int nor None.

    Example:
        >>> check_window((-1, 3)), check_window((None, -1)), check_window((2**40, 0))
        ((None, 3), None, (None, 0))
    """
    if window_size is None:
        return None
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise ValueError(f"window_size must be None or a pair (left, right), got {window_size!r}")
    bounds = []
    for side, bound in zip(("left", "right"), window_size, strict=True):
        if bound is not None and (
            isinstance(bound, (bool, np.bool_)) or not isinstance(bound, (int, np.integer))
        ):
            raise TypeError(
                f"window_size {side} bound must be a Python int or None, got {type(bound).__name__}"
            )
        unbounded = bound is None or bound < 0 or bound >= UNBOUNDED
        bounds.append(None if unbounded else int(bound))
    return None if bounds == [None, None] else (bounds[0], bounds[1])


def window_bound(window_size: Window, side: int) -> int | None:
    """One side of a parsed window (0 = left, 1 = right): an int in ``[0, UNBOUNDED)`` or None.

    Args:
        window_size: a window parsed by :func:`check_window` (raw bounds are re-checked: None,
            negative or ``>= UNBOUNDED`` give None).
        side: 0 for the left bound, 1 for the right one.

    Returns:
        The bound, or None where that side is unbounded.

    Example:
        >>> window_bound((3, None), 0), window_bound((3, None), 1), window_bound(None, 0)
        (3, None, None)
    """
    if window_size is None:
        return None
    bound = window_size[side]
    if bound is None or bound < 0 or bound >= UNBOUNDED:
        return None
    return int(bound)


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

    Args:
        q: the queries' :class:`thdkit.Segments`, int32[*B, T_q] fields.
        kv: the keys'/values' :class:`thdkit.Segments`, int32[*B, T_kv] fields.
        mask_type: a parsed ``MaskType``.
        window_size: ``(left, right)`` or None (see :func:`in_window`).

    Returns:
        bool[*B, T_q, T_kv].

    Example:
        >>> from thdkit.segments import Segments
        >>> seg = Segments.from_ids(jnp.array([1, 1, 1]))
        >>> pair_mask(seg, seg, mask_type=MaskType.CAUSAL, window_size=(1, 0)).astype(int)
        Array([[1, 0, 0],
               [1, 1, 0],
               [0, 1, 1]], dtype=int32)
    """
    ids_q, pos_q, rl_q = (a[..., :, None] for a in (q.ids, q.positions, q.lengths))
    ids_kv, pos_kv, rl_kv = (a[..., None, :] for a in (kv.ids, kv.positions, kv.lengths))
    allowed = (ids_q == ids_kv) & (ids_q != 0) & rel(mask_type, pos_q, pos_kv, rl_q, rl_kv)
    return allowed & in_window(mask_type, window_size, pos_q, pos_kv, rl_q, rl_kv)


# --- Isolation of non-finite values ------------------------------------------------------------


def sanitize(x: Float[Array, "B T H D"]) -> tuple[Float[Array, "B T H D"], Bool[Array, "B T H"]]:
    """Non-finite elements replaced by zeros (a select), and which (token, head) vectors had one.

    Attention computes every product from the sanitised values, so a NaN or inf in one document
    can reach no other document through a ``0 * nan`` of a masked pair; the flags say which
    query rows to poison instead (docs/attention.md, "Isolation").

    Args:
        x: float[B, T, H, D]; query, key or value.

    Returns:
        ``(clean, bad)``: ``x``'s dtype and shape with zeros where ``x`` was NaN or +-inf;
        bool[B, T, H], True where the token's vector of that head held a non-finite element.

    Example:
        >>> clean, bad = sanitize(jnp.array([[[[1.0, jnp.nan]], [[2.0, 3.0]]]]))
        >>> clean[0, :, 0].tolist(), bad[0, :, 0].tolist()
        ([[1.0, 0.0], [2.0, 3.0]], [True, False])
    """
    finite = jnp.isfinite(x)
    return jnp.where(finite, x, jnp.zeros((), x.dtype)), ~jnp.all(finite, axis=-1)


def poison(
    out: Float[Array, "*R D_v"], lse: Float[Array, " *R"], poisoned: Bool[Array, " *R"]
) -> tuple[Float[Array, "*R D_v"], Float[Array, " *R"]]:
    """NaN in the output vectors and log-sum-exps of the poisoned rows (a select).

    The counterpart of :func:`sanitize`: a row that read a non-finite query, key or value is
    reported as NaN instead of being computed from the sanitised zeros.

    Args:
        out: float[*R, D_v]; attention outputs, any leading row axes.
        lse: float[*R]; their log-sum-exps.
        poisoned: bool[*R]; the rows to poison.

    Returns:
        ``(out, lse)`` with NaN where ``poisoned``.

    Example:
        >>> out, lse = poison(jnp.ones((2, 1)), jnp.zeros(2), jnp.array([True, False]))
        >>> out[:, 0].tolist(), lse.tolist()
        ([nan, 1.0], [nan, 0.0])
    """
    return jnp.where(poisoned[..., None], jnp.nan, out), jnp.where(poisoned, jnp.nan, lse)
