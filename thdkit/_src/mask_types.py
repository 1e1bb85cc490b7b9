"""The six mask types, their names and aliases, and sliding windows (parsed once, static).

Every mask type of thdkit restricts attention to pairs of tokens of the same non-padding segment;
the types differ only in the pairwise rule (:func:`thdkit._src.masks.rel`, docs/semantics.md). A
sliding window ``(left, right)`` narrows each side further. This module imports nothing of thdkit.
"""

from __future__ import annotations

import enum
from typing import Any

import numpy as np

__all__ = [
    "UNBOUNDED",
    "MaskType",
    "Window",
    "check_window",
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
