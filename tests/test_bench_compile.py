"""The compile benchmark (thdkit.bench.compile) at a tiny size: its counts are sane.

No assertion depends on timing: compile counts come from jax.monitoring, sizes from compilation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import thdkit
from thdkit.bench.compile import (
    ENTRIES,
    CompileBench,
    CompileCounter,
    memory_maps,
    run_compile_bench,
)
from thdkit.bench.compile_report import compile_table, host_table
from thdkit.bench.measure import ConfigError

TINY = dict(
    entry_seq_len=64,
    entry_segments=4,
    pallas_seq_len=16,
    layers=2,
    heads=1,
    head_dim=8,
    seq_lens=(64,),
    segments=(4, 128),  # S above T: that cell is skipped
    compile_samples=2,
    repeats=2,
    warmup=0,
    time_per_program_s=0.01,
)


@pytest.fixture(scope="module")
def records():
    config = CompileBench(entries=("metadata", "metadata-host", "attention-fwd"), **TINY)
    return run_compile_bench(config)


def test_entry_point_counts(records):
    by_entry = {r["entry"]: r for r in records if r["table"] == "entry"}
    assert list(by_entry) == ["metadata", "metadata-host", "attention-fwd"]
    assert all(r["skip_reason"] is None for r in by_entry.values())
    host = by_entry["metadata-host"]
    assert (host["programs_new_shape"], host["programs_repeated_shape"], host["programs"]) == (
        0,
        0,
        [],
    )
    assert host["hlo_instructions"] is None and host["compile_s"] == 0
    # Concrete JAX layouts are read back once and take the host path too: nothing compiles, and
    # the program the caller's jit would trace is still measured.
    metadata = by_entry["metadata"]
    assert (metadata["programs_new_shape"], metadata["programs_repeated_shape"]) == (0, 0)
    assert metadata["hlo_instructions"] > 0
    forward = by_entry["attention-fwd"]
    assert forward["programs"] == ["jit(_forward)"]  # the tile ranges are computed on the host
    assert forward["programs_new_shape"] == 1 and forward["programs_repeated_shape"] == 0
    assert forward["compile_s"] > 0 and forward["hlo_instructions"] > 0
    for record in records:
        assert record["thdkit_version"] == thdkit.__version__
        assert record["jax_version"] == jax.__version__


def test_host_vs_device_cells(records):
    cells = [r for r in records if r["table"] == "host"]
    assert [(r["seq_len"], r["segments"]) for r in cells] == [(64, 4)]
    (cell,) = cells
    assert cell["matches_device"] and cell["programs_host"] == 0
    assert cell["programs_first_call"] >= 1
    assert cell["device_first_ms"]["samples"] == 2
    assert cell["first_over_host"] > 0 and cell["warm_over_host"] > 0


def test_tables_render(records):
    assert compile_table(records).row_count == 3
    assert host_table(records).row_count == 1


def test_counter_and_maps():
    x = jnp.ones(11)
    with CompileCounter() as counter:
        jax.jit(lambda x: x - 5)(x).block_until_ready()
    with CompileCounter() as again:
        jax.jit(lambda x: x - 5)  # traced nothing, compiled nothing
    assert len(counter.programs) == 1 and counter.seconds > 0 and again.programs == []
    maps = memory_maps()
    assert maps is None or maps > 0


def test_config_checks():
    assert set(CompileBench().entries) == set(ENTRIES)
    with pytest.raises(ConfigError, match="entry_segments"):
        CompileBench(entry_seq_len=8, entry_segments=5)
    with pytest.raises(ConfigError, match="entries"):
        CompileBench(entries=())
