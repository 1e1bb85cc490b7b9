"""``PackedSelfAttention``: a Flax NNX self-attention layer over packed rows (extra ``flax``).

Axis legend: B batch, T row length, F the layer's features (``in_features``), H query heads,
K key/value heads (``num_kv_heads``, dividing H), D head dim, S = ``max_segments_per_seq``.

The layer does what a transformer block's attention does, on a packed layout: q/k/v projections,
rotary embeddings (RoPE) from each token's position *inside its document* (so every document
starts at position 0, whatever its place in the row), grouped-query attention masked by segment
ids and positions, and the output projection. The layout is planned once per batch
(:func:`thdkit.plan_attention`, or :meth:`PackedSelfAttention.plan`) and the plan is passed to
every layer, so no layer recomputes it; under ``nnx.scan`` over layers the plan is a closed-over
(or broadcast) pytree.

With ``mesh=`` and ``axis_name=`` the same layer runs :func:`thdkit.ring_attention`: the
sequence axis is sharded over the mesh axis (context parallelism), tokens in the order the host
put them in (e.g. :func:`thdkit.reorder.striped`, see :func:`thdkit.data.pack`). The ring plans
each step itself, so it takes the :class:`thdkit.Segments` of the (reordered) rows.

Install with ``pip install "thdkit[flax]"``; the rest of thdkit never imports this module.
"""

from __future__ import annotations

import operator

import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from jaxtyping import Array, Float, Int

from thdkit.context_parallel import ring_attention
from thdkit.kernels import AttentionPlan, attention, names, plan_attention
from thdkit.mask_types import MaskType, check_window
from thdkit.segments import Segments

__all__ = ["PackedSelfAttention", "rope"]


def rope(
    x: Float[Array, "B T N D"], positions: Int[Array, "B T"], *, theta: float = 10_000.0
) -> Float[Array, "B T N D"]:
    """Rotary position embedding (rotate-half form) at the given per-token positions.

    Feature pair ``(i, i + D/2)`` of a token at position ``p`` is rotated by the angle
    ``p * theta ** (-2i / D)``. Packed rows pass each token's position inside its document
    (``Segments.positions``), so a document gets the same embedding wherever it sits in a row.

    Args:
        x: float[B, T, N, D]; N heads, D even.
        positions: int[B, T]; the position of each token.
        theta: the RoPE base, a positive real.

    Returns:
        float[B, T, N, D] in ``x``'s dtype (angles computed in float32).

    Raises:
        ValueError: D odd, a non-positive ``theta``, or ``positions`` not of shape [B, T].

    Example:
        >>> x = jnp.ones((1, 2, 1, 2))
        >>> rope(x, jnp.array([[0, 1]]), theta=10_000.0)[0, :, 0].round(3).tolist()
        [[1.0, 1.0], [-0.301..., 1.382...]]
    """
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


