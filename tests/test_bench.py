"""Tests of the benchmarks: shared measurement (thdkit.bench.measure), the metadata benchmark
(sweep / run / report), the option checks of every config, and the library without the extra.

No assertion here depends on timing: sizes come from compilation, latencies are only checked for
their shape (counts, ordering of min / median / max).
"""

from __future__ import annotations

import functools
import importlib.metadata
import itertools
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rich.console import Console
from rich.table import Table
from typer.testing import CliRunner

import thdkit
from thdkit._src import reorder, synth
from thdkit._src.mask_types import MaskType
from thdkit._src.metadata import seqlens_and_offsets
from thdkit._src.reference import allowed_pairs
from thdkit._src.segments import Segments, run_lengths
from thdkit.bench import measure, report, units
from thdkit.bench.attention import (
    AttentionBench,
    attention_program,
    bench_sinks,
    dtype_names,
    run_attention_bench,
)
from thdkit.bench.attention_report import attention_table
from thdkit.bench.attention_work import tile_matmuls
from thdkit.bench.commands import app
from thdkit.bench.cp import CPBench
from thdkit.bench.measure import MAX_RANKS, BenchConfig, ConfigError, median
from thdkit.bench.plan import PlanBench
from thdkit.bench.plot import metadata_figure
from thdkit.bench.ring import RingBench
from thdkit.bench.run import run_sweep
from thdkit.bench.sweep import FLOOR, METHODS, MetadataSweep, make_inputs

LATENCY_KEYS = {"median", "min", "max", "samples"}


def _wait_for_abandoned_compiles(timeout_s: float = 60.0) -> None:
    # XLA aborts interpreter shutdown under a compile in flight; let abandoned ones finish.
    deadline = time.monotonic() + timeout_s
    while measure.pending_compiles() and time.monotonic() < deadline:
        time.sleep(0.05)


def _metadata(ids: jax.Array, pos: jax.Array, **options: object) -> object:
    return seqlens_and_offsets(segment_ids_q=ids, segment_pos_q=pos, **options)


def _plan(fn, *args, **options):
    return measure.plan(fn, *args, compile_timeout_s=60.0, **options)


# --- measure.plan ---------------------------------------------------------------------------


def test_plan_reads_sizes_and_costs_from_shapes_alone():
    executable, fields = _plan(jnp.sum, jax.ShapeDtypeStruct((1024,), jnp.float32))
    assert fields["skip_reason"] is None
    assert (fields["arg_bytes"], fields["output_bytes"]) == (4096, 4)
    assert fields["total_bytes"] >= fields["arg_bytes"] + fields["output_bytes"]
    assert fields["flops"] > 0 and fields["bytes_accessed"] >= 4096 and fields["compile_s"] > 0
    np.testing.assert_allclose(executable(jnp.ones(1024)), 1024.0)
    assert set(fields) == {*measure.skipped("x")[1]}  # one record schema, compiled or not


def test_plan_accepts_arrays_and_binds_static_options():
    fields = _plan(jnp.sum, jnp.ones((8, 4)), axis=1)[1]
    assert (fields["arg_bytes"], fields["output_bytes"]) == (8 * 4 * 4, 8 * 4)


def test_plan_dense_temp_grows_quadratically_and_linear_stays_flat_in_s():
    spec = {t: jax.ShapeDtypeStruct((1, t), jnp.int32) for t in (256, 512, 4096)}
    dense = {
        t: _plan(
            _metadata, spec[t], spec[t], mask_type="padding_causal", max_segments_per_seq=4,
            method="dense",
        )[1]["temp_bytes"]
        for t in (256, 512)
    }  # fmt: skip
    assert 3.0 < dense[512] / dense[256] < 5.0 and dense[512] >= 512 * 512
    linear = {
        s: _plan(
            functools.partial(_metadata, method="linear"), spec[4096], spec[4096],
            mask_type="padding", max_segments_per_seq=s,
        )[1]["temp_bytes"]
        for s in (4, 64)
    }  # fmt: skip
    assert abs(linear[64] - linear[4]) < 64 * 64


def test_plan_failures_are_skip_reasons():
    executable, fields = _plan(lambda x: x @ x, jax.ShapeDtypeStruct((3, 4), jnp.float32))
    assert executable is None and fields["total_bytes"] is None
    assert fields["skip_reason"].startswith("compile failed: TypeError")

    def unsupported(x):
        raise NotImplementedError("needs a GPU")

    reason = _plan(unsupported, jnp.ones(2))[1]["skip_reason"]
    assert reason == "not supported: NotImplementedError: needs a GPU"


def test_plan_time_limit_gives_a_skip_reason_instead_of_waiting():
    spec = jax.ShapeDtypeStruct((2048,), jnp.float32)
    try:
        planned = measure.plan(lambda x: jnp.sort(x) * 2, spec, compile_timeout_s=1e-6)
        assert planned[0] is None
        assert planned[1]["skip_reason"] == "not compiled: compile exceeded 1e-06 s"
    finally:
        _wait_for_abandoned_compiles()


# --- measure: latency, budget, memory -------------------------------------------------------


def test_interleaved_latency_counts_and_order():
    x = jnp.arange(64.0)
    fns = {"sum": jax.jit(jnp.sum), "max": jax.jit(jnp.max)}
    config = BenchConfig(warmup=1, repeats=4)
    stats = measure.interleaved_latency(fns, dict.fromkeys(fns, (x,)), config)
    assert set(stats) == {"sum", "max"}
    for latency in stats.values():
        assert latency["samples"] == 4 and set(latency) == LATENCY_KEYS
        assert 0 < latency["min"] <= latency["median"] <= latency["max"]


def test_interleaved_latency_budget_keeps_three_runs_for_slow_programs():
    def slow(x):
        time.sleep(0.02)
        return x

    x = jnp.ones(4)
    config = BenchConfig(warmup=2, repeats=50, time_per_program_s=0.001)
    stats = measure.interleaved_latency(
        {"slow": slow, "fast": jax.jit(jnp.sum)}, {"slow": (x,), "fast": (x,)}, config
    )
    assert stats["slow"]["samples"] == 3
    assert 3 <= stats["fast"]["samples"] <= 50


