"""The Pallas kernels, in interpret mode on CPU, against the float64 oracle of tests/harness.py:
forward, log-sum-exp and gradients for every mask type, windows, GQA and MQA, cross-attention,
ring steps, padding at the end of rows, isolation of non-finite values, the scalar-prefetch (TPU)
path in the TPU interpreter and the ``attention(..., implementation="pallas")`` entry point;
soft-capped logits and attention sinks against a float64 oracle of their own; and the lowering
of the compiled kernels for GPU (Triton) and TPU (Mosaic), which runs on CPU through
``jax.export``.

Interpret mode compiles slowly, so the layouts of one shape are stacked into one batch (rows with
different documents, segment counts and ring-step orders) and each (mask, window) compiles once;
the isolation test reuses those compilations.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.experimental.pallas import tpu as pltpu

from thdkit._src.kernels.pallas import Pallas, pallas_attention, visiting_query_tiles
from thdkit._src.mask_types import MaskType, check_window
from thdkit._src.reference import reference_attention
from thdkit._src.segments import Segments, run_lengths
from thdkit.kernels import (
    AttentionConfig,
    TileRanges,
    attention,
    default_order,
    plan_attention,
    tile_ranges,
)

from . import harness
from .harness import SCALE
from .strategies import (
    ATTN_H_KV,
    ATTN_H_Q,
    ATTN_S,
    ATTN_T,
    ATTN_T_KV,
    batches,
    cross_layout,
    missing_layout,
    ring_layout,
    ring_step_layout,
    segments_of,
    self_layout,
)

S, T, T_KV = ATTN_S, ATTN_T, ATTN_T_KV
BLOCK = 16  # T = 40 is 2.5 query tiles: the last one ends in padding
# XLA:CPU compiles the interpreted kernels ~40% faster without its backend optimisations; the
# tiny test programs run in milliseconds either way.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _square_batch() -> dict[str, np.ndarray]:
    """Ten rows of T_q = T_kv = 40: self-attention, a segment absent from the keys, striped
    (stripe 2) and dual-chunk-swap ring steps (global document lengths)."""
    parts = [
        self_layout(0),
        missing_layout(2),
        ring_layout(3, "striped2", 0, 1),
        ring_layout(3, "striped2", 1, 0),
        ring_layout(4, "dual_chunk_swap", 1, 0),
    ]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


SQUARE = _square_batch()
BATCH = SQUARE["ids_q"].shape[0]


@functools.partial(
    jax.jit,
    static_argnames=("mask", "window", "implementation", "tpu", "cap"),
    compiler_options=FAST_COMPILE,
)
def _run(
    q, k, v, w_out, w_lse, layout, *, mask, window, implementation="pallas", tpu=False, cap=None
):
    """(out, lse, (dq, dk, dv)) of harness.partial_grads; ``tpu``: the pallas kernels take the
    TPU path (scalar prefetch) in the TPU interpreter; ``cap``: the logits' soft cap (pallas
    only)."""
    sides = segments_of(layout)

    def partial(q, k, v):
        if implementation == "reference":
            return reference_attention(
                q, k, v, **sides, mask_type=mask, window_size=window, scale=SCALE
            )
        ranges = tile_ranges(
            *sides.values(), mask_type=mask, window_size=window, block_q=BLOCK, block_kv=BLOCK
        )
        return pallas_attention(
            q, k, v, *sides.values(), ranges, mask_type=mask, window_size=window, scale=SCALE,
            logits_soft_cap=cap, interpret=pltpu.InterpretParams() if tpu else None,
            backend="tpu" if tpu else None,
        )  # fmt: skip

    return harness.partial_grads(partial, q, k, v, w_out, w_lse)


# Every mask type; windows (a negative bound is unbounded) on one type of each family: the types
# within a family differ only in name. The square rows (self-attention, a missing segment, ring
# steps) with GQA; the last case is cross-attention (T_q = 40 queries over T_kv = 56 keys).
CASES = [
    (MaskType.NO_MASK, None),
    (MaskType.PADDING, (2, 1)),
    (MaskType.CAUSAL, None),
    (MaskType.PADDING_CAUSAL, (3, 0)),
    (MaskType.CAUSAL_BOTTOM_RIGHT, None),
    (MaskType.PADDING_CAUSAL_BOTTOM_RIGHT, (4, -1)),
]


@pytest.mark.parametrize(("mask", "window"), CASES, ids=[f"{m.value}-{w}" for m, w in CASES])
def test_pallas_matches_float64_oracle(mask, window):
    window = check_window(window)
    if mask == MaskType.PADDING_CAUSAL_BOTTOM_RIGHT:
        layout, seed = cross_layout(5), 1
    else:
        layout, seed = SQUARE, 0
    inputs = harness.layout_inputs(layout, seed)
    got = _run(*inputs, layout, mask=mask, window=window)
    assert harness.check_partial(got, inputs, layout, mask, window, what="pallas").any()


def test_tpu_path_matches_float64_oracle_mqa():
    """The TPU path (tile ranges through scalar prefetch), run by the TPU interpreter that
    emulates its memory spaces, on stripe-2 ring steps with one key/value head (MQA)."""
    layout = ring_layout(6, "striped2", 1, 0)
    inputs = harness.layout_inputs(layout, 2, heads=(2, 1))
    got = _run(*inputs, layout, mask=MaskType.CAUSAL, window=None, tpu=True)
    assert harness.check_partial(got, inputs, layout, MaskType.CAUSAL, None, what="tpu").any()


# --- soft-capped logits and attention sinks ----------------------------------------------------


# Soft caps that matter: queries scaled by 4 give logits scale * q.k of magnitude ~10, which a cap
# of 2 saturates (tanh near +-1, its derivative near 0) and a cap of 8 bends. Float32 on the
# square rows (GQA, a missing segment, ring steps) and on cross-attention; one bfloat16 case.
CAP_CASES = [
    (MaskType.PADDING, None, 2.0, "float32"),
    (MaskType.PADDING_CAUSAL, (3, 0), 2.0, "float32"),
    (MaskType.PADDING_CAUSAL_BOTTOM_RIGHT, (4, -1), 8.0, "float32"),
    (MaskType.CAUSAL, None, 2.0, "bfloat16"),
]


@pytest.mark.parametrize(
    ("mask", "window", "cap", "dtype"),
    CAP_CASES,
    ids=[f"{m.value}-{w}-cap{c:g}-{d}" for m, w, c, d in CAP_CASES],
)
def test_soft_cap_matches_float64_oracle(mask, window, cap, dtype):
    window = check_window(window)
    layout = cross_layout(5) if mask.is_bottom_right else SQUARE
    q, k, v, w_out, w_lse = harness.layout_inputs(layout, 6, dtype=dtype)
    q = q * np.asarray(4, q.dtype)  # exact in every dtype
    out, lse, grads = _run(q, k, v, w_out, w_lse, layout, mask=mask, window=window, cap=cap)
    want_out, want_lse, want_grads = harness.partial_oracle(
        q, k, v, layout, mask, window, w_out=w_out, w_lse=w_lse, logits_soft_cap=cap
    )
    # The cap matters: logits reach ~10 and, uncapped, the outputs differ.
    first = np.float64(q[:, :, :: ATTN_H_Q // ATTN_H_KV])  # the first query head of each group
    logits = SCALE * np.einsum("bqhd,bkhd->bhqk", first, np.float64(k))
    uncapped, _, _ = harness.partial_oracle(q, k, v, layout, mask, window)
    assert np.abs(logits).max() > 8 and np.abs(uncapped - want_out).max() > 0.1
    # The kernels return float32 outputs; the oracle's checks read them in the inputs' dtype.
    got = (out.astype(dtype), lse, grads)
    harness.check_outputs(
        got, (want_out, want_lse, want_grads), dtype=dtype, what="pallas soft cap", zero_dq=True
    )


def test_attention_pallas_soft_cap_and_sinks_match_float64_oracle():
    """``attention(..., implementation="pallas", logits_soft_cap=..., sinks=...)``: the sinks
    join after the kernels through their log-sum-exp; forward and gradients (the sinks' too)
    close to the float64 oracle, a row with no allowed key at 0 with no gradient to the sinks."""
    layout = missing_layout(9)
    q, k, v, w_out, _ = harness.layout_inputs(layout, 7)
    q = 4 * q
    sinks = np.linspace(-1.0, 2.0, ATTN_H_Q, dtype=np.float32)
    mask, cap = MaskType.PADDING_CAUSAL, 2.0

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def step(q, k, v, sinks):
        def loss(q, k, v, sinks):
            out = attention(
                q, k, v, segment_ids_q=layout["ids_q"], segment_pos_q=layout["pos_q"],
                segment_ids_kv=layout["ids_kv"], segment_pos_kv=layout["pos_kv"],
                mask_type=mask, max_segments_per_seq=S, scale=SCALE, implementation="pallas",
                logits_soft_cap=cap, sinks=sinks,
            )  # fmt: skip
            return jnp.sum(out * w_out), out

        return jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True)(q, k, v, sinks)

    (_, out), (*grads, d_sinks) = step(q, k, v, sinks)
    want = harness.partial_oracle(
        q, k, v, layout, mask, None, w_out=w_out, logits_soft_cap=cap, sinks=sinks
    )
    harness.check_outputs(
        (out, None, (*grads, d_sinks)), want, dtype="float32", what="sinks", zero_dq=True
    )
    assert np.isneginf(want[1]).any()  # segment 2 has no keys: its rows output 0


# --- isolation of non-finite values ------------------------------------------------------------

ISOLATION_MASK, ISOLATION_WINDOW = MaskType.PADDING_CAUSAL, (3, 0)  # compiled above


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    row=st.integers(0, BATCH - 1),
    side=st.sampled_from(["q", "k", "v"]),
    poison=st.sampled_from([np.nan, np.inf, -np.inf]),
    data=st.data(),
)
def test_poison_stays_in_its_document(row, side, poison, data):
    """A NaN or inf in one document (or the padding) of one row of the square batch: every other
    row, and every gradient outside the document, is bit-equal to the clean call; the NaN rows
    are exactly the reference's."""
    ids = SQUARE["ids_q"] if side == "q" else SQUARE["ids_kv"]
    target = data.draw(st.sampled_from(sorted(set(ids[row].tolist()))), label="poisoned id")
    clean = harness.layout_inputs(SQUARE, 3)
    dirty = [x.copy() for x in clean]
    in_row = (np.arange(BATCH) == row)[:, None]
    dirty[{"q": 0, "k": 1, "v": 2}[side]][in_row & (ids == target)] = poison
    options = dict(mask=ISOLATION_MASK, window=ISOLATION_WINDOW)
    out_c, lse_c, grads_c = _run(*clean, SQUARE, **options)
    out_d, lse_d, grads_d = _run(*dirty, SQUARE, **options)
    _, lse_r, _ = _run(*dirty, SQUARE, **options, implementation="reference")
    other_q = ~(in_row & (SQUARE["ids_q"] == target))
    other_kv = ~(in_row & (SQUARE["ids_kv"] == target))
    np.testing.assert_array_equal(np.asarray(out_d)[other_q], np.asarray(out_c)[other_q])
    np.testing.assert_array_equal(np.asarray(lse_d)[other_q], np.asarray(lse_c)[other_q])
    for g_d, g_c, other in zip(grads_d, grads_c, (other_q, other_kv, other_kv), strict=True):
        np.testing.assert_array_equal(np.asarray(g_d)[other], np.asarray(g_c)[other])
        assert np.all(np.isfinite(np.asarray(g_d)))
    poisoned = np.isnan(np.asarray(lse_d))
    np.testing.assert_array_equal(poisoned, np.isnan(np.asarray(lse_r)))
    np.testing.assert_array_equal(np.isnan(np.asarray(out_d)).any(-1), poisoned)


# --- tile bookkeeping --------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("mask", "window"), compiler_options=FAST_COMPILE)
def _visitors(q_side, kv_side, *, mask, window):
    """Tile ranges (8-token query tiles, 4-token key tiles) and their visiting query tiles of
    two (ids, positions) layouts."""
    q, kv = (Segments(ids, pos, run_lengths(ids)) for ids, pos in (q_side, kv_side))
    ranges = tile_ranges(q, kv, mask_type=mask, window_size=window, block_q=8, block_kv=4)
    return ranges, visiting_query_tiles(ranges)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    q_side=batches(shape=(2, T), max_segments=S),
    kv_side=batches(shape=(2, T_KV), max_segments=S),
    config=st.sampled_from(
        [
            (MaskType.PADDING, None),
            (MaskType.CAUSAL, (3, 0)),
            (MaskType.CAUSAL_BOTTOM_RIGHT, (2, None)),
        ]
    ),
)
def test_visiting_query_tiles_are_exactly_the_visitors(q_side, kv_side, config):
    """Per key tile, [lo, hi) is the span of the query tiles whose ranges hold it, and holds
    every one of them (tile_ranges never moves backwards along a row)."""
    ranges, (q_lo, q_hi) = _visitors(q_side, kv_side, mask=config[0], window=config[1])
    q_lo, q_hi = np.asarray(q_lo), np.asarray(q_hi)
    lo, hi = np.asarray(ranges.lo), np.asarray(ranges.hi)
    for b in range(lo.shape[0]):
        for c in range(ranges.num_kv_tiles):
            visitors = [r for r in range(lo.shape[1]) if lo[b, r] <= c < hi[b, r]]
            span = (min(visitors), max(visitors) + 1) if visitors else (0, 0)
            assert (q_lo[b, c], q_hi[b, c]) == span, (b, c)


