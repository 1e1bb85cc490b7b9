"""JAX's cuDNN fused attention fed with compact metadata (GPU, representable layouts only).

:class:`Cudnn` is the first implementation of the default order
(:mod:`thdkit._src.kernels.builtins`); its checks raise ``NotImplementedError`` with the reason it
cannot run (no GPU, a mask type cuDNN's packed path lacks, a layout compact metadata cannot
express, a dtype or head dim it cannot take), and the next implementation runs instead.

JAX's packed path (``_fix_seqlen_offsets`` in ``jax/_src/cudnn/fused_attention_stablehlo.py``)
scales the key/value offsets by the *query's* heads (jax 0.10 and 0.11; jax 0.12 by the key's)
and by the query's head dim (all of them). :func:`cudnn_attention` therefore repeats key/value
heads up to the query's (GQA/MQA; right on every version) and requires ``D_v == D``, so that
every offset addresses the intended key and value element.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from thdkit._src.isolation import poison, sanitize
from thdkit._src.kernels.base import Implementation
from thdkit._src.kernels.config import AttentionConfig
from thdkit._src.kernels.representable import representable_rows
from thdkit._src.kernels.tiles import kv_spans
from thdkit._src.limits import is_concrete
from thdkit._src.mask_types import MaskType, Window, window_bound
from thdkit._src.metadata import segments_metadata
from thdkit._src.programs import program
from thdkit._src.segments import Segments
from thdkit._src.seqmeta import SeqMeta

__all__ = [
    "DTYPES",
    "TRACED",
    "Cudnn",
    "cudnn_attention",
    "packed_inputs",
    "poisoned_rows",
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


@program(static_argnames=("mask_type", "window_size", "scale"))
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
    return poison(out, None, poisoned)[0].astype(query.dtype)


TRACED = (
    "traced layout: cannot prove the varlen format expresses it; build the plan from concrete "
    "segments outside jit, or use blockwise"
)


class Cudnn(Implementation):
    """cuDNN's fused attention (through ``jax.nn``'s cuDNN path) on compact metadata.

    GPU only, bfloat16/float16, and only where compact metadata expresses the mask (always for
    self-attention without a window; otherwise checked on concrete layouts). Its auxiliary data
    is the compact :class:`thdkit.SeqMeta` and every query's allowed key interval (it poisons
    rows from them). It returns no log-sum-exp, so context parallelism cannot use it.
    """

    name = "cudnn"
    returns_lse = False

    def check_config(self, config: AttentionConfig) -> None:
        """Raises NotImplementedError without a GPU and cuDNN, or for a mask/window cuDNN's
        packed path lacks.

        Example:
            >>> import pytest
            >>> config = AttentionConfig.parse(mask_type="padding", window_size=None,
            ...     max_segments_per_seq=1, seq_q=8, seq_kv=8, self_attention=True)
            >>> with pytest.raises(NotImplementedError, match="needs a CUDA GPU"):
            ...     Cudnn().check_config(config)
        """
        _library()
        if config.mask_type.is_bottom_right and not config.self_attention:
            raise NotImplementedError(
                "has no bottom-right mask (self-attention maps it to causal, cross-attention can't)"
            )
        if config.window_size is not None and not config.mask_type.uses_positions:
            raise NotImplementedError("applies sliding windows with a causal mask only")

    def check_segments(self, q: Segments, kv: Segments, config: AttentionConfig) -> None:
        """Raises NotImplementedError where compact metadata cannot express these Segments.

        Self-attention without a window always holds (:func:`thdkit.kernels.is_representable`)
        and reads nothing. Otherwise the layout must be concrete and every row representable.

        Example:
            >>> seg = Segments.from_ids(jnp.array([[1, 1]]))
            >>> config = AttentionConfig.parse(mask_type="causal", window_size=None,
            ...     max_segments_per_seq=1, seq_q=2, seq_kv=2, self_attention=True)
            >>> Cudnn().check_segments(seg, seg, config)
        """
        left = window_bound(config.window_size, 0)
        if config.self_attention and left is None:
            return
        sides = [q] if config.self_attention else [q, kv]
        if not is_concrete(*(a for side in sides for a in (side.ids, side.positions))):
            raise NotImplementedError(TRACED)
        rows = representable_rows(
            q,
            None if config.self_attention else kv,
            mask_type=config.mask_type,
            num_segments=config.max_segments_per_seq,
            window_left=left,
        )
        if not bool(jnp.all(rows)):
            bad = jnp.flatnonzero(~rows).tolist()
            raise NotImplementedError(f"compact metadata cannot express this layout (rows {bad})")

    def prepare(self, q: Segments, kv: Segments, config: AttentionConfig) -> Any:
        metadata = segments_metadata(
            q,
            None if config.self_attention else kv,
            mask_type=config.mask_type,
            max_segments_per_seq=config.max_segments_per_seq,
        )
        return metadata, spans_of(q, kv, mask_type=config.mask_type, window_size=config.window_size)

    def check_arrays(self, query: Array, key: Array, value: Array) -> None:
        """Raises NotImplementedError where cuDNN cannot take these arrays (dtype, head dims).

        Example:
            >>> import pytest
            >>> x = jnp.zeros((1, 8, 2, 64))
            >>> with pytest.raises(NotImplementedError, match="bfloat16 or float16"):
            ...     Cudnn().check_arrays(x, x, x)
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
                f"needs D_v == D with packed layouts (JAX scales the value offsets by the "
                f"query's head dim), got D, D_v = {dims}"
            )

    def forward(self, query, key, value, q, kv, aux, config, *, scale):
        metadata, spans = aux
        out = cudnn_attention(
            query,
            key,
            value,
            metadata,
            spans,
            mask_type=config.mask_type,
            window_size=config.window_size,
            scale=scale,
        )
        return out, None
