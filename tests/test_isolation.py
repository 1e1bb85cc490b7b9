"""Isolation: a NaN or inf in one document's query, key or value (or in padding) never reaches
another document's outputs or gradients, bit for bit, in every implementation and layout."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from thdkit._src.kernels.partial import attention_partial
from thdkit._src.mask_types import MaskType
from thdkit._src.segments import Segments, run_lengths

from .strategies import ALL_MASKS, batches, ring_step_layout, segments_of

B, T, H_Q, H_KV, D, D_V, S = 2, 32, 4, 2, 8, 4, 3
BLOCKS = {"block_q": 16, "block_kv": 8}


@functools.partial(jax.jit, static_argnames=("mask", "window", "implementation"))
def _run(q, k, v, layout, *, mask, window, implementation):
    """(out, lse, (dq, dk, dv)) for a loss reading the finite outputs and log-sum-exps."""
    w = jnp.linspace(-1.0, 1.0, q.shape[2] * v.shape[-1]).reshape(q.shape[2], v.shape[-1])

    def loss(q, k, v):
        out, lse = attention_partial(
            q,
            k,
            v,
            **segments_of(layout),
            mask_type=mask,
            window_size=window,
            scale=0.4,
            implementation=implementation,
            **BLOCKS,
        )
        finite_out = jnp.where(jnp.isfinite(out), out, 0.0)
        finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
        return jnp.sum(finite_out * w[None, None]) + jnp.sum(finite_lse), (out, lse)

    (_, (out, lse)), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
    return out, lse, grads


@st.composite
def _layouts(draw):
    kind = draw(st.sampled_from(["self", "cross", "striped2", "dual_chunk_swap"]))
    if kind in ("self", "cross"):
        ids_q, pos_q = draw(batches(shape=(B, T), max_segments=S))
        ids_kv, pos_kv = (ids_q, pos_q)
        if kind == "cross":
            ids_kv, pos_kv = draw(batches(shape=(B, T), max_segments=S))
        rl_q, rl_kv = (np.asarray(run_lengths(x)) for x in (ids_q, ids_kv))
        return dict(ids_q=ids_q, pos_q=pos_q, rl_q=rl_q, ids_kv=ids_kv, pos_kv=pos_kv, rl_kv=rl_kv)
    ids, pos = draw(batches(shape=(B, 2 * T), max_segments=S, strides=(1,)))
    return ring_step_layout(ids, pos, kind, *draw(st.sampled_from([(0, 1), (1, 0), (1, 1)])))


def _inputs():
    rng = np.random.default_rng(0)
    shapes = ((B, T, H_Q, D), (B, T, H_KV, D), (B, T, H_KV, D_V))
    return tuple(np.asarray(rng.normal(size=s), np.float32) for s in shapes)


@pytest.mark.parametrize("implementation", ["blockwise", "reference"])
@pytest.mark.parametrize("mask", ALL_MASKS, ids=lambda m: m.value)
@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    layout=_layouts(),
    window=st.sampled_from([None, (3, 1)]),
    side=st.sampled_from(["q", "kv", "k", "v"]),
    poison=st.sampled_from([np.nan, np.inf, -np.inf]),
    data=st.data(),
)
def test_poison_stays_in_its_document(implementation, mask, layout, window, side, poison, data):
    mask = MaskType(mask)
    ids = layout["ids_q"] if side == "q" else layout["ids_kv"]
    target = data.draw(st.sampled_from(sorted(set(ids[0].tolist()))), label="poisoned id")
    hit = np.zeros_like(ids, bool)
    hit[0] = ids[0] == target  # one document (or the padding) of row 0
    clean = _inputs()
    dirty = [x.copy() for x in clean]
    for index in {"q": [0], "kv": [1, 2], "k": [1], "v": [2]}[side]:
        dirty[index][hit] = poison
    layout = {key: jnp.asarray(a) for key, a in layout.items()}
    options = dict(mask=mask, window=window, implementation=implementation)
    out_c, lse_c, grads_c = _run(*clean, layout, **options)
    out_d, lse_d, grads_d = _run(*dirty, layout, **options)
    # Elsewhere: query rows and key tokens outside the poisoned document.
    ids_q, ids_kv = np.asarray(layout["ids_q"]), np.asarray(layout["ids_kv"])
    other_q = ~((np.arange(B) == 0)[:, None] & (ids_q == target))
    other_kv = ~((np.arange(B) == 0)[:, None] & (ids_kv == target))
    np.testing.assert_array_equal(np.asarray(out_d)[other_q], np.asarray(out_c)[other_q])
    np.testing.assert_array_equal(np.asarray(lse_d)[other_q], np.asarray(lse_c)[other_q])
    dq_c, dk_c, dv_c = (np.asarray(g) for g in grads_c)
    dq_d, dk_d, dv_d = (np.asarray(g) for g in grads_d)
    np.testing.assert_array_equal(dq_d[other_q], dq_c[other_q])
    np.testing.assert_array_equal(dk_d[other_kv], dk_c[other_kv])
    np.testing.assert_array_equal(dv_d[other_kv], dv_c[other_kv])
    # Inside: NaN exactly where a row has an allowed key and reads the poison; gradients finite.
    for g in (*grads_d,):
        assert np.all(np.isfinite(np.asarray(g)))
    poisoned = np.isnan(np.asarray(lse_d))
    if side == "q":
        reached = hit[..., None] & np.isfinite(np.asarray(lse_c))
        np.testing.assert_array_equal(poisoned, reached)
    np.testing.assert_array_equal(np.isnan(np.asarray(out_d)).any(-1), poisoned)


def test_nan_in_padding_value_leaves_every_row_finite():
    """Issue reproducer: v[0, 2] = nan on a padding token of ids [[1, 1, 0, 2]]."""
    ids = jnp.array([[1, 1, 0, 2]])
    pos = jnp.array([[0, 1, 0, 0]])
    rl = run_lengths(ids)
    q = k = jnp.ones((1, 4, 1, 2))
    v = jnp.ones((1, 4, 1, 2)).at[0, 2].set(jnp.nan)
    for implementation in ("blockwise", "reference"):
        out, lse = attention_partial(
            q,
            k,
            v,
            q_segments=Segments(ids, pos, rl),
            kv_segments=Segments(ids, pos, rl),
            mask_type="padding",
            window_size=None,
            scale=1.0,
            implementation=implementation,
        )
        np.testing.assert_array_equal(out[0, :, 0, 0], [1.0, 1.0, 0.0, 1.0])
        assert not np.isnan(np.asarray(lse)).any()


# --- huge finite values ------------------------------------------------------------------------

# One row, documents 1 (tokens 0-7) and 2 (tokens 8-15); the huge value sits in document 2.
HUGE_IDS = np.array([[1] * 8 + [2] * 8], np.int32)


def _huge_inputs(side: str, value: float) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """``(clean, dirty)`` (q, k, v): ``dirty`` holds ``value`` in token 12's vector of ``side``."""
    rng = np.random.default_rng(1)
    clean = tuple(np.asarray(rng.normal(size=(1, 16, 2, 4)), np.float32) for _ in range(3))
    dirty = [x.copy() for x in clean]
    dirty["qkv".index(side)][0, 12, 0] = value
    return clean, tuple(dirty)