def test_run_plans_times_what_fits_and_says_why_not_the_rest():
    x = jnp.ones(64)
    plans = {
        "small": _plan(jnp.sum, x),
        "big": _plan(lambda x: jnp.tile(x, 64), x),  # a 16 KiB output
        "broken": measure.skipped("compile failed: boom"),
    }
    out = measure.run_plans(plans, (x,), BenchConfig(repeats=2, warmup=0), 1024)
    assert out["small"]["skip_reason"] is None and set(out["small"]["latency_ms"]) == LATENCY_KEYS
    assert out["small"]["latency_ms"]["samples"] == 2
    needs = measure.format_bytes(plans["big"][1]["total_bytes"])
    assert out["big"]["skip_reason"] == f"not run: needs {needs} (budget 1.0 KiB)"
    assert out["broken"]["skip_reason"] == "compile failed: boom"
    assert out["big"]["latency_ms"] is None and out["broken"]["latency_ms"] is None
    assert out["big"]["output_bytes"] == 64 * 64 * 4  # the plan is still reported
    # Without a limit the budget is half the memory free now: the small program fits.
    default = measure.run_plans(plans, (x,), BenchConfig(repeats=1, warmup=0), None)
    assert default["small"]["latency_ms"]["samples"] == 1


def test_memory_and_format_bytes():
    assert 0 < measure.memory_bytes() <= measure.memory_bytes(total=True)
    sizes = [measure.format_bytes(n) for n in (None, 512, 3 * 2**30, 2**44)]
    assert sizes == ["-", "512 B", "3.0 GiB", "16.0 TiB"]


def test_environment_names_the_backend():
    env = measure.environment()
    assert env["backend"] == jax.default_backend()
    assert env["device_kind"] == jax.devices()[0].device_kind
    for key in ("jax", "jaxlib", "cpu_count", "date", "memory_total_bytes"):
        assert env[key]
    assert (env["thdkit"], env["jax"]) == (thdkit.__version__, jax.__version__)
    assert env["peers"] == measure.peer_versions()


def test_peer_versions_name_the_peers_imported(monkeypatch):
    pytest.importorskip("ejkernel", reason="the peers extra (thdkit[peers]) is not installed")

    assert measure.peer_versions() == {"ejkernel": importlib.metadata.version("ejkernel")}
    monkeypatch.setitem(sys.modules, "ejkernel", None)  # an import blocked: it did not run
    assert measure.peer_versions() == {}
    monkeypatch.delitem(sys.modules, "ejkernel")
    assert measure.peer_versions() == {}