def test_visiting_query_tiles_cover_ranges_that_move_backwards():
    """Ranges that move backwards (tile_ranges makes none) still get a superset: query tile 1
    visits key tile 0, tile 2 key tile 1, tiles 0 and 2 key tile 2."""
    ranges = TileRanges(
        lo=jnp.array([[2, 0, 1]]),
        hi=jnp.array([[3, 1, 3]]),
        num_kv_tiles=3,
        block_q=4,
        block_kv=4,
    )
    q_lo, q_hi = visiting_query_tiles(ranges)
    assert q_lo.tolist() == [[0, 0, 0]] and q_hi.tolist() == [[2, 3, 3]]


# --- the entry point ---------------------------------------------------------------------------


_ENTRY_CONFIG = dict(mask_type="causal_bottom_right", window_size=(5, 0), max_segments_per_seq=S)


@functools.partial(jax.jit, compiler_options=FAST_COMPILE)
def _entry_step(q, k, v, w_out, segments):
    """(out, None, (dq, dk, dv)) of ``attention`` with a plan made for pallas."""
    plan = plan_attention(
        segments, **_ENTRY_CONFIG, block_q=BLOCK, block_kv=BLOCK, implementation="pallas"
    )
    assert plan.implementation == "pallas"

    def loss(q, k, v):
        out = attention(q, k, v, plan=plan, scale=SCALE)
        return jnp.sum(out.astype(jnp.float32) * w_out), out

    (_, out), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
    return out, None, grads


