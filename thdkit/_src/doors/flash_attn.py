"""FlashAttention's varlen form: ``unpad`` gathers the real tokens, ``pad`` puts them back.

Axis legend: B batch, T row length, N = B·T the flattened token axis, n the real (non-padding)
tokens of the whole batch, M the sequences ``cu_seqlens`` lists (the documents of the whole batch,
and one empty sequence for each row without a real token).

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
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Int, Shaped

from thdkit._src.limits import check_int, check_max_segments, is_concrete
from thdkit._src.segments import Segments, segments_from_ids
from thdkit._src.validate.inputs import int32_array
from thdkit._src.validate.segments import as_segments, validate_segments

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
        cu_seqlens: int32[M + 1] (or [B*S + 1] with ``max_segments_per_seq=S``): sequence k covers
            ``x[cu_seqlens[k]:cu_seqlens[k + 1]]``. The sequences are, row by row, the row's
            documents in order, and one empty sequence for a row without any real token; so
            with one document a row (an attention mask) sequence b is row b and ``M = B``, as
            FlashAttention's ``unpad_input`` gives. Starts at 0, ends at n; with a fixed
            size, slots past the sequences repeat n (empty sequences, which kernels skip).
        max_seqlen: the longest sequence (0 when there is no real token): a Python int when
            the layout is concrete, an int32 scalar under ``jit``.
    """

    x: Shaped[Array, "n ..."]
    indices: Int[Array, " n"]
    cu_seqlens: Int[Array, " M1"]
    max_seqlen: int | Int[Array, ""]


def _ids(segments: Any) -> Array:
    """Segment ids int32[B, T] of a Segments, an id array, or a boolean attention mask, checked
    (when concrete) with messages that name ``segments``; nothing is cast before its check."""
    if isinstance(segments, Segments):
        as_segments(segments, "segments", rows=True)
        validate_segments(segments, name="segments", global_lengths=True)
        ids = segments.ids
        return int32_array(ids, "segments.ids") if is_concrete(ids) else ids.astype(jnp.int32)
    if not hasattr(segments, "dtype"):
        segments = np.asarray(segments)  # lists: NumPy of their own width, never cast here
    dtype = segments.dtype
    if dtype == np.bool_:  # FlashAttention's attention_mask: one document a row
        if segments.ndim != 2:
            raise ValueError(f"segments must have shape [B, T], got {segments.shape}")
        if is_concrete(segments):
            _check_mask(np.asarray(segments))
        return jnp.asarray(segments).astype(jnp.int32)
    if dtype.kind not in "iuO":
        raise TypeError(
            "segments must be a thdkit.Segments, integer segment ids or a boolean attention "
            f"mask, got dtype {dtype}"
        )
    if segments.ndim != 2:
        raise ValueError(f"segments must have shape [B, T], got {segments.shape}")
    return jnp.asarray(segments_from_ids(segments, name="segments").ids)


def _check_mask(mask: np.ndarray) -> None:
    """A boolean attention mask holds one document a row: its real tokens are contiguous."""
    starts = mask & ~np.pad(mask, ((0, 0), (1, 0)))[:, :-1]
    later = np.cumsum(starts, axis=1) > 1
    if later.any():
        row, token = (int(i) for i in np.argwhere(later & starts)[0])
        raise ValueError(
            f"segments (a boolean attention mask) row {row}, token {token}: a real token after "
            "a padding hole; a mask holds one document a row, whose tokens must be contiguous "
            "(left or right padding only). Mark several documents a row with integer segment ids"
        )


