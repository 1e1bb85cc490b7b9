"""``make_attention_fn``: an ``attention_fn`` for Flax's own attention modules, on packed rows."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

import thdkit
from thdkit._src.kernels.config import check_soft_cap
from thdkit._src.mask_types import check_window
from thdkit.flax.plumbing import attend, check_implementation, default_segments, plan_layout

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


def _layout_names(source: str, layout: Layout) -> dict[str, str]:
    """The caller's names of the layout's sides: ``mask`` or ``layout``, ``[0]``/``[1]`` for a
    pair."""
    if isinstance(layout, (tuple, list)):
        return {"q_segments": f"{source}[0]", "kv_segments": f"{source}[1]"}
    return {"q_segments": source}


def _fit_segments(
    side: thdkit.Segments,
    name: str,
    *,
    batch_dims: tuple[int, ...],
    seq: int,
    query: tuple[int, ...],
) -> thdkit.Segments:
    """One side's Segments with the batch dims flattened as the arrays' are: its fields must be
    [batch..., T] (the query's batch dims) or [B, T] (B their product)."""
    shape = tuple(side.ids.shape)
    flat = (math.prod(batch_dims), seq)
    if shape == flat:
        return side
    if shape != (*batch_dims, seq):
        raise ValueError(
            f"{name} has fields of shape {shape}; for query of shape {query} they must be "
            f"[batch..., T] = {(*batch_dims, seq)} or {flat} (the batch dims flattened)"
        )
    return jax.tree.map(lambda a: a.reshape(flat), side)


def _plan_of(
    layout: Layout,
    source: str,
    *,
    batch_dims: tuple[int, ...],
    seq_q: int,
    seq_kv: int,
    query: tuple[int, ...],
    is_causal: bool,
    mask_type: Any,
    window_size: Any,
    max_segments_per_seq: int | None,
    implementation: str | None,
    logits_soft_cap: float | None,
) -> thdkit.AttentionPlan:
    """The plan of a call's layout (a plan as it is; Segments or None planned here), its shape
    checked against the call's arrays; ``source`` names where the layout came from."""
    batch = math.prod(batch_dims)
    if isinstance(layout, thdkit.AttentionPlan):
        shapes = (layout.q_segments.ids.shape, layout.kv_segments.ids.shape)
        if shapes != ((batch, seq_q), (batch, seq_kv)):
            raise ValueError(
                f"{source} is a plan of [B, T] = {shapes[0]} (queries) and {shapes[1]} "
                f"(keys/values); for query of shape {query} and T_kv = {seq_kv} it must be "
                f"{(batch, seq_q)} and {(batch, seq_kv)} (B: the batch dims flattened)"
            )
        return layout
    names = _layout_names(source, layout)
    if layout is None:  # One document a row on each side, as Flax's own attention.
        q = thdkit.Segments.from_ids(np.ones((batch, seq_q), np.int32))
        kv = (
            None
            if seq_q == seq_kv
            else thdkit.Segments.from_ids(np.ones((batch, seq_kv), np.int32))
        )
    elif isinstance(layout, thdkit.Segments):
        if seq_q != seq_kv:
            raise ValueError(
                f"{source} is one thdkit.Segments (self-attention), but T = {seq_q} and T_kv = "
                f"{seq_kv} differ; pass a pair (query Segments, key/value Segments)"
            )
        q, kv = layout, None
    else:
        q, kv = layout
    fit = dict(batch_dims=batch_dims, query=query)
    q = _fit_segments(q, names["q_segments"], seq=seq_q, **fit)
    if kv is not None and layout is not None:
        kv = _fit_segments(kv, names["kv_segments"], seq=seq_kv, **fit)
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
        names=names,
        mask_type=mask,
        window_size=window_size,
        max_segments_per_seq=default_segments(
            q, kv, seq_len=max(seq_q, seq_kv), given=max_segments_per_seq
        ),
        implementation=implementation,
        logits_soft_cap=logits_soft_cap,
    )


def _dense(
    x: Any,
    name: str,
    *,
    batch_dims: tuple[int, ...],
    heads: int,
    seq_q: int,
    seq_kv: int,
    query: tuple[int, ...],
) -> Array | None:
    """A ``bias`` or ``mask`` broadcastable to [batch..., N, T, T_kv] (Flax's rule: numpy
    broadcasting, fewer dims aligned right) as [B or 1, N or 1, T or 1, T_kv or 1], its batch
    dims broadcast and flattened as the arrays' are."""
    if x is None:
        return None
    x = jnp.asarray(x)
    given, rank = tuple(x.shape), len(batch_dims) + 3
    full = (*batch_dims, heads, seq_q, seq_kv)
    try:
        fits = x.ndim <= rank and np.broadcast_shapes(given, full) == full
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(
            f"{name} of shape {given} does not broadcast to [batch..., N, T, T_kv] = {full} "
            f"(query of shape {query}, T_kv = {seq_kv})"
        )
    x = x.reshape((1,) * (rank - x.ndim) + given)
    lead, tail = x.shape[: len(batch_dims)], x.shape[len(batch_dims) :]
    if all(d == 1 for d in lead):
        return x.reshape(1, *tail)
    return jnp.broadcast_to(x, (*batch_dims, *tail)).reshape(-1, *tail)


def _check_mask_dtype(mask: Any) -> None:
    """An integer ``mask`` is refused: segment ids go in as a layout, never as a boolean."""
    dtype = jnp.asarray(mask).dtype
    if jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(
            f"mask must be a boolean array (True: attend), or a thdkit layout, got dtype {dtype}; "
            "pass segment ids as a layout: mask=thdkit.Segments.from_ids(ids, positions) (add "
            "padding_id=-1 for ids numbered from 0, else id 0 is padding) or a plan from "
            "thdkit.plan_attention (see thdkit.flax.make_attention_fn)"
        )


