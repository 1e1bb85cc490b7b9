"""The ring benchmark: how evenly context-parallel reorders spread causal attention work.

Axis legend: B batch, T tokens per row, cp ranks of the ring, H heads, D head dim.

For each layout (rows packed with a given number of causal documents that fill the row) and each
reorder of the sequence axis (none, striped with each stripe size, dual-chunk swap), the benchmark

1. counts, exactly and on the host, the allowed (q, kv) pairs of every ring step
   (O(T log T) per step, :func:`work_per_rank`) and sums them per
   rank: a rank's *work*. Ranks wait for the slowest, so ``max / mean`` over ranks is the
   imbalance (1.0 = perfect). It also counts the (query tile, key tile) pairs the blockwise
   kernel of :func:`thdkit.attention.attention_partial` visits (:func:`thdkit.attention.tile_ranges`
   at its default block size): pair counts ignore how well the allowed pairs fill the tiles, tile
   counts are closer to the time a rank spends;
2. counts the steps :func:`thdkit.ring.ring_attention` skips (:func:`thdkit.ring.ring_schedule`)
   and the steps that truly hold no allowed pair;
3. optionally times :func:`thdkit.ring.ring_attention` on a mesh of cp devices (interleaved
   round-robin over the reorders, :func:`thdkit.bench.measure.interleaved_latency`). On simulated
   CPU devices all ranks share the host's cores, so latency follows total work, not the slowest
   rank; only a real multi-device run shows the imbalance as time.

One document per row without a reorder is the case that motivates the reorders: under a causal
mask the last rank attends to everything before it and does about twice the mean work.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from rich.table import Table

from thdkit import reorder, synth
from thdkit.attention import DEFAULT_BLOCK, tile_ranges
from thdkit.bench.measure import BenchConfig, Column, ConfigError, interleaved_latency, table
from thdkit.masks import MaskType, check_window
from thdkit.ring import difference_bounds, ring_attention, ring_schedule
from thdkit.segments import lengths_from_counts, segment_counts

__all__ = [
    "MASK_TYPE",
    "RingBench",
    "reorder_names",
    "ring_table",
    "run_ring_bench",
    "tiles_per_rank",
    "work_per_rank",
]

# The balance question is about causal work: the benchmark measures this mask type.
MASK_TYPE = "padding_causal"


@dataclasses.dataclass(frozen=True, kw_only=True)
class RingBench(BenchConfig):
    """What the ring benchmark measures (the timing fields are :class:`BenchConfig`'s).

    Attributes:
        cp: ranks of the ring.
        seq_len: T, tokens per row (a multiple of ``2 * cp`` and of ``cp`` times each stripe).
        segments: documents per row, one layout each.
        stripe_sizes: a striped reorder is measured for each.
        heads: H, for the latency runs.
        head_dim: D, for the latency runs.
        latency: whether to time ``ring_attention`` (needs cp devices).

    Example:
        >>> RingBench(cp=4, seq_len=100)
        Traceback (most recent call last):
        ...
        thdkit.bench.measure.ConfigError: seq_len must be a multiple of 2 * cp = 8 ... got 100
    """

    cp: int = 4
    seq_len: int = 4096
    segments: tuple[int, ...] = (1, 16)
    stripe_sizes: tuple[int, ...] = (1, 2, 128)
    heads: int = 2
    head_dim: int = 64
    latency: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self._at_least(1, "cp", "seq_len", "segments", "stripe_sizes", "heads", "head_dim")
        multiples = [self.cp * s for s in self.stripe_sizes]
        if any(self.seq_len % m for m in [2 * self.cp, *multiples]):
            raise ConfigError(
                "seq_len",
                f"must be a multiple of 2 * cp = {2 * self.cp} and of cp * stripe_size = "
                f"{', '.join(map(str, multiples))}, got {self.seq_len}",
            )
        if max(self.segments) > self.seq_len:
            raise ConfigError(
                "segments", f"must be at most seq_len={self.seq_len}, got {self.segments}"
            )


def reorder_names(stripe_sizes: Sequence[int]) -> list[str]:
    """The reorders a benchmark measures, in table order.

    Example:
        >>> reorder_names((1, 2))
        ['none', 'striped(1)', 'striped(2)', 'dual_chunk_swap']
    """
    return ["none", *(f"striped({s})" for s in stripe_sizes), "dual_chunk_swap"]


def _reorder_fn(name: str, cp: int) -> Callable[..., Any]:
    """The forward reorder named by :func:`reorder_names`, as ``fn(x, axis=...)``."""
    if name == "none":
        return lambda x, axis=-1: x
    if name == "dual_chunk_swap":
        return functools.partial(reorder.dual_chunk_swap, cp=cp)
    if name.startswith("striped(") and name.endswith(")"):
        return functools.partial(reorder.striped, cp=cp, stripe_size=int(name[8:-1]))
    raise ValueError(f"unknown reorder {name!r}")


def _document_lengths(segment_ids: np.ndarray) -> np.ndarray:
    """int32[B, T]: each token's document length over its whole row, as the ring computes it."""
    ids = jnp.asarray(segment_ids, jnp.int32)
    counts = segment_counts(ids, num_segments=int(segment_ids.max()))
    return np.asarray(lengths_from_counts(ids, counts))


def _step_pairs(
    q: tuple[np.ndarray, np.ndarray], kv: tuple[np.ndarray, np.ndarray], lo: int, hi: int
) -> int:
    """Pairs of equal non-zero id with ``lo <= x_kv - x_q <= hi``, by sorting and searching.

    ``q`` and ``kv`` are ``(ids, x)``, int[B, n]; O(n log n) per row.
    """
    total = 0
    for ids_q, x_q, ids_kv, x_kv in zip(*q, *kv, strict=True):
        keep_q, keep_kv = ids_q != 0, ids_kv != 0
        if not keep_q.any() or not keep_kv.any():
            continue
        # Keys of different ids never mix: every x_kv + shift and every searched bound lies in
        # [0, width), so id * width + offset orders by id first.
        reach = int(max(np.abs(x_q).max(), np.abs(x_kv).max())) + 1
        row_lo, row_hi = max(lo, -2 * reach), min(hi, 2 * reach)
        shift, width = 4 * reach, 8 * reach
        keys = np.sort(ids_kv[keep_kv].astype(np.int64) * width + x_kv[keep_kv] + shift)
        base = ids_q[keep_q].astype(np.int64) * width + x_q[keep_q] + shift
        upper = np.searchsorted(keys, base + row_hi, side="right")
        lower = np.searchsorted(keys, base + row_lo, side="left")
        total += int(np.maximum(upper - lower, 0).sum())
    return total


def _per_step(
    arrays: Sequence[np.ndarray], cp: int, count: Callable[[tuple, tuple], int]
) -> np.ndarray:
    """int64[cp, cp]: ``[r, k]`` = ``count(q, kv)`` of rank r's shards of ``arrays`` and those
    of rank ``(r - k) % cp``, whose keys rank r holds at ring step k."""
    shards = [tuple(reorder.shard(x, cp=cp, rank=rank) for x in arrays) for rank in range(cp)]
    counts = [[count(shards[r], shards[(r - k) % cp]) for k in range(cp)] for r in range(cp)]
    return np.array(counts, np.int64)


def work_per_rank(
    segment_ids: np.ndarray,
    segment_pos: np.ndarray,
    *,
    cp: int,
    mask_type: MaskType | str = MASK_TYPE,
    window_size: tuple[int | None, int | None] | None = None,
) -> np.ndarray:
    """Allowed (q, kv) pairs per rank and ring step, summed over the batch; exact.

    Without the [n, n] matrix: every mask type and window bounds the difference of one
    per-token quantity (position, or document length minus position) between key and query, so
    each query token's count is the difference of two binary searches.

    Args:
        segment_ids, segment_pos: int[B, T]; an already reordered self-attention layout.
        cp: ranks.
        mask_type: a :class:`thdkit.MaskType` or its name.
        window_size: ``(left, right)`` or None, as for :func:`thdkit.ring.ring_attention`.

    Returns:
        int64[cp, cp]; ``[r, k]`` = pairs of rank r at step k (the keys of rank ``(r - k) % cp``).

    Example:
        >>> ids, pos = np.ones((1, 8), np.int32), np.arange(8, dtype=np.int32)[None]
        >>> work_per_rank(ids, pos, cp=2).tolist()
        [[10, 0], [10, 16]]
    """
    bounds = difference_bounds(MaskType.parse(mask_type), check_window(window_size))
    x = segment_pos.astype(np.int64)
    if bounds.uses_key:
        x = _document_lengths(segment_ids) - x
    big = 2**40  # unbounded sides; _step_pairs clips them to the data's reach
    lo = -big if bounds.lo is None else bounds.lo
    hi = big if bounds.hi is None else bounds.hi
    return _per_step((segment_ids, x), cp, lambda q, kv: _step_pairs(q, kv, lo, hi))


@functools.partial(jax.jit, static_argnames=("block",))
def _visited_tiles(q: tuple[jax.Array, ...], kv: tuple[jax.Array, ...], *, block: int) -> jax.Array:
    """Visited tiles of one step; ``q`` and ``kv`` are (ids, positions, document lengths)."""
    mask = MaskType.parse(MASK_TYPE)
    ranges = tile_ranges(*q, *kv, mask_type=mask, window_size=None, block_q=block, block_kv=block)
    return jnp.sum(ranges.hi - ranges.lo)


def tiles_per_rank(
    segment_ids: np.ndarray, segment_pos: np.ndarray, *, cp: int, block: int = DEFAULT_BLOCK
) -> np.ndarray:
    """Key tiles the blockwise kernel visits per rank and ring step, summed over the batch.

    Args:
        segment_ids, segment_pos: int[B, T]; an already reordered self-attention layout.
        cp: ranks.
        block: tile size (queries and keys), capped to the shard length as the kernel does.

    Returns:
        int64[cp, cp]; ``[r, k]`` = (query tile, key tile) pairs rank r visits at step k.

    Example:
        >>> ids, pos = np.ones((1, 8), np.int32), np.arange(8, dtype=np.int32)[None]
        >>> tiles_per_rank(ids, pos, cp=2, block=2).tolist()
        [[3, 0], [3, 4]]
    """
    # Document lengths over the whole row, as the ring passes them.
    lengths = _document_lengths(segment_ids)
    layout = [np.asarray(x, np.int32) for x in (segment_ids, segment_pos, lengths)]
    block = min(block, segment_ids.shape[-1] // cp)
    return _per_step(layout, cp, lambda q, kv: int(_visited_tiles(q, kv, block=block)))


def _balance_record(
    config: RingBench, segments: int, name: str, ids: np.ndarray, pos: np.ndarray
) -> dict[str, Any]:
    work = work_per_rank(ids, pos, cp=config.cp)
    runs = np.asarray(
        ring_schedule(
            segment_ids_q=ids,
            segment_pos_q=pos,
            cp=config.cp,
            mask_type=MASK_TYPE,
            max_segments_per_seq=segments,
        )
    ).any(axis=0)  # a rank runs a step when any row of its batch needs it
    per_rank = work.sum(axis=1)
    tiles = (tiles_per_rank(ids, pos, cp=config.cp) * runs).sum(axis=1)
    return {
        "cp": config.cp,
        "seq_len": config.seq_len,
        "batch": config.batch,
        "segments": segments,
        "mask_type": MASK_TYPE,
        "reorder": name,
        "work_per_rank": per_rank.tolist(),
        "work_max": int(per_rank.max()),
        "work_mean": float(per_rank.mean()),
        "imbalance": float(per_rank.max() / per_rank.mean()) if per_rank.any() else None,
        "block": min(DEFAULT_BLOCK, config.seq_len // config.cp),
        "tiles_per_rank": tiles.tolist(),
        "tiles_max": int(tiles.max()),
        "tiles_total": int(tiles.sum()),
        "tile_imbalance": float(tiles.max() / tiles.mean()) if tiles.any() else None,
        "steps_total": config.cp * config.cp,
        "steps_run": int(runs.sum()),
        "steps_skipped": int((~runs).sum()),
        "steps_empty": int((work == 0).sum()),
        "max_steps_run_per_rank": int(runs.sum(axis=1).max()),
        "latency_ms": None,
        "skip_reason": None if config.latency else "latency not requested",
    }


def _measure_latency(
    config: RingBench, cells: Mapping[str, tuple[np.ndarray, np.ndarray]]
) -> tuple[dict[str, dict[str, Any]], str | None]:
    """Latency of ring attention on each cell's layout, or why there is none."""
    if jax.device_count() < config.cp:
        return {}, (
            f"not run: needs {config.cp} devices, found {jax.device_count()}; on CPU set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={config.cp} before JAX starts"
        )
    mesh = Mesh(np.array(jax.devices()[: config.cp]), ("cp",))
    tokens = NamedSharding(mesh, P(None, "cp"))
    heads = NamedSharding(mesh, P(None, "cp", None, None))
    rng = np.random.default_rng(config.seed)
    shape = (config.batch, config.seq_len, config.heads, config.head_dim)
    qkv = [jax.device_put(rng.standard_normal(shape, np.float32), heads) for _ in range(3)]

    # One jitted program for every cell: ids and positions are traced, and S only sizes
    # per-segment bins, so the largest document count serves all.
    @jax.jit
    def program(q: jax.Array, k: jax.Array, v: jax.Array, ids: jax.Array, pos: jax.Array):
        return ring_attention(
            q, k, v, segment_ids_q=ids, segment_pos_q=pos, mask_type=MASK_TYPE,
            max_segments_per_seq=max(config.segments), mesh=mesh, axis_name="cp",
        )  # fmt: skip

    args = {
        key: (*qkv, jax.device_put(ids, tokens), jax.device_put(pos, tokens))
        for key, (ids, pos) in cells.items()
    }
    stats = interleaved_latency(
        dict.fromkeys(cells, program),
        args,
        warmup=config.warmup,
        repeats=config.repeats,
        budget_s=config.time_per_program_s,
    )
    return {key: s._asdict() for key, s in stats.items()}, None


def run_ring_bench(
    config: RingBench,
    *,
    on_step: Callable[[str], None] | None = None,
    on_cell_done: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """Work balance, skipped steps and (optionally) latency of every layout x reorder.

    Args:
        config: the options.
        on_step: called with a short progress line before each stage.
        on_cell_done: called after each (layout, reorder) is counted.

    Returns:
        JSON-ready records, one per (segments, reorder), in table order, with keys ``cp``,
        ``seq_len``, ``batch``, ``segments``, ``mask_type``, ``reorder``, ``work_per_rank``,
        ``work_max``, ``work_mean``, ``imbalance`` (max / mean), ``block``, ``tiles_per_rank``,
        ``tiles_max``, ``tiles_total``, ``tile_imbalance`` (max / mean of visited tiles over the
        steps that run), ``steps_total``, ``steps_run``, ``steps_skipped``, ``steps_empty``
        (steps with no allowed pair), ``max_steps_run_per_rank``, ``latency_ms`` and
        ``skip_reason`` (why ``latency_ms`` is None).

    Example:
        >>> config = RingBench(cp=4, seq_len=64, segments=(1,), stripe_sizes=(1, 2), latency=False)
        >>> for r in run_ring_bench(config):
        ...     print(r["reorder"], round(r["imbalance"], 2), r["steps_skipped"])
        none 1.74 6
        striped(1) 1.05 0
        striped(2) 1.09 0
        dual_chunk_swap 1.0 0
    """
    step = on_step or (lambda _: None)
    rng = np.random.default_rng(config.seed)
    records: list[dict[str, Any]] = []
    cells: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for segments in config.segments:
        ids, pos = synth.filled_segments(
            rng, batch=config.batch, seq_len=config.seq_len, segments=segments
        )
        for name in reorder_names(config.stripe_sizes):
            step(f"ring work: {segments} segments per row, reorder {name}")
            fn = _reorder_fn(name, config.cp)
            cells[f"{segments}/{name}"] = cell = (fn(ids, axis=-1), fn(pos, axis=-1))
            records.append(_balance_record(config, segments, name, *cell))
            if on_cell_done is not None:
                on_cell_done()
    if config.latency:
        step(f"ring latency: compiling and timing {len(cells)} layouts")
        latency, reason = _measure_latency(config, cells)
        for record in records:
            record["latency_ms"] = latency.get(f"{record['segments']}/{record['reorder']}")
            record["skip_reason"] = reason
    return records


def ring_table(records: Sequence[Mapping[str, Any]]) -> Table:
    """RING SUMMARY: per-rank work balance, skipped steps and latency of each reorder.

    Args:
        records: as returned by :func:`run_ring_bench`.

    Returns:
        a rich table.
    """
    first = records[0] if records else {}
    block = first.get("block")
    title = (
        f"RING SUMMARY (cp={first.get('cp')}, T={first.get('seq_len')}, B={first.get('batch')}, "
        f"{first.get('mask_type')}; work = allowed (q, kv) pairs; tiles = visited {block}x{block} "
        "tiles)"
    )
    count, ratio = "{:,}".format, "{:.3f}".format
    columns = [
        Column("segments", "segments"),
        Column("reorder", "reorder", justify="left"),
        Column("work max", "work_max", count),
        Column("work mean", "work_mean", "{:,.0f}".format),
        Column("max / mean", "imbalance", ratio),
        Column("tiles max", "tiles_max", count),
        Column("tiles total", "tiles_total", count),
        Column("tiles max / mean", "tile_imbalance", ratio),
        Column("steps run", lambda r: f"{r['steps_run']}/{r['steps_total']}"),
        Column("skipped", "steps_skipped"),
        Column("empty", "steps_empty"),
        Column("latency ms", lambda r: (r["latency_ms"] or {}).get("median"), "{:.3g}".format),
        Column("runs", lambda r: (r["latency_ms"] or {}).get("samples")),
    ]
    reasons = sorted({r["skip_reason"] for r in records if r["skip_reason"]})
    caption = "latency: " + "; ".join(reasons) if reasons else None
    return table(title, columns, records, section=lambda r: r["segments"], caption=caption)
