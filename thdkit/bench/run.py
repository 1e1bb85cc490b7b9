"""How the metadata benchmark measures a sweep: every method a ``jax.jit`` program, plus a floor
program that only reads the inputs, timed interleaved where it fits; outputs checked against
linear's; methods estimated above the compile limit not compiled at all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from thdkit._src.metadata import seqlens_and_offsets
from thdkit.bench.measure import (
    SILENT,
    Callbacks,
    format_bytes,
    memory_bytes,
    plan,
    run_plans,
    skipped,
)
from thdkit.bench.sweep import FLOOR, MetadataSweep, make_inputs

__all__ = ["run_sweep"]

# Rough scratch bytes, known before compiling (within ~20 % on XLA:CPU), from (B, T, S): dense
# keeps a bool allowed[T, T], one_hot int32 keys over [T, S+1] per side, linear a few int32 per
# token.
_ESTIMATES: dict[str, Callable[[int, int, int], int | None]] = {
    "linear": lambda b, t, s: 16 * b * t,
    "one_hot": lambda b, t, s: 8 * b * t * (s + 1),
    "dense": lambda b, t, s: b * t * t,
    FLOOR: lambda b, t, s: None,
}
_NAMES = ("segment_ids_q", "segment_pos_q", "segment_ids_kv", "segment_pos_kv")


def _metadata(*arrays: jax.Array, **options: Any) -> Any:
    """``seqlens_and_offsets``; self-attention passes only q's arrays, so linear reads them once."""
    return seqlens_and_offsets(**dict(zip(_NAMES, arrays, strict=False)), **options)


def _floor(*arrays: jax.Array, **_: Any) -> jax.Array:
    """Reads every input once: the least any method must pay."""
    return sum(jnp.sum(array, dtype=jnp.int32) for array in arrays)


def run_sweep(sweep: MetadataSweep, *, callbacks: Callbacks = SILENT) -> list[dict[str, Any]]:
    """Plans, runs and checks every method of every cell of a sweep, plus the floor.

    Args:
        sweep: the options.
        callbacks: progress reports (:class:`thdkit.bench.measure.Callbacks`); a cell is one
            cell.

    Returns:
        JSON-ready records, one per cell and method (the floor last in each cell), in sweep order;
        their keys are listed in docs/benchmarks.md.

    Example:
        >>> sweep = MetadataSweep(seq_lens=(64,), max_segments=(4,), mask_types=("padding",),
        ...                       repeats=1, warmup=0)
        >>> [(r["method"], r["matches_linear"]) for r in run_sweep(sweep)]
        [('linear', True), ('one_hot', True), ('dense', True), ('floor', None)]
    """
    limit = sweep.compile_limit_bytes or 8 * memory_bytes(total=True)
    timeout = sweep.compile_timeout_s
    records: list[dict[str, Any]] = []
    for cell in sweep.cells():
        seq_len, max_segments, mask_type = cell
        label = f"T={seq_len} S={max_segments} {mask_type}"
        callbacks.step(f"{label}: drawing layout")
        arrays, segments, ring_step = make_inputs(sweep, *cell)
        plans, estimates = {}, {}
        for name in [*sweep.methods, FLOOR]:
            callbacks.step(f"{label}: compiling {name}")
            estimate = estimates[name] = _ESTIMATES[name](sweep.batch, seq_len, max_segments)
            if estimate is not None and estimate > limit:
                needs = f"~{format_bytes(estimate)} (compile limit {format_bytes(limit)})"
                plans[name] = skipped(f"not compiled: needs {needs}")
                continue
            plans[name] = plan(
                _floor if name == FLOOR else _metadata, *arrays, compile_timeout_s=timeout,
                method=name, mask_type=mask_type, max_segments_per_seq=max_segments,
            )  # fmt: skip
        callbacks.step(f"{label}: timing")
        device_arrays = tuple(jnp.asarray(a) for a in arrays)
        outcome = run_plans(plans, device_arrays, sweep, sweep.memory_limit_bytes)
        ran = [name for name in plans if name != FLOOR and outcome[name]["skip_reason"] is None]
        outputs = {name: jax.tree.leaves(plans[name][0](*device_arrays)) for name in ran}
        for name in plans:
            temp, same = outcome[name]["temp_bytes"], None
            if name in outputs and "linear" in outputs:
                pairs = zip(outputs[name], outputs["linear"], strict=True)
                same = all(np.array_equal(x, y) for x, y in pairs)
            records.append({
                "method": name, "mask_type": mask_type, "layout": sweep.layout,
                "batch": sweep.batch, "seq_len": seq_len, "seq_len_kv": seq_len,
                "max_segments": max_segments, "segments": segments, "ring_step": ring_step,
                **outcome[name],
                "temp_bytes_per_token": temp and temp / (sweep.batch * seq_len),
                "estimated_bytes": estimates[name], "matches_linear": same,
            })  # fmt: skip
        callbacks.cell_done()
    return records