def unpad(
    x: Shaped[ArrayLike, "B T ..."],
    segments: Segments | Int[ArrayLike, "B T"] | Bool[ArrayLike, "B T"],
    *,
    capacity: int | None = None,
    max_segments_per_seq: int | None = None,
    max_documents: int | None = None,
) -> Unpadded:
    """The non-padding tokens of ``x``, back to back, with FlashAttention's ``cu_seqlens``.

    A document is a run of one non-zero segment id in a row (docs/semantics.md); every token
    whose id is not 0 is kept (the kernel applies causality inside each document).
    ``cu_seqlens`` lists, row by row, each row's documents in order, and **one empty sequence
    for a row without any real token**. With one document a row (FlashAttention's boolean
    ``attention_mask``, or ids 0/1) that is FlashAttention's ``unpad_input`` exactly:
    ``B + 1`` entries, ``cu_seqlens[b]:cu_seqlens[b + 1]`` is row b, an empty row a
    zero-length entry. With several documents a row it is FlashAttention's
    ``unpad_input_for_concatenated_sequences`` (sequence k is the k-th document in row-major
    order, so entry b is not row b), except that a row without documents still adds its empty
    sequence (FlashAttention's adds none).

    Shapes: the number of real tokens n and of sequences M depend on the data. On a concrete
    layout they are exact (``max_seqlen`` a Python int, as FlashAttention's ``.item()``); a
    layout with no real token (or no row) gives empty ``x`` and ``indices``. Under ``jit`` pass
    ``capacity`` (a static int >= n, e.g. ``B*T`` or a token budget): ``x`` and ``indices`` get
    ``capacity`` entries (zeros and ``B*T`` past n), ``cu_seqlens`` ``B*S + 1`` with
    ``max_segments_per_seq=S`` (else ``min(capacity + B, B*T) + 1``, enough for every layout
    that fits ``capacity``), and ``max_seqlen`` is a traced int32. Under ``jit`` nothing is
    checked: a ``capacity`` too small drops the tokens past it, and ``cu_seqlens`` keeps the
    first ``B*S`` sequences of the batch (eagerly a row of more than S documents raises); a
    traced layout that breaks a rule is read run by run (a mask with a padding hole gives a
    sequence per stretch of real tokens; eagerly it raises).

    Args:
        x: [B, T, ...] (any trailing dims, any dtype): hidden states, q/k/v, token ids...
        segments: a :class:`thdkit.Segments` ([B, T] fields), integer segment ids [B, T]
            (0 = padding; any integer dtype, checked before any cast), or a boolean attention
            mask [B, T] (FlashAttention's: True = token, one document a row).
        capacity: a static int >= n, or None for exactly n (concrete layouts only).
        max_segments_per_seq: S, a static int >= the documents of any row (a row without any
            still adds one empty sequence, so at least 1): ``cu_seqlens`` gets ``B*S + 1``
            entries; or None: exactly M + 1 on a concrete layout without ``capacity``, else
            ``min(capacity + B, B*T) + 1``.
        max_documents: deprecated (a ``DeprecationWarning``): the number M of sequences of the
            whole batch, ``cu_seqlens`` getting ``max_documents + 1`` entries; pass
            ``max_segments_per_seq`` (``max_documents=B*S`` is ``max_segments_per_seq=S``).

    Returns:
        :class:`Unpadded` ``(x, indices, cu_seqlens, max_seqlen)``.

    Raises:
        TypeError: ``segments`` neither Segments, integer nor boolean; a non-int ``capacity`` /
            ``max_segments_per_seq``; ``max_documents`` with ``max_segments_per_seq``.
        ValueError: shapes (``segments`` not [B, T] or not matching ``x``'s leading dims), a
            negative ``capacity``, ``max_segments_per_seq`` outside ``[1, MAX_SEGMENTS]``, or
            (concrete layouts) a ``capacity`` below n or a row of more than
            ``max_segments_per_seq`` documents, ``capacity=None`` for a traced layout, or
            (concrete ``segments``) a broken layout rule or a value outside int32, naming
            ``segments``, the row and the token.

    Warns:
        DeprecationWarning: ``max_documents``; pass ``max_segments_per_seq``.

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

        An attention mask whose first row is all padding: one entry a row, as FlashAttention's
        ``unpad_input``:

        >>> mask = jnp.array([[False, False, False], [True, True, True]])
        >>> unpad(jnp.ones((2, 3)), mask).cu_seqlens.tolist()
        [0, 0, 3]

        Under ``jit`` the sizes are static: ``capacity`` tokens, ``B*S + 1`` entries of
        ``cu_seqlens`` (the slots past the sequences repeat n):

        >>> fixed = jax.jit(lambda i: unpad(x, i, capacity=8, max_segments_per_seq=4))(ids)
        >>> fixed.cu_seqlens.tolist(), int(fixed.max_seqlen)
        ([0, 3, 5, 6, 6], 3)
    """
    if max_documents is not None:
        if max_segments_per_seq is not None:
            raise TypeError(
                "pass max_segments_per_seq or max_documents (deprecated), not both; got "
                f"max_segments_per_seq={max_segments_per_seq!r} and "
                f"max_documents={max_documents!r}"
            )
        warnings.warn(
            "unpad's max_documents (the sequences of the whole batch) is deprecated: pass "
            "max_segments_per_seq=S, the most documents a row holds (cu_seqlens then has "
            "B*S + 1 entries; max_documents=B*S is max_segments_per_seq=S)",
            DeprecationWarning,
            stacklevel=2,
        )
        max_documents = check_int(max_documents, "max_documents", low=0)
    if max_segments_per_seq is not None:
        max_segments_per_seq = check_max_segments(max_segments_per_seq)
    ids = _ids(segments)
    x = jnp.asarray(x)
    if x.shape[:2] != ids.shape:
        raise ValueError(
            f"x must have leading dims [B, T] = {ids.shape} like segments, got shape {x.shape}"
        )
    batch, seq_len = ids.shape
    concrete = is_concrete(ids)
    if concrete:
        host = np.asarray(ids)
        total = int(np.count_nonzero(host))
        starts = (host[:, 1:] != host[:, :-1]) & (host[:, 1:] != 0)
        # Each row's sequences: its documents, or one empty sequence for a row without any.
        per_row = np.maximum(np.count_nonzero(host[:, :1], axis=1) + starts.sum(axis=1), 1)
        documents = int(per_row.sum())
    if capacity is None:
        if not concrete:
            raise ValueError(
                "the layout is traced (under jit): pass capacity= (a static int >= the number of "
                "real tokens, e.g. B*T) so that the shapes are static"
            )
        capacity = total
        if max_documents is None and max_segments_per_seq is None:
            max_documents = documents
    capacity = check_int(capacity, "capacity", low=0)
    if concrete and capacity < total:
        raise ValueError(f"capacity={capacity} is below the {total} real tokens of segments")
    if max_segments_per_seq is not None:
        sequences = batch * max_segments_per_seq
        if concrete and per_row.size and per_row.max() > max_segments_per_seq:
            row = int(np.argmax(per_row))
            raise ValueError(
                f"max_segments_per_seq={max_segments_per_seq} is below the {int(per_row[row])} "
                f"documents of segments row {row}"
            )
    elif max_documents is not None:
        sequences = max_documents
        if concrete and sequences < documents:
            raise ValueError(
                f"max_documents={sequences} is below the {documents} sequences of segments "
                "(its documents, and one empty sequence for each row without a real token)"
            )
    else:  # enough for every layout that fits capacity
        sequences = min(capacity + batch, batch * seq_len)
    gathered, indices, cu_seqlens, max_seqlen = _unpad(
        x, ids, capacity=capacity, sequences=sequences
    )
    return Unpadded(gathered, indices, cu_seqlens, int(max_seqlen) if concrete else max_seqlen)


