"""``PackedSelfAttention``: an NNX self-attention layer over packed rows, with RoPE and the ring."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from jaxtyping import Array, Float

import thdkit
from thdkit._src.kernels.config import check_soft_cap
from thdkit._src.limits import check_bool
from thdkit._src.mask_types import check_window
from thdkit.flax.plumbing import (
    attend,
    check_features,
    check_implementation,
    check_size,
    check_strategy,
    default_segments,
    dropout_stream,
    plan_layout,
    ring,
)
from thdkit.flax.rotary import rope

__all__ = ["DEFAULT_BIAS_INIT", "DEFAULT_KERNEL_INIT", "DEFAULT_SINKS_INIT", "PackedSelfAttention"]

DEFAULT_KERNEL_INIT = nnx.initializers.lecun_normal()
"""Flax's default kernel initialiser (``nnx.MultiHeadAttention``'s)."""
DEFAULT_BIAS_INIT = nnx.initializers.zeros_init()
"""Flax's default bias initialiser."""
DEFAULT_SINKS_INIT = nnx.initializers.normal(stddev=0.02)
"""The attention sinks' initialiser: gpt-oss's as Hugging Face transformers trains it
(``GptOssPreTrainedModel._init_weights``: a normal of std ``initializer_range``, 0.02)."""


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
    parallelism (``mesh=``, ``axis_name=``: :func:`thdkit.context_parallel_attention` with the
    layer's ``strategy``), soft-capped logits (``logits_soft_cap``) and learned attention sinks
    (``sinks=True``: a parameter ``sinks``, float[N], one logit per query head joining every
    row's softmax denominator; docs/semantics.md, "Attention sinks"), both on every path (the
    kernels, the dense path of dropout, the mesh), and an opt-in check of traced layouts
    (``check_layout=True``). Segment ids numbered from 0 (splash attention's
    and kvax's convention) become Segments with ``thdkit.Segments.from_ids(ids, positions,
    padding_id=-1)``; with the default ``padding_id=0`` id 0 is padding.

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
            the first that can run (see :func:`thdkit.plan_attention`); on a mesh, what every
            ring step runs (one of :func:`thdkit.kernels.partial_implementations`: not cuDNN).
            Checked against the registry (:func:`thdkit.kernels.names`).
        strategy: the context-parallel strategy run on a mesh, a name of
            :func:`thdkit.context_parallel.names` (``"ring"`` by default).
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
        logits_soft_cap: ``cap`` of the soft cap ``cap * tanh(logit / cap)`` on the scaled
            logits (docs/semantics.md, "Soft-capped logits"; Gemma 2 uses 50.0), or None. Part
            of the layer's plans: a plan given to the call must carry the same.
        sinks: whether the layer learns attention sinks: a parameter ``sinks`` of shape [N]
            (``param_dtype``, initialised by ``sinks_init``) passed to the attention on every
            call. Needs an implementation that returns a log-sum-exp (not ``"cudnn"``).
        sinks_init: the sinks' initialiser (:data:`DEFAULT_SINKS_INIT`: normal, stddev 0.02,
            as gpt-oss in Hugging Face transformers; ``nnx.initializers.zeros_init()`` starts
            every sink at 0). Drawn after the projections, so they still equal Flax's.

    Raises:
        TypeError: a non-int size, a non-bool ``check_layout`` or ``sinks``, a non-real
            ``logits_soft_cap``.
        ValueError: a size below 1, ``qkv_features`` not a multiple of N, N not a multiple of
            K, an odd D with RoPE, a non-positive ``rope_theta``, a ``dropout_rate`` outside
            [0, 1), an unknown ``mask_type``, ``implementation`` or ``strategy``, a bad
            ``window_size``, a ``logits_soft_cap`` not positive and finite.
        NotImplementedError: ``logits_soft_cap`` or ``sinks`` with an ``implementation`` that
            cannot take it (the message names the feature).

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

        Soft-capped logits and learned sinks (one per query head):

        >>> gemma_like = PackedSelfAttention(2, 8, logits_soft_cap=50.0, sinks=True,
        ...                                  rngs=nnx.Rngs(0))
        >>> gemma_like(jnp.ones((1, 8, 8)), seg).shape, gemma_like.sinks.shape
        ((1, 8, 8), (2,))

        An id above S under ``jit``, caught by ``check_layout=True`` and checkify:

        >>> from jax.experimental import checkify
        >>> checked = PackedSelfAttention(2, 8, check_layout=True, rngs=nnx.Rngs(0))
        >>> @nnx.jit
        ... def forward(layer, x, segments):
        ...     return checkify.checkify(lambda x: layer(x, segments, max_segments_per_seq=2))(x)
        >>> bad = thdkit.Segments.from_ids(jnp.array([[1, 1, 1, 2, 2, 3, 0, 0]]))
        >>> err, y = forward(checked, jnp.ones((1, 8, 8)), bad)
        >>> print(err.get().split(" (")[0])
        segments_or_plan.ids: invalid layout in row 0, token 5: code 2
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
        strategy: str = "ring",
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
        logits_soft_cap: float | None = None,
        sinks: bool = False,
        sinks_init: Callable[..., Array] = DEFAULT_SINKS_INIT,
    ) -> None:
        self.num_heads = check_size("num_heads", num_heads)
        self.in_features = check_size("in_features", in_features)
        self.qkv_features = check_size(
            "qkv_features", in_features if qkv_features is None else qkv_features
        )
        self.out_features = check_size(
            "out_features", in_features if out_features is None else out_features
        )
        self.num_kv_heads = check_size(
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
        check_implementation(implementation)
        check_strategy(strategy)
        self.strategy = strategy
        self.mask_type = thdkit.MaskType.parse(mask_type)
        self.window_size = check_window(window_size)
        self.rope_theta = None if rope_theta is None else float(rope_theta)
        self.implementation = implementation
        self.dtype = dtype
        self.broadcast_dropout = broadcast_dropout
        self.dropout_rate = float(dropout_rate)
        self.deterministic = deterministic
        self.use_bias = use_bias
        self.check_layout = check_bool(check_layout, "check_layout")
        self.logits_soft_cap = check_soft_cap(logits_soft_cap)
        sinks = check_bool(sinks, "sinks")
        check_features(implementation, logits_soft_cap=self.logits_soft_cap, sinks=sinks)

        def linear(fan_in: Any, fan_out: Any, **kw: Any) -> nnx.LinearGeneral:
            return nnx.LinearGeneral(
                fan_in, fan_out, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                precision=precision, rngs=rngs, **kw,
            )  # fmt: skip

        heads = (self.num_heads, self.head_dim)
        kv_heads = (self.num_kv_heads, self.head_dim)
        init = dict(kernel_init=kernel_init, bias_init=bias_init)
        self.query = linear(self.in_features, heads, **init)
        self.key = linear(self.in_features, kv_heads, **init)
        self.value = linear(self.in_features, kv_heads, **init)
        self.out = linear(
            heads, self.out_features, axis=(-2, -1), kernel_init=out_kernel_init or kernel_init,
            bias_init=out_bias_init or bias_init,
        )  # fmt: skip
        self.sinks = (
            nnx.Param(sinks_init(rngs.params(), (self.num_heads,), param_dtype)) if sinks else None
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
            TypeError, ValueError, NotImplementedError: as :func:`thdkit.plan_attention`,
                naming ``segments`` (a broken layout rule: its row and token).
        """
        return self._plan(segments, "segments", max_segments_per_seq)

    def _plan(
        self, segments: thdkit.Segments, name: str, max_segments_per_seq: int | None
    ) -> thdkit.AttentionPlan:
        """:meth:`plan`, its messages naming the caller's argument ``name``."""
        given, seq_len = max_segments_per_seq, segments.seq_len
        num_segments = default_segments(segments, seq_len=seq_len, given=given)
        self._check(segments, name, num_segments=num_segments, cp=1)
        return plan_layout(
            segments,
            names={"q_segments": name},
            mask_type=self.mask_type,
            window_size=self.window_size,
            max_segments_per_seq=num_segments,
            implementation=self.implementation,
            logits_soft_cap=self.logits_soft_cap,
        )

    def _check(self, segments: thdkit.Segments, name: str, *, num_segments: int, cp: int) -> None:
        """With ``check_layout``, :func:`thdkit.check_layout` on traced segments: the whole
        rows, or (``cp > 1``) each of the ``cp`` contiguous shards of a row as a row of its own.
        Concrete segments are validated eagerly by the plan or the ring instead."""
        if not self.check_layout or not isinstance(segments.ids, jax.core.Tracer):
            return
        ids, pos, name = segments.ids, segments.positions, f"{name}.ids"
        if cp > 1:
            ids, pos = (a.reshape(*a.shape[:-1], cp, a.shape[-1] // cp) for a in (ids, pos))
            name = f"{name}, shard by shard (row = batch row * {cp} + shard)"
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
                ``batch["segments"]``), valid shard by shard; on a one-device axis (cp = 1)
                the rows in document order.
            max_segments_per_seq: S, with Segments only; None as in :meth:`plan`.
            mesh: a ``jax.sharding.Mesh`` to run the layer's ``strategy`` on
                (:func:`thdkit.context_parallel_attention`), or None.
            axis_name: the mesh axis the sequence is sharded over (with ``mesh``).
            deterministic: Flax's: overrides the constructor's; needed (or the constructor's)
                when ``dropout_rate > 0``.
            rngs: Flax's: the dropout stream, overriding the stored one.

        Returns:
            float[B, T, out_features] in the computation dtype.

        Raises:
            TypeError: ``segments_or_plan`` of another type; a plan together with a mesh.
            ValueError: ``x`` not [B, T, in_features], a layout of another [B, T], a plan whose
                mask, window or soft cap differ from the layer's (or a cross-attention plan),
                ``mesh`` without ``axis_name`` (or the reverse), S given with a plan, dropout
                without ``deterministic`` or without an rng stream, a mesh with an
                ``implementation`` that returns no log-sum-exp; concrete Segments that break
                the layout rules (naming ``segments_or_plan``, the row and the token; with a
                mesh shard by shard, and on a one-device axis saying that cp = 1 reads rows
                whole).
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
                f"{type(segments_or_plan).__name__}; build it from segment ids with "
                "thdkit.Segments.from_ids(ids, positions) (padding_id=-1 for ids numbered from "
                "0, else id 0 is padding)"
            )
        if plan is not None:
            if mesh is not None:
                raise TypeError(
                    "segments_or_plan is an AttentionPlan, but ring attention (mesh=) plans "
                    "every ring step itself: pass the rows' Segments with mesh"
                )
            if max_segments_per_seq is not None:
                raise ValueError(
                    "max_segments_per_seq comes from the plan (segments_or_plan); do not pass "
                    "it too"
                )
            if not plan.config.self_attention:
                raise ValueError(
                    "segments_or_plan is a cross-attention plan; this layer is self-attention"
                )
            config = plan.config
            mine = (self.mask_type, self.window_size, self.logits_soft_cap)
            if (config.mask_type, config.window_size, config.logits_soft_cap) != mine:
                raise ValueError(
                    f"segments_or_plan: the plan's mask_type={config.mask_type.value!r}, "
                    f"window_size={config.window_size}, logits_soft_cap={config.logits_soft_cap} "
                    f"differ from the layer's mask_type={self.mask_type.value!r}, "
                    f"window_size={self.window_size}, logits_soft_cap={self.logits_soft_cap} "
                    "(plan with the layer's plan())"
                )
        if segments.ids.shape != x.shape[:2]:
            raise ValueError(
                f"segments_or_plan has [B, T] = {tuple(segments.ids.shape)}; it must be "
                f"{tuple(x.shape[:2])} to match x of shape {tuple(x.shape)}"
            )
        dropout_rng = dropout_stream(
            self.dropout_rate, deterministic, rngs, default=self.deterministic, own=self.rngs
        )
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
            out = self._ring(q, k, v, segments, max_segments_per_seq, mesh, axis_name)
        else:
            if plan is None:
                plan = self._plan(segments, "segments_or_plan", max_segments_per_seq)
            out = attend(
                q, k, v, plan=plan, bias=None, mask=None, is_causal=False,
                broadcast_dropout=self.broadcast_dropout, dropout_rng=dropout_rng,
                dropout_rate=self.dropout_rate, deterministic=dropout_rng is None, module=None,
                sinks=self._sinks(),
            )  # fmt: skip
        return self.out(out)

    def _ring(
        self,
        q: Array,
        k: Array,
        v: Array,
        segments: thdkit.Segments,
        max_segments_per_seq: int | None,
        mesh: Mesh,
        axis_name: str,
    ) -> Array:
        """:func:`thdkit.context_parallel_attention` with the layer's mask, window, implementation,
        strategy, soft cap and sinks, its messages naming the caller's ``segments_or_plan``; on
        a one-device axis, why a reordered row is refused."""
        given, seq_len = max_segments_per_seq, segments.seq_len
        num_segments = default_segments(segments, seq_len=seq_len, given=given)
        cp = mesh.shape.get(axis_name, 1)
        if segments.seq_len % cp == 0:  # Else ring_attention says why it cannot split.
            self._check(segments, "segments_or_plan", num_segments=num_segments, cp=cp)
        return ring(
            q, k, v, segments, name="segments_or_plan", mask_type=self.mask_type,
            window_size=self.window_size, max_segments_per_seq=num_segments,
            implementation=self.implementation, strategy=self.strategy,
            logits_soft_cap=self.logits_soft_cap, sinks=self._sinks(), mesh=mesh,
            axis_name=axis_name,
        )  # fmt: skip

    def _sinks(self) -> Array | None:
        """The sinks parameter's value (float[N]), or None without sinks."""
        return None if self.sinks is None else self.sinks[...]
