"""How the metadata benchmark measures a sweep (:mod:`thdkit.bench.sweep` says what).

For each cell the benchmark draws the layout (:func:`thdkit.bench.sweep.make_inputs`), plans every
method as its own ``jax.jit`` program plus a *floor* program that only reads the same inputs once
(one sum per array), times the plans that fit the memory budget, interleaved round-robin after
warm-up (:func:`thdkit.bench.measure.run_plans`), and checks that every method's output equals
linear's. A method whose rough size estimate exceeds the compile limit is not compiled at all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from thdkit.bench.measure import (
    Plan,
    format_bytes,
    memory_budget_bytes,
    memory_bytes,
    plan,
    run_plans,
)
from thdkit.bench.sweep import (
    COMPILE_LIMIT_MEMORY_MULTIPLE,
    FLOOR,
    Cell,
    MetadataSweep,
    estimated_bytes,
    make_inputs,
)
from thdkit.metadata import seqlens_and_offsets

__all__ = ["run_cell", "run_sweep"]


def _metadata(*arrays: jax.Array, **options: Any) -> Any:
    # Self-attention passes (ids, pos) only, so the linear method reads the row once.
    names = ("segment_ids_q", "segment_pos_q", "segment_ids_kv", "segment_pos_kv")
    return seqlens_and_offsets(**dict(zip(names, arrays, strict=False)), **options)


def _floor(*arrays: jax.Array) -> jax.Array:
    """Reads every input once: the least any method must pay."""
    return sum(jnp.sum(array, dtype=jnp.int32) for array in arrays)


def _plan(
    sweep: MetadataSweep, cell: Cell, method: str, specs: list[Any]
) -> tuple[Plan, int | None]:
    if method == FLOOR:
        return plan(_floor, *specs, compile_timeout_s=sweep.compile_timeout_s), None
    estimate = estimated_bytes(
        method, batch=sweep.batch, seq_len=cell.seq_len, max_segments=cell.max_segments
    )
    limit = sweep.compile_limit_bytes or COMPILE_LIMIT_MEMORY_MULTIPLE * memory_bytes(total=True)
    if estimate > limit:
        reason = (
            f"not compiled: needs ~{format_bytes(estimate)} (compile limit {format_bytes(limit)})"
        )
        return Plan.skipped(reason), estimate
    options = {"mask_type": cell.mask_type, "max_segments_per_seq": cell.max_segments}
    return plan(
        _metadata, *specs, compile_timeout_s=sweep.compile_timeout_s, method=method, **options
    ), estimate


def run_cell(
    sweep: MetadataSweep, cell: Cell, *, on_step: Callable[[str], None] | None = None
) -> list[dict[str, Any]]:
    """Plans, runs and checks every method of one cell, plus the floor.

    Args:
        sweep: the options.
        cell: the (T, S, mask type).
        on_step: called with a short description before each step (for progress displays).

    Returns:
        one JSON-ready record per method, the floor last (keys: docs/benchmarks.md).

    Example:
        >>> sweep = MetadataSweep(seq_lens=(64,), max_segments=(4,), mask_types=("padding",),
        ...                       repeats=1, warmup=0)
        >>> [(r["method"], r["matches_linear"]) for r in run_cell(sweep, sweep.cells()[0])]
        [('linear', True), ('one_hot', True), ('dense', True), ('floor', None)]
    """
    step = on_step or (lambda _: None)
    step(f"{cell.label()}: drawing layout")
    inputs = make_inputs(sweep, cell)
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in inputs.arrays]
    plans, estimates = {}, {}
    for name in [*sweep.methods, FLOOR]:
        step(f"{cell.label()}: compiling {name}")
        plans[name], estimates[name] = _plan(sweep, cell, name, specs)
    step(f"{cell.label()}: timing")
    arrays = tuple(jnp.asarray(a) for a in inputs.arrays)
    budget = memory_budget_bytes(limit_bytes=sweep.memory_limit_bytes)
    outcome = run_plans(plans, dict.fromkeys(plans, arrays), sweep, budget_bytes=budget)
    ran = {name for name, (reason, _) in outcome.items() if reason is None}
    expected = plans["linear"].executable(*arrays) if "linear" in ran else None
    records = []
    for name, planned in plans.items():
        matches = None
        if expected is not None and name in ran and name != FLOOR:
            leaves = zip(
                jax.tree.leaves(planned.executable(*arrays)), jax.tree.leaves(expected), strict=True
            )
            matches = all(np.array_equal(x, y) for x, y in leaves)
        records.append(
            {
                "method": name,
                "mask_type": cell.mask_type,
                "layout": sweep.layout,
                "batch": sweep.batch,
                "seq_len": cell.seq_len,
                "seq_len_kv": cell.seq_len,
                "max_segments": cell.max_segments,
                "segments": inputs.segments,
                "ring_step": list(inputs.ring_step) if inputs.ring_step else None,
                **planned.fields(),
                "temp_bytes_per_token": (
                    None
                    if planned.temp_bytes is None
                    else planned.temp_bytes / (sweep.batch * cell.seq_len)
                ),
                "estimated_bytes": estimates[name],
                "matches_linear": matches,
                "latency_ms": outcome[name][1],
                "skip_reason": outcome[name][0],
            }
        )
    return records


def run_sweep(
    sweep: MetadataSweep,
    *,
    on_step: Callable[[str], None] | None = None,
    on_cell_done: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """Runs every cell of a sweep.

    Args:
        sweep: the options.
        on_step: forwarded to :func:`run_cell`.
        on_cell_done: called after each cell.

    Returns:
        the records of all cells, in sweep order.
    """
    records: list[dict[str, Any]] = []
    for cell in sweep.cells():
        records.extend(run_cell(sweep, cell, on_step=on_step))
        if on_cell_done is not None:
            on_cell_done()
    return records
