"""Flax on packed rows: an ``attention_fn`` for Flax's own attention modules, and a layer with RoPE.

Axis legend: B batch, T row length (T_kv the key/value length in cross-attention), F the input
features (``in_features``), N query heads, K key/value heads (``num_kv_heads``, dividing N),
D head dim, S = ``max_segments_per_seq`` (the largest segment id).

- :func:`make_attention_fn` returns a function with Flax's ``attention_fn`` signature: pass it to
  a stock ``flax.nnx.MultiHeadAttention(attention_fn=...)`` or
  ``flax.linen.MultiHeadDotProductAttention(attention_fn=...)``, and give the module the batch's
  layout (an :class:`thdkit.AttentionPlan` or :class:`thdkit.Segments`) through its ``mask``
  argument, which Flax forwards untouched (or close over it when the module is built per call,
  as linen modules are). Parameters, checkpoints and the rest of the module stay Flax's.
- :class:`PackedSelfAttention` is an NNX self-attention layer with Flax's argument names and
  parameter layout (``query``, ``key``, ``value``, ``out``: ``nnx.LinearGeneral``) plus what a
  packed decoder needs: RoPE from each token's position inside its document (:func:`rope`),
  grouped-query attention, one plan per batch shared by the layers, and context parallelism
  (:func:`thdkit.ring_attention`) on a mesh.

Attention-weight dropout and sowing the weights (Flax's ``dropout_rate`` / ``deterministic`` and
``sow_weights``) need the weights themselves: they run the dense path
(:func:`thdkit.dot_product_attention_weights`, O(B·N·T·T_kv) memory); everything else runs
thdkit's kernels, which never build a ``[T, T_kv]`` array.

Under ``jit`` nothing validates the values of a layout; ``PackedSelfAttention(...,
check_layout=True)`` adds :func:`thdkit.check_layout` (``jax.experimental.checkify``) for traced
layouts, so a step wrapped with ``checkify.checkify`` reports an id above S or a broken run.

Install with ``pip install "thdkit[flax]"``; the rest of thdkit never imports this module.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jaxtyping import Array, ArrayLike, Float, Int

import thdkit

__all__ = ["PackedSelfAttention", "make_attention_fn", "rope"]

DEFAULT_KERNEL_INIT = nnx.initializers.lecun_normal()
"""Flax's default kernel initialiser (``nnx.MultiHeadAttention``'s)."""
DEFAULT_BIAS_INIT = nnx.initializers.zeros_init()
"""Flax's default bias initialiser."""

_UNBOUNDED = 2**31 - 1

Layout = Any
"""A layout a Flax attention call reads: :class:`thdkit.AttentionPlan`, :class:`thdkit.Segments`
(self-attention), a pair of Segments (queries, keys/values), or None (one document a row)."""


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


# --- Shared plumbing ---------------------------------------------------------------------------


def _parse_window(window_size: Any) -> tuple[int | None, int | None] | None:
    """``window_size`` as thdkit parses it (a plan's ``window_size``): None or a negative or
    ``>= 2**31 - 1`` bound is unbounded; both sides unbounded is None."""
    if window_size is None:
        return None
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise ValueError(f"window_size must be None or a pair (left, right), got {window_size!r}")
    bounds = []
    for side, bound in zip(("left", "right"), window_size, strict=True):
        if bound is not None and (
            isinstance(bound, (bool, np.bool_)) or not isinstance(bound, (int, np.integer))
        ):
            raise TypeError(
                f"window_size {side} bound must be an int or None, got {type(bound).__name__}"
            )
        bounds.append(None if bound is None or bound < 0 or bound >= _UNBOUNDED else int(bound))
    return None if bounds == [None, None] else (bounds[0], bounds[1])


def _check_implementation(implementation: Any) -> None:
    if implementation is not None and implementation not in thdkit.kernels.names():
        raise ValueError(
            f"implementation must be one of {', '.join(map(repr, thdkit.kernels.names()))} or "
            f"None, got {implementation!r}"
        )


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
    return _plan(
        q,
        kv,
        mask_type=mask,
        window_size=window_size,
        max_segments_per_seq=max_segments_per_seq
        or _default_segments(q, kv, seq_len=max(seq_q, seq_kv)),
        implementation=implementation,
    )


