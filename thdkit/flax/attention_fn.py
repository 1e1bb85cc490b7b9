"""``make_attention_fn``: an ``attention_fn`` for Flax's own attention modules, on packed rows."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

import thdkit
from thdkit.flax.plumbing import attend, check_implementation, default_segments, plan_layout
from thdkit.mask_types import check_window

__all__ = ["Layout", "make_attention_fn"]

Layout = Any
"""A layout a Flax attention call reads: :class:`thdkit.AttentionPlan`, :class:`thdkit.Segments`
(self-attention), a pair of Segments (queries, keys/values), or None (one document a row)."""


def _is_layout(x: Any) -> bool:
    if isinstance(x, (thdkit.AttentionPlan, thdkit.Segments)):
        return True
    return (
        isinstance(x, (tuple, list))
        and len(x) == 2
        and all(isinstance(s, thdkit.Segments) for s in x)
    )


def _plan_of(
    layout: Layout,
    *,
    seq_q: int,
    seq_kv: int,
    batch: int,
    is_causal: bool,
    mask_type: Any,
    window_size: Any,
    max_segments_per_seq: int | None,
    implementation: str | None,
) -> thdkit.AttentionPlan:
    """The plan of a call's layout (a plan as it is; Segments or None planned here)."""
    if isinstance(layout, thdkit.AttentionPlan):
        return layout
    if layout is None:
        q = thdkit.Segments.from_ids(jnp.ones((batch, seq_q), jnp.int32))
        kv = None if seq_q == seq_kv else thdkit.Segments.from_ids(jnp.ones((batch, seq_kv)))
    elif isinstance(layout, thdkit.Segments):
        q, kv = layout, None
    else:
        q, kv = layout
    if mask_type is None:
        mask_type = "padding_causal" if is_causal else "padding"
    mask = thdkit.MaskType.parse(mask_type)
    if is_causal and not mask.is_causal:
        raise ValueError(
            f"is_causal=True (top-left causal) conflicts with mask_type={mask.value!r}"
        )
    return plan_layout(
        q,
        kv,
        mask_type=mask,
        window_size=window_size,
        max_segments_per_seq=max_segments_per_seq
        or default_segments(q, kv, seq_len=max(seq_q, seq_kv)),
        implementation=implementation,
    )


def _flatten_dense(x: Any) -> Any:
    """A bias or mask of [batch..., N, T, T_kv] with several batch dims as [B, N, T, T_kv]."""
    if x is None or jnp.ndim(x) <= 4:
        return x
    x = jnp.asarray(x)
    return x.reshape(-1, *x.shape[-3:])


