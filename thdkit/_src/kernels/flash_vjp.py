"""The custom VJP both flash implementations share: isolation, and the backward's row terms.

A flash implementation supplies two loops over its tiles:

- ``forward(static, q, k, v, *rest) -> (out, lse, poisoned, (row_max, row_sum))``: float32
  ``out[*R, D_v]`` normalised over the allowed keys, ``lse[*R]`` (-inf where none is),
  ``poisoned: bool[*R]``, the rows that read a non-finite query, key or value (computed from
  sanitised inputs), and the row statistics the backward recomputes the weights from: the shift
  ``row_max[*R]`` each row's exponents were taken against (its largest allowed logit, in the
  implementation's own units; -inf where no key is allowed) and ``row_sum[*R]``, the sum of the
  row's ``exp(logit - row_max)`` (0 where no key is allowed);
- ``backward(static, (q, k, v, *rest), d_out, row_term, row_max, row_sum) -> (dq, dk, dv)``,
  recomputing each tile's weights ``p = exp(logit - row_max) / row_sum`` and forming
  ``d logit = p * (d_out . v + row_term)``.

Why the row maximum and the sum, not the log-sum-exp: ``exp(logit - lse)`` with
``lse = row_max + log(row_sum)`` rounded to float32 loses the exact 1 of the row's largest
logit once ``|lse|`` is large (its rounding error grows with it: about 1e-3 at 1e4, more than
the whole ``log(row_sum)`` by 1e7), and the gradients drift, then overflow. ``logit - row_max``
is exactly 0 at the maximum (the forward took its exponents against the same value), so the
largest weight is exactly ``1 / row_sum`` at any magnitude. An implementation keeps this by
forming each exponent as ``(dot - row_max) * scale`` with ``row_max`` a dot product (not
``scale * dot - scale * row_max``, which a compiler may fuse into an FMA that is no longer 0 at
the maximum), and clamping recomputed exponents at 0 so that no weight exceeds ``1 / row_sum``.

:func:`flash_vjp` turns the loops into one differentiable function ``(static, q, k, v, *rest)
-> (out, lse)``. What it adds is the part every flash kernel needs and must not get wrong:

- poisoned rows come out NaN in ``out`` and ``lse`` (:func:`thdkit._src.isolation.poison`);
- their cotangents are selected away, so they pass no gradient back;
- ``row_term = d_lse - sum(d_out * out)`` (the softmax's row term, once per row, not per tile),
  and row statistics made safe where no key is allowed (``row_max`` 0, ``row_sum`` 1), so that
  ``exp`` never sees ``-inf - -inf`` and nothing divides by 0;
- the arguments after ``v`` (layouts, tile ranges, flags) get no gradient.

The row axes ``*R`` are the implementation's own (e.g. tiles, heads, tokens); ``out`` has one
more axis, D_v, at the end.

Inside ``jax.shard_map`` (``check_vma=True``, its default) every array has a type that says over
which mesh axes its value varies; a loop carry or the branches of a ``lax.cond`` must keep one
type, and an array built from constants (``jnp.zeros``) varies over none. :func:`varying_axes`
and :func:`match_varying` give such arrays the type of the data they are combined with (a no-op
outside ``shard_map``), so the flash loops run unchanged inside a user's ``shard_map``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array

from thdkit._src.isolation import poison

__all__ = ["flash_vjp", "match_varying", "varying_axes"]

Forward = Callable[..., tuple[Array, Array, Array, tuple[Array, Array]]]
Backward = Callable[..., tuple[Array, Array, Array]]


def _varying(leaf: Any) -> frozenset:
    """The mesh axes over which ``leaf``'s value varies (empty outside ``shard_map``, and where
    ``check_vma`` is off)."""
    manual = getattr(jax.typeof(leaf), "manual_axis_type", None)
    return frozenset(getattr(manual, "varying", ()))


def varying_axes(*trees: Any) -> frozenset:
    """The union of the mesh axes over which any array of ``trees`` varies.

    Args:
        trees: pytrees of arrays (non-array leaves are ignored).

    Returns:
        A frozenset of mesh axis names; empty outside ``jax.shard_map``.

    Example:
        >>> varying_axes(jnp.zeros(2), {"a": jnp.ones(3)})
        frozenset()
    """
    leaves = jax.tree.leaves(trees)
    return frozenset().union(*(_varying(x) for x in leaves if isinstance(x, jax.Array)))


def match_varying(tree: Any, axes: frozenset) -> Any:
    """``tree`` with every array made to vary over ``axes`` too (``jax.lax.pcast``): the type a
    loop carry or ``lax.cond`` branch needs to match the data it is combined with.

    Args:
        tree: a pytree of arrays.
        axes: mesh axis names, e.g. :func:`varying_axes` of the loop's inputs.

    Returns:
        ``tree``, its values unchanged; leaves already varying over ``axes`` are returned as they
        are (so it is a no-op outside ``jax.shard_map``).

    Example:
        >>> match_varying(jnp.zeros(2), frozenset())
        Array([0., 0.], dtype=float32)
    """

    def one(x: Any) -> Any:
        missing = tuple(sorted(axes - _varying(x), key=str))
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(one, tree)


def flash_vjp(forward: Forward, backward: Backward) -> Callable[..., tuple[Array, Array]]:
    """A flash-attention function with isolation and the shared backward bookkeeping.

    Args:
        forward: ``(static, q, k, v, *rest) -> (out, lse, poisoned, (row_max, row_sum))``;
            ``static`` is hashable.
        backward: ``(static, (q, k, v, *rest), d_out, row_term, row_max, row_sum) -> (dq, dk,
            dv)`` with ``d_out[*R, D_v]`` and ``row_term[*R]`` float32 and zero on poisoned
            rows, ``row_max`` finite and ``row_sum`` positive.

    Returns:
        ``(static, q, k, v, *rest) -> (out, lse)``, differentiable in ``q``, ``k`` and ``v``.

    Example:
        >>> def fwd(static, q, k, v):  # one row, every key allowed
        ...     logits = q @ k.T
        ...     row_max = logits.max(axis=-1)
        ...     weights = jnp.exp(logits - row_max[:, None])
        ...     row_sum = weights.sum(axis=-1)
        ...     lse = row_max + jnp.log(row_sum)
        ...     out = weights @ v / row_sum[:, None]
        ...     return out, lse, jnp.zeros(lse.shape, bool), (row_max, row_sum)
        >>> def bwd(static, inputs, d_out, row_term, row_max, row_sum):
        ...     q, k, v = inputs
        ...     p = jnp.exp(jnp.minimum(q @ k.T - row_max[:, None], 0.0)) / row_sum[:, None]
        ...     d_logits = p * (d_out @ v.T + row_term[:, None])
        ...     return d_logits @ k, d_logits.T @ q, p.T @ d_out
        >>> f = flash_vjp(fwd, bwd)
        >>> x = jnp.arange(6.0).reshape(3, 2) / 6
        >>> g = jax.grad(lambda q: f(None, q, x, x)[0].sum())(x)
        >>> bool(jnp.allclose(g, jax.grad(lambda q: jax.nn.dot_product_attention(
        ...     q[None, :, None], x[None, :, None], x[None, :, None], scale=1.0).sum())(x)))
        True
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def flash(static: Any, q: Array, k: Array, v: Array, *rest: Any) -> tuple[Array, Array]:
        out, lse, poisoned, _ = forward(static, q, k, v, *rest)
        return poison(out, lse, poisoned)

    def flash_fwd(static, q, k, v, *rest):
        out, lse, poisoned, (row_max, row_sum) = forward(static, q, k, v, *rest)
        residuals = ((q, k, v, *rest), out, row_max, row_sum, poisoned)
        return poison(out, lse, poisoned), residuals

    def flash_bwd(static, residuals, cotangents):
        inputs, out, row_max, row_sum, poisoned = residuals
        d_out = jnp.where(poisoned[..., None], 0.0, cotangents[0])
        d_lse = jnp.where(poisoned, 0.0, cotangents[1])
        row_term = d_lse - jnp.sum(d_out * out, axis=-1)
        visited = row_sum > 0
        safe_max = jnp.where(visited & jnp.isfinite(row_max), row_max, 0.0)
        safe_sum = jnp.where(visited, row_sum, 1.0)
        grads = backward(static, inputs, d_out, row_term, safe_max, safe_sum)
        grads = tuple(g.astype(x.dtype) for g, x in zip(grads, inputs[:3], strict=True))
        return (*grads, *(None for _ in inputs[3:]))

    flash.defvjp(flash_fwd, flash_bwd)
    return flash
