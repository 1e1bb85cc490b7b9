"""FlashAttention's varlen form: ``unpad`` gathers the real tokens, ``pad`` puts them back.

Axis legend: B batch, T row length, N = B·T the flattened token axis, n the real (non-padding)
tokens of the whole batch, M the documents of the whole batch.

FlashAttention's ``flash_attn_varlen_func`` (and Hugging Face's flash-attention path) reads the
tokens of all documents **back to back**, without padding, and ``cu_seqlens`` over that gathered
axis: document k covers ``[cu_seqlens[k], cu_seqlens[k + 1])``. That is not the padded axis:
:meth:`thdkit.SeqMeta.flat` gives offsets over the padded ``[B*T]`` axis (the TE/cuDNN
convention, where a document after a padding token starts past it), and passing those to
FlashAttention reads the padding. :func:`unpad` builds FlashAttention's form from a packed
layout; :func:`pad` is its inverse, as ``flash_attn.bert_padding``'s ``unpad_input`` /
``pad_input`` (with one document a row) and ``unpad_input_for_concatenated_sequences`` (several).
"""

from __future__ import annotations

import functools
import operator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Int, Shaped

import thdkit

__all__ = ["Unpadded", "pad", "unpad"]


class Unpadded(NamedTuple):
    """The real tokens of a packed batch, back to back, and their varlen metadata.

    Unpacks like the first four results of FlashAttention's ``unpad_input``:
    ``x, indices, cu_seqlens, max_seqlen = thdkit.unpad(x, segments)``.

    Attributes:
        x: [n, ...] (or [capacity, ...]): the non-padding tokens in row-major order; entries
            past the real tokens (with ``capacity``) are zeros.
        indices: int32[n] (or [capacity]): each gathered token's index in the flattened
            ``[B*T]`` axis; entries past the real tokens hold ``B*T`` (out of range: :func:`pad`
            drops them).
        cu_seqlens: int32[M + 1] (or [max_documents + 1]): document k covers
            ``x[cu_seqlens[k]:cu_seqlens[k + 1]]``; starts at 0, ends at n; slots past the
            documents repeat n (empty documents, which varlen kernels skip).
        max_seqlen: the longest document: a Python int when the layout is concrete, an int32
            scalar under ``jit``.
    """

    x: Shaped[Array, "n ..."]
    indices: Int[Array, " n"]
    cu_seqlens: Int[Array, " M1"]
    max_seqlen: int | Int[Array, ""]


def _static_int(value: Any, name: str, *, low: int) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def _ids(segments: Any) -> Array:
    """Segment ids int32[B, T] of a Segments, an id array, or a boolean attention mask."""
    if isinstance(segments, thdkit.Segments):
        ids = segments.ids
    else:
        ids = jnp.asarray(segments)
        if ids.dtype == jnp.bool_:  # FlashAttention's attention_mask: one document a row
            ids = ids.astype(jnp.int32)
        elif not jnp.issubdtype(ids.dtype, jnp.integer):
            raise TypeError(
                "segments must be a thdkit.Segments, integer segment ids or a boolean "
                f"attention mask, got dtype {ids.dtype}"
            )
        if ids.ndim != 2:
            raise ValueError(f"segments must have shape [B, T], got {ids.shape}")
        ids = thdkit.Segments.from_ids(ids).ids  # checks the layout when concrete
    if ids.ndim != 2:
        raise ValueError(f"segments must have [B, T] fields, got shape {ids.shape}")
    return ids