def test_host_memory_is_read_without_starting_jax():
    code = (
        "import jax, jax._src.xla_bridge as xb; from thdkit.bench import measure; "
        "n = measure.host_memory_bytes(total=True); "
        "from thdkit.bench.ring import RingBench; from thdkit.bench.cp import CPBench; "
        "RingBench(cp=4); CPBench(cps=(2, 4)); "
        "print(n > 0, len(xb._backends))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "0"]  # no backend started: XLA_FLAGS still apply


# --- the table builder ----------------------------------------------------------------------


def test_table_shows_values_sections_and_dashes():
    records = [{"a": 1, "b": 0.5}, {"a": 1, "b": None}, {"a": 2, "b": 2.0}]
    columns = [("a", "a"), ("b", "b", "{:.2f}".format), ("c", lambda r: r["a"] * 10, str, "left")]
    table = measure.table("T", columns, records, section=lambda r: r["a"], caption="note")
    assert table.row_count == 3 and table.caption == "note"
    assert list(table.columns[1].cells) == ["0.50", "-", "2.00"]
    assert list(table.columns[2].cells) == ["10", "10", "20"]
    assert [c.justify for c in table.columns] == ["right", "right", "left"]
    assert [row.end_section for row in table.rows] == [False, True, False]


# --- option checks of every config ----------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "options", "field"),
    [
        (BenchConfig, {"seed": -1}, "seed"),
        (BenchConfig, {"batch": 0}, "batch"),
        (BenchConfig, {"batch": 2.0}, "batch"),
        (BenchConfig, {"batch": True}, "batch"),
        (BenchConfig, {"repeats": 0}, "repeats"),
        (BenchConfig, {"warmup": -1}, "warmup"),
        (BenchConfig, {"time_per_program_s": 0.0}, "time_per_program_s"),
        (BenchConfig, {"time_per_program_s": "1"}, "time_per_program_s"),
        (MetadataSweep, {"methods": ("fast",)}, "methods"),
        (MetadataSweep, {"methods": ()}, "methods"),
        (MetadataSweep, {"layout": "diagonal"}, "layout"),
        (MetadataSweep, {"mask_types": ("sideways",)}, "mask_types"),
        (MetadataSweep, {"mask_types": ()}, "mask_types"),
        (MetadataSweep, {"seq_lens": ()}, "seq_lens"),
        (MetadataSweep, {"max_segments": (0,)}, "max_segments"),
        (MetadataSweep, {"compile_timeout_s": -1.0}, "compile_timeout_s"),
        (MetadataSweep, {"memory_limit_bytes": 0}, "memory_limit_bytes"),
        (MetadataSweep, {"compile_limit_bytes": 0}, "compile_limit_bytes"),
        (AttentionBench, {"dtype": "bogus"}, "dtype"),
        (AttentionBench, {"dtype": "int32"}, "dtype"),
        (AttentionBench, {"implementations": ("fast",)}, "implementations"),
        (AttentionBench, {"segments": (0,)}, "segments"),
        (AttentionBench, {"seq_lens": (64,), "segments": (65,)}, "segments"),
        (AttentionBench, {"mask_type": "sideways"}, "mask_type"),
        (AttentionBench, {"window_size": (1, 2, 3)}, "window_size"),
        (AttentionBench, {"block_q": 0}, "block_q"),
        (RingBench, {"seq_len": 100}, "seq_len"),
        (RingBench, {"cp": 0}, "cp"),
        (RingBench, {"stripe_sizes": (0,)}, "stripe_sizes"),
        (RingBench, {"seq_len": 64, "stripe_sizes": (1,), "segments": (65,)}, "segments"),
        # The library's limits: T <= MAX_SEQ_LEN, S <= MAX_SEGMENTS, finite waits.
        (MetadataSweep, {"seq_lens": (64, 2**30 + 1)}, "seq_lens"),
        (MetadataSweep, {"seq_lens": (3 * 2**30,)}, "seq_lens"),
        (MetadataSweep, {"max_segments": (2**30,)}, "max_segments"),
        (MetadataSweep, {"layout": "ring", "seq_lens": (2**28 + 1,)}, "seq_lens"),
        (MetadataSweep, {"time_per_program_s": float("inf")}, "time_per_program_s"),
        (MetadataSweep, {"time_per_program_s": float("nan")}, "time_per_program_s"),
        (MetadataSweep, {"time_per_program_s": 1e300}, "time_per_program_s"),
        (MetadataSweep, {"compile_timeout_s": float("inf")}, "compile_timeout_s"),
        (MetadataSweep, {"compile_timeout_s": threading.TIMEOUT_MAX * 2}, "compile_timeout_s"),
        (AttentionBench, {"seq_lens": (2**31,)}, "seq_lens"),
        (AttentionBench, {"segments": (2**30,)}, "segments"),
        (AttentionBench, {"block_q": 2**30 + 1}, "block_q"),
        (AttentionBench, {"block_kv": 2**31}, "block_kv"),
        (AttentionBench, {"dtype": "float64"}, "dtype"),  # x64 off: it would run float32
        (AttentionBench, {"dtype": "float"}, "dtype"),
        (AttentionBench, {"dtype": "complex64"}, "dtype"),
        (AttentionBench, {"dtype": 3}, "dtype"),
        (PlanBench, {"seq_lens": (2**30 + 1,)}, "seq_lens"),
        (PlanBench, {"seq_lens": (64,), "segments": 65}, "segments"),
        (PlanBench, {"segments": 2**30}, "segments"),
        (RingBench, {"seq_len": 2**31}, "seq_len"),
        (RingBench, {"cp": MAX_RANKS + 1, "seq_len": 2**20}, "cp"),
        (RingBench, {"stripe_sizes": (2**31,)}, "stripe_sizes"),
        (CPBench, {"seq_len": 2**31}, "seq_len"),
        (CPBench, {"cps": (2, MAX_RANKS * 2)}, "cps"),
        (CPBench, {"stripe_size": 2**31}, "stripe_size"),
        (CPBench, {"segments": 2**30}, "segments"),
        # Inputs that cannot fit in host memory: the factor furthest above its default.
        (AttentionBench, {"heads": 2**40}, "heads"),
        (AttentionBench, {"head_dim": 2**40}, "head_dim"),
        (AttentionBench, {"batch": 2**40}, "batch"),
        (PlanBench, {"heads": 2**40}, "heads"),
        (RingBench, {"heads": 2**40}, "heads"),
        (CPBench, {"head_dim": 2**40}, "head_dim"),
        (MetadataSweep, {"batch": 2**40}, "batch"),
    ],
)
def test_configs_reject_bad_options_naming_them(cls, options, field):
    with pytest.raises(ConfigError, match=f"^{field}: ") as error:
        cls(**options)
    assert error.value.field == field


@pytest.mark.parametrize(
    ("cls", "options", "field", "words"),
    [
        (MetadataSweep, {"seq_lens": (2**30 + 1,)}, "seq_lens", "at most 1,073,741,824 (thdkit"),
        (MetadataSweep, {"max_segments": (2**30,)}, "max_segments", "(thdkit.MAX_SEGMENTS)"),
        (RingBench, {"cp": 512, "seq_len": 2**20}, "cp", "at most 256"),
        (BenchConfig, {"time_per_program_s": float("inf")}, "time_per_program_s", "finite"),
        (AttentionBench, {"heads": 2**40}, "heads", "host memory"),
    ],
)
def test_limit_messages_say_the_limit(cls, options, field, words):
    with pytest.raises(ConfigError) as error:
        cls(**options)
    assert error.value.field == field and words in error.value.message, error.value.message


def test_limits_are_inclusive_and_memory_is_the_host_total(monkeypatch):
    monkeypatch.setattr(measure, "host_memory_bytes", lambda total=False: 2**62)
    assert MetadataSweep(seq_lens=(2**30,)).seq_lens == (2**30,)
    assert MetadataSweep(layout="ring", seq_lens=(2**28,)).seq_lens == (2**28,)
    assert RingBench(cp=MAX_RANKS, seq_len=2**20, stripe_sizes=(1,)).cp == MAX_RANKS
    assert AttentionBench(block_q=2**30, segments=(1,)).block_q == 2**30
    assert BenchConfig(time_per_program_s=threading.TIMEOUT_MAX).time_per_program_s > 0
    # Host memory bounds the inputs: B * T * (a layout + q, k, v) bytes.
    monkeypatch.setattr(measure, "host_memory_bytes", lambda total=False: 2**20)
    with pytest.raises(ConfigError, match=r"^seq_lens: the inputs \(seq_lens=65536, batch=1\)"):
        MetadataSweep(seq_lens=(1024, 65536))
    assert MetadataSweep(seq_lens=(1024,)).host_input_bytes() <= 2**20
    ring, cross = (MetadataSweep(seq_lens=(1024,), layout=x) for x in ("ring", "cross"))
    assert ring.host_input_bytes() == 4 * cross.host_input_bytes() // 2
    MetadataSweep(seq_lens=(8192,))  # 512 KiB
    with pytest.raises(ConfigError, match=r"^seq_lens: .*host memory"):
        MetadataSweep(seq_lens=(8192,), layout="ring")  # rows of 4 T: 2 MiB
    plan = PlanBench(seq_lens=(64,), heads=1, head_dim=8, layers=3, segments=2)
    assert plan.host_input_bytes() == 64 * (64 + 24 * 8) + 12 * 3 * 64


