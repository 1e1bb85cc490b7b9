"""The attention benchmark: the dense reference against the blockwise method (and cuDNN on a GPU).

Axis legend: B batch, T tokens per row (T_q = T_kv, self-attention), H heads, D head dim,
S documents per row.

For each cell (T, S) the benchmark packs rows full with S causal documents of random lengths
(:func:`thdkit.synth.filled_segments`) and, for each implementation of
:func:`thdkit.attention.attention` and each pass (forward, forward + backward):

1. plans the jitted program from shapes alone (:func:`thdkit.bench.measure.plan`): scratch
   ("temp") bytes and XLA's flop estimate, even for reference cells far too big to run;
2. times the programs that fit in the memory budget round-robin
   (:func:`thdkit.bench.measure.run_plans`);
3. counts the work: the fraction of (query tile, key tile) pairs the blockwise method visits
   (:func:`thdkit.attention.tile_ranges`) next to the fraction of token pairs that are allowed and
   ``sum_s len_s^2 / T^2``, and the matmul flops each implementation executes (XLA's estimate
   cannot see the data-dependent trip count of the blockwise loop).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from rich.table import Table

from thdkit import synth
from thdkit.attention import DEFAULT_BLOCK, attention, tile_ranges
from thdkit.bench.measure import (
    BenchConfig,
    Column,
    ConfigError,
    Plan,
    format_bytes,
    memory_budget_bytes,
    plan,
    run_plans,
    table,
)
from thdkit.bench.ring import work_per_rank
from thdkit.layout import run_lengths
from thdkit.masks import MaskType, check_window

__all__ = ["IMPLEMENTATIONS", "PASSES", "AttentionBench", "attention_table", "run_attention_bench"]

IMPLEMENTATIONS = ("reference", "blockwise", "cudnn")
PASSES = ("fwd", "fwd+bwd")
# Matmul flops per (query, key) pair per head and head-dim unit: QK^T and PV forward; the
# backward adds dV, dP, dQ, dK, and the blockwise (and cuDNN) backward also recomputes QK^T.
_FLOPS_PER_PAIR = {"fwd": 4, "fwd+bwd": 14}
_REFERENCE_FLOPS_PER_PAIR = {"fwd": 4, "fwd+bwd": 12}


def _default_implementations() -> tuple[str, ...]:
    return IMPLEMENTATIONS if jax.default_backend() == "gpu" else IMPLEMENTATIONS[:2]


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionBench(BenchConfig):
    """What the attention benchmark measures (the timing fields are :class:`BenchConfig`'s).

    Attributes:
        seq_lens: T values.
        segments: S values, documents per row (one layout per value).
        heads: H (query and key/value heads).
        head_dim: D (also the value head dim).
        mask_type: a mask type name.
        window_size: ``(left, right)`` or None.
        implementations: of :func:`thdkit.attention.attention`; cuDNN on a GPU only.
        dtype: input dtype name; None means bfloat16 on a GPU (what cuDNN takes), else float32.
        block_q, block_kv: tile sizes of the blockwise method.
        compile_timeout_s: seconds a compile may take before its program is skipped.
        memory_limit_bytes: run budget; None means half the memory available.

    Example:
        >>> AttentionBench(dtype="bogus")
        Traceback (most recent call last):
        ...
        thdkit.bench.measure.ConfigError: dtype must name a floating dtype ..., got 'bogus'
    """

    seq_lens: tuple[int, ...] = (8192, 32768)
    segments: tuple[int, ...] = (16,)
    heads: int = 8
    head_dim: int = 64
    mask_type: str = "padding_causal"
    window_size: tuple[int | None, int | None] | None = None
    implementations: tuple[str, ...] = dataclasses.field(default_factory=_default_implementations)
    dtype: str | None = None
    block_q: int = DEFAULT_BLOCK
    block_kv: int = DEFAULT_BLOCK
    time_per_program_s: float = 2.0
    compile_timeout_s: float = 120.0
    memory_limit_bytes: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        sizes = ("seq_lens", "segments", "heads", "head_dim", "block_q", "block_kv")
        self._at_least(1, *sizes, "memory_limit_bytes")
        self._positive("compile_timeout_s")
        if max(self.segments) > min(self.seq_lens):
            raise ConfigError("segments", f"must be at most min(seq_lens), got {self.segments}")
        self._among("implementations", IMPLEMENTATIONS)
        for field, check in (("mask_type", MaskType.parse), ("window_size", check_window)):
            try:
                check(getattr(self, field))
            except (ValueError, TypeError) as error:
                raise ConfigError(field, f"is invalid: {error}") from None
        if self.dtype is not None:
            try:
                floating = jnp.issubdtype(jnp.dtype(self.dtype), jnp.floating)
            except TypeError:
                floating = False
            if not floating:
                raise ConfigError(
                    "dtype",
                    f"must name a floating dtype such as float32 or bfloat16, got {self.dtype!r}",
                )

    @property
    def input_dtype(self) -> jnp.dtype:
        """The dtype of query, key and value."""
        if self.dtype is not None:
            return jnp.dtype(self.dtype)
        return jnp.dtype(jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32)


def _program(config: AttentionBench, implementation: str, segments: int, passes: str):
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

    def forward_backward(q, k, v, ids, pos):
        out, pullback = jax.vjp(lambda q, k, v: forward(q, k, v, ids, pos), q, k, v)
        return out, pullback(out)

    return forward if passes == "fwd" else forward_backward


@functools.partial(jax.jit, static_argnames=("mask", "window", "block_q", "block_kv"))
def _work(ids, pos, *, mask, window, block_q, block_kv):
    """Visited tile fraction, visited tiles and sum_s len_s^2 / T^2 of one row batch."""
    rl = run_lengths(ids)
    ranges = tile_ranges(
        ids, pos, rl, ids, pos, rl,
        mask_type=mask, window_size=window, block_q=block_q, block_kv=block_kv,
    )  # fmt: skip
    squares = jnp.sum(jnp.where(ids != 0, rl, 0)) / (ids.shape[0] * ids.shape[-1] ** 2)
    return ranges.visited_fraction(), jnp.sum(ranges.hi - ranges.lo), squares


def _cell_work(config: AttentionBench, ids: jax.Array, pos: jax.Array) -> dict[str, Any]:
    mask, window = MaskType.parse(config.mask_type), check_window(config.window_size)
    block_q, block_kv = min(config.block_q, ids.shape[-1]), min(config.block_kv, ids.shape[-1])
    fraction, visited, squares = _work(
        ids, pos, mask=mask, window=window, block_q=block_q, block_kv=block_kv
    )
    allowed = work_per_rank(
        np.asarray(ids), np.asarray(pos), cp=1, mask_type=mask, window_size=window
    )
    return {
        "tiles_visited_fraction": float(fraction),
        "tiles_visited": int(visited),
        "block_q": block_q,
        "block_kv": block_kv,
        "allowed_pair_fraction": int(allowed.sum()) / (ids.shape[0] * ids.shape[-1] ** 2),
        "sum_len_squared_fraction": float(squares),
    }


def _matmul_flops(config: AttentionBench, seq_len: int, name: str, work: Mapping[str, Any]):
    """Matmul flops the implementation executes (blockwise: only the visited tiles; None for
    cuDNN, whose tiling is its own)."""
    implementation, passes = name.split(" ")
    per_pair = config.heads * config.head_dim
    if implementation == "reference":
        return float(_REFERENCE_FLOPS_PER_PAIR[passes] * per_pair * config.batch * seq_len**2)
    if implementation == "blockwise":
        pairs = work["tiles_visited"] * work["block_q"] * work["block_kv"]
        return float(_FLOPS_PER_PAIR[passes] * per_pair * pairs)
    return None


def run_attention_bench(
    config: AttentionBench,
    *,
    on_step: Callable[[str], None] | None = None,
    on_cell_done: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """Plans, work and (where they fit) latency of every cell x implementation x pass.

    Args:
        config: the options.
        on_step: called with a short progress line before each stage.
        on_cell_done: called after each (T, S) cell.

    Returns:
        JSON-ready records, one per (seq_len, segments, implementation, pass), with keys
        ``seq_len``, ``segments``, ``batch``, ``heads``, ``head_dim``, ``dtype``, ``mask_type``,
        ``window_size``, ``implementation``, ``pass``, the plan's sizes and costs
        (:meth:`thdkit.bench.measure.Plan.fields`), ``matmul_flops``, ``latency_ms``,
        ``skip_reason``, ``speedup`` (reference median over this median, or None) and the cell's
        work: ``tiles_visited_fraction``, ``tiles_visited``, ``block_q``, ``block_kv``,
        ``allowed_pair_fraction``, ``sum_len_squared_fraction``.

    Example:
        >>> config = AttentionBench(seq_lens=(256,), segments=(4,), heads=1, head_dim=8,
        ...                         implementations=("blockwise",), repeats=1, warmup=0)
        >>> [(r["pass"], r["skip_reason"]) for r in run_attention_bench(config)]
        [('fwd', None), ('fwd+bwd', None)]
    """
    step = on_step or (lambda _: None)
    rng = np.random.default_rng(config.seed)
    budget = memory_budget_bytes(limit_bytes=config.memory_limit_bytes)
    records: list[dict[str, Any]] = []
    for seq_len in config.seq_lens:
        for segments in config.segments:
            label = f"attention T={seq_len} S={segments}"
            ids, pos = map(jnp.asarray, synth.filled_segments(
                rng, batch=config.batch, seq_len=seq_len, segments=segments
            ))  # fmt: skip
            step(f"{label}: work")
            work = _cell_work(config, ids, pos)
            shape = (config.batch, seq_len, config.heads, config.head_dim)
            qkv = [
                jnp.asarray(rng.standard_normal(shape, np.float32), config.input_dtype)
                for _ in range(3)
            ]
            args = (*qkv, ids, pos)
            plans: dict[str, Plan] = {}
            for implementation in config.implementations:
                for passes in PASSES:
                    name = f"{implementation} {passes}"
                    step(f"{label}: compile {name}")
                    program = _program(config, implementation, segments, passes)
                    plans[name] = plan(program, *args, compile_timeout_s=config.compile_timeout_s)
            step(f"{label}: timing")
            outcome = run_plans(plans, dict.fromkeys(plans, args), config, budget_bytes=budget)
            for name, planned in plans.items():
                skip_reason, latency = outcome[name]
                reference = outcome.get(f"reference {name.split(' ')[1]}", (None, None))[1]
                records.append(
                    {
                        "seq_len": seq_len,
                        "segments": segments,
                        "batch": config.batch,
                        "heads": config.heads,
                        "head_dim": config.head_dim,
                        "dtype": config.input_dtype.name,
                        "mask_type": config.mask_type,
                        "window_size": config.window_size,
                        "implementation": name.split(" ")[0],
                        "pass": name.split(" ")[1],
                        **planned.fields(),
                        "matmul_flops": _matmul_flops(config, seq_len, name, work),
                        "latency_ms": latency,
                        "skip_reason": skip_reason,
                        "speedup": (
                            reference["median"] / latency["median"]
                            if reference and latency
                            else None
                        ),
                        **work,
                    }
                )
            if on_cell_done is not None:
                on_cell_done()
    return records


def attention_table(records: Sequence[Mapping[str, Any]]) -> Table:
    """ATTENTION: scratch bytes, executed matmul flops, latency and speedup per program, with
    the blockwise method's visited tile fraction next to the allowed pair fraction.

    Args:
        records: as returned by :func:`run_attention_bench`.

    Returns:
        a rich table.
    """
    percent = "{:.2%}".format
    columns = [
        Column("T", "seq_len"),
        Column("S", "segments"),
        Column("impl", "implementation", justify="left"),
        Column("pass", "pass", justify="left"),
        Column("temp", "temp_bytes", format_bytes),
        Column(
            "matmul GFLOP", lambda r: r["matmul_flops"] and r["matmul_flops"] / 1e9, "{:.3g}".format
        ),
        Column("median ms", lambda r: (r["latency_ms"] or {}).get("median"), "{:.1f}".format),
        Column("speedup", "speedup", "{:.1f}x".format),
        Column(
            "tiles visited",
            lambda r: r["tiles_visited_fraction"] if r["implementation"] == "blockwise" else None,
            percent,
        ),
        Column("allowed pairs", "allowed_pair_fraction", percent),
        Column("status", lambda r: r["skip_reason"] or "", justify="left"),
    ]
    caption = (
        "temp: scratch bytes of the compiled program; matmul GFLOP: executed (blockwise: visited "
        "tiles only); allowed pairs: allowed (q, kv) pairs / T^2"
    )
    title = "ATTENTION: reference vs blockwise (median of interleaved runs)"
    return table(
        title, columns, records, section=lambda r: (r["seq_len"], r["segments"]), caption=caption
    )