def unpad(
    x: Shaped[ArrayLike, "B T ..."],
    segments: thdkit.Segments | Int[ArrayLike, "B T"],
    *,
    capacity: int | None = None,
    max_documents: int | None = None,
) -> Unpadded:
    """The non-padding tokens of ``x``, back to back, with FlashAttention's ``cu_seqlens``.

    A document is a run of one non-zero segment id in a row (docs/semantics.md); documents are
    numbered in row-major order across the batch, and every token whose id is not 0 is kept (the
    kernel applies causality inside each document).

    Shapes: the number of real tokens n and of documents M depend on the data. On a concrete
    layout they are exact (``max_seqlen`` a Python int, as FlashAttention's ``.item()``). Under
    ``jit`` pass ``capacity`` (a static int >= n, e.g. ``B*T`` or a token budget): ``x`` and
    ``indices`` get ``capacity`` entries (zeros and ``B*T`` past n), ``cu_seqlens``
    ``max_documents + 1`` (default ``capacity + 1``, as every document has a token), and
    ``max_seqlen`` is a traced int32. Under ``jit`` a ``capacity`` below n drops the tokens past
    it (not checked); eagerly it raises.

    Args:
        x: [B, T, ...] (any trailing dims, any dtype): hidden states, q/k/v, token ids...
        segments: a :class:`thdkit.Segments` ([B, T] fields), integer segment ids [B, T]
            (0 = padding), or a boolean attention mask [B, T] (FlashAttention's: True = token,
            one document a row).
        capacity: a static int >= n, or None for exactly n (concrete layouts only).
        max_documents: a static int >= M, or None: exactly M on a concrete layout without
            ``capacity``, else ``capacity``.

    Returns:
        :class:`Unpadded` ``(x, indices, cu_seqlens, max_seqlen)``.

    Raises:
        TypeError: non-integer ids or a non-int ``capacity`` / ``max_documents``.
        ValueError: shapes ([B, T] ids matching ``x``'s leading dims), a ``capacity`` or
            ``max_documents`` below 1 or (concrete layouts) below n or M, ``capacity=None`` for a
            traced layout, or (concrete ids) a broken layout rule.

    Example:
        The README's row: document 3 comes after two padding tokens, so its start in the
        gathered axis is 5, not its padded offset 7:

        >>> ids = jnp.array([[1, 1, 1, 2, 2, 0, 0, 3]])
        >>> x = jnp.arange(8.0).reshape(1, 8, 1)
        >>> tokens, indices, cu_seqlens, max_seqlen = unpad(x, ids)
        >>> tokens[:, 0].tolist(), indices.tolist(), cu_seqlens.tolist(), max_seqlen
        ([0.0, 1.0, 2.0, 3.0, 4.0, 7.0], [0, 1, 2, 3, 4, 7], [0, 3, 5, 6], 3)
        >>> pad(tokens, indices, 1, 8)[0, :, 0].tolist()
        [0.0, 1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 7.0]
    """
    ids = _ids(segments)
    x = jnp.asarray(x)
    if x.shape[:2] != ids.shape:
        raise ValueError(
            f"x must have leading dims [B, T] = {ids.shape} like segments, got shape {x.shape}"
        )
    concrete = not isinstance(ids, jax.core.Tracer)
    if concrete:
        host = np.asarray(ids)
        total = int(np.count_nonzero(host))
        starts = host[:, 1:] != host[:, :-1]
        documents = int(
            np.count_nonzero(host[:, :1]) + np.count_nonzero(starts & (host[:, 1:] != 0))
        )
    if capacity is None:
        if not concrete:
            raise ValueError(
                "the layout is traced (under jit): pass capacity= (a static int >= the number of "
                "real tokens, e.g. B*T) so that the shapes are static"
            )
        capacity = total
        max_documents = documents if max_documents is None else max_documents
    capacity = _static_int(capacity, "capacity", low=1)
    max_documents = capacity if max_documents is None else max_documents
    max_documents = _static_int(max_documents, "max_documents", low=1)
    if concrete and capacity < total:
        raise ValueError(f"capacity={capacity} is below the {total} real tokens")
    if concrete and max_documents < documents:
        raise ValueError(f"max_documents={max_documents} is below the {documents} documents")
    gathered, indices, cu_seqlens, max_seqlen = _unpad(
        x, ids, capacity=capacity, max_documents=max_documents
    )
    return Unpadded(gathered, indices, cu_seqlens, int(max_seqlen) if concrete else max_seqlen)