def test_dtype_names_follow_x64():
    assert dtype_names() == ("bfloat16", "float16", "float32")
    assert AttentionBench(dtype="half").dtype == "float16"
    assert AttentionBench(dtype="f4").dtype == "float32"
    with pytest.raises(ConfigError, match="float64 needs x64") as error:
        AttentionBench(dtype="float64")
    assert "bfloat16, float16, float32" in error.value.message
    with jax.enable_x64(True):
        assert dtype_names()[-1] == "float64"
        assert AttentionBench(dtype="float64").dtype == "float64"


@pytest.mark.parametrize("dtype", ["bfloat16", "float64"])
def test_records_hold_the_dtype_that_ran(dtype):
    config = dict(seq_lens=(64,), segments=(2,), heads=1, head_dim=8, repeats=1, warmup=0)
    names = ("blockwise", "reference") + (("jax-nn-xla",) if dtype == "float64" else ())
    with jax.enable_x64(dtype == "float64"):
        records = run_attention_bench(AttentionBench(**config, dtype=dtype, implementations=names))
    assert {r["dtype"] for r in records} == {dtype}
    for record in records:
        # thdkit.attention itself (reference here) takes float32, bfloat16 and float16 only.
        if dtype == "float64" and record["implementation"] == "reference":
            assert "got dtype float64" in record["skip_reason"]
        else:
            assert record["skip_reason"] is None, record


def test_sweep_canonical_mask_names_and_cells():
    config = MetadataSweep(seq_lens=(64, 128), max_segments=(4,), mask_types=("causal_padding",))
    assert config.mask_types == ("padding_causal",)
    assert config.cells() == [(64, 4, "padding_causal"), (128, 4, "padding_causal")]


# --- the metadata benchmark -----------------------------------------------------------------


def test_ring_layout_takes_the_step_with_the_most_pairs():
    config = MetadataSweep(layout="ring")
    view, segments, (q_rank, kv_rank) = make_inputs(config, 32, 3, "padding_causal")
    rng = np.random.default_rng([config.seed, 32, 3])  # as make_inputs draws it
    ids, pos = synth.packed_segments(rng, batch=1, seq_len=4 * 32, max_segments=3)
    ids, pos = reorder.striped(ids, cp=4), reorder.striped(pos, cp=4)

    def count(q, kv):
        step = reorder.ring_step(ids, pos, cp=4, q_rank=q, kv_rank=kv)
        q, kv = (Segments(i, p, run_lengths(i)) for i, p in (step[:2], step[2:]))
        return int(allowed_pairs(q, kv, mask_type=MaskType.PADDING_CAUSAL).sum())

    assert segments == 3
    assert all(count(q_rank, kv_rank) >= count(q, kv) for q in range(4) for kv in range(4))
    expected = reorder.ring_step(ids, pos, cp=4, q_rank=q_rank, kv_rank=kv_rank)
    assert all(np.array_equal(a, b) for a, b in zip(view, expected, strict=True))


def test_make_inputs_shapes_and_segment_cap():
    for layout, count in (("self", 2), ("cross", 4), ("ring", 4)):
        arrays, segments, ring_step = make_inputs(
            MetadataSweep(layout=layout, batch=2), 32, 100, "padding"
        )
        assert len(arrays) == count
        assert all(a.shape == (2, 32) and a.dtype == np.int32 for a in arrays)
        # S > row length: the generator gets one document per token of the row at most.
        assert segments == (100 if layout == "ring" else 32)
        assert (ring_step is not None) == (layout == "ring")


@pytest.mark.parametrize(
    ("layout", "mask_type"),
    [("self", "padding_causal"), ("cross", "padding"), ("ring", "padding_causal_bottom_right")],
)
def test_run_sweep_runs_every_method_and_they_agree(layout, mask_type):
    config = MetadataSweep(
        seq_lens=(64,), max_segments=(4,), mask_types=(mask_type,), layout=layout, warmup=1,
        repeats=2, time_per_program_s=0.01,
    )  # fmt: skip
    records = run_sweep(config)
    assert [r["method"] for r in records] == [*METHODS, FLOOR]
    for record in records:
        assert record["skip_reason"] is None and record["layout"] == layout
        assert set(record["latency_ms"]) == LATENCY_KEYS and record["latency_ms"]["samples"] >= 1
        assert record["matches_linear"] is (None if record["method"] == FLOOR else True)
    estimates = [r["estimated_bytes"] for r in records]
    assert estimates[0] < estimates[1] < estimates[2] == 64 * 64 and estimates[3] is None


def test_absurd_dense_is_skipped_before_compiling():
    config = MetadataSweep(
        seq_lens=(2**22,), max_segments=(16,), mask_types=("padding",), methods=("dense",),
        memory_limit_bytes=1,
    )  # fmt: skip
    started = time.perf_counter()
    dense, floor = run_sweep(config)
    assert dense["skip_reason"].startswith("not compiled: needs ~16.0 TiB")
    assert dense["compile_s"] is None and dense["temp_bytes"] is None
    assert dense["estimated_bytes"] == 2**44
    assert floor["skip_reason"].startswith("not run: needs")
    assert time.perf_counter() - started < 30


def test_compile_timeout_is_a_skip_reason():
    config = MetadataSweep(
        seq_lens=(64,), max_segments=(4,), mask_types=("padding",), methods=("linear",),
        compile_timeout_s=1e-6, repeats=1,
    )  # fmt: skip
    try:
        linear, floor = run_sweep(config)
    finally:
        _wait_for_abandoned_compiles()
    assert linear["skip_reason"] == floor["skip_reason"] == "not compiled: compile exceeded 1e-06 s"
    assert linear["latency_ms"] is None and linear["matches_linear"] is None


