"""Argument checks shared by every attention entry point (``attention``, ring attention).

Axis legend: B batch, T_q / T_kv query and key/value lengths, H_q / H_kv heads, D / D_v head dims.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike

__all__ = ["check_arguments", "check_layout_shapes", "check_scale"]

_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def check_arguments(
    query: ArrayLike, key: ArrayLike, value: ArrayLike, *, scale: Any
) -> tuple[Array, Array, Array, float]:
    """Checks attention inputs and the scale; shared by every attention entry point.

    Args:
        query: float32/bfloat16/float16[B, T_q, H_q, D].
        key: [B, T_kv, H_kv, D], the query's dtype; ``H_q`` a multiple of ``H_kv``.
        value: [B, T_kv, H_kv, D_v], the query's dtype.
        scale: a real number (Python or NumPy, finite), or None for ``1 / sqrt(D)``.

    Returns:
        ``(query, key, value, scale)``: the arrays as JAX arrays, the scale as a Python float.

    Raises:
        TypeError: a non-float or mixed dtype, a non-real ``scale``.
        ValueError: ranks, batch/length/head/dim mismatches, zero heads or head dims (naming
            the argument), a non-finite ``scale``.

    Example:
        >>> x = jnp.zeros((1, 8, 2, 4))
        >>> check_arguments(x, x, x, scale=None)[3]
        0.5
    """
    arrays = []
    for name, x in (("query", query), ("key", key), ("value", value)):
        x = jnp.asarray(x)
        if x.dtype not in _DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got dtype {x.dtype}")
        if x.ndim != 4:
            raise ValueError(f"{name} must have rank 4 ([B, T, H, D]), got shape {x.shape}")
        arrays.append(x)
    query, key, value = arrays
    if not query.dtype == key.dtype == value.dtype:
        raise TypeError(
            "query, key and value must share one dtype, got "
            f"{query.dtype}, {key.dtype} and {value.dtype}"
        )
    for name, x, what in (
        ("query", query, "T_q"),
        ("key", key, "T_kv"),
        ("query", query, "H_q"),
        ("key", key, "H_kv"),
        ("query", query, "D"),
        ("value", value, "D_v"),
    ):
        axis = {"T": 1, "H": 2, "D": 3}[what[0]]
        if x.shape[axis] == 0:
            raise ValueError(f"{name} has {what} = 0 (shape {x.shape}); it must be positive")
    if not query.shape[0] == key.shape[0] == value.shape[0]:
        raise ValueError(
            f"query, key and value must have the same batch size B, got shapes {query.shape}, "
            f"{key.shape} and {value.shape}"
        )
    if key.shape[:3] != value.shape[:3]:
        raise ValueError(
            "key and value must agree in B, T_kv and H_kv, got shapes "
            f"{key.shape} and {value.shape}"
        )
    if query.shape[3] != key.shape[3]:
        raise ValueError(
            f"query and key must have the same head dim D, got {query.shape[3]} and {key.shape[3]}"
        )
    if query.shape[2] % key.shape[2]:
        raise ValueError(
            f"the query heads H_q={query.shape[2]} must be a multiple of the key/value heads "
            f"H_kv={key.shape[2]}"
        )
    return query, key, value, check_scale(scale, head_dim=query.shape[3])


def check_layout_shapes(query: Array, key: Array, ids_q: Array, ids_kv: Array | None) -> None:
    """Checks that the layouts fit the arrays: ``[B, T_q]`` and ``[B, T_kv]``, or self-attention.

    Shared by every attention entry point, after :func:`check_arguments`.

    Args:
        query: [B, T_q, H_q, D].
        key: [B, T_kv, H_kv, D].
        ids_q: the query segment ids, int[B, T_q].
        ids_kv: the key/value segment ids, int[B, T_kv], or None for self-attention (then
            ``T_kv`` must equal ``T_q``).

    Raises:
        ValueError: a shape mismatch, naming the layout parameter and ``T_kv``/``T_q``.

    Example:
        >>> x = jnp.zeros((1, 8, 2, 4))
        >>> check_layout_shapes(x, x[:, :4], jnp.zeros((1, 8), int), None)
        Traceback (most recent call last):
        ...
        ValueError: self-attention (no segment_ids_kv) needs T_kv == T_q, got T_kv=4 and T_q=8...
    """
    batch, seq_q = query.shape[:2]
    seq_kv = key.shape[1]
    if ids_kv is None and seq_kv != seq_q:
        raise ValueError(
            f"self-attention (no segment_ids_kv) needs T_kv == T_q, got T_kv={seq_kv} and "
            f"T_q={seq_q}; pass segment_ids_kv and segment_pos_kv"
        )
    for name, ids, seq, of in (
        ("segment_ids_q", ids_q, seq_q, "query"),
        ("segment_ids_kv", ids_kv, seq_kv, "key"),
    ):
        if ids is not None and ids.shape != (batch, seq):
            raise ValueError(
                f"{name} must have shape [B, T] = {(batch, seq)} to match {of}, got {ids.shape}"
            )


def check_scale(scale: Any, *, head_dim: int) -> float:
    """The logits' scale as a Python float: ``scale`` checked, or ``1 / sqrt(head_dim)``.

    Args:
        scale: a real number (Python or NumPy, finite), or None.
        head_dim: D, the query/key head dim, for the default.

    Returns:
        A finite Python float.

    Raises:
        TypeError: ``scale`` not a real number (bools are not).
        ValueError: ``scale`` not finite.

    Example:
        >>> check_scale(None, head_dim=16), check_scale(np.float32(0.5), head_dim=16)
        (0.25, 0.5)
    """
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, (bool, np.bool_)) or not isinstance(
        scale, (int, float, np.integer, np.floating)
    ):
        raise TypeError(
            f"scale must be a Python float, a NumPy real or None, got {type(scale).__name__}"
        )
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)
