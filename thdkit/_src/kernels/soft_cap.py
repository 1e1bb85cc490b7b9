"""The values a flash tile keeps of its logits, with or without a soft cap: one definition for
every tiled kernel (blockwise, Pallas).

Without a cap a flash kernel keeps the dot products ``q . k`` (negated for a negative scale) and
multiplies by ``|scale|`` only inside the exponent, so that each row's maximum is a dot product
and the largest weight is recomputed exactly at any magnitude (:mod:`~.flash_vjp`). With a cap
the logits are ``cap * tanh(scale * q . k / cap)`` (docs/semantics.md, "Soft-capped logits"),
bounded by the cap: the kernel keeps them as they are, and the multiplier is 1.

Every function takes the kernel's static ``scale`` and ``cap`` (None: no cap).
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array

__all__ = ["d_dots", "exponents", "tile_values", "unit"]


def unit(*, scale: float, cap: float | None) -> float:
    """What multiplies the values of :func:`tile_values` into logits: ``|scale|``, or 1 with a
    soft cap.

    Example:
        >>> unit(scale=-0.5, cap=None), unit(scale=-0.5, cap=30.0)
        (0.5, 1.0)
    """
    return 1.0 if cap is not None else abs(scale)


def tile_values(dots: Array, *, scale: float, cap: float | None) -> Array:
    """The values a tile keeps of its float32 dot products: ``dots`` (negated for a negative
    scale), or the capped logits ``cap * tanh(scale * dots / cap)``.

    Example:
        >>> tile_values(jnp.array([1.0, 100.0]), scale=1.0, cap=10.0)
        Array([ 0.9966799, 10.       ], dtype=float32)
    """
    if cap is not None:
        return cap * jnp.tanh(dots * (scale / cap))
    return -dots if scale < 0 else dots


def exponents(values: Array, shift: Array, *, scale: float, cap: float | None) -> Array:
    """``(values - shift) * unit``: the logits less their row's largest (``shift``, in the units
    of ``values``), exactly 0 at it and -inf where ``values`` is (a masked pair).

    Example:
        >>> exponents(jnp.array([2.0, -jnp.inf]), jnp.array(2.0), scale=0.5, cap=None)
        Array([  0., -inf], dtype=float32)
    """
    multiplier = unit(scale=scale, cap=cap)
    if multiplier == 0:
        return jnp.where(values == -jnp.inf, -jnp.inf, 0.0)
    return (values - shift) * multiplier


def d_dots(values: Array, *, scale: float, cap: float | None) -> Array | float:
    """The derivative of the logit with respect to the dot product at the tile values:
    ``scale``, or ``scale * (1 - tanh^2) = scale * (1 - (values / cap)^2)`` under a soft cap.

    Example:
        >>> d_dots(jnp.array([0.0, 10.0]), scale=2.0, cap=10.0)
        Array([2., 0.], dtype=float32)
    """
    if cap is None:
        return scale
    return scale * (1.0 - jnp.square(values / cap))