_REORDERED_HINT = (
    "; if these rows were reordered for context parallelism (striped / dual_chunk_swap, e.g. "
    "by thdkit.data.pack(cp=...)), they are valid only shard by shard: pass them with mesh= "
    "and axis_name= (ring attention) or to thdkit.context_parallel_attention, or plan the rows "
    "in document order"
)
_RUN_RULES = ("starts a second run", "must increase from run to run")  # Rules 3 and 4.


def _plan(*sides: thdkit.Segments | None, **options: Any) -> thdkit.AttentionPlan:
    """:func:`thdkit.plan_attention`, with a hint on rules 3 and 4, which a row reordered for
    context parallelism breaks as a whole row."""
    try:
        return thdkit.plan_attention(*sides, **options)
    except ValueError as error:
        message = str(error)
        if any(rule in message for rule in _RUN_RULES) and "context parallelism" not in message:
            raise ValueError(message + _REORDERED_HINT) from error
        raise


def _default_segments(*sides: thdkit.Segments | None, seq_len: int) -> int:
    """S when not given: the largest id of concrete segments, else the row length (a row of T
    tokens holds at most T documents numbered 1..n). S sizes cuDNN's metadata and, through
    the mean document length T / S, the blockwise tiles."""
    ids = [side.ids for side in sides if side is not None]
    if any(isinstance(a, jax.core.Tracer) for a in ids):
        return seq_len
    return max(1, *(int(np.max(np.asarray(a), initial=0)) for a in ids))


def _flatten_dense(x: Any) -> Any:
    """A bias or mask of [batch..., N, T, T_kv] with several batch dims as [B, N, T, T_kv]."""
    if x is None or jnp.ndim(x) <= 4:
        return x
    x = jnp.asarray(x)
    return x.reshape(-1, *x.shape[-3:])


def _sow(module: Any, weights: Array) -> None:
    if isinstance(module, nnx.Module):
        module.sow(nnx.Intermediate, "attention_weights", weights)
    else:  # a linen module
        module.sow("intermediates", "attention_weights", weights)


