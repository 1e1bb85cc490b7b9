"""The metadata's containers: :class:`SeqMeta` (per-row seqlens and offsets) and its flat form.

:func:`thdkit.seqlens_and_offsets` returns a :class:`SeqMeta`; :meth:`SeqMeta.flat` gives the
cumulative form over a flattened ``[B*T]`` token axis, whose offsets count the padding (the
TE/cuDNN convention; FlashAttention's contiguous form is :func:`thdkit.unpad`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from thdkit._src.limits import MAX_SEQ_LEN, check_int, is_concrete

__all__ = ["FlatSeqMeta", "SeqMeta"]


class FlatSeqMeta(NamedTuple):
    """Metadata for kernels that take a flattened ``[B*T]`` token axis (single batch dim).

    Attributes:
        cu_seqlens_q: int32[B*S+1]; cumulative q seqlens, starting at 0.
        cu_seqlens_kv: int32[B*S+1]; cumulative kv seqlens.
        q_starts: int32[B*S]; start of each q segment in flattened coordinates (row b's offset
            plus ``b * T_q``), -1 where the slot is empty.
        kv_starts: int32[B*S]; the same for kv (``b * T_kv``).
    """

    cu_seqlens_q: Int[Array, " BS1"]
    cu_seqlens_kv: Int[Array, " BS1"]
    q_starts: Int[Array, " BS"]
    kv_starts: Int[Array, " BS"]


class SeqMeta(NamedTuple):
    """Per-segment lengths and start offsets of one batch of packed rows (a pytree).

    Attributes:
        q_seqlens: int32[*B, S]; active query tokens of each segment.
        kv_seqlens: int32[*B, S]; active key/value tokens of each segment.
        q_offsets: int32[*B, S+1]; index of each segment's first active query token, -1 after.
        kv_offsets: int32[*B, S+1]; the same for keys/values.

    In the compact format, slot k of every array describes the k-th surviving segment of the row,
    seqlens padded with 0; in the raw format seqlens are indexed by segment id - 1.
    """

    q_seqlens: Int[Array, "*B S"]
    kv_seqlens: Int[Array, "*B S"]
    q_offsets: Int[Array, "*B S1"]
    kv_offsets: Int[Array, "*B S1"]

    def flat(self, *, seq_len_q: int, seq_len_kv: int | None = None) -> FlatSeqMeta:
        """The cu_seqlens form over the **padded** flattened ``[B*T]`` token axis (TE/cuDNN).

        Meant for compact metadata with one batch dim (flatten more dims first). The padding
        stays in place: ``q_starts`` / ``kv_starts`` are each segment's start in the padded
        ``[B*T]`` axis (row b's offset plus ``b * T``), and ``cu_seqlens_*`` are the cumulative
        active lengths, so ``cu_seqlens[k]`` equals segment k's start only where no padding
        precedes it. That is Transformer Engine's / cuDNN's THD convention (sequence lengths plus
        separate offsets). FlashAttention's ``flash_attn_varlen_func`` instead reads
        ``cu_seqlens`` as the starts over the gathered tokens, padding removed: for it, gather
        the tokens with :func:`thdkit.unpad`, which returns those contiguous ``cu_seqlens`` (in
        the row ``[1 1 1 2 2 0 0 3]`` document 3 starts at 7 here and at 5 there).

        Args:
            seq_len_q: T_q, the row length the q offsets refer to; an int in
                ``[1, MAX_SEQ_LEN]``.
            seq_len_kv: T_kv, likewise; defaults to ``seq_len_q``.

        Returns:
            :class:`FlatSeqMeta`, int32 arrays.

        Raises:
            TypeError: a seq_len is not a Python or NumPy int (bools and floats included).
            ValueError: a seq_len outside ``[1, MAX_SEQ_LEN]``, ``B * T`` beyond int32, metadata
                without exactly one batch dim, or (concrete metadata) a segment that ends past
                its row (offset + seqlen > T), naming the row.

        Example:
            >>> meta = SeqMeta(jnp.array([[3, 2]]), jnp.array([[3, 2]]),
            ...                jnp.array([[0, 3, -1]]), jnp.array([[0, 3, -1]]))
            >>> meta.flat(seq_len_q=8).cu_seqlens_q
            Array([0, 3, 5], dtype=int32)
        """
        if self.q_seqlens.ndim != 2:
            raise ValueError(
                f"flat() needs metadata with exactly one batch dim, got q_seqlens of shape "
                f"{self.q_seqlens.shape}; reshape to [B, S] first"
            )
        seq_len_q = _check_seq_len(seq_len_q, "seq_len_q", self.q_seqlens.shape[0])
        seq_len_kv = (
            seq_len_q
            if seq_len_kv is None
            else _check_seq_len(seq_len_kv, "seq_len_kv", self.q_seqlens.shape[0])
        )
        _check_segment_ends(self.q_seqlens, self.q_offsets, seq_len_q, "seq_len_q", "q")
        _check_segment_ends(self.kv_seqlens, self.kv_offsets, seq_len_kv, "seq_len_kv", "kv")

        def cumulative(seqlens: Array) -> Array:
            flat = jnp.asarray(seqlens).astype(jnp.int32).reshape(-1)
            return jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(flat, dtype=jnp.int32)])

        def starts(offsets: Array, seq_len: int) -> Array:
            offsets = jnp.asarray(offsets).astype(jnp.int32)
            shift = jnp.arange(offsets.shape[0], dtype=jnp.int32)[:, None] * seq_len
            body = offsets[:, :-1]
            return jnp.where(body >= 0, body + shift, -1).reshape(-1)

        return FlatSeqMeta(
            cumulative(self.q_seqlens),
            cumulative(self.kv_seqlens),
            starts(self.q_offsets, seq_len_q),
            starts(self.kv_offsets, seq_len_kv),
        )


_INT32_MAX = int(np.iinfo(np.int32).max)


def _check_seq_len(seq_len: object, name: str, rows: int) -> int:
    """A row length for :meth:`SeqMeta.flat` as an int, or raises naming the parameter."""
    seq_len = check_int(seq_len, name, low=1, high=MAX_SEQ_LEN)
    if rows * seq_len > _INT32_MAX:
        raise ValueError(
            f"{name}={seq_len} with {rows} rows gives {rows * seq_len} flattened tokens, "
            "beyond int32"
        )
    return seq_len


def _check_segment_ends(seqlens: Array, offsets: Array, seq_len: int, name: str, side: str) -> None:
    """Raises when concrete compact metadata has a segment ending past ``seq_len``."""
    if not is_concrete(seqlens, offsets):
        return
    seqlens, offsets = np.asarray(seqlens), np.asarray(offsets)[:, :-1]
    ends = np.where(offsets >= 0, offsets.astype(np.int64) + seqlens, 0)
    too_long = ends.max(axis=-1, initial=0) > seq_len
    if too_long.any():
        row = int(np.flatnonzero(too_long)[0])
        raise ValueError(
            f"{name}={seq_len} is shorter than row {row}'s {side} segments, which end at "
            f"{int(ends[row].max())} (offset + seqlen)"
        )
