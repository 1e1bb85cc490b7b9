"""Tests of the benchmarks: shared measurement (thdkit.bench.measure), the metadata benchmark
(sweep / run / report), the option checks of every config, and the library without the extra.

No assertion here depends on timing: sizes come from compilation, latencies are only checked for
their shape (counts, ordering of min / median / max).
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from thdkit import synth
from thdkit.bench import measure, report, run, sweep
from thdkit.bench.attention import AttentionBench
from thdkit.bench.measure import BenchConfig, Column, ConfigError, Plan
from thdkit.bench.ring import RingBench
from thdkit.masks import MaskType
from thdkit.metadata import seqlens_and_offsets
from thdkit.reference import allowed_pairs

LATENCY_KEYS = {"median", "min", "max", "samples"}


def _wait_for_abandoned_compiles(timeout_s: float = 60.0) -> None:
    # XLA aborts interpreter shutdown under a compile in flight; let abandoned ones finish.
    deadline = time.monotonic() + timeout_s
    while measure.pending_compiles() and time.monotonic() < deadline:
        time.sleep(0.05)


def _metadata(ids: jax.Array, pos: jax.Array, **options: object) -> object:
    return seqlens_and_offsets(segment_ids_q=ids, segment_pos_q=pos, **options)


# --- measure.plan ---------------------------------------------------------------------------


def test_plan_reads_sizes_and_costs_from_shapes_alone():
    planned = measure.plan(jnp.sum, jax.ShapeDtypeStruct((1024,), jnp.float32))
    assert planned.skip_reason is None
    assert (planned.arg_bytes, planned.output_bytes) == (4096, 4)
    assert planned.total_bytes >= planned.arg_bytes + planned.output_bytes
    assert planned.flops > 0 and planned.bytes_accessed >= 4096 and planned.compile_s > 0
    np.testing.assert_allclose(planned.executable(jnp.ones(1024)), 1024.0)
    fields = planned.fields()
    assert fields["total_bytes"] == planned.total_bytes and "executable" not in fields


def test_plan_accepts_arrays_and_binds_static_options():
    planned = measure.plan(jnp.sum, jnp.ones((8, 4)), axis=1)
    assert (planned.arg_bytes, planned.output_bytes) == (8 * 4 * 4, 8 * 4)


def test_plan_dense_temp_grows_quadratically_and_linear_stays_flat_in_s():
    spec = {t: jax.ShapeDtypeStruct((1, t), jnp.int32) for t in (256, 512, 4096)}
    dense = {
        t: measure.plan(
            _metadata, spec[t], spec[t], mask_type="padding_causal", max_segments_per_seq=4,
            method="dense",
        ).temp_bytes
        for t in (256, 512)
    }  # fmt: skip
    assert 3.0 < dense[512] / dense[256] < 5.0 and dense[512] >= 512 * 512
    linear = {
        s: measure.plan(
            functools.partial(_metadata, method="linear"), spec[4096], spec[4096],
            mask_type="padding", max_segments_per_seq=s,
        ).temp_bytes
        for s in (4, 64)
    }  # fmt: skip
    assert abs(linear[64] - linear[4]) < 64 * 64


def test_plan_failures_are_skip_reasons():
    failed = measure.plan(lambda x: x @ x, jax.ShapeDtypeStruct((3, 4), jnp.float32))
    assert failed.executable is None and failed.total_bytes is None
    assert failed.skip_reason.startswith("compile failed: TypeError")

    def unsupported(x):
        raise NotImplementedError("needs a GPU")

    reason = measure.plan(unsupported, jnp.ones(2)).skip_reason
    assert reason == "not supported: NotImplementedError: needs a GPU"


def test_plan_time_limit_gives_a_skip_reason_instead_of_waiting():
    spec = jax.ShapeDtypeStruct((2048,), jnp.float32)
    try:
        planned = measure.plan(lambda x: jnp.sort(x) * 2, spec, compile_timeout_s=1e-6)
        assert planned.executable is None
        assert planned.skip_reason == "not compiled: compile exceeded 1e-06 s"
    finally:
        _wait_for_abandoned_compiles()


# --- measure: latency, budget, memory -------------------------------------------------------


def test_interleaved_latency_counts_and_order():
    x = jnp.arange(64.0)
    fns = {"sum": jax.jit(jnp.sum), "max": jax.jit(jnp.max)}
    stats = measure.interleaved_latency(fns, dict.fromkeys(fns, (x,)), warmup=1, repeats=4)
    assert set(stats) == {"sum", "max"}
    for latency in stats.values():
        assert latency.samples == 4
        assert 0 < latency.min <= latency.median <= latency.max
        assert set(latency._asdict()) == LATENCY_KEYS


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


def test_run_plans_times_what_fits_and_says_why_not_the_rest():
    spec = jax.ShapeDtypeStruct((1024,), jnp.float32)
    plans = {
        "small": measure.plan(jnp.sum, jax.ShapeDtypeStruct((4,), jnp.float32)),
        "big": measure.plan(jnp.sum, spec),
        "broken": Plan.skipped("compile failed: boom"),
    }
    args = {"small": (jnp.ones(4),), "big": (jnp.ones(1024),), "broken": ()}
    out = measure.run_plans(plans, args, BenchConfig(repeats=2, warmup=0), budget_bytes=1024)
    assert out["small"][0] is None and set(out["small"][1]) == LATENCY_KEYS
    assert out["small"][1]["samples"] == 2
    needs = measure.format_bytes(plans["big"].total_bytes)
    assert out["big"] == (f"not run: needs {needs} (budget 1.0 KiB)", None)
    assert out["broken"] == ("compile failed: boom", None)


def test_memory_and_budget():
    assert measure.memory_budget_bytes(limit_bytes=1) == 1
    assert measure.memory_budget_bytes(fraction=0.5) <= measure.memory_bytes()
    assert 0 < measure.memory_bytes() <= measure.memory_bytes(total=True)


def test_environment_names_the_backend():
    env = measure.environment()
    assert env["backend"] == jax.default_backend()
    assert env["device_kind"] == jax.devices()[0].device_kind
    for key in ("jax", "jaxlib", "cpu_count", "date", "memory_total_bytes"):
        assert env[key]


# --- the table builder and the JSON report --------------------------------------------------


def test_table_shows_values_sections_and_dashes():
    records = [{"a": 1, "b": 0.5}, {"a": 1, "b": None}, {"a": 2, "b": 2.0}]
    columns = [
        Column("a", "a"),
        Column("b", "b", "{:.2f}".format),
        Column("c", lambda r: r["a"] * 10),
    ]
    table = measure.table("T", columns, records, section=lambda r: r["a"], caption="note")
    assert table.row_count == 3 and table.caption == "note"
    assert list(table.columns[1].cells) == ["0.50", "-", "2.00"]
    assert list(table.columns[2].cells) == ["10", "10", "20"]
    assert [row.end_section for row in table.rows] == [False, True, False]


@pytest.mark.parametrize("config", [sweep.MetadataSweep(), RingBench(), BenchConfig()])
def test_write_json_has_the_same_top_level_keys(tmp_path, config):
    path = tmp_path / "out.json"
    records = [{"latency_ms": None, "skip_reason": "not run"}]
    measure.write_json(path, benchmark="x", config=config, environment={"backend": "cpu"},
                       records=records)  # fmt: skip
    document = json.loads(path.read_text())
    assert list(document) == ["benchmark", "config", "environment", "summary", "records"]
    assert document["config"]["seed"] == 0 and document["summary"] == {}
    assert document["records"] == records


# --- option checks of every config ----------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "options", "field"),
    [
        (BenchConfig, {"seed": -1}, "seed"),
        (BenchConfig, {"batch": 0}, "batch"),
        (BenchConfig, {"repeats": 0}, "repeats"),
        (BenchConfig, {"warmup": -1}, "warmup"),
        (BenchConfig, {"time_per_program_s": 0.0}, "time_per_program_s"),
        (sweep.MetadataSweep, {"methods": ("fast",)}, "methods"),
        (sweep.MetadataSweep, {"methods": ()}, "methods"),
        (sweep.MetadataSweep, {"layout": "diagonal"}, "layout"),
        (sweep.MetadataSweep, {"mask_types": ("sideways",)}, "mask_types"),
        (sweep.MetadataSweep, {"mask_types": ()}, "mask_types"),
        (sweep.MetadataSweep, {"seq_lens": ()}, "seq_lens"),
        (sweep.MetadataSweep, {"max_segments": (0,)}, "max_segments"),
        (sweep.MetadataSweep, {"compile_timeout_s": -1.0}, "compile_timeout_s"),
        (sweep.MetadataSweep, {"memory_limit_bytes": 0}, "memory_limit_bytes"),
        (AttentionBench, {"dtype": "bogus"}, "dtype"),
        (AttentionBench, {"dtype": "int32"}, "dtype"),
        (AttentionBench, {"implementations": ("fast",)}, "implementations"),
        (AttentionBench, {"segments": (0,)}, "segments"),
        (AttentionBench, {"seq_lens": (64,), "segments": (65,)}, "segments"),
        (AttentionBench, {"mask_type": "sideways"}, "mask_type"),
        (AttentionBench, {"window_size": (1, 2, 3)}, "window_size"),
        (RingBench, {"seq_len": 100}, "seq_len"),
        (RingBench, {"cp": 0}, "cp"),
        (RingBench, {"stripe_sizes": (0,)}, "stripe_sizes"),
        (RingBench, {"seq_len": 64, "stripe_sizes": (1,), "segments": (65,)}, "segments"),
    ],
)
def test_configs_reject_bad_options_naming_them(cls, options, field):
    with pytest.raises(ConfigError, match=f"^{field} ") as error:
        cls(**options)
    assert error.value.field == field


def test_sweep_canonical_mask_names_and_cells():
    config = sweep.MetadataSweep(
        seq_lens=(64, 128), max_segments=(4,), mask_types=("causal_padding",)
    )
    assert config.mask_types == ("padding_causal",)
    assert [c.label() for c in config.cells()] == [
        "T=64 S=4 padding_causal",
        "T=128 S=4 padding_causal",
    ]


# --- the metadata benchmark -----------------------------------------------------------------


def test_worst_ring_step_has_the_most_pairs():
    ids, pos = synth.packed_segments(np.random.default_rng(0), batch=1, seq_len=128, max_segments=3)
    ids, pos = synth.striped(ids, cp=4), synth.striped(pos, cp=4)
    worst = sweep.worst_ring_step(ids, pos, cp=4, mask_type="padding_causal")

    def count(step):
        view = synth.ring_step(ids, pos, cp=4, q_rank=step[0], kv_rank=step[1])
        return int(allowed_pairs(*view, mask_type=MaskType.PADDING_CAUSAL).sum())

    assert all(count(worst) >= count((q, kv)) for q in range(4) for kv in range(4))


def test_make_inputs_shapes_and_segment_cap():
    for layout, count in (("self", 2), ("cross", 4), ("ring", 4)):
        config = sweep.MetadataSweep(layout=layout, batch=2)
        inputs = sweep.make_inputs(config, sweep.Cell(32, 100, "padding"))
        assert len(inputs.arrays) == count
        assert all(a.shape == (2, 32) and a.dtype == np.int32 for a in inputs.arrays)
        # S > row length: the generator gets one document per token of the row at most.
        assert inputs.segments == (100 if layout == "ring" else 32)
        assert (inputs.ring_step is not None) == (layout == "ring")


def test_estimated_bytes_orders_the_methods():
    sizes = {
        m: sweep.estimated_bytes(m, batch=1, seq_len=131072, max_segments=16) for m in sweep.METHODS
    }
    assert sizes["linear"] < sizes["one_hot"] < sizes["dense"] == 131072**2


@pytest.mark.parametrize(
    ("layout", "mask_type"),
    [("self", "padding_causal"), ("cross", "padding"), ("ring", "padding_causal_bottom_right")],
)
def test_run_cell_runs_every_method_and_they_agree(layout, mask_type):
    config = sweep.MetadataSweep(
        seq_lens=(64,), max_segments=(4,), mask_types=(mask_type,), layout=layout, warmup=1,
        repeats=2, time_per_program_s=0.01,
    )  # fmt: skip
    records = run.run_cell(config, config.cells()[0])
    assert [r["method"] for r in records] == [*sweep.METHODS, sweep.FLOOR]
    for record in records:
        assert record["skip_reason"] is None and record["layout"] == layout
        assert set(record["latency_ms"]) == LATENCY_KEYS and record["latency_ms"]["samples"] >= 1
        assert record["matches_linear"] is (None if record["method"] == sweep.FLOOR else True)


def test_absurd_dense_is_skipped_before_compiling():
    config = sweep.MetadataSweep(
        seq_lens=(2**22,), max_segments=(16,), mask_types=("padding",), methods=("dense",),
        memory_limit_bytes=1,
    )  # fmt: skip
    started = time.perf_counter()
    dense, floor = run.run_cell(config, config.cells()[0])
    assert dense["skip_reason"].startswith("not compiled: needs ~16.0 TiB")
    assert dense["compile_s"] is None and dense["temp_bytes"] is None
    assert dense["estimated_bytes"] == 2**44
    assert floor["skip_reason"].startswith("not run: needs")
    assert time.perf_counter() - started < 30


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


def test_metadata_tables_ratios_against_linear_and_floor():
    config = sweep.MetadataSweep(
        seq_lens=(64, 128), max_segments=(4,), mask_types=("padding",), methods=("linear", "dense"),
        repeats=1, warmup=0,
    )  # fmt: skip
    records = run.run_sweep(config)
    memory, work, latency, growth = report.metadata_tables(records)
    ratio = dict(zip(memory.columns[3].cells, memory.columns[8].cells, strict=True))
    assert ratio["linear"] == "1"
    expected = records[1]["temp_bytes"] / records[0]["temp_bytes"]
    assert float(list(memory.columns[8].cells)[1].replace(",", "")) == pytest.approx(expected, 0.01)
    assert list(latency.columns[9].cells)[2] == "1"  # the floor against itself
    assert [row.end_section for row in memory.rows].count(True) == 1  # two cells
    assert growth.row_count == 2  # linear and dense, the floor left out
    assert work.row_count == len(records)


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
        library = [n for n in names if not n.startswith("thdkit.bench")]
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
    assert "thdkit.cli" in result.stdout and "thdkit.metadata" in result.stdout
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