def make_attention_fn(
    layout: Layout = None,
    *,
    mask_type: thdkit.MaskType | str | None = None,
    window_size: tuple[int | None, int | None] | None = None,
    max_segments_per_seq: int | None = None,
    implementation: str | None = None,
    logits_soft_cap: float | None = None,
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
       kernels, with Flax's ``mask`` and ``is_causal``), T_kv may differ from T (plain
       cross-attention, and each step of an ``nnx.MultiHeadAttention(decode=True)``).

    A layout's Segments are built from segment ids with ``thdkit.Segments.from_ids(ids,
    positions)``: ids 1..n are documents and 0 is padding; ids numbered from 0 (splash
    attention's, kvax's) need ``padding_id=-1``. A single Segments is self-attention; for
    cross-attention pass a pair. Its fields are [B, T] or [batch..., T] (the query's batch dims).

    A ``mask`` array (bool, or Flax's float 0/1 masks: non-zero attends; an integer mask raises,
    segment ids go in as a layout) and a ``bias``, broadcastable to [batch..., N, T, T_kv] as in
    Flax, are combined with the packed mask on the dense path
    (:func:`thdkit.dot_product_attention`), as are attention-weight dropout (``dropout_rate > 0``
    and not ``deterministic``: Flax's dropout, the same random bits) and ``sow_weights`` (the
    weights, [batch..., N, T, T_kv], are sowed as ``attention_weights``, in ``nnx.Intermediate``
    or linen's ``"intermediates"``). ``precision`` is ignored: thdkit accumulates in float32.

    Args:
        layout: a plan, Segments, a pair of Segments, or None (see above).
        mask_type: the mask of layouts planned here (Segments); None is ``"padding_causal"``
            when the module passes ``is_causal=True``, else ``"padding"``. Not with a plan.
        window_size: ``(left, right)`` sliding window of layouts planned here, or None.
        max_segments_per_seq: S of layouts planned here; None is the largest id of concrete
            Segments, ``max(T, T_kv)`` for traced ones.
        implementation: of layouts planned here (see :func:`thdkit.plan_attention`).
        logits_soft_cap: the soft cap ``cap * tanh(logit / cap)`` of layouts planned here
            (:func:`thdkit.plan_attention`; docs/semantics.md, "Soft-capped logits"), on every
            path (the dense one of ``bias``, ``mask``, dropout and ``sow_weights`` too), or None.
            A plan carries its own.

    Returns:
        ``attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout=True,
        dropout_rng=None, dropout_rate=0.0, deterministic=False, dtype=None, precision=None,
        module=None, is_causal=False)`` -> [batch..., T, N, D_v] in ``dtype`` (or the promoted
        input dtype). Query/key/value are ``[batch..., T, N, D]`` (any number of batch dims, the
        same for the three; flattened to one B = their product, the B of a plan).

    Raises:
        TypeError: a ``layout`` of another type, a non-real ``logits_soft_cap``; at call time an
            integer ``mask``.
        ValueError: planning options together with a plan, an unknown ``implementation``, a
            ``logits_soft_cap`` not positive and finite; at call time a ``mask`` or ``bias``
            that does not broadcast to [batch..., N, T, T_kv] or a layout of other shapes
            (naming ``mask`` or ``layout`` and the query's shape), a broken layout rule
            (naming them, the row and the token), errors of
            :func:`thdkit.dot_product_attention` (e.g. ``is_causal=True`` with a non-causal
            plan), or dropout without ``dropout_rng``.

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
        logits_soft_cap=check_soft_cap(logits_soft_cap),
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
                "options (mask_type, window_size, max_segments_per_seq, implementation, "
                "logits_soft_cap) apply to Segments only: the plan carries its own"
            )
        source = "mask" if call_layout is mask else "layout"
        if mask_array is not None:
            _check_mask_dtype(mask_array)
        arrays = [jnp.asarray(a) for a in (query, key, value)]
        dtype = dtype if dtype is not None else jnp.result_type(*arrays)
        query, key, value = (a.astype(dtype) for a in arrays)
        given = tuple(query.shape)
        if query.ndim < 3:
            raise ValueError(f"query must be [batch..., T, N, D], got shape {given}")
        batch_dims = given[:-3]
        for name, a in (("key", key), ("value", value)):
            if a.ndim != query.ndim or a.shape[:-3] != batch_dims:
                raise ValueError(
                    f"{name} of shape {a.shape} must have query's batch dims {batch_dims} "
                    f"([batch..., T_kv, K, D]; query of shape {given})"
                )
        seq_q, heads, seq_kv = given[-3], given[-2], key.shape[-3]
        dense = dict(batch_dims=batch_dims, heads=heads, seq_q=seq_q, seq_kv=seq_kv, query=given)
        bias, mask_array = _dense(bias, "bias", **dense), _dense(mask_array, "mask", **dense)
        if mask_array is not None:  # Flax's rule: non-zero attends (its masks may be float)
            mask_array = mask_array.astype(jnp.bool_)
        # One batch dim, as Flax's attention flattens them (or adds one).
        query, key, value = (a.reshape(-1, *a.shape[-3:]) for a in (query, key, value))
        plan = _plan_of(
            call_layout,
            source,
            batch_dims=batch_dims,
            seq_q=seq_q,
            seq_kv=seq_kv,
            query=given,
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
            batch_shape=batch_dims,
        )
        return out.reshape(*batch_dims, *out.shape[1:])

    return attention_fn
