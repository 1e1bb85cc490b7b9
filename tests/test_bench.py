"""Tests of the benchmark helpers (thdkit.bench.measure) and the metadata benchmark's pieces.

No assertion here depends on timing: sizes come from compilation, latencies are only checked for
their shape (counts, ordering of min / median / max).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from thdkit import synth
from thdkit.bench import measure
from thdkit.bench import metadata as bench
from thdkit.masks import MaskType
from thdkit.metadata import seqlens_and_offsets
from thdkit.reference import allowed_pairs

MASKS = ("padding", "padding_causal", "padding_causal_bottom_right")


def _wait_for_abandoned_compiles(timeout_s: float = 60.0) -> None:
    # XLA aborts interpreter shutdown under a compile in flight; let abandoned ones finish.
    deadline = time.monotonic() + timeout_s
    while measure.pending_compiles() and time.monotonic() < deadline:
        time.sleep(0.05)


def _dense_self(ids: jax.Array, pos: jax.Array, **options: object) -> object:
    return seqlens_and_offsets(segment_ids_q=ids, segment_pos_q=pos, method="dense", **options)


# --- measure.plan ---------------------------------------------------------------------------


def test_plan_reads_sizes_and_costs_from_shapes_alone():
    spec = jax.ShapeDtypeStruct((1024,), jnp.float32)
    planned = measure.plan(jnp.sum, spec)
    assert planned.skip_reason is None
    assert planned.arg_bytes == 4096
    assert planned.output_bytes == 4
    assert planned.temp_bytes is not None and planned.temp_bytes >= 0
    assert planned.total_bytes >= planned.arg_bytes + planned.output_bytes
    assert planned.flops is not None and planned.flops > 0
    assert planned.bytes_accessed is not None and planned.bytes_accessed >= 4096
    assert planned.compile_s is not None and planned.compile_s > 0
    np.testing.assert_allclose(planned.executable(jnp.ones(1024)), 1024.0)


def test_plan_accepts_arrays_and_binds_static_options():
    planned = measure.plan(jnp.sum, jnp.ones((8, 4)), axis=1)
    assert planned.skip_reason is None
    assert planned.arg_bytes == 8 * 4 * 4
    assert planned.output_bytes == 8 * 4


def test_plan_dense_temp_grows_quadratically():
    temps = {}
    for seq_len in (256, 512):
        spec = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
        planned = measure.plan(
            _dense_self, spec, spec, mask_type="padding_causal", max_segments_per_seq=4
        )
        assert planned.skip_reason is None
        temps[seq_len] = planned.temp_bytes
    assert 3.0 < temps[512] / temps[256] < 5.0
    assert temps[512] >= 512 * 512  # at least one bool[T, T]


def test_plan_compile_failure_is_a_skip_reason():
    spec = jax.ShapeDtypeStruct((3, 4), jnp.float32)
    planned = measure.plan(lambda x: x @ x, spec)
    assert planned.executable is None
    assert planned.skip_reason.startswith("compile failed: TypeError")
    assert planned.total_bytes is None


def test_plan_time_limit_gives_a_skip_reason_instead_of_waiting():
    spec = jax.ShapeDtypeStruct((2048,), jnp.float32)
    try:
        planned = measure.plan(lambda x: jnp.sort(x) * 2, spec, compile_timeout_s=1e-6)
        assert planned.executable is None
        assert planned.skip_reason == "not compiled: compile exceeded 1e-06 s"
    finally:
        _wait_for_abandoned_compiles()


@pytest.mark.parametrize(
    ("cost", "expected"),
    [
        ({"flops": 3.0}, {"flops": 3.0}),
        ([{"flops": 3.0}], {"flops": 3.0}),
        ([], {}),
        (None, {}),
    ],
)
def test_cost_analysis_as_dict_or_list(cost, expected):
    assert dict(measure._cost_entry(cost)) == expected


# --- measure: latency and memory ------------------------------------------------------------


def test_interleaved_latency_counts_and_order():
    x = jnp.arange(64.0)
    fns = {"sum": jax.jit(jnp.sum), "max": jax.jit(jnp.max)}
    stats = measure.interleaved_latency(fns, dict.fromkeys(fns, (x,)), warmup=1, repeats=4)
    assert set(stats) == {"sum", "max"}
    for latency in stats.values():
        assert latency.samples == 4
        assert 0 < latency.min_ms <= latency.median_ms <= latency.max_ms


def test_interleaved_latency_budget_keeps_min_repeats_for_slow_programs():
    def slow(x):
        time.sleep(0.02)
        return x

    x = jnp.ones(4)
    stats = measure.interleaved_latency(
        {"slow": slow, "fast": jax.jit(jnp.sum)},
        {"slow": (x,), "fast": (x,)},
        warmup=2,
        repeats=50,
        min_repeats=2,
        budget_s=0.001,
    )
    assert stats["slow"].samples == 2
    assert 2 <= stats["fast"].samples <= 50


def test_memory_budget_and_fit():
    assert measure.memory_budget_bytes(limit_bytes=1) == 1
    assert measure.memory_budget_bytes(fraction=0.5) <= measure.available_memory_bytes()
    assert 0 < measure.available_memory_bytes() <= measure.total_memory_bytes()
    assert measure.fits_in_budget(10, 10)
    assert not measure.fits_in_budget(11, 10)
    assert not measure.fits_in_budget(None, 10)


def test_environment_names_the_backend():
    env = measure.environment()
    assert env["backend"] == jax.default_backend()
    assert env["device_kind"] == jax.devices()[0].device_kind
    for key in ("jax", "jaxlib", "cpu_count", "date", "memory_total_bytes"):
        assert env[key]


# --- the metadata benchmark -----------------------------------------------------------------


def test_worst_ring_step_has_the_most_pairs():
    rng = np.random.default_rng(0)
    ids, pos = synth.packed_segments(rng, batch=1, seq_len=128, max_segments=3)
    ids, pos = synth.striped(ids, cp=4), synth.striped(pos, cp=4)
    worst = bench.worst_ring_step(ids, pos, cp=4, mask_type="padding_causal")

    def count(step):
        view = synth.ring_step(ids, pos, cp=4, q_rank=step[0], kv_rank=step[1])
        return int(allowed_pairs(*view, mask_type=MaskType.PADDING_CAUSAL).sum())

    assert all(count(worst) >= count((q, kv)) for q in range(4) for kv in range(4))


def test_make_inputs_shapes_and_segment_cap():
    for layout, count in (("self", 2), ("cross", 4), ("ring", 4)):
        inputs = bench.make_inputs(
            layout=layout, batch=2, seq_len=32, max_segments=100, mask_type="padding", seed=0
        )
        assert len(inputs.arrays) == count
        assert all(a.shape == (2, 32) and a.dtype == np.int32 for a in inputs.arrays)
        # S > row length: the generator gets one document per token of the row at most.
        assert inputs.segments == (100 if layout == "ring" else 32)
        assert (inputs.ring_step is not None) == (layout == "ring")


def test_estimated_bytes_orders_the_methods():
    sizes = {
        m: bench.estimated_bytes(m, batch=1, seq_len=131072, max_segments=16) for m in bench.METHODS
    }
    assert sizes["linear"] < sizes["one_hot"] < sizes["dense"] == 131072**2


@pytest.mark.parametrize(
    ("layout", "mask_type"),
    [("self", "padding_causal"), ("cross", "padding"), ("ring", "padding_causal_bottom_right")],
)
def test_run_cell_runs_every_method_and_they_agree(layout, mask_type):
    sweep = bench.MetadataSweep(
        seq_lens=(64,),
        max_segments=(4,),
        mask_types=(mask_type,),
        layout=layout,
        warmup=1,
        repeats=2,
        time_per_method_s=0.01,
    )
    records = bench.run_cell(sweep, sweep.cells()[0])
    assert [r["method"] for r in records] == [*bench.METHODS, bench.FLOOR]
    for record in records:
        assert record["skip_reason"] is None
        assert record["latency_ms"]["samples"] >= 1
        assert record["layout"] == layout
        assert record["matches_linear"] is (None if record["method"] == bench.FLOOR else True)


def test_absurd_dense_is_skipped_before_compiling():
    sweep = bench.MetadataSweep(
        seq_lens=(2**22,),
        max_segments=(16,),
        mask_types=("padding",),
        methods=("dense",),
        memory_limit_bytes=1,
    )
    started = time.perf_counter()
    dense, floor = bench.run_cell(sweep, sweep.cells()[0])
    assert dense["skip_reason"].startswith("not compiled: needs ~16.0 TiB")
    assert dense["compile_s"] is None and dense["temp_bytes"] is None
    assert dense["estimated_bytes"] == 2**44
    assert floor["skip_reason"].startswith("not run: needs")
    assert time.perf_counter() - started < 30


def test_growth_exponents_recover_the_power():
    records = [
        {
            "mask_type": "padding",
            "max_segments": 16,
            "method": m,
            "seq_len": t,
            "temp_bytes": t**k,
            "latency_ms": {"median": 1e-3 * t},
        }
        for m, k in (("dense", 2), ("linear", 1))
        for t in (1024, 4096, 16384)
    ]
    rows = {row["method"]: row for row in bench.growth_exponents(records)}
    assert rows["dense"]["temp_exponent"] == pytest.approx(2.0)
    assert rows["linear"]["temp_exponent"] == pytest.approx(1.0)
    assert rows["linear"]["latency_exponent"] == pytest.approx(1.0)


def test_sweep_rejects_bad_options():
    with pytest.raises(ValueError, match="unknown methods"):
        bench.MetadataSweep(methods=("fast",))
    with pytest.raises(ValueError, match="unknown layout"):
        bench.MetadataSweep(layout="diagonal")
    with pytest.raises(ValueError, match="unknown mask_type"):
        bench.MetadataSweep(mask_types=("sideways",))
    assert bench.MetadataSweep(mask_types=("causal_padding",)).mask_types == ("padding_causal",)


def test_plan_of_the_benchmark_programs_is_small_for_linear():
    # Linear's scratch does not grow with S: the same at S = 4 and S = 64 up to O(S) terms.
    spec = jax.ShapeDtypeStruct((1, 4096), jnp.int32)
    temps = {
        s: measure.plan(
            functools.partial(bench._self_metadata, method="linear"),
            spec,
            spec,
            mask_type="padding",
            max_segments_per_seq=s,
        ).temp_bytes
        for s in (4, 64)
    }
    assert abs(temps[64] - temps[4]) < 64 * 64
