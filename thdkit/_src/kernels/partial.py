"""Attention over one set of keys with its log-sum-exp: the building block of context parallelism.

Each context-parallel strategy computes attention in pieces (a ring step, a gathered row) and
merges the pieces through their log-sum-exps. :func:`attention_partial` returns ``(out, lse)``
from any registered implementation whose ``forward`` returns the log-sum-exp
(``returns_lse``, :mod:`thdkit._src.kernels.base`); it names none.
"""

from __future__ import annotations

from typing import Any

from jaxtyping import Array, Float

from thdkit._src.kernels import base, builtins  # noqa: F401  (builtins: the built-in implementations)
from thdkit._src.kernels.config import AttentionConfig
from thdkit._src.kernels.plan import no_candidate
from thdkit._src.kernels.tiles import DEFAULT_BLOCK
from thdkit._src.mask_types import MaskType, Window
from thdkit._src.programs import program
from thdkit._src.segments import Segments

__all__ = ["attention_partial", "check_partial_implementation", "partial_implementations"]


def partial_implementations() -> tuple[str, ...]:
    """The registered implementations that return ``(out, lse)``: the default order's first.

    Example:
        >>> partial_implementations()[:2]
        ('blockwise', 'pallas')
    """
    default = base.default_order()
    names = sorted(
        base.names(), key=lambda n: (n not in default, default.index(n) if n in default else 0)
    )
    return tuple(n for n in names if base.get(n).returns_lse)


def check_partial_implementation(implementation: Any) -> str:
    """``implementation`` checked against :func:`partial_implementations`; None gives the first.

    Raises:
        ValueError: an implementation that cannot return ``(out, lse)``, naming the valid ones.

    Example:
        >>> check_partial_implementation(None)
        'blockwise'
    """
    names = partial_implementations()
    words = (
        "implementation={name} cannot run context-parallel attention (it returns no "
        "log-sum-exp, or is unknown); valid: {valid}"
    )
    return base.check_name(implementation, among=names, words=words) or names[0]


def attention_partial(
    query: Float[Array, "B T_q H_q D"],
    key: Float[Array, "B T_kv H_kv D"],
    value: Float[Array, "B T_kv H_kv D_v"],
    *,
    q_segments: Segments,
    kv_segments: Segments,
    mask_type: MaskType | str,
    window_size: Window,
    scale: float,
    implementation: str | None = None,
    block_q: int | None = None,
    block_kv: int | None = None,
    max_segments_per_seq: int | None = None,
    logits_soft_cap: float | None = None,
) -> tuple[Float[Array, "B T_q H_q D_v"], Float[Array, "B T_q H_q"]]:
    """Attention over one set of keys, with its log-sum-exp, for merging partial results.

    The building block of context parallelism (one call per ring step; the partials merge
    through ``lse``). Nothing is validated: the layouts must be valid (docs/semantics.md) and the
    ``lengths`` constant along each run, as run lengths and global document lengths are.
    Differentiable with respect to ``query``, ``key`` and ``value``, including through ``lse``;
    rows with no allowed key get zero gradients.

    Isolation: a row with at least one allowed key whose own query, or one of whose allowed keys
    or values, holds a NaN or inf gets NaN in ``out`` and ``lse`` and passes no gradient back (it
    adds zeros to every gradient; non-finite input elements get zero gradients). Every other row
    and every gradient it produces are bit-equal to the same call without the non-finite values.

    Args:
        query: float[B, T_q, H_q, D].
        key: float[B, T_kv, H_kv, D]; ``H_q`` a multiple of ``H_kv``.
        value: float[B, T_kv, H_kv, D_v].
        q_segments: the queries' :class:`thdkit.Segments`, int32[B, T_q] fields; ``lengths`` as
            the bottom-right rule reads them (run lengths, or the global document lengths in a
            context-parallel shard: :meth:`thdkit.Segments.with_global_lengths`); with
            ``prefix_lengths`` on both sides, prefix pairs are allowed (docs/semantics.md,
            "Prefix-LM masks").
        kv_segments: the same for keys/values, int32[B, T_kv] fields.
        mask_type: a ``MaskType`` or its name.
        window_size: ``(left, right)`` or None (``check_window``).
        scale: multiplies the logits.
        implementation: one of :func:`partial_implementations` (``"blockwise"``, ``"pallas"``,
            ``"reference"``, or one's own), or None for the first.
        block_q, block_kv: tile sizes of the tiled implementations, capped to T_q and T_kv; None
            means :data:`thdkit.kernels.DEFAULT_BLOCK`.
        max_segments_per_seq: S where known, for implementations that read it; the built-in
            ones that return a log-sum-exp do not.
        logits_soft_cap: ``cap`` of ``cap * tanh(logit / cap)`` applied to the scaled logits
            before the mask (docs/semantics.md, "Soft-capped logits"), or None.

    Returns:
        ``(out, lse)``: float32[B, T_q, H_q, D_v], normalised over this call's keys (zeros where no
        key is allowed); float32[B, T_q, H_q], the log-sum-exp of the allowed logits (-inf where
        none is).

    Raises:
        ValueError: an implementation that returns no log-sum-exp, or an unknown one.
        NotImplementedError: the implementation cannot run this configuration or these arrays
            (one that does not implement the soft cap, or prefix-LM masks where the Segments
            carry ``prefix_lengths``, included).

    Example:
        >>> seg = Segments.from_ids(jnp.array([[1, 1, 1, 0, 2, 2, 2, 2]]))
        >>> q = k = jnp.zeros((1, 8, 1, 4))
        >>> v = jnp.arange(8.0).reshape(1, 8, 1, 1)
        >>> out, lse = attention_partial(q, k, v, q_segments=seg, kv_segments=seg,
        ...     mask_type=MaskType.CAUSAL, window_size=None, scale=0.5, block_q=4, block_kv=4)
        >>> out[0, :, 0, 0]
        Array([0. , 0.5, 1. , 0. , 4. , 4.5, 5. , 5.5], dtype=float32)
        >>> jnp.exp(lse[0, :, 0])
        Array([1., 2., 3., 0., 1., 2., 3., 4.], dtype=float32)
    """
    name = check_partial_implementation(implementation)
    seq_q, seq_kv = query.shape[1], key.shape[1]
    config = AttentionConfig.parse(
        mask_type=mask_type,
        window_size=window_size,
        max_segments_per_seq=max_segments_per_seq,
        block_q=DEFAULT_BLOCK if block_q is None else block_q,
        block_kv=DEFAULT_BLOCK if block_kv is None else block_kv,
        seq_q=seq_q,
        seq_kv=seq_kv,
        self_attention=False,
        logits_soft_cap=logits_soft_cap,
        prefix=q_segments.prefix_lengths is not None or kv_segments.prefix_lengths is not None,
    )
    candidate = base.get(name)
    try:
        base.check_features(candidate, config)
        candidate.check_config(config)
        candidate.check_arrays(query, key, value)
    except NotImplementedError as reason:
        raise no_candidate({name: str(reason)}) from None
    return _partial(
        query,
        key,
        value,
        q_segments,
        kv_segments,
        implementation=candidate,
        config=config,
        scale=float(scale),
    )


@program(static_argnames=("implementation", "config", "scale"))
def _partial(query, key, value, q, kv, *, implementation, config, scale):
    """Auxiliary data and forward in one program (one compilation per shape when eager)."""
    aux = implementation.prepare(q, kv, config)
    return implementation.forward(query, key, value, q, kv, aux, config, scale=scale)