def make_attention_fn(
    layout: Layout = None,
    *,
    mask_type: thdkit.MaskType | str | None = None,
    window_size: tuple[int | None, int | None] | None = None,
    max_segments_per_seq: int | None = None,
    implementation: str | None = None,
) -> Callable[..., Array]:
    """An ``attention_fn`` for Flax's attention modules that attends within packed documents.

    The result has the signature of ``flax.nnx.dot_product_attention`` /
    ``flax.linen.dot_product_attention`` (``query, key, value, bias, mask, broadcast_dropout,
    dropout_rng, dropout_rate, deterministic, dtype, precision, module, is_causal``), so
    ``nnx.MultiHeadAttention(..., attention_fn=make_attention_fn())`` and
    ``linen.MultiHeadDotProductAttention(..., attention_fn=make_attention_fn(plan))`` accept it.
    Each call reads its layout from, in order:

    1. the module's ``mask`` argument, when it is an :class:`thdkit.AttentionPlan`, a
       :class:`thdkit.Segments` or a pair of them: ``mha(x, mask=plan)``. Flax forwards ``mask``
       untouched outside decoding, so one module serves every batch (the NNX way);
    2. ``layout``, closed over here (the linen way: a module built per call inside ``@compact``);
    3. neither: one document a row, no padding (then the call is Flax's attention on thdkit's
       kernels, with Flax's ``mask`` and ``is_causal``).

    A boolean (or 0/1) ``mask`` array and a ``bias`` are combined with the packed mask on the
    dense path (:func:`thdkit.dot_product_attention`), as are attention-weight dropout
    (``dropout_rate > 0`` and not ``deterministic``: Flax's dropout, the same random bits) and
    ``sow_weights`` (the weights are sowed as ``attention_weights``, in ``nnx.Intermediate`` or
    linen's ``"intermediates"``). ``precision`` is ignored: thdkit accumulates in float32.

    Args:
        layout: a plan, Segments, a pair of Segments, or None (see above).
        mask_type: the mask of layouts planned here (Segments); None is ``"padding_causal"``
            when the module passes ``is_causal=True``, else ``"padding"``. Not with a plan.
        window_size: ``(left, right)`` sliding window of layouts planned here, or None.
        max_segments_per_seq: S of layouts planned here; None is the largest id of concrete
            Segments, ``max(T, T_kv)`` for traced ones.
        implementation: of layouts planned here (see :func:`thdkit.plan_attention`).

    Returns:
        ``attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout=True,
        dropout_rng=None, dropout_rate=0.0, deterministic=False, dtype=None, precision=None,
        module=None, is_causal=False)`` -> [batch..., T, N, D_v] in ``dtype`` (or the promoted
        input dtype). Query/key/value are ``[batch..., T, N, D]`` (any number of batch dims,
        flattened to one B that must match the layout's).

    Raises:
        TypeError: a ``layout`` of another type.
        ValueError: planning options together with a plan, an unknown ``implementation``; at
            call time, as :func:`thdkit.dot_product_attention` (e.g. ``is_causal=True`` with a
            non-causal plan), or dropout without ``dropout_rng``.

    Example:
        >>> from flax import nnx
        >>> import thdkit
        >>> mha = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False,
        ...                              attention_fn=make_attention_fn(), rngs=nnx.Rngs(0))
        >>> segments = thdkit.Segments.from_ids(jnp.array([[1, 1, 1, 2, 2, 0, 0, 3]]))
        >>> plan = thdkit.plan_attention(segments, mask_type="padding_causal",
        ...                              max_segments_per_seq=3)
        >>> mha(jnp.ones((1, 8, 8)), mask=plan).shape
        (1, 8, 8)
    """
    if layout is not None and not _is_layout(layout):
        raise TypeError(
            "layout must be a thdkit.AttentionPlan, a thdkit.Segments, a pair of Segments or "
            f"None, got {type(layout).__name__}"
        )
    options = dict(
        mask_type=mask_type,
        window_size=window_size,
        max_segments_per_seq=max_segments_per_seq,
        implementation=implementation,
    )
    if isinstance(layout, thdkit.AttentionPlan) and any(v is not None for v in options.values()):
        given = ", ".join(name for name, v in options.items() if v is not None)
        raise ValueError(f"the plan fixes {given}; pass them to thdkit.plan_attention instead")
    check_implementation(implementation)
    if mask_type is not None:
        thdkit.MaskType.parse(mask_type)
    check_window(window_size)

    def attention_fn(
        query: Float[ArrayLike, "*B T N D"],
        key: Float[ArrayLike, "*B T_kv K D"],
        value: Float[ArrayLike, "*B T_kv K D_v"],
        bias: Float[ArrayLike, "*B #N #T #T_kv"] | None = None,
        mask: Any = None,
        broadcast_dropout: bool = True,
        dropout_rng: Array | None = None,
        dropout_rate: float = 0.0,
        deterministic: bool = False,
        dtype: Any = None,
        precision: Any = None,
        module: Any = None,
        is_causal: bool = False,
    ) -> Float[Array, "*B T N D_v"]:
        del precision  # thdkit accumulates in float32
        call_layout, mask_array = (mask, None) if _is_layout(mask) else (layout, mask)
        if isinstance(call_layout, thdkit.AttentionPlan) and any(
            v is not None for v in options.values()
        ):
            raise ValueError(
                "the module was given a plan as its mask; make_attention_fn's planning "
                "options (mask_type, window_size, max_segments_per_seq, implementation) "
                "apply to Segments only"
            )
        arrays = [jnp.asarray(a) for a in (query, key, value)]
        dtype = dtype if dtype is not None else jnp.result_type(*arrays)
        query, key, value = (a.astype(dtype) for a in arrays)
        batch_dims = query.shape[:-3]
        if len(batch_dims) != 1:  # flatten (or add) the batch dims, as Flax does
            query, key, value = (a.reshape(-1, *a.shape[-3:]) for a in (query, key, value))
            bias, mask_array = (_flatten_dense(a) for a in (bias, mask_array))
        if mask_array is not None:
            mask_array = jnp.asarray(mask_array).astype(jnp.bool_)
        plan = _plan_of(
            call_layout,
            seq_q=query.shape[1],
            seq_kv=key.shape[1],
            batch=query.shape[0],
            is_causal=is_causal,
            **options,
        )
        out = attend(
            query,
            key,
            value,
            plan=plan,
            bias=bias,
            mask=mask_array,
            is_causal=is_causal,
            broadcast_dropout=broadcast_dropout,
            dropout_rng=dropout_rng,
            dropout_rate=dropout_rate,
            deterministic=deterministic,
            module=module,
        )
        return out.reshape(*batch_dims, *out.shape[1:])

    return attention_fn
