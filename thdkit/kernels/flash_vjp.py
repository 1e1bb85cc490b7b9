"""The custom VJP both flash implementations share: isolation, and the backward's row terms.

A flash implementation supplies two loops over its tiles:

- ``forward(static, q, k, v, *rest) -> (out, lse, poisoned)``: float32 ``out[*R, D_v]``
  normalised over the allowed keys, ``lse[*R]`` (-inf where none is) and ``poisoned: bool[*R]``,
  the rows that read a non-finite query, key or value (computed from sanitised inputs);
- ``backward(static, (q, k, v, *rest), d_out, row_term, lse) -> (dq, dk, dv)``, recomputing each
  tile's weights ``p = exp(logit - lse)`` and forming ``d logit = p * (d_out . v + row_term)``.

:func:`flash_vjp` turns them into one differentiable function ``(static, q, k, v, *rest) ->
(out, lse)``. What it adds is the part every flash kernel needs and must not get wrong:

- poisoned rows come out NaN in ``out`` and ``lse`` (:func:`thdkit.isolation.poison`);
- their cotangents are selected away, so they pass no gradient back;
- ``row_term = d_lse - sum(d_out * out)`` (the softmax's row term, once per row, not per tile),
  and an ``lse`` made finite (0) where no key is allowed, so ``exp`` never sees ``-inf - -inf``;
- the arguments after ``v`` (layouts, tile ranges, flags) get no gradient.

The row axes ``*R`` are the implementation's own (e.g. tiles, heads, tokens); ``out`` has one
more axis, D_v, at the end.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array

from thdkit.isolation import poison

__all__ = ["flash_vjp"]

Forward = Callable[..., tuple[Array, Array, Array]]
Backward = Callable[..., tuple[Array, Array, Array]]


def flash_vjp(forward: Forward, backward: Backward) -> Callable[..., tuple[Array, Array]]:
    """A flash-attention function with isolation and the shared backward bookkeeping.

    Args:
        forward: ``(static, q, k, v, *rest) -> (out, lse, poisoned)``; ``static`` is hashable.
        backward: ``(static, (q, k, v, *rest), d_out, row_term, lse) -> (dq, dk, dv)`` with
            ``d_out[*R, D_v]`` and ``row_term[*R]`` float32 and zero on poisoned rows, ``lse``
            finite.

    Returns:
        ``(static, q, k, v, *rest) -> (out, lse)``, differentiable in ``q``, ``k`` and ``v``.

    Example:
        >>> def fwd(static, q, k, v):  # one row, every key allowed
        ...     logits = q @ k.T
        ...     lse = jax.nn.logsumexp(logits, axis=-1)
        ...     return jnp.exp(logits - lse[:, None]) @ v, lse, jnp.zeros(lse.shape, bool)
        >>> def bwd(static, inputs, d_out, row_term, lse):
        ...     q, k, v = inputs
        ...     p = jnp.exp(q @ k.T - lse[:, None])
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
        return poison(*forward(static, q, k, v, *rest))

    def flash_fwd(static, q, k, v, *rest):
        out, lse, poisoned = forward(static, q, k, v, *rest)
        return poison(out, lse, poisoned), ((q, k, v, *rest), out, lse, poisoned)

    def flash_bwd(static, residuals, cotangents):
        inputs, out, lse, poisoned = residuals
        d_out = jnp.where(poisoned[..., None], 0.0, cotangents[0])
        d_lse = jnp.where(poisoned, 0.0, cotangents[1])
        row_term = d_lse - jnp.sum(d_out * out, axis=-1)
        safe_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
        grads = backward(static, inputs, d_out, row_term, safe_lse)
        grads = tuple(g.astype(x.dtype) for g, x in zip(grads, inputs[:3], strict=True))
        return (*grads, *(None for _ in inputs[3:]))

    flash.defvjp(flash_fwd, flash_bwd)
    return flash