def test_growth_exponents_recover_the_power():
    records = [
        {"mask_type": "padding", "max_segments": 16, "method": m, "seq_len": t,
         "temp_bytes": t**k, "latency_ms": {"median": 1e-3 * t}}
        for m, k in (("dense", 2), ("linear", 1))
        for t in (1024, 4096, 16384)
    ]  # fmt: skip
    rows = {row["method"]: row for row in report.growth_exponents(records)}
    assert rows["dense"]["temp_exponent"] == pytest.approx(2.0)
    assert rows["linear"]["temp_exponent"] == pytest.approx(1.0)
    assert rows["linear"]["latency_exponent"] == pytest.approx(1.0)


def _grids(sections):
    return [next(r for r in section.renderables if isinstance(r, Table)) for section in sections]


def test_metadata_tables_put_the_methods_side_by_side_with_ratios():
    config = MetadataSweep(
        seq_lens=(64, 128), max_segments=(4,), mask_types=("padding",), methods=("linear", "dense"),
        repeats=1, warmup=0,
    )  # fmt: skip
    records = run_sweep(config)  # per T: linear, dense, floor
    memory, work, latency, growth = _grids(report.metadata_tables(records))
    assert [c.header for c in memory.columns] == ["T", "linear", "dense"]  # one S, one mask
    assert [c.header for c in latency.columns] == ["T", "linear", "dense", "floor"]
    assert list(memory.columns[0].cells) == ["64", "128"]
    linear, dense = records[3], records[4]
    ratio = report.times(dense["temp_bytes"] / linear["temp_bytes"])
    per_token = dense["temp_bytes_per_token"]
    assert list(memory.columns[2].cells)[1] == f"{report._per_token(per_token)} ({ratio})"
    assert list(latency.columns[3].cells)[1] == report._ms(median(records[5]))  # floor: no ratio
    assert growth.row_count == 2 and work.row_count == 2  # linear and dense; a row per T
    assert len(report.metadata_tables(records[:3])) == 3  # one T: no growth section


def test_times_and_token_counts_read_short():
    assert [report.times(x) for x in (0.05, 2.36, 13.2, 690.4, 11606.0)] == [
        "0.05x", "2.4x", "13x", "690x", "11,600x"
    ]  # fmt: skip
    assert [units.format_tokens(t) for t in (64, 1000, 1024, 131072, 2**20)] == [
        "64", "1,000", "1k", "128k", "1M"
    ]  # fmt: skip


def _record(method, seq_len, max_segments, mask_type, per_token, ms, skip=None):
    """A metadata record as run_sweep writes it (no JAX): ``per_token`` None and ``skip`` set
    for a method too big to compile."""
    compiled = per_token is not None
    return {
        "method": method, "mask_type": mask_type, "layout": "self", "batch": 1,
        "seq_len": seq_len, "max_segments": max_segments, "skip_reason": skip,
        "temp_bytes": (compiled and per_token * seq_len) or None,
        "temp_bytes_per_token": per_token, "estimated_bytes": seq_len * seq_len,
        "bytes_accessed": (compiled and 64.0 * seq_len) or None,
        "latency_ms": None if skip else {"median": ms}, "matches_linear": None if skip else True,
    }  # fmt: skip


def _full_sweep():
    """Records as ``--full`` writes them: 3 T x 3 S x 3 masks, methods missing for memory."""
    records = []
    for t, s, mask in itertools.product((1024, 131072, 2**20), (16, 1024, 65536), MASKS):
        big = f"not compiled: needs ~{t * t / 2**30:.1f} GiB (compile limit 188.3 GiB)"
        dense = {1024: 1100.0, 131072: 139276.0}.get(t)
        over = "not run: needs 17.0 GiB (budget 11.0 GiB)" if t == 131072 else None
        records += [
            _record("linear", t, s, mask, 12.0 + s / 2**14, 0.9),
            _record("one_hot", t, s, mask, None if s * t > 2**34 else 8.0 * s, 597.3,
                    None if s * t <= 2**34 else big),
            _record("dense", t, s, mask, dense, 4550.0, big if dense is None else over),
            _record(FLOOR, t, s, mask, 0.3, 0.45),
        ]  # fmt: skip
    return records


MASKS = ("padding", "padding_causal", "padding_causal_bottom_right")


def test_the_report_fits_80_columns_without_cutting_a_cell():
    console = Console(width=80, record=True)
    for section in report.metadata_tables(_full_sweep()):
        console.print(section)
    text = console.export_text()
    assert "…" not in text, text
    assert max(len(line) for line in text.splitlines()) <= 80, text
    assert "mask: pad = padding, pad+causal = padding_causal" in text  # abbreviations explained
    assert "dense at T=128k: not run: needs 17.0 GiB (budget 11.0 GiB)" in text
    assert "one_hot at T=1M (S=65,536): not compiled: needs ~1024.0 GiB" in text
    for words in ("scratch: XLA temp bytes", "floor: ", "(Nx): N times linear's", "k: least"):
        assert words in text, words


def test_result_line_states_the_largest_t_from_the_records():
    records = _full_sweep()
    line = report.result_line(records)
    # At 1M: linear's largest scratch (12.0 + 65536 / 2**14 = 16.0), the smallest ratios.
    assert line == "linear: ≤16.0 B scratch/token at T=1M; one_hot ≥11x, dense ≥~65,500x more"
    assert len(line) <= 80
    one = [r for r in records if (r["seq_len"], r["max_segments"], r["mask_type"]) ==
           (131072, 16, "padding")]  # fmt: skip
    assert report.result_line(one) == (
        "linear: 12.0 B scratch/token at T=128k; one_hot 11x, dense 11,600x more"
    )