class PackedSelfAttention(nnx.Module):
    """Multi-head (grouped-query) self-attention with RoPE over packed rows.

    Parameters (``nnx.Linear``, no bias, kernels ``[in, out]``):

    - ``q_proj``: F -> H·D; ``k_proj``, ``v_proj``: F -> K·D; ``o_proj``: H·D -> F.

    Args:
        in_features: F.
        num_heads: H.
        num_kv_heads: K, dividing H (K = H: multi-head; K = 1: multi-query).
        head_dim: D, even (RoPE rotates feature pairs).
        mask_type: a :class:`thdkit.MaskType` or its name (``"padding_causal"`` for a decoder).
        window_size: ``(left, right)`` sliding window or None (see :func:`thdkit.attention`).
        rope_theta: the RoPE base.
        implementation: ``"reference"``, ``"blockwise"``, ``"cudnn"``, ``"pallas"``, or None for
            the first that can run (see :func:`thdkit.plan_attention`); not used by ring
            attention.
        dtype: the computation dtype of the projections (None: the inputs'); attention
            accumulates in float32 in every case.
        param_dtype: the parameters' dtype.
        rngs: ``nnx.Rngs`` for the initialisation.

    Raises:
        TypeError: a non-int size.
        ValueError: a size below 1, H not a multiple of K, an odd D, a non-positive
            ``rope_theta``, an unknown ``mask_type`` or bad ``window_size``.

    Example:
        >>> from flax import nnx
        >>> from thdkit.segments import Segments
        >>> layer = PackedSelfAttention(8, 2, 1, 4, mask_type="padding_causal",
        ...                             rngs=nnx.Rngs(0))
        >>> seg = Segments.from_ids(jnp.array([[1, 1, 1, 2, 2, 0, 0, 0]]))
        >>> plan = layer.plan(seg, max_segments_per_seq=2)
        >>> layer(jnp.ones((1, 8, 8)), plan).shape
        (1, 8, 8)
        >>> layer.k_proj.kernel.shape
        (8, 4)
    """

    def __init__(
        self,
        in_features: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        mask_type: MaskType | str = "padding_causal",
        window_size: tuple[int | None, int | None] | None = None,
        rope_theta: float = 10_000.0,
        implementation: str | None = None,
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        sizes = {}
        for name, value in (
            ("in_features", in_features),
            ("num_heads", num_heads),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
        ):
            if isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got bool")
            try:
                sizes[name] = operator.index(value)
            except TypeError:
                raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
            if sizes[name] < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if sizes["num_heads"] % sizes["num_kv_heads"]:
            raise ValueError(
                f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}"
            )
        if sizes["head_dim"] % 2:
            raise ValueError(f"head_dim must be even (RoPE rotates pairs), got {head_dim}")
        if not rope_theta > 0:
            raise ValueError(f"rope_theta must be positive, got {rope_theta}")
        if implementation is not None and implementation not in names():
            raise ValueError(
                f"implementation must be one of {', '.join(map(repr, names()))} "
                f"or None, got {implementation!r}"
            )
        self.in_features = sizes["in_features"]
        self.num_heads = sizes["num_heads"]
        self.num_kv_heads = sizes["num_kv_heads"]
        self.head_dim = sizes["head_dim"]
        self.mask_type = MaskType.parse(mask_type)
        self.window_size = check_window(window_size)
        self.rope_theta = float(rope_theta)
        self.implementation = implementation

        def linear(fan_in: int, fan_out: int) -> nnx.Linear:
            return nnx.Linear(
                fan_in, fan_out, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs
            )

        features, q_width = self.in_features, self.num_heads * self.head_dim
        kv_width = self.num_kv_heads * self.head_dim
        self.q_proj = linear(features, q_width)
        self.k_proj = linear(features, kv_width)
        self.v_proj = linear(features, kv_width)
        self.o_proj = linear(q_width, features)

    def plan(self, segments: Segments, *, max_segments_per_seq: int) -> AttentionPlan:
        """The plan of a batch's layout with this layer's mask, window and implementation.

        Compute it once per batch, outside the layer loop, and pass it to every layer that shares
        the configuration.

        Args:
            segments: :class:`thdkit.Segments` with int32[B, T] fields.
            max_segments_per_seq: S, a static int >= the largest id.

        Returns:
            :class:`thdkit.AttentionPlan` (see :func:`thdkit.plan_attention`).

        Raises:
            TypeError, ValueError, NotImplementedError: as :func:`thdkit.plan_attention`.
        """
        return plan_attention(
            segments,
            mask_type=self.mask_type,
            window_size=self.window_size,
            max_segments_per_seq=max_segments_per_seq,
            implementation=self.implementation,
        )

    def __call__(
        self,
        x: Float[Array, "B T F"],
        segments_or_plan: Segments | AttentionPlan,
        *,
        max_segments_per_seq: int | None = None,
        mesh: Mesh | None = None,
        axis_name: str | None = None,
    ) -> Float[Array, "B T F"]:
        """Attention of every token over the earlier tokens of its own document.

        Args:
            x: float[B, T, F].
            segments_or_plan: an :class:`thdkit.AttentionPlan` of the batch's layout (from
                :meth:`plan`, planned once and shared by the layers), or its
                :class:`thdkit.Segments` (planned here: pass ``max_segments_per_seq``). With a
                mesh: the Segments of the rows in the order the ring sees them.
            max_segments_per_seq: S, with Segments only.
            mesh: a ``jax.sharding.Mesh`` to run :func:`thdkit.ring_attention` on, or None.
            axis_name: the mesh axis the sequence is sharded over (with ``mesh``).

        Returns:
            float[B, T, F], ``x``'s dtype (or the layer's ``dtype``).

        Raises:
            TypeError: ``segments_or_plan`` of another type; a plan together with a mesh.
            ValueError: ``x`` not [B, T, in_features], a layout of another [B, T], a plan whose
                mask or window differ from the layer's, ``mesh`` without ``axis_name`` (or the
                reverse), S missing or given with a plan.
        """
        if x.ndim != 3 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"x must have shape [B, T, in_features={self.in_features}], got {x.shape}"
            )
        if (mesh is None) != (axis_name is None):
            raise ValueError("pass mesh and axis_name together (ring attention), or neither")
        plan = segments_or_plan if isinstance(segments_or_plan, AttentionPlan) else None
        segments = plan.q_segments if plan is not None else segments_or_plan
        if not isinstance(segments, Segments):
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
            config = plan.config
            if (config.mask_type, config.window_size) != (self.mask_type, self.window_size):
                raise ValueError(
                    f"the plan's mask_type={plan.config.mask_type.value!r}, "
                    f"window_size={plan.config.window_size} differ from the layer's "
                    f"mask_type={self.mask_type.value!r}, window_size={self.window_size}"
                )
        elif max_segments_per_seq is None:
            raise ValueError("max_segments_per_seq is required with Segments")
        if segments.ids.shape != x.shape[:2]:
            raise ValueError(
                f"the layout has shape [B, T] = {segments.ids.shape}; it must be {x.shape[:2]} "
                "to match x"
            )
        batch, seq_len, _ = x.shape
        q = self.q_proj(x).reshape(batch, seq_len, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(batch, seq_len, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(batch, seq_len, self.num_kv_heads, self.head_dim)
        q = rope(q, segments.positions, theta=self.rope_theta)
        k = rope(k, segments.positions, theta=self.rope_theta)
        if mesh is not None:
            out = ring_attention(
                q,
                k,
                v,
                segment_ids_q=segments.ids,
                segment_pos_q=segments.positions,
                mask_type=self.mask_type,
                window_size=self.window_size,
                max_segments_per_seq=max_segments_per_seq,
                mesh=mesh,
                axis_name=axis_name,
            )
        else:
            if plan is None:
                plan = self.plan(segments, max_segments_per_seq=max_segments_per_seq)
            out = attention(q, k, v, plan=plan)
        return self.o_proj(out.reshape(batch, seq_len, self.num_heads * self.head_dim))
