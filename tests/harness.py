"""One harness for every attention implementation and context-parallel strategy.

It holds the layouts (two fixed shapes: self-attention over B = 2 rows of T = 32 tokens and
cross-attention of T_q = 24 queries to T_kv = 40 keys, a few documents per row with padding,
drawn from fixed seeds), a float64 NumPy oracle written from the rule of docs/semantics.md (and
the window of docs/attention.md, "Semantics"; outputs, log-sum-exps and gradients written by hand;
optionally soft-capped logits, attention sinks and per-document prefixes),
the tolerances per dtype and the functions that compare against it: the inputs, losses and checks
the kernel tests share, on these layouts or on their own.

The case matrix is pairwise, not the full product: every implementation runs every mask type in
float32 under ``jit`` (forward and gradients, self-attention, GQA, no window), and a fixed set of
extra cases in which window, heads, self/cross, dtype and jit/eager vary so that every pair of
values of any two of those axes (and every mask type) occurs at least once.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import thdkit
from thdkit._src import synth
from thdkit._src.mask_types import MaskType

from .strategies import ATTN_D, ATTN_D_V, ATTN_H_KV, ATTN_H_Q, np_run_lengths

B, T, T_Q, T_KV, D, D_V, S = 2, 32, 24, 40, 8, 8, 4
SCALE = 0.3
WINDOW = (3, 1)
HEADS = {"gqa": (4, 2), "mha": (2, 2)}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# |got - want| <= atol + rtol * |want|, elementwise, against the float64 oracle run on the
# inputs as the implementation sees them (rounded to the dtype). Measured on CPU, the built-ins
# stay within a tenth of the float32 bounds and a half of the bfloat16 and float16 ones (outputs
# and gradients rounded to 8 or 11 bits of mantissa, and intermediates of some backward passes
# too).
TOLERANCES = {
    "float32": {"forward": dict(atol=5e-6, rtol=5e-6), "grad": dict(atol=1e-5, rtol=1e-5)},
    "bfloat16": {"forward": dict(atol=1e-2, rtol=1e-2), "grad": dict(atol=2e-2, rtol=2e-2)},
    "float16": {"forward": dict(atol=2e-3, rtol=2e-3), "grad": dict(atol=4e-3, rtol=4e-3)},
}


@dataclass(frozen=True)
class Case:
    """One configuration of the matrix."""

    mask: MaskType
    window: tuple[int, int] | None = None
    heads: str = "gqa"
    cross: bool = False
    dtype: str = "float32"
    jit: bool = True

    @property
    def id(self) -> str:
        window = "win" if self.window else "nowin"
        side = "cross" if self.cross else "self"
        mode = "jit" if self.jit else "eager"
        return f"{self.mask.value}-{window}-{self.heads}-{side}-{self.dtype}-{mode}"


def _pairwise_rows() -> list[tuple[int, ...]]:
    """A covering array of strength 2 for five two-valued axes (6 rows), checked below."""
    return [
        (0, 0, 0, 0, 0),
        (0, 1, 1, 1, 1),
        (1, 0, 1, 1, 0),
        (1, 1, 0, 0, 1),
        (1, 1, 1, 0, 0),
        (0, 0, 0, 1, 1),
    ]


def covers_every_pair(rows: list[tuple[int, ...]]) -> bool:
    """Whether every pair of values of every two axes occurs in some row."""
    for a, b in itertools.combinations(range(len(rows[0])), 2):
        if {(r[a], r[b]) for r in rows} != set(itertools.product((0, 1), repeat=2)):
            return False
    return True


# Extra cases: the pairwise rows over (window, heads, cross, dtype, jit), mask types rotating.
_EXTRA_MASKS = [
    MaskType.PADDING_CAUSAL_BOTTOM_RIGHT,
    MaskType.CAUSAL,
    MaskType.PADDING,
    MaskType.CAUSAL_BOTTOM_RIGHT,
    MaskType.PADDING_CAUSAL,
    MaskType.NO_MASK,
]
CORE_CASES = [Case(mask) for mask in MaskType]
EXTRA_CASES = [
    Case(
        mask,
        window=WINDOW if w else None,
        heads=("gqa", "mha")[h],
        cross=bool(c),
        dtype=("float32", "bfloat16")[d],
        jit=bool(j),
    )
    for mask, (w, h, c, d, j) in zip(_EXTRA_MASKS, _pairwise_rows(), strict=True)
]
CASES = CORE_CASES + EXTRA_CASES


# --- Layouts and inputs ------------------------------------------------------------------------


# One row of 8 tokens, two documents around a padding token (its position counting on): the
# layout of the argument checks.
ROW_IDS = np.array([[1, 1, 1, 0, 2, 2, 2, 2]], np.int32)
ROW_POS = np.array([[0, 1, 2, 3, 0, 1, 2, 3]], np.int32)


@functools.cache
def layout(cross: bool) -> dict[str, np.ndarray]:
    """``ids_q, pos_q, ids_kv, pos_kv`` (int32 NumPy) of the self or the cross shape."""
    rng = np.random.default_rng(7 if cross else 3)
    if cross:
        ids_q, pos_q, ids_kv, pos_kv = synth.cross_segments(
            rng, batch=B, seq_len_q=T_Q, seq_len_kv=T_KV, max_segments=S
        )
    else:
        ids_q, pos_q = synth.packed_segments(rng, batch=B, seq_len=T, max_segments=S)
        ids_kv, pos_kv = ids_q, pos_q
    return dict(ids_q=ids_q, pos_q=pos_q, ids_kv=ids_kv, pos_kv=pos_kv)


def layout_keywords(lay: dict[str, Any], **options: Any) -> dict[str, Any]:
    """The keywords of ``thdkit.attention`` (and of ``seqlens_and_offsets`` and
    ``is_representable``) for ``lay``: ``segment_ids_q, segment_pos_q``, the kv pair where the
    keys have a layout of their own (``ids_kv`` given and not ``ids_q`` itself), ``mask_type``
    padding_causal and ``max_segments_per_seq=S``; ``options`` add to them or replace them."""
    kv = {}
    if lay.get("ids_kv") is not None and lay["ids_kv"] is not lay["ids_q"]:
        kv = dict(segment_ids_kv=lay["ids_kv"], segment_pos_kv=lay["pos_kv"])
    common = dict(mask_type="padding_causal", max_segments_per_seq=S)
    return dict(segment_ids_q=lay["ids_q"], segment_pos_q=lay["pos_q"], **kv, **common) | options


def random_inputs(
    seed: int = 0,
    *,
    batch: int | tuple[int, ...] = B,
    seq_q: int = T,
    seq_kv: int | None = None,
    heads: tuple[int, int] = HEADS["gqa"],
    dim: int = D,
    dim_v: int = D_V,
    dtype: Any = "float32",
) -> tuple[np.ndarray, ...]:
    """``(q, k, v, w_out, w_lse)``: standard normal NumPy arrays, drawn in that order from the
    generator seeded ``100 + seed``.

    ``q`` is ``[*batch, seq_q, H_q, dim]``, ``k`` and ``v`` ``[*batch, seq_kv, H_kv, dim]`` and
    ``[*batch, seq_kv, H_kv, dim_v]`` (``seq_kv`` defaults to ``seq_q``), all three in ``dtype``
    (a name of ``DTYPES`` or a dtype); the loss weights of the output, ``w_out [*batch, seq_q,
    H_q, dim_v]``, and of the log-sum-exp, ``w_lse [*batch, seq_q, H_q]``, are float32.
    ``batch`` is one size or several leading axes (an extra one for ``vmap``).
    """
    lead, seq_kv, (h_q, h_kv) = np.atleast_1d(batch), seq_kv or seq_q, heads
    rng, dtype = np.random.default_rng(100 + seed), DTYPES.get(dtype, dtype)
    shapes = [(seq_q, h_q, dim), (seq_kv, h_kv, dim), (seq_kv, h_kv, dim_v), (seq_q, h_q, dim_v)]
    drawn = [rng.normal(size=(*lead, *s)) for s in [*shapes, (seq_q, h_q)]]
    return (*(np.asarray(x, dtype) for x in drawn[:3]), *(x.astype(np.float32) for x in drawn[3:]))


def layout_inputs(
    lay: dict[str, np.ndarray],
    seed: int = 0,
    *,
    heads: tuple[int, int] = (ATTN_H_Q, ATTN_H_KV),
    dim: int = ATTN_D,
    dim_v: int = ATTN_D_V,
    dtype: Any = "float32",
) -> tuple[np.ndarray, ...]:
    """:func:`random_inputs` for the layout ``lay``: the batch and ``T_q`` of its ``ids_q``,
    ``T_kv`` of its ``ids_kv``; by default the heads of tests/strategies.py's attention layouts
    (8 query heads over 2 key/value heads, ``D = 8``, ``D_v = 4``)."""
    (batch, seq_q), seq_kv = lay["ids_q"].shape, lay.get("ids_kv", lay["ids_q"]).shape[-1]
    return random_inputs(
        seed, batch=batch, seq_q=seq_q, seq_kv=seq_kv, heads=heads, dim=dim, dim_v=dim_v,
        dtype=dtype,
    )  # fmt: skip


def inputs(case: Case, seed: int = 0) -> tuple[jax.Array, ...]:
    """``(q, k, v, w)`` of the case's layout, heads and dtype (:func:`layout_inputs`); ``w``
    (float32) weighs the output in the loss whose gradients are compared."""
    lay, heads = layout(case.cross), HEADS[case.heads]
    arrays = layout_inputs(lay, seed, heads=heads, dim=D, dim_v=D_V, dtype=case.dtype)
    return tuple(jnp.asarray(x) for x in arrays[:4])


# --- The float64 oracle --------------------------------------------------------------------------


def _lengths(lay: dict[str, np.ndarray], side: str) -> np.ndarray:
    """``rl_<side>`` of the layout where it has one (a ring step passes the global document
    lengths), else the run lengths of ``ids_<side>``."""
    if f"rl_{side}" in lay:
        return np.asarray(lay[f"rl_{side}"], np.int64)
    return np.stack([np_run_lengths(row) for row in np.asarray(lay[f"ids_{side}"])])


def _bound(bound: int | None) -> int | None:
    """A window bound, None where it is unbounded (None, negative, or >= 2**31 - 1)."""
    return None if bound is None or bound < 0 or bound >= 2**31 - 1 else int(bound)


def allowed(lay: dict[str, np.ndarray], mask: MaskType, window) -> np.ndarray:
    """bool[B, T_q, T_kv]: the rule of docs/attention.md, "Semantics" (the mask types of
    docs/semantics.md and the window), on ``ids_q, pos_q, ids_kv, pos_kv`` and optionally
    ``rl_q, rl_kv`` (document lengths; by default the run lengths of the ids).

    Optionally ``pl_q, pl_kv`` (both or neither): each token's document's prefix length (0 = no
    prefix, as on padding). A pair of the same non-padding document that the mask type and the
    window refuse is allowed where both tokens lie in the prefix: ``pos_q < pl_q`` and
    ``pos_kv < pl_kv`` (a prefix-LM mask: the prefix attends to itself bidirectionally).
    """
    ids_q, pos_q, ids_kv, pos_kv = (
        np.asarray(lay[k], np.int64) for k in ("ids_q", "pos_q", "ids_kv", "pos_kv")
    )
    same = (ids_q[:, :, None] == ids_kv[:, None, :]) & (ids_q[:, :, None] != 0)
    keep = np.ones_like(same)
    pq, pk = pos_q[:, :, None], pos_kv[:, None, :]
    # Tokens from each one to the end of its document: the bottom-right rule compares them.
    end_q, end_kv = (
        (_lengths(lay, "q") - pos_q)[:, :, None],
        (_lengths(lay, "kv") - pos_kv)[:, None],
    )
    if mask.is_causal:
        keep &= pq >= pk
    if mask.is_bottom_right:
        keep &= end_q <= end_kv
    left, right = (None, None) if window is None else (_bound(b) for b in window)
    if left is not None:
        keep &= (end_q + left >= end_kv) if mask.is_bottom_right else (pk >= pq - left)
    if right is not None and not mask.is_bottom_right:
        keep &= pk <= pq + right
    if ("pl_q" in lay) != ("pl_kv" in lay):
        raise ValueError("a layout gives the prefix lengths of both sides (pl_q, pl_kv) or none")
    if "pl_q" in lay:
        pl_q, pl_kv = (np.asarray(lay[k], np.int64) for k in ("pl_q", "pl_kv"))
        keep |= (pq < pl_q[:, :, None]) & (pk < pl_kv[:, None, :])
    return same & keep


def _float64(x) -> np.ndarray:
    return np.asarray(x).astype(np.float64)


class Oracle(NamedTuple):
    """What :func:`dense_oracle` gives, float64.

    Attributes:
        out: ``[B, T_q, H_q, D_v]``.
        lse: ``[B, T_q, H_q]``; -inf for a query with no allowed key.
        weights: ``[B, H_q, T_q, T_kv]``, the softmax weights (the sinks' share left out).
        grads: ``(dq, dk, dv)``, and ``d sinks [H_q]`` last with sinks.
        d_logits: ``[B, H_q, T_q, T_kv]``, the gradient of the final logits (a bias's).
    """

    out: np.ndarray
    lse: np.ndarray
    weights: np.ndarray
    grads: tuple[np.ndarray, ...]
    d_logits: np.ndarray


def dense_oracle(
    q,
    k,
    v,
    keep,
    *,
    w_out=None,
    w_lse=None,
    scale: float = SCALE,
    logits_soft_cap: float | None = None,
    sinks=None,
    bias=None,
) -> Oracle:
    """float64 attention over the keys ``keep`` allows, with gradients written by hand of
    ``sum(out * w_out) + sum(lse * w_lse)`` over the finite lse (a weight left out counting as
    zeros): zeros and an lse of -inf for a query with no allowed key.

    The logits are ``s = scale * q.k``, or with ``logits_soft_cap`` ``c`` the capped ``s = c *
    tanh(scale * q.k / c)``, plus ``bias``, then masked. With ``sinks`` (float[H_q], one logit
    per query head) each row with an allowed key has ``D_i = sum_j exp(s_ij) + exp(sink_h)``:
    ``p_ij = exp(s_ij) / D_i``, ``out_i = sum_j p_ij v_j``, ``lse_i = log D_i``, and the
    gradients end in ``d sinks``: ``d sink_h = sum_i (w_lse_i - w_out_i . out_i) exp(sink_h) /
    D_i`` over that head's rows. A row with no allowed key stays out of it all: output zeros,
    lse -inf, no gradient to anything, the sinks included.

    Shapes: q ``[B, T_q, H_q, D]``, k and v ``[B, T_kv, H_kv, D | D_v]``; ``keep`` bool
    ``[B, T_q, T_kv]`` or ``[B, H_q | 1, T_q, T_kv]``; ``bias`` broadcasting to ``[B, H_q, T_q,
    T_kv]``.
    """
    q, k, v = (_float64(x) for x in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    kh, vh = (np.repeat(x, groups, axis=2) for x in (k, v))
    keep = np.asarray(keep)
    keep = keep[:, None] if keep.ndim == 3 else keep  # [B, H_q | 1, T_q, T_kv]
    raw = scale * np.einsum("bqhd,bkhd->bhqk", q, kh)
    capped = None if logits_soft_cap is None else np.tanh(raw / logits_soft_cap)
    logits = raw if capped is None else logits_soft_cap * capped
    if bias is not None:
        logits = logits + _float64(bias)
    logits = np.where(keep, logits, -np.inf)
    top = np.max(logits, axis=-1, keepdims=True)
    has = np.isfinite(top)  # [B, H_q, T_q, 1]: the row has an allowed key
    sink = None if sinks is None else _float64(sinks).reshape(1, -1, 1, 1)
    if sink is not None:
        top = np.maximum(top, sink)  # the largest term of each row's denominator
    top = np.where(has, top, 0.0)
    weights = np.where(keep, np.exp(logits - top), 0.0)
    total = np.sum(weights, axis=-1, keepdims=True)
    if sink is not None:
        sink_weight = np.exp(np.where(has, sink - top, -np.inf))
        total = total + sink_weight
    total = np.where(has, total, 1.0)
    p = np.where(has, weights / total, 0.0)
    out = np.einsum("bhqk,bkhd->bqhd", p, vh)
    lse = np.where(has, top + np.log(total), -np.inf)[..., 0]
    w_out = np.zeros_like(out) if w_out is None else _float64(w_out)
    w_lse = np.zeros(lse.shape) if w_lse is None else _float64(w_lse).transpose(0, 2, 1)
    dp = np.einsum("bqhd,bkhd->bhqk", w_out, vh)
    row = np.einsum("bqhd,bqhd->bhq", w_out, out)
    d_logits = p * (dp - row[..., None] + w_lse[..., None])  # d lse / d logit = p
    ds = d_logits if capped is None else d_logits * (1.0 - capped**2)  # to the scaled logits
    dq = scale * np.einsum("bhqk,bkhd->bqhd", ds, kh)
    dkh = scale * np.einsum("bhqk,bqhd->bkhd", ds, q)
    dvh = np.einsum("bhqk,bqhd->bkhd", p, w_out)
    b, t_kv, h_kv = k.shape[:3]
    dk = dkh.reshape(b, t_kv, h_kv, groups, -1).sum(3)
    dv = dvh.reshape(b, t_kv, h_kv, groups, -1).sum(3)
    grads = (dq, dk, dv)
    if sink is not None:
        share = np.where(has, sink_weight / total, 0.0)[..., 0]  # exp(sink) / D, [B, H_q, T_q]
        grads += (np.sum(share * (w_lse - row), axis=(0, 2)),)
    return Oracle(out, lse.transpose(0, 2, 1), p, grads, d_logits)


def partial_oracle(
    q,
    k,
    v,
    lay,
    mask: MaskType,
    window,
    *,
    w_out=None,
    w_lse=None,
    scale: float = SCALE,
    logits_soft_cap: float | None = None,
    sinks=None,
) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, ...]]:
    """:func:`dense_oracle` over the keys a layout allows (:func:`allowed`), as
    ``attention_partial`` returns them: float64 ``(out, lse, grads)``; with ``sinks`` the
    gradients are ``(dq, dk, dv, dsinks)``.
    """
    oracle = dense_oracle(
        q, k, v, allowed(lay, mask, window), w_out=w_out, w_lse=w_lse, scale=scale,
        logits_soft_cap=logits_soft_cap, sinks=sinks,
    )  # fmt: skip
    return oracle.out, oracle.lse, oracle.grads


# --- Running an implementation and comparing -----------------------------------------------------


def _step(name: str, mask: MaskType, window):
    """``(q, k, v, w, ids_q, pos_q, ids_kv, pos_kv) -> (out, (dq, dk, dv))`` of one
    implementation through ``thdkit.attention``."""

    def run(q, k, v, w, ids_q, pos_q, ids_kv, pos_kv):
        def loss(q, k, v):
            out = thdkit.attention(
                q, k, v, segment_ids_q=ids_q, segment_pos_q=pos_q, segment_ids_kv=ids_kv,
                segment_pos_kv=pos_kv, mask_type=mask, window_size=window,
                max_segments_per_seq=S, scale=SCALE, implementation=name,
            )  # fmt: skip
            return jnp.sum(out.astype(jnp.float32) * w), out

        (_, out), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
        return out, grads

    return run


@functools.cache
def _jitted(name: str, mask: MaskType, window) -> Any:
    return jax.jit(_step(name, mask, window))


def partial_grads(partial: Callable[..., tuple], q, k, v, w_out, w_lse):
    """``(out, lse, (dq, dk, dv))`` of ``partial(q, k, v) -> (out, lse)`` (``attention_partial``
    or a kernel under it), the gradients those of :func:`partial_oracle`'s loss: ``sum(out *
    w_out) + sum(lse * w_lse)`` over the finite values (a query holding a NaN or inf stays out
    of the loss, as in the isolation tests)."""

    def loss(q, k, v):
        out, lse = partial(q, k, v)
        finite_out, finite_lse = (jnp.where(jnp.isfinite(x), x, 0.0) for x in (out, lse))
        return jnp.sum(finite_out * w_out) + jnp.sum(finite_lse * w_lse), (out, lse)

    (_, (out, lse)), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
    return out, lse, grads


def check_partial(got, inputs, lay, mask: MaskType, window, *, what: str) -> np.ndarray:
    """:func:`check_outputs` (``zero_dq``, float32) of ``got = (out, lse, (dq, dk, dv))`` of
    :func:`partial_grads` on ``inputs = (q, k, v, w_out, w_lse)`` and the layout ``lay``, against
    :func:`partial_oracle`; returns the queries with no allowed key, bool [B, T_q, H_q]."""
    q, k, v, w_out, w_lse = inputs
    want = partial_oracle(q, k, v, lay, mask, window, w_out=w_out, w_lse=w_lse)
    return check_outputs(got, want, dtype="float32", what=what, zero_dq=True)


# The gradients compared, in the order the oracle returns them (``dsinks`` only with sinks).
GRADIENTS = ("dq", "dk", "dv", "dsinks")


def assert_close(got, want, tol: dict[str, float], what: str) -> None:
    """Elementwise ``|got - want| <= atol + rtol * |want|``, ``got`` all finite."""
    got = _float64(got)
    assert np.all(np.isfinite(got)), f"{what}: non-finite values"
    np.testing.assert_allclose(got, _float64(want), err_msg=what, **tol)


def assert_agree(got, want, *, dtype: str = "float32", what: str) -> None:
    """``got = (out, (dq, dk, dv))`` (or ``(dq, dk, dv, dsinks)``) finite and close to ``want``
    within ``TOLERANCES[dtype]``: against the float64 oracle, or the same computation by another
    route (a transform, a plan, the keyword form), whose float32 results agree far more
    closely."""
    (out, grads), (want_out, want_grads), tol = got, want, TOLERANCES[dtype]
    assert len(grads) == len(want_grads), f"{what}: {len(grads)} gradients, {len(want_grads)}"
    assert_close(out, want_out, tol["forward"], f"{what}: out")
    for label, g, w in zip(GRADIENTS, grads, want_grads, strict=False):
        assert_close(g, w, tol["grad"], f"{what}: {label}")


def check_outputs(got, want, *, dtype: str, what: str, zero_dq: bool = False) -> np.ndarray:
    """Checks ``got = (out, lse, (dq, dk, dv))`` (``lse`` None where the entry point returns
    none; ``dsinks`` after ``dv`` where the oracle ran with sinks) against ``want`` of
    :func:`partial_oracle`, within ``TOLERANCES[dtype]`` (:func:`assert_agree`): the output and
    the gradients in ``dtype`` (``dsinks`` in float32, the sinks' dtype), the lse in float32, all
    close and finite; a query with no allowed key outputs zeros (and an lse of -inf) exactly,
    and with ``zero_dq`` gets a zero query gradient exactly.

    Returns:
        bool [B, T_q, H_q]: the queries with no allowed key.
    """
    (out, lse, grads), (want_out, want_lse, want_grads) = got, want
    empty = np.isneginf(want_lse)
    for label, x in zip(("out", *GRADIENTS), (out, *grads), strict=False):
        want_dtype = jnp.float32 if label == "dsinks" else DTYPES[dtype]
        assert x.dtype == want_dtype, f"{what}: {label} dtype {x.dtype}"
    assert_agree((out, grads), (want_out, want_grads), dtype=dtype, what=what)
    assert np.all(_float64(out)[empty] == 0), f"{what}: out of rows with no key"
    if lse is not None:
        assert lse.dtype == jnp.float32, f"{what}: lse dtype {lse.dtype}"
        lse, tol = _float64(lse), TOLERANCES[dtype]["forward"]
        np.testing.assert_array_equal(np.isneginf(lse), empty, f"{what}: rows with no key")
        assert_close(np.where(empty, 0, lse), np.where(empty, 0, want_lse), tol, f"{what}: lse")
    if zero_dq:
        assert np.all(_float64(grads[0])[empty] == 0), f"{what}: dq of rows with no key"
    return empty


def compare(name: str, case: Case, got) -> None:
    """Checks ``got = (out, (dq, dk, dv))`` of one case against the float64 oracle."""
    q, k, v, w = inputs(case)
    want = partial_oracle(q, k, v, layout(case.cross), case.mask, case.window, w_out=w)
    out, grads = got
    check_outputs((out, None, grads), want, dtype=case.dtype, what=f"{name} {case.id}")


def run_case(name: str, case: Case):
    """``(out, (dq, dk, dv))`` of implementation ``name`` on one case (raises
    NotImplementedError where it cannot run it)."""
    lay = layout(case.cross)
    args = (*inputs(case), *(jnp.asarray(lay[k]) for k in ("ids_q", "pos_q", "ids_kv", "pos_kv")))
    if case.jit:
        return _jitted(name, case.mask, case.window)(*args)
    return _step(name, case.mask, case.window)(*args)


def check_case(name: str, case: Case) -> str | None:
    """Runs and checks one case; returns the reason where the implementation refuses it."""
    try:
        got = run_case(name, case)
    except NotImplementedError as reason:
        return str(reason)
    compare(name, case, got)
    return None


def check_implementation(name: str, cases: list[Case] | None = None) -> dict[str, str]:
    """Runs the whole matrix (``CASES``) for the implementation registered as ``name``.

    Returns:
        the cases it refused (case id -> reason); raises AssertionError on a mismatch, and
        NotImplementedError where it refuses every case.
    """
    refused = {}
    for case in CASES if cases is None else cases:
        reason = check_case(name, case)
        if reason is not None:
            refused[case.id] = reason
    if len(refused) == len(CASES if cases is None else cases):
        raise NotImplementedError(f"{name} runs no case: {next(iter(refused.values()))}")
    return refused


def refusal(name: str) -> str | None:
    """Why ``name`` cannot run on this machine at all (its ``check_config`` on the plainest
    configuration raises NotImplementedError), or None."""
    from thdkit._src.kernels.base import get
    from thdkit._src.kernels.config import AttentionConfig

    config = AttentionConfig.parse(
        mask_type="padding", window_size=None, max_segments_per_seq=S, seq_q=T, seq_kv=T,
        self_attention=True,
    )  # fmt: skip
    try:
        get(name).check_config(config)
    except NotImplementedError as reason:
        return str(reason)
    return None


def machine_marks(name: str) -> list:
    """The marks of a test of implementation ``name``: none, or where it cannot run on this
    machine (:func:`refusal`) ``gpu`` and a skip that says why."""
    import pytest

    reason = refusal(name)
    return [] if reason is None else [pytest.mark.gpu, pytest.mark.skip(reason=f"{name}: {reason}")]