def test_plot_names_ticks_panels_device_and_marks_what_did_not_run():
    records = [r for r in _full_sweep() if r["max_segments"] == 16 and r["seq_len"] < 2**20]
    environment = {"backend": "cpu", "device_kind": "cpu", "jax": "0.10.2"}
    figure, chosen = metadata_figure(records, environment)
    memory, latency = figure.axes
    assert chosen == "padding_causal"
    assert [t.get_text() for t in latency.get_xticklabels()] == ["1k", "128k"]
    assert figure.get_suptitle().count("cpu") == 1  # the device named once
    assert memory.get_title() and latency.get_title() and memory.get_title() != latency.get_title()
    marks = [line for line in latency.lines if line.get_marker() == "x"]
    assert [(m.get_xdata()[0], m.get_color()) for m in marks] == [(131072, "tab:red")]
    assert not [line for line in memory.lines if line.get_marker() == "x"]  # planned: has bytes
    assert "not run (memory)" in [t.get_text() for t in figure.legends[0].get_texts()]


# --- the attention benchmark ----------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def test_bench_attention_command_reports_efficiency_ratios_and_pairs(tmp_path):
    json_path = tmp_path / "attention.json"
    args = [
        *("bench", "attention", "--seq-len", "128", "--segments", "1", "--heads", "2"),
        *("--head-dim", "8", "--block-q", "64", "--block-kv", "64", "--repeats", "2"),
        *("--implementation", "blockwise,jax-nn-xla,cudnn"),
        *("--warmup", "0", "--dtype", "float32", "--json", str(json_path)),
    ]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "ATTENTION" in result.output and "× blockwise" in result.output
    document = json.loads(json_path.read_text())
    rate = document["summary"]["matmul_flop_rate"]
    records = {(r["segments"], r["implementation"], r["pass"]): r for r in document["records"]}
    assert len(records) == len(document["records"]) == 3 * 2 and rate > 0
    # One causal document of 128 tokens in 64-token tiles: 3 of 4 tiles, 128 * 129 / 2 pairs.
    one = records[1, "blockwise", "fwd"]
    assert (one["tiles_visited"], one["visited_pair_fraction"]) == (3, 0.75)
    assert one["allowed_pairs"] == 128 * 129 // 2 and one["needed_flops"] == 8256 * 4 * 2 * 8
    assert records[1, "blockwise", "fwd+bwd"]["needed_flops"] == 8256 * 12 * 2 * 8
    assert one["sum_len_squared_fraction"] == 1.0
    for (segments, name, passes), record in records.items():
        assert record["matmul_flop_rate"] == rate
        assert record["allowed_pair_fraction"] == 8256 / 128**2
        visited = {"jax-nn-xla": 1.0, "cudnn": None}.get(name, record["tiles_visited"] / 4)
        assert record["visited_pair_fraction"] == visited
        assert visited is None or record["allowed_pair_fraction"] <= visited
        if name == "cudnn":  # Not on this backend: reported, not timed.
            assert record["skip_reason"].startswith("not supported: NotImplementedError")
            assert record["efficiency"] is record["vs_blockwise"] is None
            continue
        assert record["skip_reason"] is None
        mine, blockwise = (median(r) for r in (record, records[segments, "blockwise", passes]))
        assert record["efficiency"] == pytest.approx(record["needed_flops"] / mine * 1e3 / rate)
        assert record["vs_blockwise"] == pytest.approx(mine / blockwise)
        if name != "blockwise":
            assert record["tile_matmul_ms"] is record["tile_rate"] is record["in_matmuls"] is None
            continue
        # Blockwise's efficiency is the product of its factors (thdkit.bench.attention_work).
        floor, factor = record["tile_matmul_ms"], {"fwd": 4 / 4, "fwd+bwd": 12 / 14}[passes]
        assert floor > 0 and record["in_matmuls"] == pytest.approx(floor / mine)
        tile_flops = 3 * 64 * 64 * {"fwd": 4, "fwd+bwd": 14}[passes] * 2 * 8
        assert record["tile_rate"] == pytest.approx(tile_flops / floor * 1e3 / rate)
        product = 8256 / (3 * 64 * 64) * factor * record["tile_rate"] * record["in_matmuls"]
        assert record["efficiency"] == pytest.approx(product)


