"""cuDNN: JAX's packed offsets address the intended keys once kv heads are repeated (CPU), the
metadata handed to JAX, the refusal without a GPU, and (GPU) cuDNN against the reference."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from thdkit._src import reorder, synth
from thdkit._src.kernels.cudnn import packed_inputs, poisoned_rows, spans_of
from thdkit._src.mask_types import MaskType
from thdkit._src.masks import pair_mask
from thdkit._src.metadata import seqlens_and_offsets
from thdkit._src.segments import Segments, run_lengths
from thdkit.kernels import attention, is_representable

from . import harness
from .harness import S, layout_keywords

SIDES = ("ids_q", "pos_q", "ids_kv", "pos_kv")
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")


def _fix_seqlen_offsets():
    from jax._src.cudnn import fused_attention_stablehlo

    return fused_attention_stablehlo._fix_seqlen_offsets


@pytest.mark.parametrize("heads_kv", [4, 2, 1], ids=lambda h: f"H_kv={h}")
def test_jax_packed_offsets_address_the_intended_keys(heads_kv):
    """JAX's own offset fix on our compact metadata: with kv heads repeated up to H_q (what
    cudnn.run does), every kv offset is the flat index of element [b, k_o, 0, 0] of the key
    tensor; with GQA unrepeated it is only from jax 0.12 on (jax 0.10 and 0.11 scale by the
    query's heads)."""
    batch, seq_q, seq_kv, heads_q, dim = 3, 16, 24, 4, 8
    layout = synth.cross_segments(
        np.random.default_rng(0), batch=batch, seq_len_q=seq_q, seq_len_kv=seq_kv, max_segments=S
    )
    meta = seqlens_and_offsets(**layout_keywords(dict(zip(SIDES, layout, strict=True))))
    packed = packed_inputs(meta, S)
    query = jnp.zeros((batch, seq_q, heads_q, dim))

    def offsets(heads):
        key = jnp.zeros((batch, seq_kv, heads, dim))
        fixed = _fix_seqlen_offsets()(*packed, query, key)
        return np.asarray(fixed[3]).reshape(-1), np.asarray(fixed[2]).reshape(-1)

    # The intended flat index of each segment's first key (and query), in row order.
    want_kv, want_q = [], []
    for b in range(batch):
        for k in range(S):
            if int(meta.kv_offsets[b, k]) >= 0:
                want_kv.append((b * seq_kv + int(meta.kv_offsets[b, k])) * heads_q * dim)
                want_q.append((b * seq_q + int(meta.q_offsets[b, k])) * heads_q * dim)
    kv_repeated, q_offsets = offsets(heads_q)  # what cudnn.run passes
    count = len(want_kv)
    np.testing.assert_array_equal(kv_repeated[:count], want_kv)
    np.testing.assert_array_equal(q_offsets[:count], want_q)
    if heads_kv != heads_q:
        # Unrepeated: the flat index of element [b, k_o, 0, 0] is (b*T + k_o) * H_kv * D.
        kv_raw, _ = offsets(heads_kv)
        intended = np.asarray(want_kv) // heads_q * heads_kv
        scales_by_kv_heads = jax.__version_info__ >= (0, 12)
        assert np.array_equal(kv_raw[:count], intended) == scales_by_kv_heads, (
            "JAX changed how it scales GQA kv offsets"
        )


@pytest.mark.parametrize("mask", ["padding", "padding_causal", "causal_bottom_right"])
def test_poisoned_rows_match_the_dense_rule(mask):
    """The O(T) poison of the cuDNN path (prefix sums over key spans) equals the dense rule."""
    mask = MaskType.parse(mask)
    ids, pos = synth.packed_segments(np.random.default_rng(1), batch=2, seq_len=32, max_segments=S)
    ids, pos = jnp.asarray(ids), jnp.asarray(pos)
    side = Segments(ids, pos, run_lengths(ids))
    window = (3, None) if mask.uses_positions else None
    spans = spans_of(side, side, mask_type=mask, window_size=window)
    rng = np.random.default_rng(2)
    bad_q = jnp.asarray(rng.random((2, 32, 4)) < 0.05)
    bad_kv = jnp.asarray(rng.random((2, 32, 2)) < 0.1)
    got = poisoned_rows(spans, bad_q, bad_kv)
    allowed = np.asarray(pair_mask(side, side, mask_type=mask, window_size=window))
    kv_heads = np.repeat(np.asarray(bad_kv), 2, axis=-1)  # query head h reads kv head h // 2
    hits = np.einsum("bqk,bkh->bqh", allowed, kv_heads) > 0
    want = (hits | np.asarray(bad_q)) & allowed.any(-1)[..., None]
    np.testing.assert_array_equal(got, want)
    assert want.any() and not want.all()


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the error without a GPU")
def test_cudnn_without_gpu_raises_clearly():
    with pytest.raises(NotImplementedError, match=r"cudnn: needs a CUDA GPU"):
        x = jnp.zeros((1, 8, 2, 8), jnp.bfloat16)
        layout = dict(ids_q=harness.ROW_IDS, pos_q=harness.ROW_POS)
        attention(
            x, x, x, **layout_keywords(layout, max_segments_per_seq=2), implementation="cudnn"
        )


# --- GPU: cuDNN against the reference ----------------------------------------------------------


IMPLS = ("cudnn", "reference")


def _out_and_grads(q, k, v, implementation: str, common: dict):
    """``(out, dq, dk, dv)`` of ``sum(out ** 2)``, jitted."""

    def loss(q, k, v):
        out = attention(q, k, v, **common, implementation=implementation)
        return jnp.sum(out.astype(jnp.float32) ** 2), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
    return out, *grads


def _gpu_inputs(seed: int, seq_q: int, seq_kv: int | None = None, heads=(4, 4), **options):
    """``(q, k, v)``: bfloat16 unless ``options`` say otherwise, head dim 64, batch 2."""
    options = dict(dim=64, dim_v=64, dtype="bfloat16") | options
    return harness.random_inputs(seed, seq_q=seq_q, seq_kv=seq_kv, heads=heads, **options)[:3]


@gpu
@needs_gpu
@pytest.mark.parametrize("mask", ["padding", "padding_causal", "causal_bottom_right"])
@pytest.mark.parametrize("window", [None, (16, 0)], ids=str)
def test_cudnn_matches_reference_self_attention(mask, window):
    if window is not None and mask == "padding":
        pytest.skip("cuDNN applies windows with causal masks only")
    ids, pos = synth.packed_segments(np.random.default_rng(0), batch=2, seq_len=256, max_segments=S)
    q, k, v = _gpu_inputs(0, 256)
    common = layout_keywords(dict(ids_q=ids, pos_q=pos), mask_type=mask, window_size=window)
    (out_c, *grads_c), (out_r, *grads_r) = (_out_and_grads(q, k, v, i, common) for i in IMPLS)
    tol = {"atol": 3e-2, "rtol": 3e-2}
    np.testing.assert_allclose(np.asarray(out_c, np.float32), np.asarray(out_r, np.float32), **tol)
    for g_c, g_r in zip(grads_c, grads_r, strict=True):
        np.testing.assert_allclose(np.asarray(g_c, np.float32), np.asarray(g_r, np.float32), **tol)


@gpu
@needs_gpu
def test_cudnn_cross_attention_and_automatic_choice():
    layout = synth.cross_segments(
        np.random.default_rng(1), batch=2, seq_len_q=128, seq_len_kv=256, max_segments=S
    )
    q, k, v = _gpu_inputs(1, 128, 256, heads=(4, 2))
    common = layout_keywords(dict(zip(SIDES, layout, strict=True)))
    want = attention(q, k, v, **common, implementation="reference")
    for implementation in ("cudnn", None):
        got = jax.jit(functools.partial(attention, **common, implementation=implementation))(
            q, k, v
        )
        np.testing.assert_allclose(
            np.asarray(got, np.float32), np.asarray(want, np.float32), atol=3e-2, rtol=3e-2
        )


@gpu
@needs_gpu
def test_cudnn_refuses_what_it_cannot_express():
    ids, pos = synth.packed_segments(np.random.default_rng(2), batch=1, seq_len=128, max_segments=S)
    shuffled = [reorder.striped(x, cp=2, stripe_size=4) for x in (ids, pos)]
    step = reorder.ring_step(*shuffled, cp=2, q_rank=1, kv_rank=0)
    common = layout_keywords(dict(zip(SIDES, step, strict=True)))
    assert not bool(is_representable(**common)), "choose a layout the kernel cannot read"
    q, k, v = (jnp.zeros((1, 64, 2, 64), jnp.bfloat16) for _ in range(3))
    with pytest.raises(NotImplementedError, match="compact metadata cannot express"):
        attention(q, k, v, **common, implementation="cudnn")
    with pytest.raises(NotImplementedError, match="float32"):
        attention(
            q.astype(jnp.float32),
            k.astype(jnp.float32),
            v.astype(jnp.float32),
            **common,
            implementation="cudnn",
        )
    automatic = attention(q, k, v, **common)
    blockwise = attention(q, k, v, **common, implementation="blockwise")
    np.testing.assert_array_equal(np.asarray(automatic), np.asarray(blockwise))


def _uneven_rows(seq: int, counts: tuple[int, ...], seed: int):
    """One row per count, filled with that many documents; the last row ends in tail padding."""
    rng = np.random.default_rng(seed)
    rows = [synth.filled_segments(rng, batch=1, seq_len=seq, segments=c) for c in counts]
    ids, pos = (np.concatenate(side) for side in zip(*rows, strict=True))
    last = int(np.sum(ids[-1] == ids[-1, -1]))  # the length of the last row's last document
    ids[-1, seq - last // 2 :] = 0  # its second half: padding (positions keep counting)
    return jnp.asarray(ids), jnp.asarray(pos)


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize(
    ("heads_kv", "window"), [(4, None), (2, None), (1, None), (2, (32, 0)), (1, (7, 0))], ids=str
)
def test_cudnn_matches_reference_on_uneven_rows_gqa_and_windows(dtype, heads_kv, window):
    """B = 3 rows of 1, 5 and 12 documents, GQA (2 kv heads) and MQA (1), sliding windows,
    bfloat16 and float16: cuDNN's output and gradients equal the reference's."""
    seq, counts = 256, (1, 5, 12)
    ids, pos = _uneven_rows(seq, counts, seed=5)
    q, k, v = _gpu_inputs(6, seq, heads=(4, heads_kv), batch=len(counts), dtype=dtype)
    common = layout_keywords(
        dict(ids_q=ids, pos_q=pos), window_size=window, max_segments_per_seq=max(counts)
    )
    (out_c, *grads_c), (out_r, *grads_r) = (_out_and_grads(q, k, v, i, common) for i in IMPLS)
    tol = {"atol": 3e-2, "rtol": 3e-2} if dtype == "bfloat16" else {"atol": 1e-2, "rtol": 1e-2}
    assert not np.asarray(out_r[-1, -1], np.float32).any()  # a padded query gives zeros
    for got, want in zip((out_c, *grads_c), (out_r, *grads_r), strict=True):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **tol)
