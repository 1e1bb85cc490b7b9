"""The metadata benchmark: ``seqlens_and_offsets`` by method, over T, S, mask types and layouts.

Axis legend: B batch, T tokens per row (T_q = T_kv = T for every layout), S =
``max_segments_per_seq``.

A *cell* is one (T, S, mask type) of a sweep. For each cell the benchmark

1. draws a random [B, T] layout (seeded by (seed, T, S), so every mask type and method of a (T, S)
   sees the same tokens): ``self`` = :func:`thdkit.synth.packed_segments`; ``cross`` =
   :func:`thdkit.synth.cross_segments` with T_kv = T; ``ring`` = the worst ring step of a row of
   ``RING_CP * T`` tokens striped over ``RING_CP`` ranks (stripe 1), each rank holding T tokens.
   The generator gets ``min(S, row length)`` documents (it needs at least one token each);
2. plans every method as its own ``jax.jit`` program, plus a *floor* program that only reads the
   same inputs once (one sum per array): compilation alone gives argument / output / temp bytes,
   flops and bytes accessed. A method whose rough size estimate exceeds the compile limit is not
   compiled at all;
3. times the programs whose plans fit the memory budget, interleaved round-robin after warm-up,
   and checks that every method's output equals linear's.

The worst ring step is the (q rank, kv rank) pair whose view has the most allowed (q, kv) pairs
under the cell's mask type (counted exactly on the host, O(T log T)); ties go to the first pair in
row-major order.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from rich.table import Table

from thdkit import synth
from thdkit.bench.measure import (
    Plan,
    fits_in_budget,
    format_bytes,
    interleaved_latency,
    memory_budget_bytes,
    plan,
    total_memory_bytes,
    write_report,
)
from thdkit.bench.ring import work_per_rank
from thdkit.masks import MaskType
from thdkit.metadata import seqlens_and_offsets

__all__ = [
    "FLOOR",
    "LAYOUTS",
    "METHODS",
    "PRESETS",
    "RING_CP",
    "Cell",
    "MetadataSweep",
    "estimated_bytes",
    "growth_exponents",
    "growth_table",
    "latency_table",
    "make_inputs",
    "memory_table",
    "plot_records",
    "run_cell",
    "run_sweep",
    "work_table",
    "worst_ring_step",
    "write_json",
]

Layout = Literal["self", "cross", "ring"]

METHODS: tuple[str, ...] = ("linear", "one_hot", "dense")
FLOOR = "floor"
LAYOUTS: tuple[str, ...] = ("self", "cross", "ring")
RING_CP = 4
RING_STRIPE = 1
# A compile skipped by estimate must be hopeless, not merely too big to run: plans of programs
# somewhat larger than memory are still worth showing (e.g. dense at T = 128k on 24 GiB).
COMPILE_LIMIT_MEMORY_MULTIPLE = 8

_ALL_MASKS = ("padding", "padding_causal", "padding_causal_bottom_right")

PRESETS: dict[str, dict[str, Any]] = {
    # A first look in well under a minute on two CPU cores: all methods, one mask type, and a
    # 1 GiB run budget so that dense at 64k shows the "not run" path instead of taking seconds
    # per call.
    "quick": {
        "seq_lens": (1024, 4096, 16384, 65536),
        "max_segments": (16,),
        "mask_types": ("padding_causal",),
        "warmup": 1,
        "repeats": 10,
        "time_per_method_s": 0.3,
        "memory_limit_bytes": 2**30,
    },
    "default": {
        "seq_lens": (1024, 4096, 16384, 65536, 131072),
        "max_segments": (16,),
        "mask_types": _ALL_MASKS,
        "warmup": 2,
        "repeats": 20,
        "time_per_method_s": 1.0,
        "memory_limit_bytes": None,
    },
    "full": {
        "seq_lens": (1024, 4096, 16384, 65536, 131072, 262144, 1048576),
        "max_segments": (16, 1024, 65536),
        "mask_types": _ALL_MASKS,
        "warmup": 2,
        "repeats": 20,
        "time_per_method_s": 1.0,
        "memory_limit_bytes": None,
    },
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MetadataSweep:
    """What to measure.

    Attributes:
        seq_lens: the T values.
        max_segments: the S values (``max_segments_per_seq``).
        batch: B.
        mask_types: mask type names.
        methods: methods of ``seqlens_and_offsets`` (the floor is always added).
        layout: "self", "cross" or "ring".
        seed: seed of the random layouts.
        warmup: untimed runs per program.
        repeats: most timed runs per program.
        time_per_method_s: rough seconds of timed runs per program (slow ones stop early).
        compile_timeout_s: seconds a compile may take before the method is skipped.
        memory_limit_bytes: run budget; None means half the memory available at each cell.
        compile_limit_bytes: skip compiling a method whose estimate exceeds it; None means
            ``COMPILE_LIMIT_MEMORY_MULTIPLE`` times the device's total memory.
    """

    seq_lens: tuple[int, ...] = PRESETS["default"]["seq_lens"]
    max_segments: tuple[int, ...] = PRESETS["default"]["max_segments"]
    batch: int = 1
    mask_types: tuple[str, ...] = _ALL_MASKS
    methods: tuple[str, ...] = METHODS
    layout: Layout = "self"
    seed: int = 0
    warmup: int = 2
    repeats: int = 20
    time_per_method_s: float = 1.0
    compile_timeout_s: float = 60.0
    memory_limit_bytes: int | None = None
    compile_limit_bytes: int | None = None

    def __post_init__(self) -> None:
        if not self.seq_lens or any(t < 1 for t in self.seq_lens):
            raise ValueError(f"seq_lens must be positive ints, got {self.seq_lens}")
        if not self.max_segments or any(s < 1 for s in self.max_segments):
            raise ValueError(f"max_segments must be positive ints, got {self.max_segments}")
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; valid: {', '.join(LAYOUTS)}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown methods {unknown}; valid: {', '.join(METHODS)}")
        canonical = tuple(MaskType.parse(m).value for m in self.mask_types)
        object.__setattr__(self, "mask_types", canonical)
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError(
                f"need repeats >= 1 and warmup >= 0, got {self.repeats}, {self.warmup}"
            )

    def cells(self) -> list[Cell]:
        """Every (T, S, mask type), T outermost, in sweep order."""
        return [
            Cell(seq_len=t, max_segments=s, mask_type=m)
            for t in self.seq_lens
            for s in self.max_segments
            for m in self.mask_types
        ]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Cell:
    """One (T, S, mask type) of a sweep."""

    seq_len: int
    max_segments: int
    mask_type: str

    def label(self) -> str:
        """Short text for progress lines, e.g. ``"T=4096 S=16 padding"``."""
        return f"T={self.seq_len} S={self.max_segments} {self.mask_type}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Inputs:
    """The arrays of one cell and how they were drawn.

    Attributes:
        arrays: ``(ids, pos)`` (self) or ``(ids_q, pos_q, ids_kv, pos_kv)``, each int32[B, T].
        segments: documents per row the generator was asked for.
        ring_step: ``(q_rank, kv_rank)`` for the ring layout, else None.
    """

    arrays: tuple[np.ndarray, ...]
    segments: int
    ring_step: tuple[int, int] | None


def worst_ring_step(
    segment_ids: np.ndarray,
    segment_pos: np.ndarray,
    *,
    cp: int,
    mask_type: MaskType | str,
) -> tuple[int, int]:
    """The ring step with the most allowed pairs (ties: first in row-major order).

    Pairs are counted as ring attention sees them (:func:`thdkit.bench.ring.work_per_rank`,
    exact, with whole-document lengths for bottom-right masks).

    Args:
        segment_ids, segment_pos: int[B, T]; an already reordered self-attention layout.
        cp: ranks.
        mask_type: the mask type the pairs are counted under.

    Returns:
        ``(q_rank, kv_rank)``.

    Example:
        >>> ids = synth.striped(np.array([[1, 1, 1, 1, 1, 1, 1, 1]]), cp=2)
        >>> pos = synth.striped(np.array([[0, 1, 2, 3, 4, 5, 6, 7]]), cp=2)
        >>> worst_ring_step(ids, pos, cp=2, mask_type="padding_causal")
        (0, 0)
    """
    work = work_per_rank(segment_ids, segment_pos, cp=cp, mask_type=mask_type)
    pairs = {
        (q_rank, (q_rank - step) % cp): int(work[q_rank, step])
        for q_rank in range(cp)
        for step in range(cp)
    }
    return max(sorted(pairs), key=lambda q_kv: pairs[q_kv])


def make_inputs(
    *, layout: Layout, batch: int, seq_len: int, max_segments: int, mask_type: str, seed: int
) -> Inputs:
    """Draws the random layout of one cell.

    Args:
        layout: "self", "cross" or "ring".
        batch: B.
        seq_len: T, the length of every array handed to the methods.
        max_segments: S; the generator gets ``min(S, row length)`` documents.
        mask_type: picks the worst ring step (the other layouts ignore it).
        seed: with (T, S), seeds the generator.

    Returns:
        :class:`Inputs`.
    """
    rng = np.random.default_rng([seed, seq_len, max_segments])
    if layout == "self":
        segments = min(max_segments, seq_len)
        arrays = synth.packed_segments(rng, batch=batch, seq_len=seq_len, max_segments=segments)
        return Inputs(arrays=arrays, segments=segments, ring_step=None)
    if layout == "cross":
        segments = min(max_segments, seq_len)
        arrays = synth.cross_segments(
            rng, batch=batch, seq_len_q=seq_len, seq_len_kv=seq_len, max_segments=segments
        )
        return Inputs(arrays=arrays, segments=segments, ring_step=None)
    row_len = RING_CP * seq_len
    segments = min(max_segments, row_len)
    ids, pos = synth.packed_segments(rng, batch=batch, seq_len=row_len, max_segments=segments)
    ids = synth.striped(ids, cp=RING_CP, stripe_size=RING_STRIPE)
    pos = synth.striped(pos, cp=RING_CP, stripe_size=RING_STRIPE)
    q_rank, kv_rank = worst_ring_step(ids, pos, cp=RING_CP, mask_type=mask_type)
    arrays = synth.ring_step(ids, pos, cp=RING_CP, q_rank=q_rank, kv_rank=kv_rank)
    return Inputs(arrays=arrays, segments=segments, ring_step=(q_rank, kv_rank))


def estimated_bytes(method: str, *, batch: int, seq_len: int, max_segments: int) -> int:
    """A rough (within ~20 % on XLA:CPU) scratch size, known before compiling.

    dense keeps a bool ``allowed[T, T]``; one_hot compares int32 keys over ``[T, S+1]`` per side;
    linear keeps a few int32 values per token.

    Args:
        method: "linear", "one_hot" or "dense".
        batch: B.
        seq_len: T (= T_q = T_kv).
        max_segments: S.

    Returns:
        bytes.

    Example:
        >>> format_bytes(estimated_bytes("dense", batch=1, seq_len=2**20, max_segments=16))
        '1.0 TiB'
    """
    if method == "dense":
        return batch * seq_len * seq_len
    if method == "one_hot":
        return 4 * batch * 2 * seq_len * (max_segments + 1)
    return 4 * batch * 4 * seq_len


def _self_metadata(ids: jax.Array, pos: jax.Array, **options: Any) -> Any:
    # kv omitted: self-attention, so the linear method reads the row once.
    return seqlens_and_offsets(segment_ids_q=ids, segment_pos_q=pos, **options)


def _cross_metadata(
    ids_q: jax.Array, pos_q: jax.Array, ids_kv: jax.Array, pos_kv: jax.Array, **options: Any
) -> Any:
    return seqlens_and_offsets(
        segment_ids_q=ids_q,
        segment_pos_q=pos_q,
        segment_ids_kv=ids_kv,
        segment_pos_kv=pos_kv,
        **options,
    )


def _floor(*arrays: jax.Array) -> jax.Array:
    """Reads every input once: the least any method must pay."""
    return sum(jnp.sum(array, dtype=jnp.int32) for array in arrays)


def _plan_method(
    sweep: MetadataSweep, cell: Cell, method: str, specs: Sequence[Any], compile_limit: int
) -> tuple[Plan, int | None]:
    if method == FLOOR:
        return plan(_floor, *specs, compile_timeout_s=sweep.compile_timeout_s), None
    estimate = estimated_bytes(
        method, batch=sweep.batch, seq_len=cell.seq_len, max_segments=cell.max_segments
    )
    if estimate > compile_limit:
        reason = (
            f"not compiled: needs ~{format_bytes(estimate)} "
            f"(compile limit {format_bytes(compile_limit)})"
        )
        return Plan.skipped(reason), estimate
    program = _self_metadata if sweep.layout == "self" else _cross_metadata
    planned = plan(
        program,
        *specs,
        compile_timeout_s=sweep.compile_timeout_s,
        mask_type=cell.mask_type,
        max_segments_per_seq=cell.max_segments,
        method=method,
    )
    return planned, estimate


def _same_output(a: Any, b: Any) -> bool:
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _record(
    sweep: MetadataSweep,
    cell: Cell,
    inputs: Inputs,
    method: str,
    planned: Plan,
    *,
    estimate: int | None,
    skip_reason: str | None,
) -> dict[str, Any]:
    tokens = sweep.batch * cell.seq_len
    return {
        "method": method,
        "mask_type": cell.mask_type,
        "layout": sweep.layout,
        "batch": sweep.batch,
        "seq_len": cell.seq_len,
        "seq_len_kv": cell.seq_len,
        "max_segments": cell.max_segments,
        "segments": inputs.segments,
        "ring_step": list(inputs.ring_step) if inputs.ring_step else None,
        "arg_bytes": planned.arg_bytes,
        "output_bytes": planned.output_bytes,
        "temp_bytes": planned.temp_bytes,
        "total_bytes": planned.total_bytes,
        "temp_bytes_per_token": (
            None if planned.temp_bytes is None else planned.temp_bytes / tokens
        ),
        "estimated_bytes": estimate,
        "flops": planned.flops,
        "bytes_accessed": planned.bytes_accessed,
        "transcendentals": planned.transcendentals,
        "compile_s": planned.compile_s,
        "latency_ms": None,
        "matches_linear": None,
        "skip_reason": skip_reason,
    }


def run_cell(
    sweep: MetadataSweep,
    cell: Cell,
    *,
    on_step: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Plans, runs and checks every method of one cell, plus the floor.

    Args:
        sweep: the options.
        cell: the (T, S, mask type).
        on_step: called with a short description before each step (for progress displays).

    Returns:
        one JSON-ready record per method, the floor last.
    """
    step = on_step or (lambda _: None)
    step(f"{cell.label()}: drawing layout")
    inputs = make_inputs(
        layout=sweep.layout,
        batch=sweep.batch,
        seq_len=cell.seq_len,
        max_segments=cell.max_segments,
        mask_type=cell.mask_type,
        seed=sweep.seed,
    )
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in inputs.arrays]
    compile_limit = sweep.compile_limit_bytes or (
        COMPILE_LIMIT_MEMORY_MULTIPLE * total_memory_bytes()
    )
    names = [*sweep.methods, FLOOR]
    plans: dict[str, Plan] = {}
    estimates: dict[str, int | None] = {}
    for name in names:
        step(f"{cell.label()}: compiling {name}")
        plans[name], estimates[name] = _plan_method(sweep, cell, name, specs, compile_limit)
    budget = memory_budget_bytes(limit_bytes=sweep.memory_limit_bytes)
    skip_reasons = {name: plans[name].skip_reason for name in names}
    for name in names:
        if skip_reasons[name] is None and not fits_in_budget(plans[name].total_bytes, budget):
            skip_reasons[name] = (
                f"not run: needs {format_bytes(plans[name].total_bytes)} "
                f"(budget {format_bytes(budget)})"
            )
    runnable = [name for name in names if skip_reasons[name] is None]
    records = {
        name: _record(
            sweep,
            cell,
            inputs,
            name,
            plans[name],
            estimate=estimates[name],
            skip_reason=skip_reasons[name],
        )
        for name in names
    }
    if runnable:
        step(f"{cell.label()}: timing {', '.join(runnable)}")
        arrays = tuple(jnp.asarray(a) for a in inputs.arrays)
        executables = {name: plans[name].executable for name in runnable}
        stats = interleaved_latency(
            executables,
            dict.fromkeys(runnable, arrays),
            warmup=sweep.warmup,
            repeats=sweep.repeats,
            budget_s=sweep.time_per_method_s,
        )
        for name, latency in stats.items():
            records[name]["latency_ms"] = {
                "median": latency.median_ms,
                "min": latency.min_ms,
                "max": latency.max_ms,
                "samples": latency.samples,
            }
        if "linear" in runnable:
            expected = executables["linear"](*arrays)
            for name in runnable:
                if name != FLOOR:
                    records[name]["matches_linear"] = _same_output(
                        executables[name](*arrays), expected
                    )
    return [records[name] for name in names]


