"""The host path: layout checks and the linear metadata in NumPy, with no XLA compilation.

A data pipeline (Grain workers, a collator) holds its packed rows as NumPy arrays, one new shape
after another. On the device path every new shape compiles two programs (the layout checks and
the metadata) before the first result; on the host path :func:`thdkit.seqlens_and_offsets`
computes the same int32 arrays in NumPy and compiles nothing.

There is one implementation of each idea: the layout rules (``validate.rules``), the int32
conversion (``validate.inputs``), the linear method (``metadata``) and its steps
(``counting``) are written once over an :class:`ArrayOps`, the array module they run on
(``numpy`` or ``jax.numpy``) plus the few operations the two spell differently:

=================  ==========================================  ===================================
operation          JAX                                          NumPy
=================  ==========================================  ===================================
``cummax``         ``jax.lax.cummax``                           ``np.maximum.accumulate``
``scatter_max``    ``x.at[i].max(v, mode="drop")``              ``np.maximum.at`` (in-range only)
``place``          ``x.at[i].set(v, mode="drop")``, one row     fancy assignment, every row at once
``cond``           ``jax.lax.cond``                             ``if``
``map_rows``       ``jax.vmap``                                 the function itself (it takes rows)
=================  ==========================================  ===================================

:data:`JAX` is the default everywhere, so the device programs are the ones thdkit always traced;
:data:`NUMPY` runs the same code on NumPy arrays. :func:`on_host` is the dispatch rule: the host
path runs when every given layout array is host data (a NumPy array or a Python list), none a
``jax.Array`` (concrete or traced).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["JAX", "NUMPY", "ArrayOps", "on_host", "readable"]


def readable(x: Any) -> Any:
    """A concrete, fully addressable ``jax.Array`` read back as NumPy (host data); anything else
    (host data, tracers, arrays sharded over other processes, None) as it is.

    Entry points that would otherwise compile small programs to check and convert a concrete
    layout read it back once and take the host path.

    Example:
        >>> type(readable(jnp.arange(3))).__name__, readable(None)
        ('ndarray', None)
    """
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and x.is_fully_addressable:
        return np.asarray(x)
    return x


def on_host(*arrays: Any) -> bool:
    """True when the given arrays (None ones skipped) are host data: none is a ``jax.Array``.

    NumPy arrays, Python lists and other array-likes are host data; a ``jax.Array`` or a tracer
    makes the call take the device path.

    Args:
        arrays: the layout arrays of one call; None for the ones not given.

    Returns:
        bool; False when no array is given.

    Example:
        >>> on_host(np.array([1, 1, 2]), [0, 1, 0], None)
        True
        >>> on_host(np.array([1, 1, 2]), jnp.array([0, 1, 0]))
        False
    """
    given = [a for a in arrays if a is not None]
    return bool(given) and not any(isinstance(a, (jax.Array, jax.core.Tracer)) for a in given)


def _jax_place(out: jax.Array, index: jax.Array, values: jax.Array) -> jax.Array:
    return out.at[index].set(values, mode="drop")


def _wrapped(index: np.ndarray, size: int) -> np.ndarray:
    """Negative indices counted from the end, as JAX's ``.at[]`` reads them."""
    return np.where(index < 0, index + size, index) if (index < 0).any() else index


def _numpy_place(out: np.ndarray, index: np.ndarray, values: np.ndarray) -> np.ndarray:
    out = np.array(out)  # a fresh, writable array: the JAX version returns a new one too
    index = _wrapped(index, out.shape[-1])
    keep = (index >= 0) & (index < out.shape[-1])
    where = np.nonzero(keep)
    out[(*where[:-1], index[where])] = values[where]
    return out


def _jax_scatter_max(out: jax.Array, index: jax.Array, values: jax.Array) -> jax.Array:
    return out.at[index].max(values, mode="drop")


def _numpy_scatter_max(out: np.ndarray, index: np.ndarray, values: np.ndarray) -> np.ndarray:
    index = _wrapped(index, out.shape[0])
    keep = (index >= 0) & (index < out.shape[0])
    if not keep.all():  # Valid layouts drop nothing: skip the copies.
        index, values = index[keep], values[keep]
    shape, width = out.shape, math.prod(out.shape[1:])  # no -1: M may be 0
    out, values = out.reshape(shape[0], width), values.reshape(values.shape[0], width)
    # ufunc.at is fast on contiguous one-dimensional operands only: one call per column.
    columns = []
    for c in range(width):
        column = out[:, c].copy()
        np.maximum.at(column, index, np.ascontiguousarray(values[:, c]))
        columns.append(column)
    return np.stack(columns, axis=-1).reshape(shape)


def _numpy_cond(pred: Any, true_fn: Callable[[], Any], false_fn: Callable[[], Any]) -> Any:
    return true_fn() if bool(pred) else false_fn()


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayOps:
    """An array module and the operations NumPy and ``jax.numpy`` spell differently.

    Attributes:
        name: ``"jax"`` or ``"numpy"``.
        xp: the module (``jax.numpy`` or ``numpy``) for everything spelled alike.
        cummax: ``cummax(x, axis)``, the running maximum along ``axis``.
        scatter_max: ``scatter_max(out[M, ...], index[n], values[n, ...])``: ``out`` with
            ``out[index[k]] = max(out[index[k]], values[k])``; indices in ``[-M, 0)`` count from
            the end, the others outside ``[0, M)`` are dropped (JAX's ``mode="drop"``).
        place: ``place(out[..., M], index[..., n], values[..., n])``: ``out`` with
            ``values[..., k]`` written at ``index[..., k]`` of the last axis, indices read as by
            ``scatter_max``, kept indices distinct within a row. The JAX version takes one row
            (1-D arrays; map it over rows with ``map_rows``), the NumPy version any number.
        cond: ``cond(pred, true_fn, false_fn)``: the result of the branch ``pred`` selects.
        map_rows: lifts a function of ``place``-style rows to ``[N, ...]`` arrays (``jax.vmap``
            for JAX; NumPy functions take the rows as they are).

    Example:
        >>> NUMPY.place(np.full(4, -1), np.array([2, 0, 4, -1]), np.array([7, 8, 9, 6]))
        array([ 8, -1,  7,  6])
        >>> NUMPY.scatter_max(np.zeros(2, np.int32), np.array([1, 1, 5]), np.array([4, 6, 9]))
        array([0, 6], dtype=int32)
    """

    name: str
    xp: ModuleType
    cummax: Callable[[Any, int], Any]
    scatter_max: Callable[[Any, Any, Any], Any]
    place: Callable[[Any, Any, Any], Any]
    cond: Callable[[Any, Callable[[], Any], Callable[[], Any]], Any]
    map_rows: Callable[[Callable[..., Any]], Callable[..., Any]]

    def __repr__(self) -> str:
        return f"ArrayOps({self.name})"


JAX = ArrayOps(
    name="jax",
    xp=jnp,
    cummax=lambda x, axis: jax.lax.cummax(x, axis=axis),
    scatter_max=_jax_scatter_max,
    place=_jax_place,
    cond=jax.lax.cond,
    map_rows=jax.vmap,
)
"""The device path: ``jax.numpy`` and ``jax.lax``, traced and compiled (the default)."""


NUMPY = ArrayOps(
    name="numpy",
    xp=np,
    cummax=lambda x, axis: np.maximum.accumulate(x, axis=axis),
    scatter_max=_numpy_scatter_max,
    place=_numpy_place,
    cond=_numpy_cond,
    map_rows=lambda fn: fn,
)
"""The host path: NumPy, on the CPU that calls it; nothing is compiled."""
