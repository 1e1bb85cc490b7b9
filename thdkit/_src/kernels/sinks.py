"""Attention sinks: a learned logit per query head that joins every row's softmax denominator.

With ``Z = sum_j exp(s_ij)`` over the row's allowed keys and ``sink_h`` the row's head's sink
(docs/semantics.md, "Attention sinks")::

    out_i = sum_j exp(s_ij) v_j / (Z + exp(sink_h)) = out_i' * Z / (Z + exp(sink_h))
          = out_i' * sigmoid(lse_i - sink_h)

where ``out_i'`` and ``lse_i = log Z`` are what any implementation that returns a log-sum-exp
gives. So a sink is not a kernel feature: it is one block over ``(out, lse)``, applied once per
row after every partial result is merged (a ring joins it after its last step, not at each), and
differentiated through ``lse`` like any merge. A row with no allowed key has ``Z = 0``: its
output is 0 and its sink gradient 0, as the formula gives.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

__all__ = ["attach_sinks", "check_sinks"]


def check_sinks(sinks: ArrayLike | None, *, heads_q: int, name: str = "sinks") -> Array | None:
    """``sinks`` checked and converted to float32[H_q], or None.

    Args:
        sinks: a float array (or list) of shape [H_q], or None for no sinks.
        heads_q: H_q, the query heads.
        name: the parameter's name in messages.

    Returns:
        float32[H_q], or None.

    Raises:
        TypeError: a non-float dtype (an integer or bool array).
        ValueError: a shape other than [H_q].

    Example:
        >>> check_sinks([0.5, -1.0], heads_q=2)
        Array([ 0.5, -1. ], dtype=float32)
        >>> check_sinks(jnp.zeros(3), heads_q=2)
        Traceback (most recent call last):
        ...
        ValueError: sinks must have shape [H_q] = (2,) (one logit per query head), got (3,)
    """
    if sinks is None:
        return None
    sinks = jnp.asarray(sinks)
    if not jnp.issubdtype(sinks.dtype, jnp.floating):
        raise TypeError(f"{name} must be a float array of shape [H_q], got dtype {sinks.dtype}")
    if sinks.shape != (heads_q,):
        raise ValueError(
            f"{name} must have shape [H_q] = {(heads_q,)} (one logit per query head), got "
            f"{sinks.shape}"
        )
    return sinks.astype(jnp.float32)


def attach_sinks(
    out: Float[Array, "*B H D_v"], lse: Float[Array, "*B H"], sinks: Float[Array, " H"]
) -> tuple[Float[Array, "*B H D_v"], Float[Array, "*B H"]]:
    """``(out, lse)`` of attention over the allowed keys, with each head's sink joined.

    Args:
        out: float32[..., H, D_v], normalised over the allowed keys (zeros where none is).
        lse: float32[..., H], their log-sum-exp (-inf where none is; NaN on a poisoned row).
        sinks: float32[H], broadcast over the leading axes.

    Returns:
        ``(out * sigmoid(lse - sink), logaddexp(lse, sink))``: float32[..., H, D_v] and
        float32[..., H]. A poisoned row (NaN ``lse``) stays NaN and passes no gradient back, to
        the sinks included.

    Example:
        >>> out, lse = jnp.ones((1, 2, 1, 1)), jnp.array([[[0.0], [-jnp.inf]]])
        >>> joined, total = attach_sinks(out, lse, jnp.zeros(1))
        >>> joined[0, :, 0, 0], total[0, :, 0]
        (Array([0.5, 0. ], dtype=float32), Array([0.6931472, 0.       ], dtype=float32))
    """
    sinks = jnp.reshape(sinks, (1,) * (lse.ndim - 1) + sinks.shape)
    poisoned = jnp.isnan(lse)
    # Selects, so that a poisoned row's NaN never meets the sinks' gradient (0 * NaN).
    safe_lse = jnp.where(poisoned, -jnp.inf, lse)
    safe_out = jnp.where(poisoned[..., None], 0.0, out)
    keep = jax.nn.sigmoid(safe_lse - sinks)
    joined = jnp.where(poisoned[..., None], jnp.nan, safe_out * keep[..., None])
    total = jnp.where(poisoned, jnp.nan, jnp.logaddexp(safe_lse, sinks))
    return joined, total