def test_attention_implementation_pallas_bfloat16():
    """``attention(..., implementation="pallas")``: bfloat16 in and out, float32 accumulation,
    forward and gradients close to the float64 oracle; never chosen automatically."""
    layout = self_layout(8)
    segments = Segments.from_ids(layout["ids_q"], layout["pos_q"])
    q, k, v, w_out, _ = harness.layout_inputs(layout, 4, dtype="bfloat16")
    mask, window = MaskType.parse(_ENTRY_CONFIG["mask_type"]), _ENTRY_CONFIG["window_size"]
    want = harness.partial_oracle(q, k, v, layout, mask, window, w_out=w_out)
    got = _entry_step(q, k, v, w_out, segments)
    harness.check_outputs(got, want, dtype="bfloat16", what="pallas entry")
    assert "pallas" not in default_order()
    automatic = jax.eval_shape(lambda s: plan_attention(s, **_ENTRY_CONFIG), segments)
    assert automatic.implementation in default_order()


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU behaviour")
def test_pallas_on_cpu_runs_in_interpret_mode_only():
    Pallas().check_config(_CONFIG)
    x = jnp.zeros((1, 8, 1, 4))
    Pallas().check_arrays(x, x, x)
    side = Segments(*(jnp.ones((1, 8), jnp.int32),) * 3)
    ranges = TileRanges(
        lo=jnp.zeros((1, 2), jnp.int32),
        hi=jnp.ones((1, 2), jnp.int32),
        num_kv_tiles=2,
        block_q=4,
        block_kv=4,
    )
    options = dict(mask_type=MaskType.CAUSAL, window_size=None, scale=1.0)
    with pytest.raises(NotImplementedError, match="interpret mode"):
        pallas_attention(x, x, x, side, side, ranges, **options, interpret=False)
    with pytest.raises(ValueError, match="backend"):
        pallas_attention(x, x, x, side, side, ranges, **options, backend="metal")
    wrong = TileRanges(lo=ranges.lo, hi=ranges.hi, num_kv_tiles=3, block_q=4, block_kv=4)
    with pytest.raises(ValueError, match="ranges"):
        pallas_attention(x, x, x, side, side, wrong, **options)
    # Tiles the compiled kernels cannot take are refused before anything is lowered.
    compiled = dict(options, interpret=False)
    with pytest.raises(NotImplementedError, match="powers of two >= 16"):
        pallas_attention(x, x, x, side, side, ranges, **compiled, backend="gpu")
    with pytest.raises(NotImplementedError, match="multiples of 128"):
        pallas_attention(x, x, x, side, side, ranges, **compiled, backend="tpu")


