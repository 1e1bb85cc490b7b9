"""Hypothesis strategies and NumPy oracles shared by the tests."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

from thdkit import reorder
from thdkit._src.mask_types import MaskType

ALL_MASKS = list(MaskType)


@st.composite
def rows(draw, *, seq_len: int, max_segments: int, strides=(1, 2, 3)) -> tuple[np.ndarray, ...]:
    """One valid row (ids, pos) of length ``seq_len`` with ids in 1..max_segments.

    Documents get random gaps of padding before them, tail padding whose positions keep counting,
    ids with gaps between them, positions that start anywhere and step by a stride (as in
    context-parallel shards); rows may be all padding.
    """
    ids = np.zeros(seq_len, np.int32)
    pos = np.zeros(seq_len, np.int32)
    n_docs = draw(st.integers(0, max_segments))
    doc_ids = sorted(draw(st.sets(st.integers(1, max_segments), min_size=n_docs, max_size=n_docs)))
    t = 0
    for doc in doc_ids:
        t += draw(st.integers(0, 2))  # padding (position 0) between documents
        length = draw(st.integers(1, max(1, seq_len // max(1, n_docs))))
        tail = draw(st.integers(0, 2))
        if t + length > seq_len:
            break
        start = draw(st.integers(0, 3))
        stride = draw(st.sampled_from(strides))
        run = start + stride * np.arange(length + tail)
        ids[t : t + length] = doc
        end = min(seq_len, t + length + tail)
        pos[t:end] = run[: end - t]
        t = end
    return ids, pos


@st.composite
def batches(draw, *, shape: tuple[int, ...], max_segments: int, strides=(1, 2, 3)):
    """A batch of valid rows of the given shape ``(*B, T)``."""
    *batch, seq_len = shape
    n = int(np.prod(batch, dtype=int))
    drawn = [
        draw(rows(seq_len=seq_len, max_segments=max_segments, strides=strides)) for _ in range(n)
    ]
    ids = np.stack([r[0] for r in drawn]).reshape(shape)
    pos = np.stack([r[1] for r in drawn]).reshape(shape)
    return ids, pos


def np_run_lengths(ids: np.ndarray) -> np.ndarray:
    """Run length of each token of a 1-D row, 0 on padding (a plain loop)."""
    out = np.zeros_like(ids)
    t = 0
    while t < len(ids):
        end = t
        while end + 1 < len(ids) and ids[end + 1] == ids[t]:
            end += 1
        if ids[t] != 0:
            out[t : end + 1] = end - t + 1
        t = end + 1
    return out


def np_allowed(ids_q, pos_q, ids_kv, pos_kv, mask: MaskType) -> np.ndarray:
    """allowed[i, j] of one row by loops over i and j, straight from docs/semantics.md."""
    rl_q, rl_kv = np_run_lengths(ids_q), np_run_lengths(ids_kv)
    out = np.zeros((len(ids_q), len(ids_kv)), bool)
    for i in range(len(ids_q)):
        for j in range(len(ids_kv)):
            if ids_q[i] == 0 or ids_q[i] != ids_kv[j]:
                continue
            if mask.is_causal:
                ok = pos_q[i] >= pos_kv[j]
            elif mask.is_bottom_right:
                ok = rl_q[i] - pos_q[i] <= rl_kv[j] - pos_kv[j]
            else:
                ok = True
            out[i, j] = ok
    return out


def kernel_reading(meta_row, seq_len_q: int, seq_len_kv: int, mask: MaskType) -> np.ndarray:
    """The [T_q, T_kv] mask a varlen kernel applies when it reads one row of compact metadata.

    Segment k: q rows [qo, qo + lq) attend kv rows [ko, ko + lk); with a, c the row and column
    inside the segment, top-left causal keeps c <= a and bottom-right keeps c <= a + lk - lq.
    """
    q_seqlens, kv_seqlens, q_offsets, kv_offsets = (np.asarray(a) for a in meta_row)
    out = np.zeros((seq_len_q, seq_len_kv), bool)
    for k in range(len(q_seqlens)):
        lq, lk = int(q_seqlens[k]), int(kv_seqlens[k])
        if lq == 0 or lk == 0:
            continue
        qo, ko = int(q_offsets[k]), int(kv_offsets[k])
        a = np.arange(lq)[:, None]
        c = np.arange(lk)[None, :]
        if mask.is_causal:
            block = c <= a
        elif mask.is_bottom_right:
            block = c <= a + lk - lq
        else:
            block = np.ones((lq, lk), bool)
        out[qo : qo + lq, ko : ko + lk] = block
    return out


# --- Attention layouts and inputs (shared by the attention test modules) -----------------------
# One shape for most attention tests: B rows of T query tokens, T_KV keys in cross-attention,
# 8 query heads over 2 key/value heads (GQA), D = 8, D_v = 4; each compiles once per mask type.

ATTN_B, ATTN_T, ATTN_T_KV, ATTN_H_Q, ATTN_H_KV, ATTN_D, ATTN_D_V = 2, 40, 56, 8, 2, 8, 4
ATTN_S = 4


def segments_of(layout: dict[str, Any]) -> dict[str, Any]:
    """A six-array layout dict (``ids_q, pos_q, rl_q, ids_kv, pos_kv, rl_kv``) as the
    ``q_segments`` / ``kv_segments`` keywords of ``attention_partial`` and
    ``reference_attention``."""
    from thdkit._src.segments import Segments

    def side(suffix: str) -> Segments:
        return Segments(*(jnp.asarray(layout[f"{k}_{suffix}"]) for k in ("ids", "pos", "rl")))

    return dict(q_segments=side("q"), kv_segments=side("kv"))


def self_layout(seed: int, *, batch: int = ATTN_B, seq_len: int = ATTN_T) -> dict[str, np.ndarray]:
    """A self-attention batch as ``attention_partial`` keywords: the kv layout is the query's."""
    from thdkit._src import synth
    from thdkit._src.segments import run_lengths

    ids, pos = synth.packed_segments(
        np.random.default_rng(seed), batch=batch, seq_len=seq_len, max_segments=ATTN_S
    )
    rl = np.asarray(run_lengths(ids))
    return dict(ids_q=ids, pos_q=pos, rl_q=rl, ids_kv=ids, pos_kv=pos, rl_kv=rl)