def _attend(
    query: Array,
    key: Array,
    value: Array,
    *,
    plan: thdkit.AttentionPlan,
    bias: Array | None,
    mask: Array | None,
    is_causal: bool,
    broadcast_dropout: bool,
    dropout_rng: Array | None,
    dropout_rate: float,
    deterministic: bool,
    module: Any,
) -> Array:
    """Attention of [B, T, N, D] arrays on a plan: thdkit's kernels, or the dense path when the
    weights are needed (sowing, dropout) with Flax's dropout, bit for bit."""
    dropout = not deterministic and dropout_rate > 0.0
    if not dropout and module is None:
        return thdkit.dot_product_attention(
            query, key, value, bias, mask, is_causal=is_causal, plan=plan
        )
    weights = thdkit.dot_product_attention_weights(
        query, key, bias, mask, is_causal=is_causal, plan=plan
    )
    if module is not None:
        _sow(module, weights)
    if dropout:
        if dropout_rng is None:
            raise ValueError("dropout_rng is required when dropout_rate > 0 and not deterministic")
        dtype = weights.dtype
        keep_prob = 1.0 - dropout_rate
        shape = (1, 1, *weights.shape[-2:]) if broadcast_dropout else weights.shape
        keep = jax.random.bernoulli(dropout_rng, keep_prob, shape)
        scaled = weights * (jnp.asarray(1, dtype) / jnp.asarray(keep_prob, dtype))
        weights = jnp.where(keep, scaled, jnp.zeros_like(scaled))
    batch, seq_q, heads_q, _ = query.shape
    heads_kv = key.shape[2]
    grouped = weights.reshape(batch, heads_kv, heads_q // heads_kv, seq_q, key.shape[1])
    out = jnp.einsum("bkgts,bskd->btkgd", grouped.astype(jnp.float32), value.astype(jnp.float32))
    return out.reshape(batch, seq_q, heads_q, value.shape[-1]).astype(query.dtype)


# --- The attention_fn for Flax's modules -------------------------------------------------------


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
    _check_implementation(implementation)
    if mask_type is not None:
        thdkit.MaskType.parse(mask_type)
    _parse_window(window_size)

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
        out = _attend(
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


# --- The layer ---------------------------------------------------------------------------------


def _size(name: str, value: Any) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        size = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if size < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return size


class PackedSelfAttention(nnx.Module):
    """Multi-head (grouped-query) self-attention with RoPE over packed rows, Flax-style.

    Arguments and parameters follow ``flax.nnx.MultiHeadAttention``: ``query``: F -> (N, D),
    ``key``, ``value``: F -> (K, D), ``out``: (N, D) -> ``out_features``, all
    ``nnx.LinearGeneral`` (kernels ``[F, N, D]``, ``[F, K, D]``, ``[N, D, F_out]``; biases when
    ``use_bias``), initialised in Flax's order, so with the same ``rngs`` the parameters equal
    ``nnx.MultiHeadAttention``'s. Self-attention only (one input, no decode cache): for
    cross-attention use ``nnx.MultiHeadAttention`` with :func:`make_attention_fn`.

    What it adds: RoPE (:func:`rope`) on q and k at each token's position inside its document,
    the packed mask, one plan per batch (:meth:`plan`) shared by the layers, context
    parallelism (``mesh=``, ``axis_name=``: :func:`thdkit.ring_attention`), and an opt-in check
    of traced layouts (``check_layout=True``).

    Eagerly, every layout the layer plans or shards is validated (a ``ValueError`` naming the row
    and the token). Under ``jit`` the values are tracers and nothing can raise on them: an id
    above ``max_segments_per_seq`` or a broken run would silently give wrong attention. With
    ``check_layout=True`` the layer adds :func:`thdkit.check_layout` (a
    ``jax.experimental.checkify`` check of the layout rules against S) where it plans
    (:meth:`plan`, or a call given Segments) and, with a mesh, on every shard; wrap the jitted
    step with ``checkify.checkify`` and call ``err.throw()`` on its error (without
    ``checkify.checkify`` around it, JAX refuses to trace the check). A call given a plan checks
    nothing: :meth:`plan` checked its layout.

    Args:
        num_heads: N.
        in_features: F.
        qkv_features: N·D (default ``in_features``); D = ``qkv_features // num_heads``.
        out_features: the output features (default ``in_features``).
        num_kv_heads: K, dividing N (default N; K = 1: multi-query).
        mask_type: a :class:`thdkit.MaskType` or its name (``"padding_causal"`` for a decoder).
        window_size: ``(left, right)`` sliding window or None (see :func:`thdkit.attention`).
        rope_theta: the RoPE base, or None for no RoPE (then the layer computes what
            ``nnx.MultiHeadAttention`` with :func:`make_attention_fn` computes).
        implementation: ``"reference"``, ``"blockwise"``, ``"cudnn"``, ``"pallas"``, or None for
            the first that can run (see :func:`thdkit.plan_attention`); not used by ring
            attention.
        dtype: the computation dtype (None: inferred from inputs and parameters, as Flax);
            attention accumulates in float32 in every case.
        param_dtype: the parameters' dtype.
        broadcast_dropout: Flax's: one dropout mask for every batch row and head.
        dropout_rate: attention-weight dropout rate, as Flax's (the dense path while active:
            O(B·N·T²) memory; 0 keeps the kernels).
        deterministic: Flax's: True disables dropout; None leaves it to ``__call__``.
        precision: passed to the projections.
        kernel_init, out_kernel_init, bias_init, out_bias_init: Flax's initialisers (the out
            ones default to ``kernel_init`` / ``bias_init``).
        use_bias: whether the four projections have biases (Flax's default True).
        rngs: ``nnx.Rngs`` for the initialisation (and, with dropout, its stream).
        keep_rngs: as Flax: store ``rngs.dropout`` for dropout (when ``dropout_rate > 0``).
        check_layout: add :func:`thdkit.check_layout` (checkify) for traced layouts (see
            above); False (the default) adds nothing to the program.

    Raises:
        TypeError: a non-int size, a non-bool ``check_layout``.
        ValueError: a size below 1, ``qkv_features`` not a multiple of N, N not a multiple of
            K, an odd D with RoPE, a non-positive ``rope_theta``, a ``dropout_rate`` outside
            [0, 1), an unknown ``mask_type`` or ``implementation``, a bad ``window_size``.

    Examples:
        >>> from flax import nnx
        >>> import thdkit
        >>> layer = PackedSelfAttention(2, 8, num_kv_heads=1, rngs=nnx.Rngs(0))
        >>> seg = thdkit.Segments.from_ids(jnp.array([[1, 1, 1, 2, 2, 0, 0, 0]]))
        >>> plan = layer.plan(seg)
        >>> layer(jnp.ones((1, 8, 8)), plan).shape
        (1, 8, 8)
        >>> layer.query.kernel.shape, layer.key.kernel.shape, layer.out.kernel.shape
        ((8, 2, 4), (8, 1, 4), (2, 4, 8))

        An id above S under ``jit``, caught by ``check_layout=True`` and checkify:

        >>> from jax.experimental import checkify
        >>> checked = PackedSelfAttention(2, 8, check_layout=True, rngs=nnx.Rngs(0))
        >>> @nnx.jit
        ... def forward(layer, x, segments):
        ...     return checkify.checkify(lambda x: layer(x, segments, max_segments_per_seq=2))(x)
        >>> bad = thdkit.Segments.from_ids(jnp.array([[1, 1, 1, 2, 2, 3, 0, 0]]))
        >>> err, y = forward(checked, jnp.ones((1, 8, 8)), bad)
        >>> print(err.get().split(" (")[0])
        segments.ids: invalid layout in row 0, token 5: code 2
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        qkv_features: int | None = None,
        out_features: int | None = None,
        num_kv_heads: int | None = None,
        *,
        mask_type: thdkit.MaskType | str = "padding_causal",
        window_size: tuple[int | None, int | None] | None = None,
        rope_theta: float | None = 10_000.0,
        implementation: str | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        broadcast_dropout: bool = True,
        dropout_rate: float = 0.0,
        deterministic: bool | None = None,
        precision: Any = None,
        kernel_init: Callable[..., Array] = DEFAULT_KERNEL_INIT,
        out_kernel_init: Callable[..., Array] | None = None,
        bias_init: Callable[..., Array] = DEFAULT_BIAS_INIT,
        out_bias_init: Callable[..., Array] | None = None,
        use_bias: bool = True,
        rngs: nnx.Rngs,
        keep_rngs: bool = True,
        check_layout: bool = False,
    ) -> None:
        self.num_heads = _size("num_heads", num_heads)
        self.in_features = _size("in_features", in_features)
        self.qkv_features = _size(
            "qkv_features", in_features if qkv_features is None else qkv_features
        )
        self.out_features = _size(
            "out_features", in_features if out_features is None else out_features
        )
        self.num_kv_heads = _size(
            "num_kv_heads", num_heads if num_kv_heads is None else num_kv_heads
        )
        if self.qkv_features % self.num_heads:
            raise ValueError(
                f"qkv_features={self.qkv_features} must be a multiple of num_heads={num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        self.head_dim = self.qkv_features // self.num_heads
        if rope_theta is not None:
            if not rope_theta > 0:
                raise ValueError(f"rope_theta must be positive or None, got {rope_theta}")
            if self.head_dim % 2:
                raise ValueError(
                    f"the head dim qkv_features // num_heads = {self.head_dim} must be even "
                    "(RoPE rotates pairs), or pass rope_theta=None"
                )
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
        _check_implementation(implementation)
        self.mask_type = thdkit.MaskType.parse(mask_type)
        self.window_size = _parse_window(window_size)
        self.rope_theta = None if rope_theta is None else float(rope_theta)
        self.implementation = implementation
        self.dtype = dtype
        self.broadcast_dropout = broadcast_dropout
        self.dropout_rate = float(dropout_rate)
        self.deterministic = deterministic
        self.use_bias = use_bias
        if not isinstance(check_layout, (bool, np.bool_)):
            raise TypeError(f"check_layout must be a bool, got {type(check_layout).__name__}")
        self.check_layout = bool(check_layout)

        def linear(fan_in: Any, fan_out: Any, **kw: Any) -> nnx.LinearGeneral:
            return nnx.LinearGeneral(
                fan_in,
                fan_out,
                use_bias=use_bias,
                dtype=dtype,
                param_dtype=param_dtype,
                precision=precision,
                rngs=rngs,
                **kw,
            )

        heads = (self.num_heads, self.head_dim)
        kv_heads = (self.num_kv_heads, self.head_dim)
        init = dict(kernel_init=kernel_init, bias_init=bias_init)
        self.query = linear(self.in_features, heads, **init)
        self.key = linear(self.in_features, kv_heads, **init)
        self.value = linear(self.in_features, kv_heads, **init)
        self.out = linear(
            heads,
            self.out_features,
            axis=(-2, -1),
            kernel_init=out_kernel_init or kernel_init,
            bias_init=out_bias_init or bias_init,
        )
        self.rngs = rngs.dropout.fork() if keep_rngs and dropout_rate > 0 else None

    def plan(
        self, segments: thdkit.Segments, *, max_segments_per_seq: int | None = None
    ) -> thdkit.AttentionPlan:
        """The plan of a batch's layout with this layer's mask, window and implementation.

        Compute it once per batch, outside the layer loop, and pass it to every layer that shares
        the configuration.

        Args:
            segments: :class:`thdkit.Segments` with int32[B, T] fields.
            max_segments_per_seq: S, a static int >= the largest id; None is the largest id of
                concrete segments, or T for traced ones (enough for ids numbered 1..n). S sizes
                cuDNN's metadata ([B, S]) and the blockwise tiles (mean document length T / S).

        Returns:
            :class:`thdkit.AttentionPlan` (see :func:`thdkit.plan_attention`).

        Raises:
            TypeError, ValueError, NotImplementedError: as :func:`thdkit.plan_attention`; a
                broken run (rules 3 and 4) says that a row reordered for context parallelism
                must go to ring attention (``mesh=``) instead.
        """
        num_segments = max_segments_per_seq or _default_segments(segments, seq_len=segments.seq_len)
        self._check(segments, num_segments=num_segments, cp=1)
        return _plan(
            segments,
            mask_type=self.mask_type,
            window_size=self.window_size,
            max_segments_per_seq=num_segments,
            implementation=self.implementation,
        )

    def _check(self, segments: thdkit.Segments, *, num_segments: int, cp: int) -> None:
        """With ``check_layout``, :func:`thdkit.check_layout` on traced segments: the whole
        rows, or (``cp > 1``) each of the ``cp`` contiguous shards of a row as a row of its own.
        Concrete segments are validated eagerly by the plan or the ring instead."""
        if not self.check_layout or not isinstance(segments.ids, jax.core.Tracer):
            return
        ids, pos, name = segments.ids, segments.positions, "segments.ids"
        if cp > 1:
            ids, pos = (a.reshape(*a.shape[:-1], cp, a.shape[-1] // cp) for a in (ids, pos))
            name = f"segments.ids, shard by shard (row = batch row * {cp} + shard)"
        thdkit.check_layout(
            ids, pos, max_segments_per_seq=num_segments, mask_type=self.mask_type, name=name
        )

    def __call__(
        self,
        x: Float[Array, "B T F"],
        segments_or_plan: thdkit.Segments | thdkit.AttentionPlan,
        *,
        max_segments_per_seq: int | None = None,
        mesh: Mesh | None = None,
        axis_name: str | None = None,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> Float[Array, "B T F_out"]:
        """Attention of every token over the tokens its document and the mask allow.

        Args:
            x: float[B, T, in_features].
            segments_or_plan: an :class:`thdkit.AttentionPlan` of the batch's layout (from
                :meth:`plan`, planned once and shared by the layers), or its
                :class:`thdkit.Segments` (planned here). With a mesh: the Segments of the rows
                in the order the ring sees them (``thdkit.data.pack(cp=...)``'s
                ``batch["segments"]``), valid shard by shard.
            max_segments_per_seq: S, with Segments only; None as in :meth:`plan`.
            mesh: a ``jax.sharding.Mesh`` to run :func:`thdkit.ring_attention` on, or None.
            axis_name: the mesh axis the sequence is sharded over (with ``mesh``).
            deterministic: Flax's: overrides the constructor's; needed (or the constructor's)
                when ``dropout_rate > 0``.
            rngs: Flax's: the dropout stream, overriding the stored one.

        Returns:
            float[B, T, out_features] in the computation dtype.

        Raises:
            TypeError: ``segments_or_plan`` of another type; a plan together with a mesh.
            ValueError: ``x`` not [B, T, in_features], a layout of another [B, T], a plan whose
                mask or window differ from the layer's (or a cross-attention plan), ``mesh``
                without ``axis_name`` (or the reverse), S given with a plan, dropout without
                ``deterministic`` or without an rng stream; concrete Segments that break the
                layout rules (as :meth:`plan`, or shard by shard with a mesh).
            NotImplementedError: dropout together with a mesh.
        """
        if x.ndim != 3 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"x must have shape [B, T, in_features={self.in_features}], got {x.shape}"
            )
        if (mesh is None) != (axis_name is None):
            raise ValueError("pass mesh and axis_name together (ring attention), or neither")
        plan = segments_or_plan if isinstance(segments_or_plan, thdkit.AttentionPlan) else None
        segments = plan.q_segments if plan is not None else segments_or_plan
        if not isinstance(segments, thdkit.Segments):
            raise TypeError(
                "segments_or_plan must be a thdkit.Segments or an AttentionPlan, got "
                f"{type(segments_or_plan).__name__}"
            )
        if plan is not None:
            if mesh is not None:
                raise TypeError(
                    "ring attention plans every ring step itself: pass the Segments of the "
                    "reordered rows with mesh, not an AttentionPlan"
                )
            if max_segments_per_seq is not None:
                raise ValueError("max_segments_per_seq comes from the plan; do not pass it too")
            if not plan.config.self_attention:
                raise ValueError("the plan is a cross-attention plan; this layer is self-attention")
            if (plan.config.mask_type, plan.config.window_size) != (
                self.mask_type,
                self.window_size,
            ):
                raise ValueError(
                    f"the plan's mask_type={plan.config.mask_type.value!r}, "
                    f"window_size={plan.config.window_size} differ from the layer's "
                    f"mask_type={self.mask_type.value!r}, window_size={self.window_size}"
                )
        if segments.ids.shape != x.shape[:2]:
            raise ValueError(
                f"the layout has shape [B, T] = {segments.ids.shape}; it must be {x.shape[:2]} "
                "to match x"
            )
        dropout_rng = self._dropout_rng(deterministic, rngs)
        if dropout_rng is not None and mesh is not None:
            raise NotImplementedError(
                "attention-weight dropout runs densely and does not shard: use dropout_rate=0 "
                "(or deterministic=True) with a mesh"
            )
        q, k, v = self.query(x), self.key(x), self.value(x)
        if self.rope_theta is not None:
            q = rope(q, segments.positions, theta=self.rope_theta)
            k = rope(k, segments.positions, theta=self.rope_theta)
        if mesh is not None:
            num_segments = max_segments_per_seq or _default_segments(
                segments, seq_len=segments.seq_len
            )
            cp = mesh.shape.get(axis_name, 1)
            if segments.seq_len % cp == 0:  # Else ring_attention says why it cannot split.
                self._check(segments, num_segments=num_segments, cp=cp)
            out = thdkit.ring_attention(
                q,
                k,
                v,
                q_segments=segments,
                mask_type=self.mask_type,
                window_size=self.window_size,
                max_segments_per_seq=num_segments,
                mesh=mesh,
                axis_name=axis_name,
            )
        else:
            if plan is None:
                plan = self.plan(segments, max_segments_per_seq=max_segments_per_seq)
            out = _attend(
                q,
                k,
                v,
                plan=plan,
                bias=None,
                mask=None,
                is_causal=False,
                broadcast_dropout=self.broadcast_dropout,
                dropout_rng=dropout_rng,
                dropout_rate=self.dropout_rate,
                deterministic=dropout_rng is None,
                module=None,
            )
        return self.out(out)

    def _dropout_rng(self, deterministic: bool | None, rngs: Any) -> Array | None:
        """Flax's rule: dropout needs ``deterministic`` (call or constructor) and a stream."""
        if self.dropout_rate == 0.0:
            return None
        deterministic = deterministic if deterministic is not None else self.deterministic
        if deterministic is None:
            raise ValueError(
                "dropout_rate > 0: pass deterministic to the constructor or to the call"
            )
        if deterministic:
            return None
        stream = rngs.dropout if isinstance(rngs, nnx.Rngs) else rngs
        stream = stream if stream is not None else self.rngs
        if stream is None:
            raise ValueError("dropout needs an rng stream: pass rngs to the call (keep_rngs=False)")
        return stream()
