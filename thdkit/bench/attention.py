"""The attention benchmark: the dense reference against blockwise (and cuDNN on a GPU).

Axis legend: B batch, T tokens per row (self-attention), H heads, D head dim, S documents per row.
Per cell (T, S), rows filled with S causal documents of random lengths, every implementation and
pass (forward, forward + backward) is planned and, where it fits, timed; the work counted next to
it is the fraction of (query tile, key tile) pairs blockwise visits, the fraction of token pairs
allowed, ``sum_s len_s^2 / T^2`` and the matmul flops each implementation executes (XLA's flop
estimate cannot see the blockwise loop's data-dependent trip count).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from rich.table import Table

from thdkit import synth
from thdkit.attention import DEFAULT_BLOCK, attention
from thdkit.bench import measure
from thdkit.bench.measure import (
    SHAPE_OPTIONS,
    SILENT,
    Callbacks,
    Options,
    PlanConfig,
    mask_names,
    median,
)
from thdkit.bench.ring import document_lengths, visited_tiles, work_per_rank
from thdkit.masks import MaskType, check_window

__all__ = ["AttentionBench", "run_attention_bench"]

IMPLEMENTATIONS = ("reference", "blockwise", "cudnn")
# Matmul flops per allowed (query, key) pair, head and head-dim unit: QK^T and PV forward; the
# backward adds dV, dP, dQ, dK, and the blockwise backward also recomputes QK^T.
_FLOPS_PER_PAIR = {
    "fwd": {"reference": 4, "blockwise": 4},
    "fwd+bwd": {"reference": 12, "blockwise": 14},
}


def _floating(name: str | None) -> str | None:
    """A check: None or the name of a floating dtype."""
    if name is not None and not jnp.issubdtype(jnp.dtype(name), jnp.floating):
        raise ValueError(f"must name a floating dtype such as float32 or bfloat16, got {name!r}")
    return name


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionBench(PlanConfig):
    """What the attention benchmark measures: ``OPTIONS`` documents each option.

    Raises:
        ConfigError: a ``ValueError`` naming the option that is out of range.

    Example:
        >>> AttentionBench(dtype="int32")
        Traceback (most recent call last):
        ...
        thdkit.bench.measure.ConfigError: dtype: must name a floating dtype ..., got 'int32'
    """

    OPTIONS: ClassVar[Options] = {
        **PlanConfig.OPTIONS,
        **SHAPE_OPTIONS,
        "mask_type": ("Mask type name.", mask_names),
        "window_size": (None, check_window),  # (left, right) or None; not on the command line.
        "implementations": ("\\[default: reference,blockwise (+cudnn on a GPU)]", IMPLEMENTATIONS),
        "dtype": ("Input dtype. \\[default: bfloat16 on a GPU, else float32]", _floating),
        "block_q": ("Query tile size of the blockwise method.", 1),
        "block_kv": ("Key tile size of the blockwise method.", 1),
    }
    seq_lens: tuple[int, ...] = (8192, 32768)
    segments: tuple[int, ...] = (16,)
    heads: int = 8
    head_dim: int = 64
    mask_type: str = "padding_causal"
    window_size: tuple[int | None, int | None] | None = None
    implementations: tuple[str, ...] = dataclasses.field(
        default_factory=lambda: IMPLEMENTATIONS[: 3 if jax.default_backend() == "gpu" else 2]
    )
    dtype: str | None = None
    block_q: int = DEFAULT_BLOCK
    block_kv: int = DEFAULT_BLOCK
    time_per_program_s: float = 2.0
    compile_timeout_s: float = 120.0

    def _relations(self) -> list[tuple[str, bool, str]]:
        return [("segments", max(self.segments) <= min(self.seq_lens), "at most min(seq_lens)")]


def _program(config: AttentionBench, implementation: str, segments: int, passes: str) -> Any:
    """``fn(q, k, v, ids, pos)`` running one pass of one implementation."""
    same = {k: getattr(config, k) for k in ("mask_type", "window_size", "block_q", "block_kv")}

    def forward(q, k, v, ids, pos):
        return attention(
            q, k, v, segment_ids_q=ids, segment_pos_q=pos, max_segments_per_seq=segments,
            implementation=implementation, **same,
        )  # fmt: skip

    def forward_backward(q, k, v, ids, pos):
        out, pullback = jax.vjp(lambda q, k, v: forward(q, k, v, ids, pos), q, k, v)
        return out, pullback(out)

    return forward if passes == "fwd" else forward_backward


def _work(config: AttentionBench, ids: np.ndarray, pos: np.ndarray) -> dict[str, Any]:
    """The cell's visited tiles, allowed pairs and sum_s len_s^2, the fractions over B T^2."""
    batch, seq_len = ids.shape
    blocks = {"block_q": min(config.block_q, seq_len), "block_kv": min(config.block_kv, seq_len)}
    mask, window, pairs = MaskType.parse(config.mask_type), config.window_size, batch * seq_len**2
    side = (ids, pos, document_lengths(ids))
    visited = int(visited_tiles(side, side, mask=mask, window=window, **blocks))
    tiles = batch * -(-seq_len // blocks["block_q"]) * -(-seq_len // blocks["block_kv"])
    allowed = work_per_rank(ids, pos, cp=1, mask_type=mask, window_size=window).sum()
    return {
        "tiles_visited_fraction": visited / tiles,
        "tiles_visited": visited,
        **blocks,
        "allowed_pair_fraction": int(allowed) / pairs,
        "sum_len_squared_fraction": int(side[2].sum()) / pairs,  # Each token adds its length.
    }


def run_attention_bench(
    config: AttentionBench, *, callbacks: Callbacks = SILENT
) -> list[dict[str, Any]]:
    """Plans, work and (where they fit) latency of every cell x implementation x pass.

    Args:
        config: the options.
        callbacks: progress reports (:class:`thdkit.bench.measure.Callbacks`); a cell is one
            (T, S) cell.

    Returns:
        JSON-ready records, one per (seq_len, segments, implementation, pass): the options, the
        plan's sizes and costs, ``latency_ms``, ``skip_reason``, ``matmul_flops`` (executed;
        None for cuDNN), ``speedup`` (the reference's median over this one) and the cell's work
        (``tiles_visited_fraction``, ``allowed_pair_fraction``, ``sum_len_squared_fraction``...).

    Example:
        >>> config = AttentionBench(seq_lens=(256,), segments=(4,), heads=1, head_dim=8,
        ...                         implementations=("blockwise",), repeats=1, warmup=0)
        >>> [(r["pass"], r["skip_reason"]) for r in run_attention_bench(config)]
        [('fwd', None), ('fwd+bwd', None)]
    """
    rng = np.random.default_rng(config.seed)
    dtype = config.dtype or ("bfloat16" if jax.default_backend() == "gpu" else "float32")
    same = {
        k: getattr(config, k) for k in ("batch", "heads", "head_dim", "mask_type", "window_size")
    }
    records: list[dict[str, Any]] = []
    for seq_len, segments in itertools.product(config.seq_lens, config.segments):
        label = f"attention T={seq_len} S={segments}"
        ids, pos = synth.filled_segments(
            rng, batch=config.batch, seq_len=seq_len, segments=segments
        )
        callbacks.step(f"{label}: work")
        work = _work(config, ids, pos)
        shape = (config.batch, seq_len, config.heads, config.head_dim)
        qkv = [jnp.asarray(rng.standard_normal(shape, np.float32), dtype) for _ in range(3)]
        args = (*qkv, jnp.asarray(ids), jnp.asarray(pos))
        plans = {}
        for implementation, passes in itertools.product(config.implementations, _FLOPS_PER_PAIR):
            callbacks.step(f"{label}: compile {implementation} {passes}")
            program = _program(config, implementation, segments, passes)
            plans[implementation, passes] = measure.plan(
                program, *args, compile_timeout_s=config.compile_timeout_s
            )
        callbacks.step(f"{label}: timing")
        outcome = measure.run_plans(plans, args, config, config.memory_limit_bytes)
        executed = {
            "reference": config.batch * seq_len**2,
            "blockwise": work["tiles_visited"] * work["block_q"] * work["block_kv"],
        }
        for (implementation, passes), fields in outcome.items():
            per_pair = _FLOPS_PER_PAIR[passes].get(implementation)  # cuDNN's tiling is its own.
            flops = (
                per_pair and per_pair * config.heads * config.head_dim * executed[implementation]
            )
            reference, mine = median(outcome.get(("reference", passes), {})), median(fields)
            records.append(
                {"seq_len": seq_len, "segments": segments, **same, "dtype": dtype}
                | {"implementation": implementation, "pass": passes, **fields}
                | {"matmul_flops": flops and float(flops), **work}
                | {"speedup": reference / mine if reference and mine else None}
            )
        callbacks.cell_done()
    return records


def attention_table(records: Sequence[Mapping[str, Any]]) -> Table:
    """ATTENTION: scratch bytes, executed matmul flops, latency and speedup per program, with the
    blockwise method's visited tile fraction next to the allowed pair fraction."""
    percent = "{:.2%}".format

    def blockwise(record: Mapping[str, Any]) -> float | None:
        return record["tiles_visited_fraction"] if record["implementation"] == "blockwise" else None

    columns = [
        ("T", "seq_len"), ("S", "segments"), ("impl", "implementation", str, "left"),
        ("pass", "pass", str, "left"), ("temp", "temp_bytes", measure.format_bytes),
        ("matmul GFLOP", lambda r: r["matmul_flops"] and r["matmul_flops"] / 1e9, "{:.3g}".format),
        ("median ms", median, "{:.1f}".format), ("speedup", "speedup", "{:.1f}x".format),
        ("tiles visited", blockwise, percent), ("allowed pairs", "allowed_pair_fraction", percent),
        ("status", lambda r: r["skip_reason"] or "", str, "left"),
    ]  # fmt: skip
    caption = (
        "temp: scratch bytes of the compiled program; matmul GFLOP: executed (blockwise: visited "
        "tiles only); allowed pairs: allowed (q, kv) pairs / T^2"
    )
    title = "ATTENTION: reference vs blockwise (median of interleaved runs)"
    section = lambda r: (r["seq_len"], r["segments"])  # noqa: E731
    return measure.table(title, columns, records, section=section, caption=caption)
