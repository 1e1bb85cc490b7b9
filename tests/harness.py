"""One harness for every attention implementation and context-parallel strategy.

It holds the layouts (two fixed shapes: self-attention over B = 2 rows of T = 32 tokens and
cross-attention of T_q = 24 queries to T_kv = 40 keys, a few documents per row with padding,
drawn from fixed seeds), a float64 NumPy oracle written from the rule of docs/semantics.md (and
the window of docs/attention.md, "Semantics"), the tolerances per dtype and the helpers that
compare forward outputs and gradients against it.

The case matrix is pairwise, not the full product: every implementation runs every mask type in
float32 under ``jit`` (forward and gradients, self-attention, GQA, no window), and a fixed set of
extra cases in which window, heads, self/cross, dtype and jit/eager vary so that every pair of
values of any two of those axes (and every mask type) occurs at least once.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import thdkit
from thdkit._src import synth
from thdkit._src.mask_types import MaskType

from .strategies import np_allowed, np_run_lengths

B, T, T_Q, T_KV, D, D_V, S = 2, 32, 24, 40, 8, 8, 4
SCALE = 0.3
WINDOW = (3, 1)
HEADS = {"gqa": (4, 2), "mha": (2, 2)}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# |got - want| <= atol + rtol * |want|, elementwise, against the float64 oracle run on the
# inputs as the implementation sees them (rounded to the dtype). Measured on CPU, the built-ins
# stay within a tenth of the float32 bounds and a third of the bfloat16 ones (outputs and
# gradients rounded to 8 bits of mantissa, and intermediates of some backward passes too).
TOLERANCES = {
    "float32": {"forward": dict(atol=5e-6, rtol=5e-6), "grad": dict(atol=1e-5, rtol=1e-5)},
    "bfloat16": {"forward": dict(atol=1e-2, rtol=1e-2), "grad": dict(atol=2e-2, rtol=2e-2)},
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


def inputs(case: Case, seed: int = 0) -> tuple[jax.Array, ...]:
    """``(q, k, v, w)`` of the case's shape and dtype; ``w`` (float32) weighs the output in the
    loss whose gradients are compared."""
    h_q, h_kv = HEADS[case.heads]
    seq_q, seq_kv = (T_Q, T_KV) if case.cross else (T, T)
    rng = np.random.default_rng(100 + seed)
    dtype = DTYPES[case.dtype]
    q = jnp.asarray(rng.normal(size=(B, seq_q, h_q, D)), dtype)
    k = jnp.asarray(rng.normal(size=(B, seq_kv, h_kv, D)), dtype)
    v = jnp.asarray(rng.normal(size=(B, seq_kv, h_kv, D_V)), dtype)
    w = jnp.asarray(rng.normal(size=(B, seq_q, h_q, D_V)), jnp.float32)
    return q, k, v, w


# --- The float64 oracle --------------------------------------------------------------------------


def allowed(lay: dict[str, np.ndarray], mask: MaskType, window) -> np.ndarray:
    """bool[B, T_q, T_kv]: the mask rule of docs/semantics.md and the window (loops)."""
    rows = []
    for b in range(lay["ids_q"].shape[0]):
        ids_q, pos_q, ids_kv, pos_kv = (lay[k][b] for k in ("ids_q", "pos_q", "ids_kv", "pos_kv"))
        keep = np_allowed(ids_q, pos_q, ids_kv, pos_kv, mask)
        if window is not None:
            left, right = window
            pq, pk = pos_q[:, None].astype(np.int64), pos_kv[None, :].astype(np.int64)
            if mask.is_bottom_right:
                rq = np_run_lengths(ids_q)[:, None].astype(np.int64)
                rk = np_run_lengths(ids_kv)[None, :].astype(np.int64)
                keep &= rq - pq + left >= rk - pk
            else:
                keep &= (pk >= pq - left) & (pk <= pq + right)
        rows.append(keep)
    return np.stack(rows)


def oracle(q, k, v, w, lay, mask: MaskType, window) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """``(out, (dq, dk, dv))`` in float64 of ``softmax(SCALE * q.k) . v`` over the allowed keys
    (zeros for a query with none) and the gradients of ``sum(out * w)``."""
    q, k, v, w = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v, w))
    groups = q.shape[2] // k.shape[2]
    kh, vh = (np.repeat(x, groups, axis=2) for x in (k, v))
    keep = allowed(lay, mask, window)[:, None]  # [B, 1, T_q, T_kv]
    logits = np.where(keep, SCALE * np.einsum("bqhd,bkhd->bhqk", q, kh), -np.inf)
    top = np.max(logits, axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    weights = np.where(keep, np.exp(logits - top), 0.0)
    total = np.sum(weights, axis=-1, keepdims=True)
    p = np.where(total > 0, weights / np.where(total > 0, total, 1.0), 0.0)
    out = np.einsum("bhqk,bkhd->bqhd", p, vh)
    dp = np.einsum("bqhd,bkhd->bhqk", w, vh)
    row = np.einsum("bqhd,bqhd->bhq", w, out)[..., None]
    ds = p * (dp - row)
    dq = SCALE * np.einsum("bhqk,bkhd->bqhd", ds, kh)
    dkh = SCALE * np.einsum("bhqk,bqhd->bkhd", ds, q)
    dvh = np.einsum("bhqk,bqhd->bkhd", p, w)
    b, t_kv, h_kv = k.shape[:3]
    dk = dkh.reshape(b, t_kv, h_kv, groups, -1).sum(3)
    dv = dvh.reshape(b, t_kv, h_kv, groups, -1).sum(3)
    return out, (dq, dk, dv)


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


def assert_close(got, want, tol: dict[str, float], what: str) -> None:
    """Elementwise ``|got - want| <= atol + rtol * |want|``, all finite."""
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    assert np.all(np.isfinite(got)), f"{what}: non-finite values"
    np.testing.assert_allclose(got, want, err_msg=what, **tol)


def compare(name: str, case: Case, got) -> None:
    """Checks ``got = (out, (dq, dk, dv))`` of one case against the float64 oracle."""
    q, k, v, w = inputs(case)
    lay = layout(case.cross)
    want_out, want_grads = oracle(q, k, v, w, lay, case.mask, case.window)
    out, grads = got
    tol = TOLERANCES[case.dtype]
    assert out.dtype == q.dtype, f"{name} {case.id}: output dtype {out.dtype}"
    assert_close(out, want_out, tol["forward"], f"{name} {case.id}: out")
    # A query with no allowed key outputs zeros exactly.
    empty = ~allowed(lay, case.mask, case.window).any(-1)
    assert np.all(np.asarray(out, np.float32)[empty] == 0), f"{name} {case.id}: empty rows"
    for label, g, want in zip(("dq", "dk", "dv"), grads, want_grads, strict=True):
        assert g.dtype == q.dtype, f"{name} {case.id}: {label} dtype {g.dtype}"
        assert_close(g, want, tol["grad"], f"{name} {case.id}: {label}")


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
