"""JAX's cuDNN fused attention fed with compact metadata (GPU, representable layouts only).

The candidate of the ordered choice in :mod:`thdkit.attention.api`: :func:`check_config` (what
the plan knows: backend, mask type, window, self-attention) and :func:`check_arrays` (dtype and
head dims, once ``attention`` sees the arrays) raise ``NotImplementedError`` with the reason it
cannot run; :func:`run` computes.

JAX's packed path (``_fix_seqlen_offsets`` in ``jax/_src/cudnn/fused_attention_stablehlo.py``)
scales the key/value offsets by the *query's* heads (jax 0.10 and 0.11; jax 0.12 by the key's)
and by the query's head dim (all of them). :func:`run` therefore repeats key/value heads up to the
query's (GQA/MQA; right on every version) and requires ``D_v == D``, so that every offset
addresses the intended key and value element.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from thdkit.attention.representable import representable_rows
from thdkit.attention.tiles import kv_spans
from thdkit.layout import is_concrete
from thdkit.masks import MaskType, Window, sanitize, window_bound
from thdkit.metadata import SeqMeta
from thdkit.segments import Segments

__all__ = [
    "DTYPES",
    "check_arrays",
    "check_config",
    "check_layout",
    "cudnn_attention",
    "packed_inputs",
    "poisoned_rows",
    "run",
    "spans_of",
]

DTYPES = (jnp.bfloat16, jnp.float16)
"""The input dtypes cuDNN's fused attention takes."""


def _library() -> Any:
    """JAX's cuDNN attention module, or NotImplementedError saying why it cannot be used."""
    if jax.default_backend() != "gpu":
        raise NotImplementedError(
            f"needs a CUDA GPU with cuDNN; the default backend is {jax.default_backend()}"
        )
    try:
        from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

        cudnn_attention.check_cudnn_version()
    except Exception as error:  # Import or library problems all mean "not available".
        raise NotImplementedError(f"cannot load cuDNN fused attention ({error})") from None
    capability = getattr(jax.devices()[0], "compute_capability", "0.0")
    if tuple(int(x) for x in str(capability).split(".")[:2]) < (9, 0):
        raise NotImplementedError(
            f"packed layouts need compute capability >= 9.0, got {capability}"
        )
    return cudnn_attention


def check_config(*, mask_type: MaskType, window_size: Window, self_attention: bool) -> None:
    """Raises NotImplementedError (with the reason) where cuDNN cannot run this configuration.

    Args:
        mask_type: a parsed ``MaskType``.
        window_size: a parsed window.
        self_attention: whether the key layout is the query's.

    Raises:
        NotImplementedError: no GPU or cuDNN, or a mask/window cuDNN's packed path lacks.

    Example:
        >>> import pytest
        >>> with pytest.raises(NotImplementedError, match="needs a CUDA GPU"):
        ...     check_config(mask_type=MaskType.PADDING, window_size=None, self_attention=True)
    """
    _library()
    if mask_type.is_bottom_right and not self_attention:
        raise NotImplementedError(
            "has no bottom-right mask (self-attention maps it to causal, cross-attention can't)"
        )
    if window_size is not None and not mask_type.uses_positions:
        raise NotImplementedError("applies sliding windows with a causal mask only")


def check_arrays(query: Array, key: Array, value: Array) -> None:
    """Raises NotImplementedError where cuDNN cannot take these arrays (dtype, head dims).

    Args:
        query, key, value: the checked attention inputs, [B, T, H, D] / [B, T, H, D_v].

    Raises:
        NotImplementedError: not bfloat16/float16, or head dims cuDNN's packed path cannot read.

    Example:
        >>> import pytest
        >>> x = jnp.zeros((1, 8, 2, 64))
        >>> with pytest.raises(NotImplementedError, match="bfloat16 or float16"):
        ...     check_arrays(x, x, x)
    """
    if query.dtype not in DTYPES:
        raise NotImplementedError(f"takes bfloat16 or float16 inputs, got {query.dtype}")
    dims = (query.shape[-1], value.shape[-1])
    if any(d % 8 or d > 256 for d in dims):
        raise NotImplementedError(
            f"needs head dims that are multiples of 8 and at most 256, got D, D_v = {dims}"
        )
    if dims[0] != dims[1]:
        raise NotImplementedError(
            f"needs D_v == D with packed layouts (JAX scales the value offsets by the query's "
            f"head dim), got D, D_v = {dims}"
        )


def _inside(offsets: Int[Array, "B S"], lengths: Int[Array, "B S"], seq_len: int) -> Array:
    """bool[B, T]: whether each token lies in one of the intervals ``[offset, offset + length)``."""

    def row(offsets, lengths):
        edges = jnp.zeros(seq_len + 1, jnp.int32)
        edges = edges.at[jnp.where(lengths > 0, offsets, seq_len + 1)].add(1, mode="drop")
        edges = edges.at[jnp.where(lengths > 0, offsets + lengths, seq_len + 1)].add(
            -1, mode="drop"
        )
        return jnp.cumsum(edges[:-1]) > 0

    return jax.vmap(row)(offsets, lengths)


