"""The accepted ranges of thdkit's integers, and the checks of static integer and flag arguments.

docs/semantics.md ("Accepted ranges"): positions lie in ``[0, MAX_POSITION]``, rows hold at most
``MAX_SEQ_LEN`` tokens and ids at most ``MAX_SEGMENTS``. These bounds keep every sum and
difference the package forms (``pos + 1``, ``rl - pos``, ``pos_q - pos_kv``, ...) inside int32.
This module imports nothing of thdkit.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

__all__ = [
    "INT32",
    "MAX_POSITION",
    "MAX_SEGMENTS",
    "MAX_SEQ_LEN",
    "check_bool",
    "check_int",
    "check_max_segments",
    "is_concrete",
    "segment_bound",
]

MAX_POSITION = 2**30 - 1
"""The largest accepted position: positions lie in ``[0, MAX_POSITION]``."""


MAX_SEQ_LEN = 2**30
"""The largest accepted row length T (the last axis of ids and positions)."""


MAX_SEGMENTS = 2**30 - 1
"""The largest accepted ``max_segments_per_seq`` (S); ids lie in ``[0, S]``."""


INT32 = np.iinfo(np.int32)


def is_concrete(*arrays: Any) -> bool:
    """True when no argument is a JAX tracer, so values can be read on the host."""
    return not any(isinstance(a, jax.core.Tracer) for a in arrays)


def check_int(
    value: Any, name: str, *, low: int, high: int | None = None, kind: str = "an int"
) -> int:
    """Returns a static integer argument as an ``int`` in ``[low, high]``, or raises naming it.

    Python and NumPy integers are accepted; bools, floats and traced values are not.

    Args:
        value: the argument.
        name: its name, for messages.
        low: the smallest accepted value.
        high: the largest accepted value, or None for no bound.
        kind: what the TypeError says the argument must be.

    Returns:
        ``int(value)``.

    Raises:
        TypeError: ``value`` is not a Python or NumPy integer (bools included).
        ValueError: ``value`` is outside ``[low, high]``.

    Example:
        >>> check_int(np.int64(4), "cp", low=1)
        4
        >>> check_int(True, "cp", low=1)
        Traceback (most recent call last):
        ...
        TypeError: cp must be an int, got bool
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
    if high is None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return int(value)


def check_bool(value: Any, name: str) -> bool:
    """Returns a flag argument as a ``bool``, or raises naming it.

    Python and NumPy bools are accepted; ints (0 and 1 included) and arrays are not.

    Args:
        value: the argument.
        name: its name, for messages.

    Returns:
        ``bool(value)``.

    Raises:
        TypeError: ``value`` is not a Python or NumPy bool.

    Example:
        >>> check_bool(np.bool_(True), "compact")
        True
        >>> check_bool(1, "compact")
        Traceback (most recent call last):
        ...
        TypeError: compact must be a bool, got int
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def check_max_segments(max_segments_per_seq: Any) -> int:
    """Returns ``max_segments_per_seq`` as a static ``int`` in ``[1, MAX_SEGMENTS]``, or raises.

    Args:
        max_segments_per_seq: S, a Python or NumPy integer (not a bool, not traced).

    Returns:
        ``int``.

    Raises:
        TypeError: it is not a Python (or NumPy) integer, e.g. a traced value, a float or a bool.
        ValueError: it is outside ``[1, MAX_SEGMENTS]``.

    Example:
        >>> check_max_segments(np.int64(4))
        4
    """
    return check_int(
        max_segments_per_seq,
        "max_segments_per_seq",
        low=1,
        high=MAX_SEGMENTS,
        kind="a static Python int (it sizes the outputs)",
    )


def segment_bound(max_segments_per_seq: Any) -> int:
    """The largest id the checks accept: ``max_segments_per_seq``, or MAX_SEGMENTS for None."""
    if max_segments_per_seq is None:
        return MAX_SEGMENTS
    return check_max_segments(max_segments_per_seq)