@functools.partial(jax.jit, static_argnames=("capacity", "max_documents"))
def _unpad(
    x: Array, ids: Array, *, capacity: int, max_documents: int
) -> tuple[Array, Array, Array, Array]:
    """:func:`unpad` at static sizes (jitted: an eager call compiles once per shape)."""
    batch, seq_len = ids.shape
    size = batch * seq_len
    flat = ids.reshape(-1)
    keep = flat != 0
    first = (jnp.arange(size) % seq_len) == 0
    previous = jnp.concatenate([jnp.zeros((1,), flat.dtype), flat[:-1]])
    start = keep & (first | (flat != previous))
    (indices,) = jnp.nonzero(keep, size=capacity, fill_value=size)
    (starts,) = jnp.nonzero(start, size=max_documents, fill_value=size)
    indices, starts = indices.astype(jnp.int32), starts.astype(jnp.int32)
    n = jnp.sum(keep, dtype=jnp.int32)
    rank = jnp.concatenate([jnp.cumsum(keep, dtype=jnp.int32) - 1, n[None]])
    cu_seqlens = jnp.concatenate([rank[starts], n[None]])
    max_seqlen = jnp.max(jnp.diff(cu_seqlens), initial=0)
    gathered = x.reshape(size, *x.shape[2:]).at[indices].get(mode="fill", fill_value=0)
    return gathered, indices, cu_seqlens, max_seqlen


def pad(
    x: Shaped[ArrayLike, "n ..."],
    indices: Int[ArrayLike, " n"],
    batch: int,
    seq_len: int,
) -> Shaped[Array, "B T ..."]:
    """The inverse of :func:`unpad` (FlashAttention's ``pad_input``): tokens back to their rows.

    Every ``x[i]`` goes to flattened position ``indices[i]`` of ``[batch*seq_len]``; positions
    that receive nothing (the padding) are zeros, and out-of-range indices (``unpad``'s fill past
    the real tokens) are dropped. Differentiable (a scatter; its gradient is the gather).

    Args:
        x: [n, ...], any dtype: the gathered tokens (e.g. the output of a varlen kernel).
        indices: int[n]: from :func:`unpad`; each in ``[0, batch*seq_len)`` or dropped.
        batch: B, a static int >= 0.
        seq_len: T, a static int >= 1.

    Returns:
        [batch, seq_len, ...] in ``x``'s dtype.

    Raises:
        TypeError: non-integer ``indices``, non-int ``batch`` / ``seq_len``.
        ValueError: ``indices`` not 1-D or not as long as ``x``, ``batch < 0``, ``seq_len < 1``.

    Example:
        >>> pad(jnp.array([1.0, 2.0]), jnp.array([1, 2]), 1, 4).tolist()
        [[0.0, 1.0, 2.0, 0.0]]
    """
    x = jnp.asarray(x)
    indices = jnp.asarray(indices)
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise TypeError(f"indices must be an integer array, got dtype {indices.dtype}")
    if indices.ndim != 1 or x.ndim < 1 or indices.shape[0] != x.shape[0]:
        raise ValueError(
            f"indices must be 1-D with one entry per token of x, got shapes {indices.shape} "
            f"and {x.shape}"
        )
    batch = _static_int(batch, "batch", low=0)
    seq_len = _static_int(seq_len, "seq_len", low=1)
    return _pad(x, indices, batch=batch, seq_len=seq_len)


@functools.partial(jax.jit, static_argnames=("batch", "seq_len"))
def _pad(x: Array, indices: Array, *, batch: int, seq_len: int) -> Array:
    out = jnp.zeros((batch * seq_len, *x.shape[1:]), x.dtype)
    out = out.at[indices].set(x, mode="drop")
    return out.reshape(batch, seq_len, *x.shape[1:])