def packed_inputs(meta: SeqMeta, num_slots: int) -> SeqMeta:
    """The compact metadata in the form JAX's packed cuDNN call takes.

    Pads to ``max(num_slots, 2)`` slots (JAX reads offsets only with more than one slot per row),
    and marks empty slots' seqlens -1 so that JAX's left shift keeps seqlens aligned with offsets
    (cuDNN itself then sees trailing zeros).

    Args:
        meta: compact :class:`thdkit.SeqMeta`, int32[B, S] / [B, S + 1].
        num_slots: S.

    Returns:
        :class:`thdkit.SeqMeta` with int32[B, S'] seqlens and [B, S' + 1] offsets, S' >= 2.

    Example:
        >>> meta = SeqMeta(jnp.array([[3]]), jnp.array([[3]]), jnp.array([[0, -1]]),
        ...                jnp.array([[0, -1]]))
        >>> packed_inputs(meta, 1).q_seqlens.tolist(), packed_inputs(meta, 1).q_offsets.tolist()
        ([[3, -1]], [[0, -1, -1]])
    """
    slots = max(num_slots, 2)

    def pad(x: Array, size: int, fill: int) -> Array:
        return jnp.pad(x, ((0, 0), (0, size - x.shape[1])), constant_values=fill)

    q_offsets = pad(meta.q_offsets, slots + 1, -1)
    kv_offsets = pad(meta.kv_offsets, slots + 1, -1)
    q_seqlens = jnp.where(q_offsets[:, :-1] >= 0, pad(meta.q_seqlens, slots, 0), -1)
    kv_seqlens = jnp.where(kv_offsets[:, :-1] >= 0, pad(meta.kv_seqlens, slots, 0), -1)
    return SeqMeta(q_seqlens, kv_seqlens, q_offsets, kv_offsets)