@functools.partial(jax.jit, static_argnames=("extra",))
def _dense(q, k, v, ids, *, extra):
    """(out, (dq, dk, dv)) of the dense path (``bias`` or ``mask``), for a loss reading document
    1's rows only."""
    from thdkit._src.doors.jax_nn import dot_product_attention

    seq = q.shape[1]
    options = {
        "bias": {"bias": jnp.zeros((1, 1, seq, seq))},
        "mask": {"mask": jnp.ones((1, 1, seq, seq), bool)},
    }[extra]
    weights = jnp.linspace(-1.0, 1.0, 2 * 4).reshape(1, 1, 2, 4)

    def loss(q, k, v):
        out = dot_product_attention(q, k, v, segment_ids=ids, is_causal=True, **options)
        return jnp.sum(jnp.where((ids == 1)[..., None, None], out * weights, 0.0)), out

    (_, out), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


@pytest.mark.parametrize("extra", ["bias", "mask"])
@pytest.mark.parametrize("side", ["q", "k", "v"])
@pytest.mark.parametrize("value", [3e38, -3e38])
def test_a_huge_finite_value_stays_in_its_document_on_the_dense_path(extra, side, value):
    """A finite value near float32's largest in document 2 leaves document 1's output and
    gradients bit-equal to the call without it, and equal to document 1 run alone."""
    clean, dirty = _huge_inputs(side, value)
    ids = jnp.asarray(HUGE_IDS)
    out_c, grads_c = _dense(*clean, ids, extra=extra)
    out_d, grads_d = _dense(*dirty, ids, extra=extra)
    out_a, grads_a = _dense(*(x[:, :8] for x in clean), ids[:, :8], extra=extra)
    np.testing.assert_array_equal(np.asarray(out_d)[0, :8], np.asarray(out_c)[0, :8])
    np.testing.assert_allclose(np.asarray(out_d)[0, :8], np.asarray(out_a)[0], rtol=1e-6, atol=1e-6)
    for name, g_d, g_c, g_a in zip("qkv", grads_d, grads_c, grads_a, strict=True):
        g_d, g_c = np.asarray(g_d)[0, :8], np.asarray(g_c)[0, :8]
        np.testing.assert_array_equal(g_d, g_c, err_msg=f"d{name}")
        np.testing.assert_allclose(g_d, np.asarray(g_a)[0], rtol=1e-5, atol=1e-6, err_msg=name)
