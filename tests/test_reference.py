"""The dense oracle, ``reference_attention``, against a float64 NumPy loop, at any finite scale.

The oracle must be the most robust path: outputs and log-sum-exps right at scales up to 1e30
(large finite logits), eagerly and under ``jit`` (where the compiler fuses and may contract the
softmax shift), with ties and rows that have no allowed key; float64 when x64 is enabled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import thdkit
from thdkit._src.mask_types import MaskType
from thdkit._src.reference import compute_dtype, reference_attention
from thdkit._src.segments import Segments

SCALES = (1.0, 1e10, 1e20, 1e30)
MASKS = ("padding", "padding_causal", "padding_causal_bottom_right")
# Cross-attention, B = 2. Row 0: padding queries (tokens 5, 6) and a document (id 3) absent from
# kv have no allowed key. Row 1: queries 0 and 1 precede every key of their document (causal
# masks leave them no key).
IDS_Q = np.array([[1, 1, 1, 2, 2, 0, 0, 3], [1, 1, 1, 1, 2, 2, 2, 2]])
POS_Q = np.array([[0, 1, 2, 0, 1, 2, 0, 0], [0, 1, 2, 3, 0, 1, 2, 3]])
IDS_KV = np.array([[1, 1, 1, 1, 2, 2, 2, 0, 0, 0], [1, 1, 2, 2, 2, 2, 2, 2, 0, 0]])
POS_KV = np.array([[0, 1, 2, 3, 0, 1, 2, 0, 0, 0], [2, 3, 0, 1, 2, 3, 4, 5, 0, 0]])
H_Q, H_KV, D, D_V = 2, 1, 4, 3


def np_run_lengths(ids: np.ndarray) -> np.ndarray:
    """Length of each token's run of equal non-zero ids (0 on padding), by a loop."""
    out = np.zeros_like(ids)
    for row, row_ids in enumerate(ids):
        t = 0
        while t < len(row_ids):
            end = t
            while end + 1 < len(row_ids) and row_ids[end + 1] == row_ids[t]:
                end += 1
            out[row, t : end + 1] = (end - t + 1) if row_ids[t] else 0
            t = end + 1
    return out