def test_tile_matmuls_are_blockwise_visits_without_the_softmax():
    """The benchmark's matmul floor (thdkit.bench.attention_work.tile_matmuls) against NumPy: the
    visits i = 0, 1, ... pair query tile i mod 3 with key tile i mod 3 (T = 12, tiles of 4)."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 12, 2, 5)).astype(np.float32) for _ in range(3))
    tiles = lambda x: x[0].reshape(3, 4, 2, 5).transpose(0, 2, 1, 3)  # noqa: E731
    qt, kt, vt = tiles(q), tiles(k), tiles(v)
    out, dq, dk, dv = (np.zeros_like(qt) for _ in range(4))
    for i in range(7):
        r = c = i % 3
        values = qt[r] @ kt[c].transpose(0, 2, 1)
        out[r] += values @ vt[c]
        d_values = qt[r] @ vt[c].transpose(0, 2, 1)  # the query stands in for the output's grad
        dq[r] += d_values @ kt[c]
        dk[c] += d_values.transpose(0, 2, 1) @ qt[r]
        dv[c] += values.transpose(0, 2, 1) @ qt[r]
    static = ("block_q", "block_kv", "tiles", "passes", "chunk")
    for chunk in (1, 7):  # one tile per step (slices), or every visit in one step (gathers)
        args = dict(block_q=4, block_kv=4, tiles=7, chunk=chunk)
        (got,) = jax.jit(tile_matmuls, static_argnames=static)(q, k, v, passes="fwd", **args)
        np.testing.assert_allclose(got, out, rtol=1e-5, atol=1e-4)
        grads = tile_matmuls(q, k, v, passes="fwd+bwd", **args)
        for got, want in zip(grads, (out, dq, dk, dv), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    # Three steps of three visits: the last step runs whole (visits 7 and 8 too).
    more = dict(block_q=4, block_kv=4, tiles=7, chunk=3)
    (got,) = tile_matmuls(q, k, v, passes="fwd", **more)
    (nine,) = tile_matmuls(q, k, v, passes="fwd", **more | dict(tiles=9))
    np.testing.assert_allclose(got, nine, rtol=1e-6)
    assert not np.allclose(got, out)


def test_device_check_runs_tiny_here_and_fails_with_a_test(tmp_path):
    failing = tmp_path / "test_gpu_failure.py"
    failing.write_text("import pytest\n\n\n@pytest.mark.gpu\ndef test_fails():\n    assert False\n")
    env = os.environ | {"PYTHON": sys.executable, "PYTEST_ADDOPTS": str(failing)}
    out = tmp_path / "check"
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "device_check.sh"), str(out), "--tiny"],
        capture_output=True, text=True, check=False, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "pytest exit 1, benchmark exit 0" in result.stdout
    assert "1 failed" in (out / "pytest.txt").read_text()
    assert "ATTENTION" in (out / "attention.txt").read_text() and (out / "device.txt").exists()
    document = json.loads((out / "attention.json").read_text())
    assert document["config"]["dtype"] == "bfloat16" and document["config"]["seq_lens"] == [256]
    assert {r["block_q"] for r in document["records"]} == {64}  # the plan's: T / S = 64
    ran = {r["implementation"] for r in document["records"] if r["skip_reason"] is None}
    assert ran >= {"blockwise", "blockwise-serial"}
    assert {r["implementation"] for r in document["records"]} == {
        "cudnn", "pallas", "blockwise", "blockwise-serial", "jax-nn-cudnn"
    }  # fmt: skip


# --- the library without the bench extra ----------------------------------------------------

_BLOCK_EXTRA = textwrap.dedent(
    """
    import sys

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("typer", "rich", "matplotlib", "click"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, Block())
    """
)


def test_library_imports_and_runs_without_the_bench_extra():
    code = _BLOCK_EXTRA + textwrap.dedent(
        """
        import importlib, pkgutil
        import jax.numpy as jnp
        import thdkit

        names = [m.name for m in pkgutil.walk_packages(thdkit.__path__, "thdkit.")]
        # The core library; thdkit.flax and thdkit.data are the optional extra thdkit[flax].
        extras = ("thdkit.bench", "thdkit.flax", "thdkit.data")
        library = [n for n in names if not n.startswith(extras)]
        for name in library:
            importlib.import_module(name)
        meta = thdkit.seqlens_and_offsets(
            segment_ids_q=jnp.array([[1, 1, 2, 0]]), segment_pos_q=jnp.array([[0, 1, 0, 0]]),
            mask_type="padding", max_segments_per_seq=2,
        )
        print(sorted(library), meta.q_seqlens.tolist())
        try:
            import thdkit.bench.commands
        except ModuleNotFoundError as error:
            print("blocked", error.name)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "thdkit.cli" in result.stdout and "thdkit._src.metadata" in result.stdout
    assert "[[2, 1]]" in result.stdout
    assert "blocked typer" in result.stdout or "blocked rich" in result.stdout


