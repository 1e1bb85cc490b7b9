"""The ring benchmark: how evenly context-parallel reorders spread causal attention work.

Per layout (rows filled with causal documents, or rows drawn from a named length distribution)
and reorder (none, striped, dual-chunk swap, balanced): the
allowed (q, kv) pairs each rank has at each ring step, counted exactly on the host; the (query
tile, key tile) pairs the blockwise kernel visits there; the steps ``ring_attention`` skips; and
optionally its latency on cp devices. Ranks wait for the slowest, so ``max / mean`` over ranks is
the imbalance (1.0 = perfect). One document per row without a reorder is the case that motivates
the reorders: the last rank attends to everything before it, about twice the mean work.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from rich.table import Table

from thdkit._src import balance, reorder, synth
from thdkit._src.context_parallel.schedule import difference_bounds
from thdkit._src.mask_types import MaskType, check_window
from thdkit._src.segments import Segments, lengths_from_counts, segment_counts
from thdkit.bench import measure
from thdkit.bench.measure import SHAPE_OPTIONS, SILENT, BenchConfig, Callbacks, Options, median
from thdkit.context_parallel import ring_attention, ring_schedule
from thdkit.kernels import DEFAULT_BLOCK, tile_ranges

__all__ = ["RingBench", "run_ring_bench"]

MASK_TYPE = "padding_causal"  # The balance question is about causal work.


@dataclasses.dataclass(frozen=True, kw_only=True)
class RingBench(BenchConfig):
    """What the ring benchmark measures: ``OPTIONS`` documents each option.

    Raises:
        ConfigError: a ``ValueError`` naming the option that is out of range.

    Example:
        >>> RingBench(cp=4, seq_len=100)
        Traceback (most recent call last):
        ...
        thdkit.bench.measure.ConfigError: seq_len: must be a multiple of 2 * cp ... got 100
    """

    OPTIONS: ClassVar[Options] = {
        **BenchConfig.OPTIONS,
        **SHAPE_OPTIONS,
        "cp": ("Ranks of the ring.", 1),
        "seq_len": ("T, tokens per row; a multiple of 2 * cp and of cp * each stripe size.", 1),
        "stripe_sizes": ("Stripe sizes; a striped reorder is measured for each.", 1),
        "distributions": (
            "Length distributions measured besides the filled rows: short (many documents of "
            "mean <= T / (4 cp)), lognormal, long_short (one document of half the row, then short "
            "ones), one (one document per row).",
            None,
        ),
        "latency": ("Time ring_attention on a mesh of cp devices.", None),
    }
    cp: int = 4
    seq_len: int = 4096
    segments: tuple[int, ...] = (1, 16)
    stripe_sizes: tuple[int, ...] = (1, 2, 128)
    distributions: tuple[str, ...] = ()
    heads: int = 2
    head_dim: int = 64
    latency: bool = True

    def _relations(self) -> list[tuple[str, Callable[[Any], bool], str]]:
        sizes = [2 * self.cp, *(self.cp * s for s in self.stripe_sizes)]
        rule = f"a multiple of 2 * cp and of cp * stripe_size ({', '.join(map(str, sizes))})"
        known = ", ".join(DISTRIBUTIONS)
        return [
            ("seq_len", lambda t: not any(t % m for m in sizes), rule),
            ("segments", lambda s: s <= self.seq_len, f"at most seq_len={self.seq_len}"),
            ("distributions", lambda d: d in DISTRIBUTIONS, f"one of {known}"),
        ]


def reorder_names(stripe_sizes: Sequence[int]) -> list[str]:
    """The reorders measured, in table order: none, striped(s) per stripe size, dual_chunk_swap,
    balanced."""
    return ["none", *(f"striped({s})" for s in stripe_sizes), "dual_chunk_swap", "balanced"]


def _reordered(name: str, ids: np.ndarray, pos: np.ndarray, cp: int) -> tuple[np.ndarray, ...]:
    """``(ids, pos)`` in the order named by :func:`reorder_names`."""
    if name == "none":
        return ids, pos
    if name == "balanced":
        balanced = balance.balance(ids, pos, cp=cp, mask_type=MASK_TYPE)
        return balanced.segment_ids, balanced.segment_pos
    if name == "dual_chunk_swap":
        return tuple(reorder.dual_chunk_swap(x, cp=cp) for x in (ids, pos))
    size = int(name.removeprefix("striped(")[:-1])
    return tuple(reorder.striped(x, cp=cp, stripe_size=size) for x in (ids, pos))


def _rows_of(lengths: Sequence[Sequence[int]], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows packed with documents of ``lengths`` (cut to the row), padding after them."""
    ids = np.zeros((len(lengths), seq_len), np.int32)
    pos = np.zeros((len(lengths), seq_len), np.int32)
    for row, row_lengths in enumerate(lengths):
        at = 0
        for doc, n in enumerate(row_lengths, start=1):
            n = min(int(n), seq_len - at)
            if n <= 0:
                break
            ids[row, at : at + n] = doc
            pos[row, at : at + n] = np.arange(n)
            at += n
    return ids, pos


