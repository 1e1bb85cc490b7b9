"""The attention benchmark: the dense reference against the blockwise method (and cuDNN on a GPU).

Axis legend: B batch, T tokens per row (T_q = T_kv, self-attention), H heads, D head dim,
S documents per row.

For each cell (T, S) the benchmark packs rows full with S causal documents of random lengths
(:func:`thdkit.synth.filled_segments`) and, for each implementation of
:func:`thdkit.attention.attention` and each pass (forward, forward + backward):

1. plans the jitted program from shapes alone (:func:`thdkit.bench.measure.plan`): scratch
   ("temp") bytes and XLA's flop estimate, even for reference cells far too big to run;
2. times the programs that fit in the memory budget round-robin
   (:func:`thdkit.bench.measure.interleaved_latency`);
3. counts the work: the fraction of (query tile, key tile) pairs the blockwise method visits
   (:func:`thdkit.attention.tile_ranges`) next to the fraction of token pairs that are allowed and
   ``sum_s len_s^2 / T^2``, and the matmul flops each implementation executes (XLA's estimate
   cannot see the data-dependent trip count of the blockwise loop).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from rich.table import Table

from thdkit import synth
from thdkit.attention import DEFAULT_BLOCK, attention, tile_ranges
from thdkit.bench.measure import (
    fits_in_budget,
    format_bytes,
    interleaved_latency,
    memory_budget_bytes,
    plan,
    write_report,
)
from thdkit.layout import run_lengths
from thdkit.masks import MaskType
from thdkit.reference import pair_mask

__all__ = ["AttentionBench", "attention_table", "run_attention_bench", "write_json"]

PASSES = ("fwd", "fwd+bwd")
# Matmul flops per (query, key) pair per head and head-dim unit: QK^T and PV forward; the
# backward adds dV, dP, dQ, dK, and the blockwise backward also recomputes QK^T.
_FLOPS_PER_PAIR = {
    ("reference", "fwd"): 4,
    ("reference", "fwd+bwd"): 12,
    ("blockwise", "fwd"): 4,
    ("blockwise", "fwd+bwd"): 14,
    ("cudnn", "fwd"): 4,
    ("cudnn", "fwd+bwd"): 14,
}


def _default_implementations() -> tuple[str, ...]:
    on_gpu = jax.default_backend() == "gpu"
    return ("reference", "blockwise", "cudnn") if on_gpu else ("reference", "blockwise")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionBench:
    """What to measure.

    Attributes:
        seq_lens: T values.
        segments: S values, documents per row (one layout per value).
        batch: B.
        heads: H (query and key/value heads).
        head_dim: D (also the value head dim).
        mask_type: a mask type name.
        window_size: ``(left, right)`` or None.
        implementations: of :func:`thdkit.attention.attention`; cuDNN on a GPU only.
        dtype: input dtype name; None means bfloat16 on a GPU (what cuDNN takes), else float32.
        block_q, block_kv: tile sizes of the blockwise method.
        warmup: untimed runs per program.
        repeats: most timed runs per program.
        time_per_program_s: rough seconds of timed runs per program; slow programs stop after
            three samples.
        compile_timeout_s: seconds a compile may take before its program is skipped.
        memory_limit_bytes: run budget; None means half the memory available.
        seed: seed of the layouts and inputs.
    """

    seq_lens: tuple[int, ...] = (8192, 32768)
    segments: tuple[int, ...] = (16,)
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    mask_type: str = "padding_causal"
    window_size: tuple[int | None, int | None] | None = None
    implementations: tuple[str, ...] = dataclasses.field(default_factory=_default_implementations)
    dtype: str | None = None
    block_q: int = DEFAULT_BLOCK
    block_kv: int = DEFAULT_BLOCK
    warmup: int = 1
    repeats: int = 10
    time_per_program_s: float = 2.0
    compile_timeout_s: float = 120.0
    memory_limit_bytes: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        MaskType.parse(self.mask_type)
        sizes = (self.batch, self.heads, self.head_dim, self.block_q, self.block_kv)
        if not self.seq_lens or min(self.seq_lens) < 1 or min(sizes) < 1:
            raise ValueError(
                "seq_lens, batch, heads, head_dim and block sizes must be >= 1, got "
                f"{self.seq_lens=}, {sizes=}"
            )
        if not self.segments or any(not 1 <= s <= min(self.seq_lens) for s in self.segments):
            raise ValueError(f"segments must be in [1, min(seq_lens)], got {self.segments}")
        unknown = set(self.implementations) - {"reference", "blockwise", "cudnn"}
        if unknown or not self.implementations:
            raise ValueError(
                f"implementations must be among reference, blockwise, cudnn, got "
                f"{self.implementations}"
            )
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError(
                f"need repeats >= 1 and warmup >= 0, got {self.repeats}, {self.warmup}"
            )

    @property
    def input_dtype(self) -> jnp.dtype:
        """The dtype of query, key and value."""
        if self.dtype is not None:
            return jnp.dtype(self.dtype)
        return jnp.dtype(jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32)


def _program(config: AttentionBench, implementation: str, segments: int, backward: bool):
    """``fn(q, k, v, ids, pos)`` running one pass of one implementation."""
    options = dict(
        mask_type=config.mask_type,
        window_size=config.window_size,
        max_segments_per_seq=segments,
        implementation=implementation,
        block_q=config.block_q,
        block_kv=config.block_kv,
    )

    def forward(q, k, v, ids, pos):
        return attention(q, k, v, segment_ids_q=ids, segment_pos_q=pos, **options)

    if not backward:
        return forward

    def forward_backward(q, k, v, ids, pos):
        out, pullback = jax.vjp(lambda q, k, v: forward(q, k, v, ids, pos), q, k, v)
        return out, pullback(out)

    return forward_backward


@functools.partial(jax.jit, static_argnames=("mask", "window", "block_q", "block_kv"))
def _work(ids, pos, *, mask, window, block_q, block_kv):
    """Visited tile fraction, allowed pair fraction and sum_s len_s^2 / T^2 of one row batch."""
    rl = run_lengths(ids)
    ranges = tile_ranges(
        ids, pos, rl, ids, pos, rl,
        mask_type=mask, window_size=window, block_q=block_q, block_kv=block_kv,
    )  # fmt: skip
    seq_len = ids.shape[-1]
    squares = jnp.sum(jnp.where(ids != 0, rl, 0)) / (ids.shape[0] * seq_len**2)
    return ranges.visited_fraction(), ranges.hi - ranges.lo, squares


def _allowed_fraction(ids, pos, mask: MaskType, window) -> float:
    """Allowed (q, kv) pairs over T^2, row by row (a [T, T] mask per row, on the host's budget)."""
    rl = run_lengths(ids)
    total = 0
    for row in range(ids.shape[0]):
        allowed = pair_mask(
            ids[row], pos[row], rl[row], ids[row], pos[row], rl[row],
            mask_type=mask, window_size=window,
        )  # fmt: skip
        total += int(jnp.sum(allowed))
    return total / (ids.shape[0] * ids.shape[-1] ** 2)


def _cell_work(config: AttentionBench, ids: np.ndarray, pos: np.ndarray) -> dict[str, Any]:
    mask = MaskType.parse(config.mask_type)
    block_q = min(config.block_q, ids.shape[-1])
    block_kv = min(config.block_kv, ids.shape[-1])
    fraction, visited, squares = _work(
        jnp.asarray(ids), jnp.asarray(pos), mask=mask, window=config.window_size,
        block_q=block_q, block_kv=block_kv,
    )  # fmt: skip
    allowed = None
    if ids.shape[-1] <= 16384:  # one [T, T] bool mask per row
        allowed = _allowed_fraction(jnp.asarray(ids), jnp.asarray(pos), mask, config.window_size)
    return {
        "tiles_visited_fraction": float(fraction),
        "tiles_visited": int(jnp.sum(visited)),
        "block_q": block_q,
        "block_kv": block_kv,
        "allowed_pair_fraction": allowed,
        "sum_len_squared_fraction": float(squares),
    }


def _matmul_flops(
    config: AttentionBench,
    seq_len: int,
    implementation: str,
    passes: str,
    work: Mapping[str, Any],
) -> float | None:
    """Matmul flops the implementation executes (blockwise: only the visited tiles; None for
    cuDNN, whose tiling is its own)."""
    per_pair = _FLOPS_PER_PAIR[(implementation, passes)] * config.heads * config.head_dim
    if implementation == "blockwise":
        pairs = work["tiles_visited"] * work["block_q"] * work["block_kv"]
    elif implementation == "cudnn":
        pairs = None
    else:
        pairs = config.batch * seq_len**2
    return None if pairs is None else float(per_pair * pairs)


def _inputs(config: AttentionBench, seq_len: int, rng: np.random.Generator):
    shape = (config.batch, seq_len, config.heads, config.head_dim)
    return tuple(
        jnp.asarray(rng.standard_normal(shape, np.float32), config.input_dtype) for _ in range(3)
    )


def run_attention_bench(
    config: AttentionBench, *, on_step: Callable[[str], None] | None = None
) -> list[dict[str, Any]]:
    """Plans, work and (where they fit) latency of every cell x implementation x pass.

    Args:
        config: the options.
        on_step: called with a short progress line before each stage.

    Returns:
        JSON-ready records, one per (seq_len, segments, implementation, pass), with keys
        ``seq_len``, ``segments``, ``batch``, ``heads``, ``head_dim``, ``dtype``, ``mask_type``,
        ``implementation``, ``pass``, ``temp_bytes``, ``total_bytes``, ``xla_flops``,
        ``matmul_flops``, ``compile_s``, ``status`` ("ran", "not run: ...", "skipped: ..."),
        ``latency_ms`` (median/min/max/samples or None), ``speedup`` (reference median over this
        median, or None) and the cell's work: ``tiles_visited_fraction``, ``tiles_visited``,
        ``block_q``, ``block_kv``, ``allowed_pair_fraction``, ``sum_len_squared_fraction``.

    Example:
        >>> config = AttentionBench(seq_lens=(256,), segments=(4,), heads=1, head_dim=8,
        ...                         implementations=("blockwise",), repeats=1, warmup=0)
        >>> [(r["pass"], r["status"]) for r in run_attention_bench(config)]
        [('fwd', 'ran'), ('fwd+bwd', 'ran')]
    """
    step = on_step or (lambda _: None)
    rng = np.random.default_rng(config.seed)
    budget = memory_budget_bytes(limit_bytes=config.memory_limit_bytes)
    records: list[dict[str, Any]] = []
    for seq_len in config.seq_lens:
        for segments in config.segments:
            ids, pos = synth.filled_segments(
                rng, batch=config.batch, seq_len=seq_len, segments=segments
            )
            step(f"attention T={seq_len} S={segments}: work")
            work = _cell_work(config, ids, pos)
            q, k, v = _inputs(config, seq_len, rng)
            args = (q, k, v, jnp.asarray(ids), jnp.asarray(pos))
            cell: dict[str, dict[str, Any]] = {}
            runnable: dict[str, Any] = {}
            for implementation in config.implementations:
                for passes in PASSES:
                    name = f"{implementation} {passes}"
                    step(f"attention T={seq_len} S={segments}: compile {name}")
                    cell[name], executable = _plan_record(
                        config, seq_len, segments, implementation, passes, args, work, budget
                    )
                    if executable is not None:
                        runnable[name] = executable
            if runnable:
                step(f"attention T={seq_len} S={segments}: timing {len(runnable)} programs")
                stats = interleaved_latency(
                    runnable,
                    dict.fromkeys(runnable, args),
                    warmup=config.warmup,
                    repeats=config.repeats,
                    budget_s=config.time_per_program_s,
                )
                for name, stat in stats.items():
                    cell[name]["latency_ms"] = stat._asdict()
            for record in cell.values():
                reference = cell.get(f"reference {record['pass']}", {}).get("latency_ms")
                mine = record["latency_ms"]
                if reference and mine:
                    record["speedup"] = reference["median_ms"] / mine["median_ms"]
                records.append(record)
    return records


def _plan_record(
    config: AttentionBench,
    seq_len: int,
    segments: int,
    implementation: str,
    passes: str,
    args: tuple[jax.Array, ...],
    work: Mapping[str, Any],
    budget: int,
) -> tuple[dict[str, Any], Any]:
    """The record of one program, and its executable when it may run (else None)."""
    record: dict[str, Any] = {
        "seq_len": seq_len,
        "segments": segments,
        "batch": config.batch,
        "heads": config.heads,
        "head_dim": config.head_dim,
        "dtype": config.input_dtype.name,
        "mask_type": config.mask_type,
        "window_size": config.window_size,
        "implementation": implementation,
        "pass": passes,
        "matmul_flops": _matmul_flops(config, seq_len, implementation, passes, work),
        "latency_ms": None,
        "speedup": None,
        **work,
    }
    program = _program(config, implementation, segments, backward=passes == "fwd+bwd")
    try:
        # attention() raises for what an implementation cannot do (e.g. cuDNN without a GPU).
        jax.eval_shape(program, *args)
    except (NotImplementedError, RuntimeError) as error:
        record.update(temp_bytes=None, total_bytes=None, xla_flops=None, compile_s=None)
        record["status"] = f"skipped: {error}"
        return record, None
    planned = plan(program, *args, compile_timeout_s=config.compile_timeout_s)
    record.update(
        temp_bytes=planned.temp_bytes,
        total_bytes=planned.total_bytes,
        xla_flops=planned.flops,
        compile_s=planned.compile_s,
    )
    if planned.skip_reason is not None:
        record["status"] = f"skipped: {planned.skip_reason}"
        return record, None
    if not fits_in_budget(planned.total_bytes, budget):
        needs = format_bytes(planned.total_bytes)
        record["status"] = f"not run: needs {needs}, budget {format_bytes(budget)}"
        return record, None
    record["status"] = "ran"
    return record, planned.executable


def _fmt(value: float | None, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def attention_table(records: Sequence[Mapping[str, Any]]) -> Table:
    """ATTENTION: scratch bytes, executed matmul flops, latency and speedup per program, with
    the blockwise method's visited tile fraction next to the allowed pair fraction.

    Args:
        records: as returned by :func:`run_attention_bench`.

    Returns:
        a ``rich`` table.
    """
    table = Table(title="ATTENTION: reference vs blockwise (median of interleaved runs)")
    for header, justify in (
        ("T", "right"),
        ("S", "right"),
        ("impl", "left"),
        ("pass", "left"),
        ("temp", "right"),
        ("matmul GFLOP", "right"),
        ("median ms", "right"),
        ("speedup", "right"),
        ("tiles visited", "right"),
        ("allowed pairs", "right"),
        ("status", "left"),
    ):
        table.add_column(header, justify=justify)
    for record in records:
        latency = record["latency_ms"] or {}
        flops = record["matmul_flops"]
        blockwise = record["implementation"] == "blockwise"
        table.add_row(
            str(record["seq_len"]),
            str(record["segments"]),
            record["implementation"],
            record["pass"],
            format_bytes(record["temp_bytes"]),
            _fmt(None if flops is None else flops / 1e9),
            _fmt(latency.get("median_ms"), ".1f"),
            "-" if record["speedup"] is None else f"{record['speedup']:.1f}x",
            f"{record['tiles_visited_fraction']:.2%}" if blockwise else "-",
            _fmt(record["allowed_pair_fraction"], ".2%"),
            record["status"] if record["status"] != "ran" else "",
        )
    table.caption = (
        "temp: scratch bytes of the compiled program; matmul GFLOP: executed (blockwise: visited "
        "tiles only); allowed pairs: allowed (q, kv) pairs / T^2"
    )
    return table


def write_json(
    path: Path | str,
    records: Sequence[Mapping[str, Any]],
    *,
    environment: Mapping[str, Any],
    config: AttentionBench,
) -> None:
    """Writes the attention benchmark's records, environment and options as JSON."""
    write_report(
        path, benchmark="attention", environment=environment, options=config, records=records
    )