@pytest.mark.parametrize(
    ("backend", "shapes", "dtype", "match"),
    [
        ("gpu", ((1, 8, 2, 512), (1, 8, 1, 512), (1, 8, 1, 64)), jnp.bfloat16, "at most 256"),
        ("tpu", ((1, 8, 2, 64),) * 3, jnp.float16, "not float16"),
        ("tpu", ((1, 8, 4, 64), (1, 2**17, 1, 64), (1, 2**17, 1, 64)), jnp.bfloat16, "VMEM"),
        ("rocm-metal", ((1, 8, 1, 64),) * 3, jnp.bfloat16, "not on rocm-metal"),
    ],
)
def test_check_arrays_names_what_the_backend_cannot_take(
    monkeypatch, backend, shapes, dtype, match
):
    """What each backend refuses (shapes only: nothing is computed while the backend is faked)."""
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    arrays = [jax.ShapeDtypeStruct(shape, dtype) for shape in shapes]
    with pytest.raises(NotImplementedError, match=match):
        Pallas().check_arrays(*arrays)
    if backend == "rocm-metal":
        with pytest.raises(NotImplementedError, match=match):
            Pallas().check_config(_CONFIG)


_CONFIG = AttentionConfig.parse(
    mask_type="padding",
    window_size=None,
    max_segments_per_seq=1,
    seq_q=8,
    seq_kv=8,
    self_attention=True,
)