def run_sweep(
    sweep: MetadataSweep,
    *,
    on_step: Callable[[str], None] | None = None,
    on_cell_done: Callable[[Cell], None] | None = None,
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
            on_cell_done(cell)
    return records


# ---------------------------------------------------------------------------------------------
# Summaries


def _cell_key(record: Mapping[str, Any]) -> tuple[Any, ...]:
    return (
        record["layout"],
        record["batch"],
        record["seq_len"],
        record["max_segments"],
        record["mask_type"],
    )


def _by_cell(records: Iterable[Mapping[str, Any]]) -> dict[tuple[Any, ...], dict[str, Any]]:
    cells: dict[tuple[Any, ...], dict[str, Any]] = {}
    for record in records:
        cells.setdefault(_cell_key(record), {})[record["method"]] = record
    return cells


def _median_ms(record: Mapping[str, Any] | None) -> float | None:
    if record is None or record["latency_ms"] is None:
        return None
    return record["latency_ms"]["median"]


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference == 0:
        return None
    return value / reference


def _fmt_ratio(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:.3g}" if ratio < 10 else f"{ratio:,.0f}"


def _fmt_number(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1e4:
        return f"{value:.3g}"
    return f"{value:,.0f}"


def _fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if value < 100 else f"{value:,.0f}"


def _status(record: Mapping[str, Any]) -> str:
    if record["skip_reason"]:
        return record["skip_reason"]
    if record["matches_linear"] is False:
        return "ran, DIFFERS from linear"
    if record["matches_linear"]:
        return "ran, = linear"
    return "ran"


def _cell_tables(title: str, columns: Sequence[tuple[str, str]]) -> Table:
    table = Table(title=title, title_justify="left", header_style="bold")
    for name, justify in columns:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    return table


_CELL_COLUMNS = [("T", "right"), ("S", "right"), ("mask", "left"), ("method", "left")]


def _cell_cells(record: Mapping[str, Any]) -> list[str]:
    return [
        str(record["seq_len"]),
        str(record["max_segments"]),
        record["mask_type"],
        record["method"],
    ]


def _rows(records: Sequence[Mapping[str, Any]]) -> Iterator[tuple[bool, dict[str, Any], dict]]:
    """Each record with whether it opens a new cell and its cell's records by method."""
    cells = _by_cell(records)
    previous = None
    for record in records:
        key = _cell_key(record)
        yield previous is not None and key != previous, record, cells[key]
        previous = key


def memory_table(records: Sequence[Mapping[str, Any]]) -> Table:
    """MEMORY SUMMARY: static bytes per program and temp bytes against linear.

    Args:
        records: as returned by :func:`run_sweep`.

    Returns:
        a rich table.
    """
    table = _cell_tables(
        "MEMORY SUMMARY (static, from compilation)",
        [
            *_CELL_COLUMNS,
            ("args", "right"),
            ("output", "right"),
            ("temp", "right"),
            ("temp B/token", "right"),
            ("temp x linear", "right"),
            ("total", "right"),
            ("status", "left"),
        ],
    )
    for new_cell, record, cell in _rows(records):
        if new_cell:
            table.add_section()
        linear = cell.get("linear")
        per_token = record["temp_bytes_per_token"]
        needed = record["total_bytes"] or record["estimated_bytes"]
        table.add_row(
            *_cell_cells(record),
            format_bytes(record["arg_bytes"]),
            format_bytes(record["output_bytes"]),
            format_bytes(record["temp_bytes"]),
            "-" if per_token is None else f"{per_token:,.1f}",
            _fmt_ratio(_ratio(record["temp_bytes"], linear and linear["temp_bytes"])),
            ("~" if record["total_bytes"] is None and needed else "") + format_bytes(needed),
            _status(record),
        )
    return table


def work_table(records: Sequence[Mapping[str, Any]]) -> Table:
    """WORK SUMMARY: flops and bytes accessed from XLA's cost analysis, against linear.

    Args:
        records: as returned by :func:`run_sweep`.

    Returns:
        a rich table.
    """
    table = _cell_tables(
        "WORK SUMMARY (static, XLA cost analysis)",
        [
            *_CELL_COLUMNS,
            ("flops", "right"),
            ("flops x linear", "right"),
            ("bytes accessed", "right"),
            ("bytes x linear", "right"),
            ("transcendentals", "right"),
            ("compile s", "right"),
        ],
    )
    for new_cell, record, cell in _rows(records):
        if new_cell:
            table.add_section()
        linear = cell.get("linear")
        table.add_row(
            *_cell_cells(record),
            _fmt_number(record["flops"]),
            _fmt_ratio(_ratio(record["flops"], linear and linear["flops"])),
            format_bytes(record["bytes_accessed"]),
            _fmt_ratio(_ratio(record["bytes_accessed"], linear and linear["bytes_accessed"])),
            _fmt_number(record["transcendentals"]),
            "-" if record["compile_s"] is None else f"{record['compile_s']:.2f}",
        )
    return table


def latency_table(records: Sequence[Mapping[str, Any]]) -> Table:
    """LATENCY SUMMARY: interleaved wall time, against linear and against the floor.

    Args:
        records: as returned by :func:`run_sweep`.

    Returns:
        a rich table.
    """
    table = _cell_tables(
        "LATENCY SUMMARY (interleaved, after warm-up; ms)",
        [
            *_CELL_COLUMNS,
            ("median", "right"),
            ("min", "right"),
            ("max", "right"),
            ("runs", "right"),
            ("x linear", "right"),
            ("x floor", "right"),
            ("status", "left"),
        ],
    )
    for new_cell, record, cell in _rows(records):
        if new_cell:
            table.add_section()
        latency = record["latency_ms"] or {}
        median = _median_ms(record)
        table.add_row(
            *_cell_cells(record),
            _fmt_ms(median),
            _fmt_ms(latency.get("min")),
            _fmt_ms(latency.get("max")),
            str(latency.get("samples", "-")),
            _fmt_ratio(_ratio(median, _median_ms(cell.get("linear")))),
            _fmt_ratio(_ratio(median, _median_ms(cell.get(FLOOR)))),
            _status(record),
        )
    return table


def _slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of log y over log x; None with fewer than two points."""
    points = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if y and y > 0]
    if len(points) < 2 or len({x for x, _ in points}) < 2:
        return None
    log_x, log_y = np.array(points).T
    return float(np.polyfit(log_x, log_y, 1)[0])


GROWTH_TAIL = 3


def growth_exponents(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per (mask type, S, method): k in ``temp bytes ∝ T^k`` and ``latency ∝ T^k``.

    Fitted by least squares on log-log over the T values that compiled (temp) or ran (latency);
    ``temp_exponent_tail`` over the largest ``GROWTH_TAIL`` of them only, where O(S) terms no
    longer hide the growth in T.

    Args:
        records: as returned by :func:`run_sweep`.

    Returns:
        dicts with mask_type, max_segments, method, temp_exponent, temp_exponent_tail,
        latency_exponent, seq_lens.
    """
    groups: dict[tuple[str, int, str], list[Mapping[str, Any]]] = {}
    for record in records:
        key = (record["mask_type"], record["max_segments"], record["method"])
        groups.setdefault(key, []).append(record)
    rows = []
    for (mask_type, max_segments, method), group in groups.items():
        temp = sorted((r["seq_len"], r["temp_bytes"]) for r in group if r["temp_bytes"])
        latency = [(r["seq_len"], _median_ms(r)) for r in group if _median_ms(r)]
        tail = temp[-GROWTH_TAIL:]
        rows.append(
            {
                "mask_type": mask_type,
                "max_segments": max_segments,
                "method": method,
                "temp_exponent": _slope(*zip(*temp, strict=True)) if temp else None,
                "temp_exponent_tail": _slope(*zip(*tail, strict=True)) if tail else None,
                "latency_exponent": _slope(*zip(*latency, strict=True)) if latency else None,
                "seq_lens": sorted({r["seq_len"] for r in group}),
            }
        )
    return rows


def growth_table(records: Sequence[Mapping[str, Any]]) -> Table:
    """GROWTH OVER T: the exponents of :func:`growth_exponents`.

    Args:
        records: as returned by :func:`run_sweep`.

    Returns:
        a rich table.
    """
    table = _cell_tables(
        "GROWTH OVER T (log-log least-squares slope k: cost ∝ T^k)",
        [
            ("mask", "left"),
            ("S", "right"),
            ("method", "left"),
            ("temp k", "right"),
            (f"temp k, top {GROWTH_TAIL} T", "right"),
            ("latency k", "right"),
            ("T range", "left"),
        ],
    )

    def exponent(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    for row in growth_exponents(records):
        if row["method"] == FLOOR or len(row["seq_lens"]) < 2:
            continue
        table.add_row(
            row["mask_type"],
            str(row["max_segments"]),
            row["method"],
            exponent(row["temp_exponent"]),
            exponent(row["temp_exponent_tail"]),
            exponent(row["latency_exponent"]),
            f"{min(row['seq_lens'])}..{max(row['seq_lens'])}",
        )
    return table


def write_json(
    path: Path | str,
    records: Sequence[Mapping[str, Any]],
    *,
    environment: Mapping[str, Any],
    sweep: MetadataSweep,
) -> None:
    """Writes the metadata benchmark's records, environment and options as JSON."""
    write_report(
        path,
        benchmark="metadata",
        environment=environment,
        options=sweep,
        records=records,
        growth=growth_exponents(records),
    )


_MARKERS = ("o", "s", "^", "D", "v", "P")
_COLORS = {"linear": "tab:blue", "one_hot": "tab:orange", "dense": "tab:red", FLOOR: "0.45"}


def plot_records(
    records: Sequence[Mapping[str, Any]],
    path: Path | str,
    *,
    environment: Mapping[str, Any],
    mask_type: str | None = None,
) -> str:
    """Writes a PNG: temp bytes and median latency against T, log-log, one line per method and S.

    Args:
        records: as returned by :func:`run_sweep`.
        path: the PNG to write.
        environment: names the backend and device in the title.
        mask_type: the mask type plotted; None picks padding_causal if present, else the first.

    Returns:
        the mask type plotted.
    """
    # The object API with the Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    masks = list(dict.fromkeys(r["mask_type"] for r in records))
    chosen = mask_type or ("padding_causal" if "padding_causal" in masks else masks[0])
    chosen_records = [r for r in records if r["mask_type"] == chosen]
    figure = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    temp_axes, latency_axes = figure.subplots(1, 2)
    methods = list(dict.fromkeys(r["method"] for r in chosen_records))
    segment_counts = sorted({r["max_segments"] for r in chosen_records})
    for method in methods:
        for index, max_segments in enumerate(segment_counts):
            line = sorted(
                (
                    r
                    for r in chosen_records
                    if r["method"] == method and r["max_segments"] == max_segments
                ),
                key=lambda r: r["seq_len"],
            )
            style = {
                "color": _COLORS.get(method),
                "marker": _MARKERS[index % len(_MARKERS)],
                "linestyle": "--" if method == FLOOR else "-",
                "label": f"{method} S={max_segments}",
            }
            temp = [(r["seq_len"], r["temp_bytes"]) for r in line if r["temp_bytes"]]
            if temp and method != FLOOR:
                temp_axes.plot(*zip(*temp, strict=True), **style)
            latency = [(r["seq_len"], _median_ms(r)) for r in line if _median_ms(r)]
            if latency:
                latency_axes.plot(*zip(*latency, strict=True), **style)
    for axes, label in (
        (temp_axes, "temp bytes (compiled plan)"),
        (latency_axes, "median latency, ms"),
    ):
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        axes.set_xlabel("T (tokens per row)")
        axes.set_ylabel(label)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize="small")
    layout = chosen_records[0]["layout"] if chosen_records else "?"
    figure.suptitle(
        f"seqlens_and_offsets, {layout} layout, {chosen}, B={chosen_records[0]['batch']} — "
        f"{environment.get('backend')} ({environment.get('device_kind')}), "
        f"jax {environment.get('jax')}"
    )
    figure.savefig(path, dpi=110)
    return chosen