def missing_layout(seed: int) -> dict[str, np.ndarray]:
    """Cross-attention with segment 2 absent from the keys: its query rows attend nothing."""
    from thdkit._src.segments import run_lengths

    layout = self_layout(seed)
    ids_kv = np.where(layout["ids_q"] == 2, 0, layout["ids_q"])
    return layout | dict(ids_kv=ids_kv, rl_kv=np.asarray(run_lengths(ids_kv)))


def cross_layout(seed: int) -> dict[str, np.ndarray]:
    """Cross-attention whose key documents are at least as long as the query ones."""
    from thdkit._src import synth
    from thdkit._src.segments import run_lengths

    ids_q, pos_q, ids_kv, pos_kv = synth.cross_segments(
        np.random.default_rng(seed),
        batch=ATTN_B,
        seq_len_q=ATTN_T,
        seq_len_kv=ATTN_T_KV,
        max_segments=ATTN_S,
    )
    return dict(
        ids_q=ids_q,
        pos_q=pos_q,
        rl_q=np.asarray(run_lengths(ids_q)),
        ids_kv=ids_kv,
        pos_kv=pos_kv,
        rl_kv=np.asarray(run_lengths(ids_kv)),
    )


def ring_step_layout(
    ids: np.ndarray, pos: np.ndarray, order: str, q_rank: int, kv_rank: int
) -> dict[str, np.ndarray]:
    """Ring step (q_rank, kv_rank) of rows ``ids, pos`` reordered for 2 ranks (``"striped1"``,
    ``"striped2"`` or ``"dual_chunk_swap"``); rl holds the global document lengths, as ring
    attention passes them to the bottom-right rule."""
    from thdkit import reorder
    from thdkit._src.segments import run_lengths

    rl = np.asarray(run_lengths(ids))
    if order == "dual_chunk_swap":
        ids, pos, rl = (reorder.dual_chunk_swap(x, cp=2) for x in (ids, pos, rl))
    else:
        stripe = int(order[-1])
        ids, pos, rl = (reorder.striped(x, cp=2, stripe_size=stripe) for x in (ids, pos, rl))
    ids_q, pos_q, ids_kv, pos_kv = reorder.ring_step(ids, pos, cp=2, q_rank=q_rank, kv_rank=kv_rank)
    return dict(
        ids_q=np.asarray(ids_q),
        pos_q=np.asarray(pos_q),
        rl_q=np.asarray(reorder.shard(rl, cp=2, rank=q_rank)),
        ids_kv=np.asarray(ids_kv),
        pos_kv=np.asarray(pos_kv),
        rl_kv=np.asarray(reorder.shard(rl, cp=2, rank=kv_rank)),
    )


def ring_layout(seed: int, order: str, q_rank: int, kv_rank: int) -> dict[str, np.ndarray]:
    """:func:`ring_step_layout` of a random packed 2T-token batch."""
    from thdkit._src import synth

    ids, pos = synth.packed_segments(
        np.random.default_rng(seed), batch=ATTN_B, seq_len=2 * ATTN_T, max_segments=ATTN_S
    )
    return ring_step_layout(ids, pos, order, q_rank, kv_rank)


def reorder_pair(name: str, cp: int) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(forward, inverse) of a named reorder ("none", "striped<k>", "dual_chunk_swap"), each
    called as ``fn(x, axis=...)``."""
    if name == "none":
        identity = lambda x, axis=-1: x  # noqa: E731
        return identity, identity
    if name == "dual_chunk_swap":
        return (
            functools.partial(reorder.dual_chunk_swap, cp=cp),
            functools.partial(reorder.undo_dual_chunk_swap, cp=cp),
        )
    stripe = int(name.removeprefix("striped"))
    return (
        functools.partial(reorder.striped, cp=cp, stripe_size=stripe),
        functools.partial(reorder.unstriped, cp=cp, stripe_size=stripe),
    )


def packed_row(seq_len: int, docs: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """One row: documents of (size, valid tokens), tail padding keeping positions, then padding."""
    ids = np.zeros(seq_len, np.int32)
    pos = np.zeros(seq_len, np.int32)
    start = 0
    for doc, (size, valid) in enumerate(docs, start=1):
        ids[start : start + valid] = doc
        pos[start : start + size] = np.arange(size)
        start += size
    return ids, pos
