"""Mask types: their names and aliases, and the pairwise predicate ``rel`` of the reference.

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

from jaxtyping import Array, Bool, Int

__all__ = ["MaskType", "rel"]


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
        return rl_q - pos_q <= rl_kv - pos_kv
    return True