@functools.partial(jax.jit, static_argnames=("capacity", "sequences"))
def _unpad(
    x: Array, ids: Array, *, capacity: int, sequences: int
) -> tuple[Array, Array, Array, Array]:
    """:func:`unpad` at static sizes, ``sequences`` entries of ``cu_seqlens`` but the last
    (jitted: an eager call compiles once per shape)."""
    batch, seq_len = ids.shape
    size = batch * seq_len
    keep = ids != 0
    first = jnp.broadcast_to(jnp.arange(seq_len) == 0, ids.shape)
    previous = jnp.concatenate([jnp.zeros((batch, 1), ids.dtype), ids[:, :-1]], axis=1)
    start = keep & (first | (ids != previous))
    empty_row = first & ~jnp.any(keep, axis=1, keepdims=True)  # its one empty sequence
    keep, start = keep.reshape(-1), (start | empty_row).reshape(-1)
    (indices,) = jnp.nonzero(keep, size=capacity, fill_value=size)
    (starts,) = jnp.nonzero(start, size=sequences, fill_value=size)
    indices, starts = indices.astype(jnp.int32), starts.astype(jnp.int32)
    # The real tokens before each flattened position (n at position B*T, the fill).
    before = jnp.cumsum(keep, dtype=jnp.int32)
    n = before[-1] if size else jnp.int32(0)
    before = jnp.concatenate([jnp.zeros((1,), jnp.int32), before])
    cu_seqlens = jnp.concatenate([before[starts], n[None]])
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
    that receive nothing (the padding) are zeros. ``indices[i] == batch*seq_len`` (``unpad``'s
    fill past the real tokens) writes nothing. Any other index outside ``[0, batch*seq_len)``,
    negative ones included, is an error when ``indices`` is concrete; under ``jit`` (not
    checked) it writes nothing either, never wrapping around to count from the end.
    Differentiable (a scatter; its gradient is the gather).

    Args:
        x: [n, ...], any dtype: the gathered tokens (e.g. the output of a varlen kernel).
        indices: int[n] (any integer dtype): from :func:`unpad`; each in
            ``[0, batch*seq_len]``, the last value meaning "no slot".
        batch: B, a static int >= 0.
        seq_len: T, a static int >= 1.

    Returns:
        [batch, seq_len, ...] in ``x``'s dtype.

    Raises:
        TypeError: non-integer ``indices``, non-int ``batch`` / ``seq_len``.
        ValueError: ``indices`` not 1-D or not as long as ``x``, ``batch < 0``, ``seq_len < 1``,
            ``batch * seq_len`` beyond int32, or (concrete ``indices``) an index outside
            ``[0, batch*seq_len]``, naming its position and value.

    Example:
        >>> pad(jnp.array([1.0, 2.0]), jnp.array([1, 2]), 1, 4).tolist()
        [[0.0, 1.0, 2.0, 0.0]]
        >>> pad(jnp.array([1.0, 2.0]), jnp.array([1, -1]), 1, 4)
        Traceback (most recent call last):
        ...
        ValueError: indices[1] = -1 is outside [0, 4] (batch * seq_len = 4 slots; 4 means none)
    """
    x = jnp.asarray(x)
    if not hasattr(indices, "dtype"):
        indices = np.asarray(indices)  # lists: NumPy of their own width, checked before a cast
    if indices.dtype == np.bool_ or not jnp.issubdtype(indices.dtype, jnp.integer):
        raise TypeError(f"indices must be an integer array, got dtype {indices.dtype}")
    if indices.ndim != 1 or x.ndim < 1 or indices.shape[0] != x.shape[0]:
        raise ValueError(
            f"indices must be 1-D with one entry per token of x, got shapes {indices.shape} "
            f"and {x.shape}"
        )
    batch = check_int(batch, "batch", low=0)
    seq_len = check_int(seq_len, "seq_len", low=1)
    size = batch * seq_len
    if size > np.iinfo(np.int32).max:
        raise ValueError(f"batch * seq_len = {size} exceeds the int32 range of the indices")
    if is_concrete(indices):
        host = np.asarray(indices)
        bad = np.flatnonzero((host < 0) | (host > size))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"indices[{i}] = {int(host[i])} is outside [0, {size}] (batch * seq_len = "
                f"{size} slots; {size} means none)"
            )
        indices = host.astype(np.int32)
    return _pad(x, jnp.asarray(indices), batch=batch, seq_len=seq_len)


@functools.partial(jax.jit, static_argnames=("batch", "seq_len"))
def _pad(x: Array, indices: Array, *, batch: int, seq_len: int) -> Array:
    size = batch * seq_len
    out = jnp.zeros((size, *x.shape[1:]), x.dtype)
    # A negative index would count from the end: send it (and every index past the slots) to
    # size, which the scatter drops.
    indices = jnp.where((indices < 0) | (indices > size), size, indices)
    out = out.at[indices].set(x, mode="drop")
    return out.reshape(batch, seq_len, *x.shape[1:])