def poisoned_rows(
    spans: tuple[Int[Array, "B T_q"], Int[Array, "B T_q"]],
    bad_q: Bool[Array, "B T_q H_q"],
    bad_kv: Bool[Array, "B T_kv H_kv"],
) -> Bool[Array, "B T_q H_q"]:
    """Query rows with an allowed key and a non-finite query or allowed key/value.

    Exact where each query's allowed keys are the interval ``spans`` (:func:`kv_spans` of the
    configurations cuDNN runs): a prefix sum of the key flags, read at both ends. O(T).

    Args:
        spans: ``(lo, hi)`` int32[B, T_q], each query token's allowed key interval.
        bad_q: bool[B, T_q, H_q]; non-finite query vectors.
        bad_kv: bool[B, T_kv, H_kv]; non-finite key or value vectors.

    Returns:
        bool[B, T_q, H_q].

    Example:
        >>> spans = (jnp.array([[0, 0, 2]]), jnp.array([[1, 2, 2]]))
        >>> bad_kv = jnp.array([[[False], [True], [False]]])
        >>> poisoned_rows(spans, jnp.zeros((1, 3, 1), bool), bad_kv)[0, :, 0].tolist()
        [False, True, False]
    """
    lo, hi = spans
    heads_q, heads_kv = bad_q.shape[-1], bad_kv.shape[-1]
    counts = jnp.cumsum(bad_kv.astype(jnp.int32), axis=1)
    counts = jnp.pad(counts, ((0, 0), (1, 0), (0, 0)))
    hits = jnp.take_along_axis(counts, hi[..., None], axis=1) - jnp.take_along_axis(
        counts, lo[..., None], axis=1
    )
    hits = jnp.repeat(hits > 0, heads_q // heads_kv, axis=-1)
    return (hits | bad_q) & (hi > lo)[..., None]


def spans_of(
    q: Segments,
    kv: Segments,
    *,
    mask_type: MaskType,
    window_size: Window,
) -> tuple[Int[Array, "B T_q"], Int[Array, "B T_q"]]:
    """Every query token's allowed key interval (:func:`kv_spans` of all tokens)."""
    tokens = jnp.broadcast_to(jnp.arange(q.seq_len, dtype=jnp.int32), q.ids.shape)
    return kv_spans(tokens, q, kv, mask_type=mask_type, window_size=window_size)


@functools.partial(jax.jit, static_argnames=("mask_type", "window_size", "scale"))
def cudnn_attention(
    query: Float[Array, "B T_q H_q D"],
    key: Float[Array, "B T_kv H_kv D"],
    value: Float[Array, "B T_kv H_kv D"],
    meta: SeqMeta,
    spans: tuple[Int[Array, "B T_q"], Int[Array, "B T_q"]],
    *,
    mask_type: MaskType,
    window_size: Window,
    scale: float,
) -> Float[Array, "B T_q H_q D"]:
    """cuDNN fused attention on compact metadata; the caller checked support and layout.

    Inputs are sanitised (a select) and rows poisoned by a non-finite input come out NaN, as in
    every implementation; rows outside every segment give zeros.

    Args:
        query, key, value: bfloat16/float16, ``D_v == D``.
        meta: compact :class:`thdkit.SeqMeta` of the layout.
        spans: each query token's allowed key interval (:func:`spans_of`).
        mask_type, window_size: parsed.
        scale: multiplies the logits.

    Returns:
        [B, T_q, H_q, D] in the query's dtype.
    """
    library = _library()
    heads_q, heads_kv = query.shape[2], key.shape[2]
    (query, bad_q), (key, bad_k), (value, bad_v) = (sanitize(x) for x in (query, key, value))
    poisoned = poisoned_rows(spans, bad_q, bad_k | bad_v)
    if heads_kv != heads_q:  # JAX scales kv offsets by the query's heads: repeat to match.
        key, value = (jnp.repeat(x, heads_q // heads_kv, axis=2) for x in (key, value))
    packed = packed_inputs(meta, meta.q_seqlens.shape[-1])
    active_q = _inside(packed.q_offsets[:, :-1], packed.q_seqlens, query.shape[1])
    active_kv = _inside(packed.kv_offsets[:, :-1], packed.kv_seqlens, key.shape[1])
    active_q, active_kv = active_q[:, :, None, None], active_kv[:, :, None, None]
    left = window_bound(window_size, 0)
    # Rows outside every segment are never written by the kernel: select zeros for them, and
    # select the inputs so that their gradients are zeros as well.
    out = library.dot_product_attention(
        jnp.where(active_q, query, 0),
        jnp.where(active_kv, key, 0),
        jnp.where(active_kv, value, 0),
        q_seqlen=packed.q_seqlens,
        kv_seqlen=packed.kv_seqlens,
        q_offsets=packed.q_offsets,
        kv_offsets=packed.kv_offsets,
        scale=scale,
        mask_type=(
            library.MaskType.PADDING_CAUSAL
            if mask_type.uses_positions
            else library.MaskType.PADDING
        ),
        qkv_layout="BTNH",
        sliding_window_length=None if left is None else left + 1,
    )
    out = jnp.where(active_q, out, 0)
    return jnp.where(poisoned[..., None], jnp.nan, out).astype(query.dtype)


TRACED = (
    "traced layout: cannot prove the varlen format expresses it; build the plan from concrete "
    "segments outside jit, or use blockwise"
)


def check_layout(
    q: Segments,
    kv: Segments | None,
    *,
    mask_type: MaskType,
    window_size: Window,
    num_segments: int,
) -> Bool[Array, " B"] | None:
    """Checks that compact metadata expresses the layout; returns the per-row result or None.

    Self-attention without a window always holds (:func:`thdkit.attention.is_representable`),
    and needs no check (None). Otherwise the layout must be concrete and every row representable.

    Args:
        q: the queries' :class:`thdkit.Segments`; kv: the keys', or None for self-attention.
        mask_type, window_size: parsed.
        num_segments: S.

    Returns:
        bool[B] (all True) or None.

    Raises:
        NotImplementedError: a traced layout that needs the check, or rows compact metadata
            cannot express (listed).

    Example:
        >>> seg = Segments.from_ids(jnp.array([[1, 1]]))
        >>> check_layout(seg, None, mask_type=MaskType.CAUSAL, window_size=None,
        ...              num_segments=1) is None
        True
    """
    left = window_bound(window_size, 0)
    if kv is None and left is None:
        return None
    layouts = [(side.ids, side.positions) for side in (q, kv) if side is not None]
    if not is_concrete(*(a for layout in layouts for a in layout)):
        raise NotImplementedError(TRACED)
    rows = representable_rows(
        layouts[0],
        layouts[1] if kv is not None else None,
        mask_type=mask_type,
        num_segments=num_segments,
        window_left=left,
    )
    if not bool(jnp.all(rows)):
        bad = jnp.flatnonzero(~rows).tolist()
        raise NotImplementedError(f"compact metadata cannot express this layout (rows {bad})")
    return rows


def run(query: Array, key: Array, value: Array, plan: Any, *, scale: float) -> Array:
    """The candidate's entry: :func:`cudnn_attention` on an ``AttentionPlan``'s fields."""
    return cudnn_attention(
        query,
        key,
        value,
        plan.metadata,
        plan.spans,
        mask_type=plan.mask_type,
        window_size=plan.window_size,
        scale=scale,
    )
