"""Argument checks shared by every attention entry point (``attention``, ring attention, and
``dot_product_attention``, whose messages use ``jax.nn``'s letters: :data:`JAX_NN_AXES`).

Axis legend: B batch, T_q / T_kv query and key/value lengths, H_q / H_kv heads, D / D_v head dims.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike

__all__ = [
    "JAX_NN_AXES",
    "THD_AXES",
    "Axes",
    "check_arguments",
    "check_float",
    "check_layout_shapes",
    "check_scale",
    "check_shapes",
]

_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


class Axes(NamedTuple):
    """The letters an entry point's messages call the axes of query, key and value by."""

    seq_q: str
    seq_kv: str
    heads_q: str
    heads_kv: str
    dim: str
    dim_v: str


THD_AXES = Axes("T_q", "T_kv", "H_q", "H_kv", "D", "D_v")
"""thdkit's letters (:func:`thdkit.attention`, context parallelism)."""

JAX_NN_AXES = Axes("T", "S", "N", "K", "H", "H_v")
"""``jax.nn.dot_product_attention``'s letters (:func:`thdkit.dot_product_attention`)."""


def check_float(x: ArrayLike, name: str) -> Array:
    """``x`` as a JAX array of float32, bfloat16 or float16, or a TypeError naming it.

    Example:
        >>> check_float(jnp.zeros(2, int), "query")
        Traceback (most recent call last):
        ...
        TypeError: query must be float32, bfloat16 or float16, got dtype int32
    """
    x = jnp.asarray(x)
    if x.dtype not in _DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got dtype {x.dtype}")
    return x


def check_shapes(
    query: Array, key: Array, value: Array, *, axes: Axes = THD_AXES, empty_rows: bool = False
) -> None:
    """Checks that rank-4 query, key and value fit together, in the caller's axis letters.

    Args:
        query: [B, T_q, H_q, D] (in ``axes``' letters).
        key: [B, T_kv, H_kv, D].
        value: [B, T_kv, H_kv, D_v].
        axes: the letters the messages use: :data:`THD_AXES` or :data:`JAX_NN_AXES`.
        empty_rows: whether ``T_q`` or ``T_kv`` may be 0 (heads and head dims never may).

    Raises:
        TypeError: mixed dtypes.
        ValueError: a zero axis, batch/length/head/dim mismatches, query heads that are not a
            multiple of the key/value heads, naming the argument and the axis.

    Example:
        >>> x = jnp.zeros((1, 8, 2, 4))
        >>> check_shapes(x, x[..., :3], x, axes=JAX_NN_AXES)
        Traceback (most recent call last):
        ...
        ValueError: query and key must have the same head dim H, got 4 and 3 (shapes ...
    """
    if not query.dtype == key.dtype == value.dtype:
        raise TypeError(
            "query, key and value must share one dtype, got "
            f"{query.dtype}, {key.dtype} and {value.dtype}"
        )
    for name, x, axis, letter in (
        ("query", query, 1, axes.seq_q),
        ("key", key, 1, axes.seq_kv),
        ("query", query, 2, axes.heads_q),
        ("key", key, 2, axes.heads_kv),
        ("query", query, 3, axes.dim),
        ("value", value, 3, axes.dim_v),
    ):
        if x.shape[axis] == 0 and not (empty_rows and axis == 1):
            raise ValueError(f"{name} has {letter} = 0 (shape {x.shape}); it must be positive")
    if not query.shape[0] == key.shape[0] == value.shape[0]:
        raise ValueError(
            f"query, key and value must have the same batch size B, got shapes {query.shape}, "
            f"{key.shape} and {value.shape}"
        )
    if key.shape[:3] != value.shape[:3]:
        raise ValueError(
            f"key and value must agree in B, {axes.seq_kv} and {axes.heads_kv}, got shapes "
            f"{key.shape} and {value.shape}"
        )
    if query.shape[3] != key.shape[3]:
        raise ValueError(
            f"query and key must have the same head dim {axes.dim}, got {query.shape[3]} and "
            f"{key.shape[3]} (shapes {query.shape} and {key.shape})"
        )
    if query.shape[2] % key.shape[2]:
        raise ValueError(
            f"the query heads {axes.heads_q}={query.shape[2]} must be a multiple of the key/value "
            f"heads {axes.heads_kv}={key.shape[2]} (shapes {query.shape} and {key.shape})"
        )


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
        ValueError: ranks, batch/length/head/dim mismatches, zero lengths, heads or head dims
            (naming the argument), a non-finite ``scale``.

    Example:
        >>> x = jnp.zeros((1, 8, 2, 4))
        >>> check_arguments(x, x, x, scale=None)[3]
        0.5
    """
    arrays = []
    for name, x in (("query", query), ("key", key), ("value", value)):
        x = check_float(x, name)
        if x.ndim != 4:
            raise ValueError(f"{name} must have rank 4 ([B, T, H, D]), got shape {x.shape}")
        arrays.append(x)
    query, key, value = arrays
    check_shapes(query, key, value)
    return query, key, value, check_scale(scale, head_dim=query.shape[3])


def check_layout_shapes(
    query: Array,
    key: Array,
    ids_q: Array,
    ids_kv: Array | None,
    *,
    names: tuple[str, str] = ("segment_ids_q", "segment_ids_kv"),
) -> None:
    """Checks that the layouts fit the arrays: ``[B, T_q]`` and ``[B, T_kv]``, or self-attention.

    Shared by every attention entry point, after :func:`check_arguments`.

    Args:
        query: [B, T_q, H_q, D].
        key: [B, T_kv, H_kv, D].
        ids_q: the query segment ids, int[B, T_q].
        ids_kv: the key/value segment ids, int[B, T_kv], or None for self-attention (then
            ``T_kv`` must equal ``T_q``).
        names: the caller's parameters for the two layouts: the keyword arrays (the default),
            or Segments (``("q_segments", "kv_segments")``, whose ids are checked).

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
    arrays = names[1] == "segment_ids_kv"
    if ids_kv is None and seq_kv != seq_q:
        fix = "segment_ids_kv and segment_pos_kv" if arrays else names[1]
        raise ValueError(
            f"self-attention (no {names[1]}) needs T_kv == T_q, got T_kv={seq_kv} and "
            f"T_q={seq_q}; pass {fix}"
        )
    shape = "shape [B, T] =" if arrays else "[B, T] fields of shape"
    for name, ids, seq, of in (
        (names[0], ids_q, seq_q, "query"),
        (names[1], ids_kv, seq_kv, "key"),
    ):
        if ids is not None and ids.shape != (batch, seq):
            raise ValueError(
                f"{name} must have {shape} {(batch, seq)} to match {of}, got {ids.shape}"
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
