"""RoPE at each token's position inside its document (rotate-half form), for packed rows."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

__all__ = ["rope"]


def rope(
    x: Float[Array, "B T N D"], positions: Int[Array, "B T"], *, theta: float = 10_000.0
) -> Float[Array, "B T N D"]:
    """Rotary position embedding (rotate-half form) at the given per-token positions.

    Feature pair ``(i, i + D/2)`` of a token at position ``p`` is rotated by the angle
    ``p * theta ** (-2i / D)``. Packed rows pass each token's position inside its document
    (``Segments.positions``), so a document gets the same embedding wherever it sits in a row.

    Args:
        x: float[B, T, N, D]; N heads, D even.
        positions: int[B, T]; the position of each token (an integer dtype: float positions
            would silently lose exactness above 2**24).
        theta: the RoPE base, a positive real.

    Returns:
        float[B, T, N, D] in ``x``'s dtype (angles computed in float32).

    Raises:
        TypeError: ``positions`` of a non-integer dtype.
        ValueError: D odd, a non-positive ``theta``, or ``positions`` not of shape [B, T].

    Example:
        >>> x = jnp.ones((1, 2, 1, 2))
        >>> rope(x, jnp.array([[0, 1]]), theta=10_000.0)[0, :, 0].round(3).tolist()
        [[1.0, 1.0], [-0.301..., 1.382...]]
    """
    positions = jnp.asarray(positions)
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise TypeError(f"positions must be an integer array, got dtype {positions.dtype}")
    head_dim = x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"rope needs an even head dim, got D={head_dim}")
    if not theta > 0:
        raise ValueError(f"theta must be positive, got {theta}")
    if positions.shape != x.shape[:2]:
        raise ValueError(f"positions must have shape [B, T] = {x.shape[:2]}, got {positions.shape}")
    half = head_dim // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions.astype(jnp.float32)[:, :, None, None] * inv_freq[None, None, None, :]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