def _draw(rng: np.random.Generator, seq_len: int, sample: Callable[[], int]) -> list[int]:
    """Lengths drawn until the row is full."""
    lengths: list[int] = []
    while sum(lengths) < seq_len:
        lengths.append(max(1, int(sample())))
    return lengths


def distribution_rows(
    name: str, rng: np.random.Generator, *, batch: int, seq_len: int, cp: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of one named length distribution (:data:`DISTRIBUTIONS`), full to ``seq_len``.

    - ``short``: lengths uniform in ``[1, T / (2 cp)]`` (mean about ``T / (4 cp)``);
    - ``lognormal``: lengths lognormal with median ``T / 32`` and sigma 1 (a mixed corpus: many
      short documents, a few long ones);
    - ``long_short``: one document of half the row, then short ones as ``short``;
    - ``one``: one document per row.

    Example:
        >>> ids, _ = distribution_rows("long_short", np.random.default_rng(0), batch=1,
        ...                            seq_len=64, cp=2)
        >>> int((ids[0] == 1).sum())
        32
    """
    short = lambda: rng.integers(1, max(2, seq_len // (2 * cp)) + 1)  # noqa: E731
    rows = []
    for _ in range(batch):
        if name == "short":
            rows.append(_draw(rng, seq_len, short))
        elif name == "lognormal":
            rows.append(_draw(rng, seq_len, lambda: rng.lognormal(np.log(seq_len / 32), 1.0)))
        elif name == "long_short":
            rows.append([seq_len // 2, *_draw(rng, seq_len - seq_len // 2, short)])
        else:
            rows.append([seq_len])
    return _rows_of(rows, seq_len)


DISTRIBUTIONS = ("short", "lognormal", "long_short", "one")
"""The names :func:`distribution_rows` draws."""


def document_lengths(segment_ids: np.ndarray) -> np.ndarray:
    """int32[B, T]: each token's document length over its whole row, as the ring computes it."""
    ids = jnp.asarray(segment_ids, jnp.int32)
    return np.asarray(lengths_from_counts(ids, segment_counts(ids, num_segments=int(ids.max()))))


def _per_step(arrays: Sequence[np.ndarray], cp: int, count: Callable[..., int]) -> np.ndarray:
    """int64[cp, cp]: ``[r, k]`` = ``count(q, kv)`` of rank r's shards of ``arrays`` and those
    of rank ``(r - k) % cp``, whose keys rank r holds at ring step k."""
    shards = [tuple(reorder.shard(x, cp=cp, rank=rank) for x in arrays) for rank in range(cp)]
    counts = [[count(shards[r], shards[(r - k) % cp]) for k in range(cp)] for r in range(cp)]
    return np.array(counts, np.int64)


def _step_pairs(q: tuple[np.ndarray, ...], kv: tuple[np.ndarray, ...], lo: int, hi: int) -> int:
    """Pairs of equal non-zero id with ``lo <= x_kv - x_q <= hi``, ``q`` and ``kv`` = (ids, x):
    every mask type and window bounds the difference of one per-token quantity (position, or
    document length minus position), so two binary searches per query count its keys."""
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


def work_per_rank(
    segment_ids: np.ndarray,
    segment_pos: np.ndarray,
    *,
    cp: int,
    mask_type: MaskType | str = MASK_TYPE,
    window_size: tuple[int | None, int | None] | None = None,
) -> np.ndarray:
    """int64[cp, cp]: ``[r, k]`` = allowed (q, kv) pairs of rank r at ring step k of an already
    reordered int[B, T] layout, summed over the batch; exact, without an [n, n] matrix.

    Example:
        >>> ids, pos = np.ones((1, 8), np.int32), np.arange(8, dtype=np.int32)[None]
        >>> work_per_rank(ids, pos, cp=2).tolist()
        [[10, 0], [10, 16]]
    """
    bounds = difference_bounds(MaskType.parse(mask_type), check_window(window_size))
    x = segment_pos.astype(np.int64)
    if bounds.uses_key:
        x = document_lengths(segment_ids) - x
    big = 2**40  # Unbounded sides; _step_pairs clips them to the data's reach.
    lo = -big if bounds.lo is None else bounds.lo
    hi = big if bounds.hi is None else bounds.hi
    return _per_step((segment_ids, x), cp, lambda q, kv: _step_pairs(q, kv, lo, hi))


@functools.partial(jax.jit, static_argnames=("mask", "window", "block_q", "block_kv"))
def visited_tiles(q: tuple, kv: tuple, *, mask: MaskType, window: Any = None, **blocks: int) -> Any:
    """(Query tile, key tile) pairs the blockwise kernel visits; ``q`` and ``kv`` are
    ``(ids, positions, document lengths)``, int32[B, n]."""
    ranges = tile_ranges(Segments(*q), Segments(*kv), mask_type=mask, window_size=window, **blocks)
    return jnp.sum(ranges.hi - ranges.lo)


def _balance(config: RingBench, layout_name: str, name: str, ids: np.ndarray, pos: np.ndarray):
    """The record of one layout and reorder, without latency."""
    segments = max(1, int(ids.max()))
    work = work_per_rank(ids, pos, cp=config.cp)
    schedule = ring_schedule(
        q_segments=Segments(ids, pos, np.zeros_like(ids)), cp=config.cp, mask_type=MASK_TYPE,
        max_segments_per_seq=segments,
    )  # fmt: skip
    runs = np.asarray(schedule).any(axis=0)  # A rank runs a step when any row needs it.
    block = min(DEFAULT_BLOCK, config.seq_len // config.cp)
    layout = [np.asarray(x, np.int32) for x in (ids, pos, document_lengths(ids))]
    mask = MaskType.parse(MASK_TYPE)
    count = lambda q, kv: int(visited_tiles(q, kv, mask=mask, block_q=block, block_kv=block))  # noqa: E731
    tiles = (_per_step(layout, config.cp, count) * runs).sum(axis=1)
    per_rank = work.sum(axis=1)
    # The last ring step with work on any rank: a ring that stops there rotates the keys that
    # many times (step 0 is the rank's own keys).
    steps = runs.any(axis=0)
    last_step = int(np.flatnonzero(steps)[-1]) if steps.any() else 0
    shard_bytes = config.batch * (config.seq_len // config.cp) * config.heads * config.head_dim
    shard_bytes *= 2 * 4  # keys and values, float32
    return {
        "cp": config.cp, "seq_len": config.seq_len, "batch": config.batch,
        "layout": layout_name, "segments": segments, "mask_type": MASK_TYPE, "reorder": name,
        "work_per_rank": per_rank.tolist(), "work_max": int(per_rank.max()),
        "work_mean": float(per_rank.mean()),
        "imbalance": float(per_rank.max() / per_rank.mean()) if per_rank.any() else None,
        "block": block, "tiles_per_rank": tiles.tolist(), "tiles_max": int(tiles.max()),
        "tiles_total": int(tiles.sum()),
        "tile_imbalance": float(tiles.max() / tiles.mean()) if tiles.any() else None,
        "steps_total": config.cp * config.cp, "steps_run": int(runs.sum()),
        "steps_skipped": int((~runs).sum()), "steps_empty": int((work == 0).sum()),
        "max_steps_run_per_rank": int(runs.sum(axis=1).max()),
        "last_step": last_step, "kv_bytes_needed": last_step * shard_bytes,
        "latency_ms": None, "latency_fwd_bwd_ms": None,
        "skip_reason": None if config.latency else "latency not requested",
    }  # fmt: skip


def _latency(
    config: RingBench, layouts: Mapping[Any, tuple[np.ndarray, ...]], *, backward: bool = False
) -> Any:
    """Latency of ring attention on each layout (one program: S only sizes per-segment bins),
    forward or forward and backward."""
    mesh = Mesh(np.array(jax.devices()[: config.cp]), ("cp",))
    tokens, heads = NamedSharding(mesh, P(None, "cp")), NamedSharding(mesh, P(None, "cp", None))
    rng = np.random.default_rng(config.seed)
    shape = (config.batch, config.seq_len, config.heads, config.head_dim)
    qkv = [jax.device_put(rng.standard_normal(shape, np.float32), heads) for _ in range(3)]
    most = max(int(xs[0].max()) for xs in layouts.values())
    options = {"max_segments_per_seq": max(1, most), "mesh": mesh, "axis_name": "cp"}

    def forward(q, k, v, ids, pos):
        return ring_attention(
            q, k, v, q_segments=Segments(ids, pos, jnp.zeros_like(ids)), mask_type=MASK_TYPE,
            **options,
        )  # fmt: skip

    def forward_backward(q, k, v, ids, pos):
        return jax.grad(lambda *x: jnp.sum(forward(*x, ids, pos)), (0, 1, 2))(q, k, v)

    program = jax.jit(forward_backward if backward else forward)
    args = {key: (*qkv, *(jax.device_put(x, tokens) for x in xs)) for key, xs in layouts.items()}
    return measure.interleaved_latency(dict.fromkeys(layouts, program), args, config)


def run_ring_bench(config: RingBench, *, callbacks: Callbacks = SILENT) -> list[dict[str, Any]]:
    """Work balance, skipped steps and (optionally) latency of every layout x reorder.

    Args:
        config: the options.
        callbacks: progress reports (:class:`thdkit.bench.measure.Callbacks`); a cell is one
            (layout, reorder).

    Returns:
        JSON-ready records, one per (layout, reorder) in table order: ``layout`` (``filled`` or a
        name of :data:`DISTRIBUTIONS`), ``work_*`` the allowed pairs per rank (``imbalance`` =
        max / mean), ``tiles_*`` the visited tiles over the steps that run
        (``tile_imbalance``), ``steps_*`` the ring steps run, skipped and without an allowed
        pair, ``last_step`` the last ring step any rank needs (a ring that stops there rotates
        the keys ``last_step`` times) and ``kv_bytes_needed`` the key/value bytes each device
        would then receive (float32), ``reorder_ms`` the host time of the reorder per row,
        ``latency_ms`` / ``latency_fwd_bwd_ms`` and ``skip_reason`` (why they are None).

    Example:
        >>> config = RingBench(cp=4, seq_len=64, segments=(1,), stripe_sizes=(1, 2), latency=False)
        >>> for r in run_ring_bench(config):
        ...     print(r["reorder"], round(r["imbalance"], 2), r["steps_skipped"])
        none 1.74 6
        striped(1) 1.05 0
        striped(2) 1.09 0
        dual_chunk_swap 1.0 0
        balanced 1.0 0
    """
    rng = np.random.default_rng(config.seed)
    rows = {}
    for segments in config.segments:
        rows["filled", segments] = synth.filled_segments(
            rng, batch=config.batch, seq_len=config.seq_len, segments=segments
        )
    for name in config.distributions:
        rows[name, None] = distribution_rows(
            name, rng, batch=config.batch, seq_len=config.seq_len, cp=config.cp
        )
    records, layouts = [], {}
    for (layout_name, segments), (ids, pos) in rows.items():
        for name in reorder_names(config.stripe_sizes):
            label = f"{segments} segments per row" if segments else f"{layout_name} rows"
            callbacks.step(f"ring work: {label}, reorder {name}")
            start = time.perf_counter()
            layout = _reordered(name, ids, pos, config.cp)
            elapsed = (time.perf_counter() - start) * 1e3 / max(1, config.batch)
            record = _balance(config, layout_name, name, *layout)
            record["reorder_ms"] = elapsed
            records.append(record)
            layouts[layout_name, record["segments"], name] = layout
            callbacks.cell_done()
    if config.latency and jax.device_count() < config.cp:
        reason = f"not run: needs {config.cp} devices, found {jax.device_count()}; on CPU set "
        reason += f"XLA_FLAGS=--xla_force_host_platform_device_count={config.cp} before JAX starts"
        for record in records:
            record["skip_reason"] = reason
    elif config.latency:
        callbacks.step(f"ring latency: compiling and timing {len(layouts)} layouts")
        latency = _latency(config, layouts)
        callbacks.step(f"ring forward+backward: compiling and timing {len(layouts)} layouts")
        latency_bwd = _latency(config, layouts, backward=True)
        for record in records:
            key = record["layout"], record["segments"], record["reorder"]
            record["latency_ms"], record["latency_fwd_bwd_ms"] = latency[key], latency_bwd[key]
    return records


def ring_table(records: Sequence[Mapping[str, Any]]) -> Table:
    """RING SUMMARY: per-rank work balance, skipped steps and latency of each reorder."""
    title = (
        "RING SUMMARY (cp={cp}, T={seq_len}, B={batch}, {mask_type}; work = allowed (q, kv) pairs; "
        "tiles = visited {block}x{block} tiles)"
    ).format_map(records[0])
    count, ratio = "{:,}".format, "{:.3f}".format
    columns = [
        ("layout", "layout", str, "left"), ("segments", "segments"),
        ("reorder", "reorder", str, "left"),
        ("work max", "work_max", count), ("work mean", "work_mean", "{:,.0f}".format),
        ("max / mean", "imbalance", ratio), ("tiles max", "tiles_max", count),
        ("tiles total", "tiles_total", count), ("tiles max / mean", "tile_imbalance", ratio),
        ("steps run", lambda r: f"{r['steps_run']}/{r['steps_total']}"),
        ("skipped", "steps_skipped"), ("empty", "steps_empty"),
        ("last step", "last_step"), ("kv MiB needed", lambda r: r["kv_bytes_needed"] / 2**20,
                                     "{:.3g}".format),
        ("reorder ms/row", "reorder_ms", "{:.3g}".format),
        ("latency ms", median, "{:.3g}".format),
        ("fwd+bwd ms", lambda r: (r["latency_fwd_bwd_ms"] or {}).get("median"), "{:.3g}".format),
        ("runs", lambda r: (r["latency_ms"] or {}).get("samples")),
    ]  # fmt: skip
    reasons = sorted({r["skip_reason"] for r in records if r["skip_reason"]})
    caption = "latency: " + "; ".join(reasons) if reasons else None
    return measure.table(
        title, columns, records, section=lambda r: (r["layout"], r["segments"]), caption=caption
    )