def np_attention(q, k, v, mask: str, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """float64 masked softmax attention by loops: the spec of docs/semantics.md, literally."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    rl_q, rl_kv = np_run_lengths(IDS_Q), np_run_lengths(IDS_KV)
    batch, seq_q, heads_q, _ = q.shape
    groups = heads_q // k.shape[2]
    out = np.zeros((batch, seq_q, heads_q, v.shape[-1]))
    lse = np.full((batch, seq_q, heads_q), -np.inf)
    for b in range(batch):
        for i in range(seq_q):
            keys = []
            for j in range(IDS_KV.shape[1]):
                same = IDS_Q[b, i] == IDS_KV[b, j] != 0
                if mask == "padding_causal":
                    same = same and POS_Q[b, i] >= POS_KV[b, j]
                elif mask == "padding_causal_bottom_right":
                    same = same and rl_q[b, i] - POS_Q[b, i] <= rl_kv[b, j] - POS_KV[b, j]
                if same:
                    keys.append(j)
            if not keys:
                continue
            for h in range(heads_q):
                logits = scale * (k[b, keys, h // groups] @ q[b, i, h])
                top = logits.max()
                weights = np.exp(logits - top)
                out[b, i, h] = weights @ v[b, keys, h // groups] / weights.sum()
                lse[b, i, h] = top + np.log(weights.sum())
    return out, lse


def inputs(kind: str, seed: int = 0, dtype=np.float32) -> tuple[np.ndarray, ...]:
    """q, k with dot products exact in float32 (so float32 and float64 see the same logits, ties
    included), v normal. ``ties``: entries in {-1, 0, 1} (many tied logits); ``spread``:
    multiples of 1/8 in [-1, 1]."""
    rng = np.random.default_rng(seed)
    if kind == "ties":
        q, k = (rng.integers(-1, 2, (2, n, h, D)) for n, h in ((8, H_Q), (10, H_KV)))
    else:
        q, k = (rng.integers(-8, 9, (2, n, h, D)) / 8 for n, h in ((8, H_Q), (10, H_KV)))
    v = rng.standard_normal((2, 10, H_KV, D_V))
    return tuple(np.asarray(x, dtype) for x in (q, k, v))


def sides() -> dict[str, Segments]:
    return {
        "q_segments": Segments.from_ids(IDS_Q, POS_Q),
        "kv_segments": Segments.from_ids(IDS_KV, POS_KV),
    }


def reference(q, k, v, mask: str, scale):
    return reference_attention(
        q, k, v, **sides(), mask_type=MaskType.parse(mask), window_size=None, scale=scale
    )


@jax.jit
def _jitted_all_masks(q, k, v, scale):
    """Every mask type in one program, ``scale`` traced: one compile for all scales."""
    return {mask: reference(q, k, v, mask, scale) for mask in MASKS}


def assert_matches(out, lse, want_out, want_lse, *, rtol: float, what: str) -> None:
    out, lse = np.asarray(out, np.float64), np.asarray(lse, np.float64)
    empty = np.isneginf(want_lse)
    assert empty.any() and (~empty).any(), what  # the layout has both kinds of rows
    np.testing.assert_array_equal(out[empty], 0.0, err_msg=f"{what}: out of rows with no key")
    np.testing.assert_array_equal(lse[empty], -np.inf, err_msg=f"{what}: lse of rows with no key")
    np.testing.assert_allclose(out, want_out, rtol=rtol, atol=rtol, err_msg=f"{what}: out")
    np.testing.assert_allclose(lse[~empty], want_lse[~empty], rtol=rtol, err_msg=f"{what}: lse")


def test_the_oracle_layout_has_ties_and_rows_without_keys():
    q, k, _ = inputs("ties")
    logits = np.einsum("bqhd,bkd->bqhk", q.astype(np.float64), k[:, :, 0].astype(np.float64))
    allowed = (IDS_Q[:, :, None] == IDS_KV[:, None, :]) & (IDS_Q[:, :, None] != 0)
    top = np.where(allowed[:, :, None], logits, -np.inf).max(-1, keepdims=True)
    ties = ((logits == top) & allowed[:, :, None]).sum(-1)
    assert (ties > 1).sum() >= 4


@pytest.mark.parametrize("kind", ["ties", "spread"])
def test_large_scales_under_jit_match_float64(kind):
    q, k, v = inputs(kind)
    for scale in SCALES:
        got = _jitted_all_masks(q, k, v, jnp.float32(scale))
        for mask in MASKS:
            want = np_attention(q, k, v, mask, scale)
            assert_matches(*got[mask], *want, rtol=2e-5, what=f"jit {kind} {mask} scale {scale}")


@pytest.mark.parametrize("scale", SCALES)
def test_large_scales_eagerly_match_float64(scale):
    q, k, v = inputs("ties", seed=1)
    for mask in MASKS:
        out, lse = reference(q, k, v, mask, scale)
        assert out.dtype == lse.dtype == jnp.float32
        assert_matches(
            out, lse, *np_attention(q, k, v, mask, scale), rtol=2e-5, what=f"{mask} {scale}"
        )


def test_negative_and_zero_scales():
    q, k, v = inputs("spread", seed=2)
    for scale in (-1e30, -1.0, 0.0):
        got = _jitted_all_masks(q, k, v, jnp.float32(scale))
        for mask in MASKS:
            want = np_attention(q, k, v, mask, scale)
            assert_matches(*got[mask], *want, rtol=2e-5, what=f"{mask} scale {scale}")


def test_gradients_stay_finite_at_large_scales():
    q, k, v = inputs("ties", seed=3)

    def loss(q, k, v, scale):
        out, lse = reference(q, k, v, "padding_causal", scale)
        return jnp.sum(out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) / scale)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    for scale in SCALES:
        for g in grad(q, k, v, jnp.float32(scale)):
            assert np.isfinite(np.asarray(g)).all(), scale


def test_attention_reference_implementation_at_large_scales():
    """``thdkit.attention(implementation="reference")`` runs the oracle: right under jit."""
    q, k, v = inputs("spread", seed=4)
    for scale in (1e10, 1e30):
        out = jax.jit(
            lambda q, k, v, scale=scale: thdkit.attention(
                q, k, v, segment_ids_q=IDS_Q, segment_pos_q=POS_Q, segment_ids_kv=IDS_KV,
                segment_pos_kv=POS_KV, mask_type="padding", max_segments_per_seq=3,
                implementation="reference", scale=scale,
            )
        )(q, k, v)  # fmt: skip
        want, _ = np_attention(q, k, v, "padding", scale)
        np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5, err_msg=str(scale))


def test_a_nan_stays_in_its_document_at_large_scales():
    q, k, v = inputs("spread", seed=5)
    bad = k.copy()
    bad[0, 4, 0, 1] = np.nan  # the first key of document 2, row 0
    for scale in (1.0, 1e30):
        clean = _jitted_all_masks(q, k, v, jnp.float32(scale))
        dirty = _jitted_all_masks(q, bad, v, jnp.float32(scale))
        for mask in MASKS:
            (out, lse), (out_bad, lse_bad) = clean[mask], dirty[mask]
            reads = np.zeros(IDS_Q.shape, bool)
            reads[0, 3:5] = True  # the queries of document 2 (every mask lets them read key 4)
            for head in range(H_Q):
                np.testing.assert_array_equal(np.isnan(lse_bad[..., head]), reads)
            np.testing.assert_array_equal(out_bad[~reads], out[~reads])
            np.testing.assert_array_equal(lse_bad[~reads], lse[~reads])


def test_float64_when_x64_is_enabled():
    with jax.enable_x64(True):
        assert compute_dtype() == jnp.float64
        q, k, v = inputs("spread", seed=6)
        for scale in SCALES:
            got = _jitted_all_masks(q, k, v, jnp.float64(scale))
            for mask in MASKS:
                out, lse = got[mask]
                assert out.dtype == lse.dtype == jnp.float64
                want = np_attention(q, k, v, mask, scale)
                assert_matches(out, lse, *want, rtol=1e-12, what=f"x64 {mask} {scale}")
        # float64 inputs are read without a float32 round trip.
        q64 = np.asarray(q, np.float64) + 1e-9
        out, _ = reference(q64, k.astype(np.float64), v.astype(np.float64), "padding", 1.0)
        want, _ = np_attention(q64, k, v, "padding", 1.0)
        np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)
    assert compute_dtype() == jnp.float32
