"""Isolation of non-finite values: one select in, one select out (docs/attention.md, "Isolation").

:func:`sanitize` replaces non-finite inputs by zeros and says which (token, head) vectors held
one; every implementation computes from the clean values, then :func:`poison` reports the rows
that read a flagged vector as NaN. A NaN in one document therefore never reaches another through
a ``0 * nan`` of a masked pair. This module imports nothing of thdkit.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

__all__ = ["poison", "sanitize"]


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
    out: Float[Array, "*R D_v"], lse: Float[Array, " *R"] | None, poisoned: Bool[Array, " *R"]
) -> tuple[Float[Array, "*R D_v"], Float[Array, " *R"] | None]:
    """NaN in the output vectors and log-sum-exps of the poisoned rows (a select).

    The counterpart of :func:`sanitize`: a row that read a non-finite query, key or value is
    reported as NaN instead of being computed from the sanitised zeros.

    Args:
        out: float[*R, D_v]; attention outputs, any leading row axes.
        lse: float[*R]; their log-sum-exps, or None (an implementation without them).
        poisoned: bool[*R]; the rows to poison.

    Returns:
        ``(out, lse)`` with NaN where ``poisoned`` (lse None stays None).

    Example:
        >>> out, lse = poison(jnp.ones((2, 1)), jnp.zeros(2), jnp.array([True, False]))
        >>> out[:, 0].tolist(), lse.tolist()
        ([nan, 1.0], [nan, 0.0])
    """
    out = jnp.where(poisoned[..., None], jnp.nan, out)
    return out, None if lse is None else jnp.where(poisoned, jnp.nan, lse)