def test_command_without_the_bench_extra_says_how_to_install_it():
    code = _BLOCK_EXTRA + "import runpy; runpy.run_module('thdkit.cli', run_name='__main__')"
    result = subprocess.run(
        [sys.executable, "-c", code, "bench", "--quick"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and 'pip install "thdkit[bench]"' in lines[0], result.stderr


def test_an_implementation_registered_at_run_time_is_benchmarked_by_name(tmp_path):
    """``--implementation`` takes the kernel registry's names as they are when it runs: one
    registered here is planned and timed, its visited pairs read from the implementation (a
    subclass of the dense reference visits every pair); unregistered, it is refused again."""
    from thdkit import kernels
    from thdkit.bench.attention import implementation_names

    class DenseHere(type(kernels.get("reference"))):
        name = "dense_here"

    kernels.register(DenseHere())
    try:
        assert "dense_here" in implementation_names()
        assert "dense_here" not in AttentionBench().implementations  # dense: only when named
        json_path = tmp_path / "attention.json"
        args = [
            *("bench", "attention", "--seq-len", "64", "--segments", "2", "--heads", "1"),
            *("--head-dim", "8", "--repeats", "1", "--warmup", "0", "--dtype", "float32"),
            *("--implementation", "dense_here", "--json", str(json_path)),
        ]
        result = CliRunner().invoke(app, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
    finally:
        kernels.unregister("dense_here")
    records = json.loads(json_path.read_text())["records"]
    assert {(r["implementation"], r["pass"]) for r in records} == {
        ("dense_here", "fwd"),
        ("dense_here", "fwd+bwd"),
    }
    assert all(r["skip_reason"] is None and r["visited_pair_fraction"] == 1.0 for r in records)
    with pytest.raises(ConfigError, match=r"implementations: must be among .*'dense_here'"):
        AttentionBench(implementations=("dense_here",))


# --- soft cap and sinks beside plain attention ------------------------------------------------


def test_bench_attention_times_soft_cap_and_sinks_beside_plain(tmp_path):
    """``--soft-cap`` and ``--sinks`` add a record per thdkit implementation and pass for each
    feature, timed in the cell's rounds; the peers stay plain; ``vs_plain`` and ``vs_blockwise``
    compare within the implementation and within the feature."""
    json_path = tmp_path / "attention.json"
    args = [
        *("bench", "attention", "--seq-len", "64", "--segments", "2", "--heads", "2"),
        *("--head-dim", "8", "--repeats", "1", "--warmup", "0", "--dtype", "float32"),
        *("--implementation", "blockwise,jax-nn-xla", "--soft-cap", "5"),
        *("--sinks", "--json", str(json_path)),
    ]
    result = CliRunner().invoke(app, args, catch_exceptions=False, env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "soft cap 5.0, sinks" in result.output and "× plain" in result.output
    document = json.loads(json_path.read_text())
    assert (document["config"]["logits_soft_cap"], document["config"]["sinks"]) == (5.0, True)
    records = {(r["implementation"], r["pass"], r["feature"]): r for r in document["records"]}
    features, passes = ("plain", "soft_cap", "sinks"), ("fwd", "fwd+bwd")
    expected = set(itertools.product(["blockwise"], passes, features))
    expected |= {("jax-nn-xla", p, "plain") for p in passes}
    assert set(records) == expected and len(document["records"]) == len(expected)
    for (name, pass_, feature), record in records.items():
        assert record["skip_reason"] is None, record
        mine = median(record)
        plain = median(records[name, pass_, "plain"])
        assert record["vs_plain"] == pytest.approx(mine / plain)
        assert record["vs_blockwise"] == pytest.approx(
            mine / median(records["blockwise", pass_, feature])
        )
        assert record["needed_flops"] == records[name, pass_, "plain"]["needed_flops"]
    assert {records[n, p, "plain"]["vs_plain"] for n, p, _ in expected} == {1.0}


def test_attention_table_shows_features_only_where_timed():
    """Without features (or from a report written before them) the table keeps its columns."""
    assert AttentionBench().features == ("plain",)
    assert AttentionBench(sinks=True).features == ("plain", "sinks")
    record = {
        "seq_len": 64, "segments": 2, "implementation": "blockwise", "pass": "fwd",
        "temp_bytes": 1024, "latency_ms": {"median": 2.0}, "vs_blockwise": 1.0,
        "efficiency": 0.5, "visited_pair_fraction": 0.5, "allowed_pair_fraction": 0.25,
        "skip_reason": None, "matmul_flop_rate": 1e9,
    }  # fmt: skip
    timed = [record, record | {"feature": "sinks", "vs_plain": 1.25}]

    def text(records):
        console = Console(width=250, record=True)
        console.print(attention_table(records))
        return console.export_text()

    old = text([record])
    assert "× blockwise" in old and "× plain" not in old and "feature" not in old
    new = text(timed)
    assert "× plain" in new and "feature" in new and "sinks" in new and "1.25" in new


def _oracle(logits_soft_cap, sinks, q, k, v, ids, pos, scale):
    """float64 ``(out, gradient of sum(out**2) / 2 in the sinks)`` of padding-causal attention from
    the formulas (docs/semantics.md, "Soft-capped logits" and "Attention sinks"): one row."""
    q, k, v = (np.asarray(x, np.float64)[0] for x in (q, k, v))  # [T, H, D]
    ids, pos = np.asarray(ids)[0], np.asarray(pos)[0]
    tokens, heads = q.shape[:2]
    out, d_sinks = np.zeros(v.shape), np.zeros(heads)
    for i, h in itertools.product(range(tokens), range(heads)):
        allowed = (ids == ids[i]) & (ids[i] != 0) & (pos <= pos[i])
        if not allowed.any():
            continue
        logits = scale * k[allowed, h] @ q[i, h]
        if logits_soft_cap is not None:
            logits = logits_soft_cap * np.tanh(logits / logits_soft_cap)
        weights = np.exp(logits)
        total = weights.sum() + (0.0 if sinks is None else np.exp(sinks[h]))
        out[i, h] = weights @ v[allowed, h] / total
        if sinks is not None:  # d out / d sink = -p out, the cotangent is out itself
            d_sinks[h] -= np.exp(sinks[h]) / total * out[i, h] @ out[i, h]
    return out[None], d_sinks


@pytest.mark.parametrize("feature", ["soft_cap", "sinks"])
def test_feature_programs_equal_a_float64_oracle(feature):
    """The programs the bench times compute the feature: blockwise's against the formulas in
    float64, forward and (sinks) the sinks' gradient in the pullback."""
    config = AttentionBench(seq_lens=(16,), segments=(3,), heads=2, head_dim=4, logits_soft_cap=1.5)
    rng = np.random.default_rng(7)
    ids = jnp.array([[1] * 5 + [0] * 2 + [2] * 6 + [3] * 3])
    pos = jnp.array([[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5, 0, 1, 2]])
    q, k, v = (jnp.asarray(3 * rng.standard_normal((1, 16, 2, 4)), jnp.float32) for _ in range(3))
    cap = 1.5 if feature == "soft_cap" else None
    sinks = bench_sinks(config) if feature == "sinks" else None
    want, want_d_sinks = _oracle(cap, sinks, q, k, v, ids, pos, scale=0.5)  # D = 4: 1 / sqrt(D)
    got = attention_program(config, "blockwise", 3, "fwd", feature=feature)(q, k, v, ids, pos)
    np.testing.assert_allclose(got, want, atol=2e-5)
    out, grads = attention_program(config, "blockwise", 3, "fwd+bwd", feature=feature)(
        q, k, v, ids, pos
    )
    np.testing.assert_allclose(out, want, atol=2e-5)
    assert len(grads) == (4 if feature == "sinks" else 3)
    if feature == "sinks":
        np.testing.assert_allclose(grads[3], want_d_sinks, atol=2e-5)
    plain, _ = _oracle(None, None, q, k, v, ids, pos, scale=0.5)
    assert not np.allclose(want, plain, atol=1e-2)  # the feature changes these outputs


def test_feature_options_are_checked_and_peers_stay_plain():
    with pytest.raises(ConfigError, match=r"^logits_soft_cap: .*positive finite") as error:
        AttentionBench(logits_soft_cap=0.0)
    assert error.value.field == "logits_soft_cap"
    with pytest.raises(ConfigError, match=r"^logits_soft_cap: "):
        AttentionBench(logits_soft_cap=float("nan"))
    result = CliRunner().invoke(app, ["bench", "attention", "--soft-cap", "-1"])
    assert result.exit_code == 2 and "'--soft-cap'" in result.output, result.output
    spec = [jax.ShapeDtypeStruct((1, 8, 1, 4), jnp.float32)] * 3
    spec += [jax.ShapeDtypeStruct((1, 8), jnp.int32)] * 2
    with pytest.raises(NotImplementedError, match="without features"):
        jax.eval_shape(
            attention_program(AttentionBench(), "jax-nn-xla", 2, "fwd", feature="sinks"), *spec
        )
    with pytest.raises(ValueError, match=r"needs config\.logits_soft_cap"):
        attention_program(AttentionBench(), "blockwise", 2, "fwd", feature="soft_cap")
