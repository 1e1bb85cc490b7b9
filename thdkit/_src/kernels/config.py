"""The static configuration of one attention call, parsed and checked in one place.

Every entry point that attends (``attention``, ``plan_attention``, ``attention_partial``, the
context-parallel strategies, ``is_representable``) turns its options into one
:class:`AttentionConfig` through :meth:`AttentionConfig.parse`, so each option has one check and
one message. The configuration is hashable: it is a static argument of every compiled program.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from thdkit._src.kernels.tiles import default_block
from thdkit._src.limits import check_int, check_max_segments
from thdkit._src.mask_types import MaskType, Window, check_window

__all__ = ["AttentionConfig", "check_soft_cap"]


def check_soft_cap(logits_soft_cap: Any) -> float | None:
    """``logits_soft_cap`` as a Python float, or None (no cap).

    Args:
        logits_soft_cap: a positive finite real (Python or NumPy), or None.

    Returns:
        A positive finite float, or None.

    Raises:
        TypeError: not a real number (bools and arrays are not: the cap is static).
        ValueError: not positive and finite.

    Example:
        >>> check_soft_cap(np.float32(50)), check_soft_cap(None)
        (50.0, None)
        >>> check_soft_cap(0.0)
        Traceback (most recent call last):
        ...
        ValueError: logits_soft_cap must be a positive finite float or None, got 0.0
    """
    if logits_soft_cap is None:
        return None
    if isinstance(logits_soft_cap, (bool, np.bool_)) or not isinstance(
        logits_soft_cap, (int, float, np.integer, np.floating)
    ):
        raise TypeError(
            f"logits_soft_cap must be a Python float, a NumPy real or None (a static value), "
            f"got {type(logits_soft_cap).__name__}"
        )
    cap = float(logits_soft_cap)
    if not (math.isfinite(cap) and cap > 0):
        raise ValueError(
            f"logits_soft_cap must be a positive finite float or None, got {logits_soft_cap}"
        )
    return cap


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Mask type, window, S, tile sizes, whether the keys share the queries' layout, soft cap,
    prefix.

    Attributes:
        mask_type: the parsed :class:`thdkit.MaskType`.
        window_size: the parsed window ``(left, right)`` (None for unbounded sides), or None.
        max_segments_per_seq: S, the largest id; None where the caller does not know it
            (:func:`thdkit.kernels.attention_partial`: no implementation that returns a
            log-sum-exp reads it).
        block_q, block_kv: tile sizes of the tiled implementations, capped to T_q and T_kv; None
            where the row lengths were not given (a configuration that runs no tiles).
        self_attention: whether the keys/values share the queries' layout.
        logits_soft_cap: ``cap`` of the logits' soft cap ``cap * tanh(logit / cap)``, applied
            after the scale and before the mask (docs/semantics.md, "Soft-capped logits"), or
            None for none.
        prefix: whether the layout carries document prefixes (``prefix_lengths`` on either
            side's Segments): prefix-LM masks, docs/semantics.md, "Prefix-LM masks".
    """

    mask_type: MaskType
    window_size: Window
    max_segments_per_seq: int | None
    block_q: int | None
    block_kv: int | None
    self_attention: bool
    logits_soft_cap: float | None = None
    prefix: bool = False

    @property
    def features(self) -> frozenset[str]:
        """The optional features this configuration asks of an implementation (those of
        ``Implementation.features``): ``"logits_soft_cap"`` where a cap is set, ``"prefix"``
        where the layout carries document prefixes."""
        asked = {"logits_soft_cap": self.logits_soft_cap is not None, "prefix": self.prefix}
        return frozenset(name for name, on in asked.items() if on)

    @classmethod
    def parse(
        cls,
        *,
        mask_type: Any,
        window_size: Any,
        max_segments_per_seq: Any,
        block_q: Any = None,
        block_kv: Any = None,
        seq_q: int | None = None,
        seq_kv: int | None = None,
        self_attention: bool = True,
        logits_soft_cap: Any = None,
        prefix: bool = False,
    ) -> AttentionConfig:
        """Checks every option once and resolves the tile sizes for rows of these lengths.

        Args:
            mask_type: a :class:`thdkit.MaskType` or its name.
            window_size: ``(left, right)`` or None (``check_window``).
            max_segments_per_seq: S, a static int in ``[1, MAX_SEGMENTS]``, or None where it is
                not known (then tile sizes default to :data:`thdkit.kernels.DEFAULT_BLOCK`).
            block_q, block_kv: positive ints, or None for
                :func:`thdkit.kernels.default_block` of the row length and S.
            seq_q, seq_kv: T_q and T_kv; the tile sizes are resolved and capped to them (left as
                given, checked, where they are None).
            self_attention: whether the keys share the queries' layout.
            logits_soft_cap: a positive finite float, or None (:func:`check_soft_cap`).
            prefix: whether either side's Segments carries ``prefix_lengths``.

        Returns:
            :class:`AttentionConfig`.

        Raises:
            TypeError: a non-int S, window bound or block size; a mask type of another type; a
                non-real soft cap.
            ValueError: an unknown mask type, a bad window form, S or a block size out of range,
                a soft cap that is not positive and finite.

        Example:
            >>> AttentionConfig.parse(mask_type="causal", window_size=(-1, 0),
            ...     max_segments_per_seq=4, seq_q=8, seq_kv=8, self_attention=True)
            AttentionConfig(mask_type=<MaskType.CAUSAL: 'causal'>, window_size=(None, 0),
                            max_segments_per_seq=4, block_q=8, block_kv=8, self_attention=True,
                            logits_soft_cap=None, prefix=False)
        """
        mask = MaskType.parse(mask_type)
        window = check_window(window_size)
        num_segments = None
        if max_segments_per_seq is not None:
            num_segments = check_max_segments(max_segments_per_seq)
        block_q, block_kv = (
            None if b is None else check_int(b, name, low=1)
            for b, name in ((block_q, "block_q"), (block_kv, "block_kv"))
        )
        if seq_q is not None and seq_kv is not None:
            block_q, block_kv = (
                min(seq, default_block(seq, num_segments or 1) if b is None else b)
                for b, seq in ((block_q, seq_q), (block_kv, seq_kv))
            )
        cap = check_soft_cap(logits_soft_cap)
        return cls(
            mask, window, num_segments, block_q, block_kv, bool(self_attention), cap, bool(prefix)
        )