# --- compiled kernels ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("platform", "target"),
    [("cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu_custom_call")],
    ids=["gpu-triton", "tpu-mosaic"],
)
@pytest.mark.parametrize("cap", [None, 30.0], ids=["no-cap", "soft-cap"])
def test_compiled_kernels_lower_for_gpu_and_tpu(platform, target, cap):
    """Forward and backward kernels lower (Pallas to Triton IR, Pallas to Mosaic) for bfloat16
    GQA inputs with 128-token tiles and a head dim Triton pads, on a window of a causal mask,
    with and without a soft cap. Exported from CPU: the lowering runs here, the device compilers
    do not."""
    backend = {"cuda": "gpu", "tpu": "tpu"}[platform]
    seq, mask, window = 256, MaskType.PADDING_CAUSAL, (64, 0)

    def grads(q, k, v, ids, pos, lengths):
        side = Segments(ids, pos, lengths)
        ranges = tile_ranges(
            side, side, mask_type=mask, window_size=window, block_q=128, block_kv=128
        )

        def loss(q, k, v):
            out, lse = pallas_attention(
                q,
                k,
                v,
                side,
                side,
                ranges,
                mask_type=mask,
                window_size=window,
                scale=0.125,
                logits_soft_cap=cap,
                interpret=False,
                backend=backend,
            )
            return jnp.sum(out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

        return jax.grad(loss, (0, 1, 2))(q, k, v)

    shapes = [((2, seq, h, 48), jnp.bfloat16) for h in (4, 2, 2)] + [((2, seq), jnp.int32)] * 3
    # Without a GPU, jax 0.12 lowers Triton only for a named abstract GPU (jax 0.10 assumes
    # compute capability 9.0 and ignores it): an H100, 9.0 as well.
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="gpu")
    target_mesh = (
        jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=device))
        if platform == "cuda" and jax.default_backend() != "gpu"
        else contextlib.nullcontext()
    )
    with target_mesh:
        exported = jax.export.export(
            jax.jit(grads),
            platforms=[platform],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(target)],
        )(*(jax.ShapeDtypeStruct(*s) for s in shapes))
    module = exported.mlir_module()
    for kernel in ("thdkit_pallas_forward", "thdkit_pallas_dq", "thdkit_pallas_dkv"):
        assert kernel in module, kernel
    assert module.count(f"custom_call @{target}(") == 3  # forward, dq, dk/dv


# --- GPU (compiled Triton kernels) -------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_compiled_gpu_kernels_match_reference(dtype):
    """The compiled kernels (64-token tiles, head dims padded to 16) on ring-step rows."""
    from thdkit._src import synth

    ids, pos = synth.packed_segments(np.random.default_rng(0), batch=2, seq_len=512, max_segments=8)
    layout = ring_step_layout(ids, pos, "striped2", 1, 0)
    sides = segments_of(layout)
    q, k, v, _, _ = harness.random_inputs(1, seq_q=256, heads=(4, 2), dim=24, dim_v=8, dtype=dtype)
    mask = MaskType.PADDING_CAUSAL

    def loss(implementation):
        def f(q, k, v):
            if implementation == "pallas":
                ranges = tile_ranges(
                    *sides.values(), mask_type=mask, window_size=None, block_q=64, block_kv=64
                )
                out, _ = pallas_attention(
                    q, k, v, *sides.values(), ranges, mask_type=mask, window_size=None, scale=0.2
                )
            else:
                out, _ = reference_attention(
                    q, k, v, **sides, mask_type=mask, window_size=None, scale=0.2
                )
            return jnp.sum(jnp.sin(out)), out

        return jax.jit(jax.value_and_grad(f, (0, 1, 2), has_aux=True))(q, k, v)

    ((_, out_p), grads_p), ((_, out_r), grads_r) = loss("pallas"), loss("reference")
    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == jnp.bfloat16 else {"atol": 1e-4, "rtol": 1e-4}
    np.testing.assert_allclose(np.asarray(out_p), np.asarray(out_r), **tol)
    for g_p, g_r in zip(grads_p, grads_r, strict=True):
        np.testing.assert_allclose(np.asarray(g_p, np.float32), np.asarray(g_r, np.float32), **tol)
