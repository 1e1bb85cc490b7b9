"""The context-parallel benchmark: ring, all-gather and all-to-all strategies side by side.

Axis legend: B batch, T_q / T_kv row lengths, H_q / H_kv heads, D / D_v head dims, cp ranks,
n = T / cp tokens per shard, b bytes per element of q/k/v.

Per cp and strategy, on a packed causal layout in striped order: the bytes each device receives
through the collectives (each strategy's closed form of the shapes it sends, its ``traffic``;
tests hold it against the traced programs), the dependent collective steps, the visited
(query tile, key tile) pairs per rank times the heads it computes (max / mean is the imbalance),
and optionally the compiled program's scratch bytes per device and its latency on cp devices.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from rich.table import Table

from thdkit._src import reorder, synth
from thdkit._src.context_parallel.base import Call, Shapes
from thdkit._src.mask_types import MaskType
from thdkit._src.segments import Segments
from thdkit.bench import measure
from thdkit.bench.measure import SILENT, BenchConfig, Callbacks, Options, median
from thdkit.bench.ring import document_lengths, visited_tiles
from thdkit.context_parallel import STRATEGIES, Strategy, context_parallel_attention
from thdkit.kernels import DEFAULT_BLOCK

__all__ = ["CPBench", "run_cp_bench"]

MASK_TYPE = "padding_causal"
_MEASURED = (
    "bytes_fwd", "bytes_bwd", "bytes_total", "steps_fwd", "steps_bwd", "tiles_per_rank",
    "tiles_max", "tile_imbalance", "temp_bytes", "latency_ms",
)  # fmt: skip


@dataclasses.dataclass(frozen=True, kw_only=True)
class CPBench(BenchConfig):
    """What the context-parallel benchmark measures: ``OPTIONS`` documents each option.

    Example:
        >>> CPBench(cps=(3,), seq_len=64)
        Traceback (most recent call last):
        ...
        thdkit.bench.measure.ConfigError: seq_len: must be a multiple of cp * stripe_size ...
    """

    OPTIONS: ClassVar[Options] = {
        **BenchConfig.OPTIONS,
        "cps": ("Context-parallel ranks, comma-separated.", 1),
        "seq_len": ("T, tokens per row; a multiple of cp * stripe_size for every cp.", 1),
        "segments": ("Documents per row.", 1),
        "stripe_size": ("Stripe of the striped reorder.", 1),
        "heads": ("H_q, query heads.", 1),
        "kv_heads": ("H_kv, key/value heads (divides H_q).", 1),
        "head_dim": ("D = D_v, head dim.", 1),
        "latency": ("Compile (scratch bytes) and time fwd+bwd on cp devices.", None),
    }
    cps: tuple[int, ...] = (2, 4, 8)
    seq_len: int = 4096
    segments: int = 16
    stripe_size: int = 1
    heads: int = 8
    kv_heads: int = 8
    head_dim: int = 64
    latency: bool = True

    def _relations(self) -> list[tuple[str, Callable[[Any], bool], str]]:
        sizes = [cp * self.stripe_size for cp in self.cps]
        return [
            ("seq_len", lambda t: not any(t % m for m in sizes),
             f"a multiple of cp * stripe_size ({', '.join(map(str, sizes))})"),
            ("kv_heads", lambda h: self.heads % h == 0, f"a divisor of heads={self.heads}"),
            ("segments", lambda s: s <= self.seq_len, f"at most seq_len={self.seq_len}"),
        ]  # fmt: skip


def _work(
    strategy: Strategy, row: Segments, *, cp: int, mask_type: MaskType, max_segments_per_seq: int
) -> list[list[Call]]:
    """The strategy's ``work`` on a self-attention row. A ``work`` written before 0.2, with the
    keywords ``mask``, ``window`` and ``num_segments``, runs for one more release, with a
    DeprecationWarning."""
    options = dict(mask_type=mask_type, window_size=None, max_segments_per_seq=max_segments_per_seq)
    parameters = inspect.signature(strategy.work).parameters
    if "mask" in parameters and "mask_type" not in parameters:
        warnings.warn(
            f"strategy {strategy.name!r}: work(..., mask, window, num_segments) is deprecated; "
            "name them mask_type, window_size, max_segments_per_seq (as StrategyConfig does)",
            DeprecationWarning,
            stacklevel=2,
        )
        options = dict(mask=mask_type, window=None, num_segments=max_segments_per_seq)
    return strategy.work(row, row, cp=cp, **options)


def _tiles_per_rank(
    strategy: Strategy, cp: int, heads: int, layout: Sequence[np.ndarray], segments: int
) -> list[int]:
    """(Query tile, key tile) pairs times heads each rank computes, on a reordered layout: the
    tiles of every attention call the strategy's ``work`` lists for the rank."""
    mask = MaskType.parse(MASK_TYPE)
    row = Segments(*(jnp.asarray(x, jnp.int32) for x in layout))
    calls = _work(strategy, row, cp=cp, mask_type=mask, max_segments_per_seq=segments)

    def tiles(call: Call) -> int:
        q, kv = ((s.ids, s.positions, s.lengths) for s in (call.q, call.kv))
        blocks = {"block_q": min(DEFAULT_BLOCK, q[0].shape[1])}
        blocks["block_kv"] = min(DEFAULT_BLOCK, kv[0].shape[1])
        return int(visited_tiles(q, kv, mask=mask, **blocks)) * heads // call.heads_split

    return [sum(tiles(call) for call in rank) for rank in calls]


def _cannot_run(strategy: Strategy, shapes: Shapes, cp: int) -> str | None:
    """Why the strategy cannot split these shapes over cp ranks (its own check), or None."""
    try:
        strategy.check(shapes, cp)
    except ValueError as error:
        return str(error)
    return None


def _shapes(config: CPBench) -> Shapes:
    """The benchmark's global shapes (float32; self-attention)."""
    return Shapes(
        config.batch, config.seq_len, config.seq_len, config.heads, config.kv_heads,
        config.head_dim, config.head_dim, 4, False,
    )  # fmt: skip


def _programs(config: CPBench, cp: int, layout: Sequence[np.ndarray]) -> dict[str, Any]:
    """Per strategy: (compiled fwd+bwd program, its sharded arguments), compiled here."""
    mesh = Mesh(np.array(jax.devices()[:cp]), ("cp",))
    tokens, heads = NamedSharding(mesh, P(None, "cp")), NamedSharding(mesh, P(None, "cp", None))
    rng = np.random.default_rng(config.seed)
    shape = (config.batch, config.seq_len, config.heads, config.head_dim)
    kv_shape = (*shape[:2], config.kv_heads, config.head_dim)
    arrays = [rng.standard_normal(s, np.float32) for s in (shape, kv_shape, kv_shape, shape)]
    args: list[Any] = [jax.device_put(x, heads) for x in arrays]
    args.append(Segments(*(jax.device_put(np.asarray(x, np.int32), tokens) for x in layout)))
    programs = {}
    for strategy, chosen in STRATEGIES.items():
        if _cannot_run(chosen, _shapes(config), cp):
            continue

        def step(q, k, v, cotangent, segments, strategy=strategy):
            out, pull = jax.vjp(
                lambda q, k, v: context_parallel_attention(
                    q, k, v, q_segments=segments, mask_type=MASK_TYPE,
                    max_segments_per_seq=config.segments, mesh=mesh, axis_name="cp",
                    strategy=strategy,
                ), q, k, v,
            )  # fmt: skip
            return out, pull(cotangent)

        programs[strategy] = jax.jit(step).lower(*args).compile(), args
    return programs


def run_cp_bench(config: CPBench, *, callbacks: Callbacks = SILENT) -> list[dict[str, Any]]:
    """Bytes, steps, work balance and (optionally) scratch bytes and latency per cp x strategy.

    Args:
        config: the options.
        callbacks: progress reports (:class:`thdkit.bench.measure.Callbacks`); a cell is one
            cp.

    Returns:
        JSON-ready records, one per (cp, strategy): ``bytes_fwd`` / ``bytes_bwd`` received per
        device (float32 inputs), ``steps_fwd`` / ``steps_bwd``, ``tiles_per_rank`` (visited tiles
        times heads), ``tile_imbalance`` (max / mean), ``temp_bytes``, ``latency_ms`` and
        ``skip_reason`` (why the last two, or every measure, are None; ``"<name>: no cost
        model"`` for a strategy without ``traffic`` or ``work``, whose bytes and steps, or
        tiles, are None).

    Example:
        >>> config = CPBench(cps=(4,), seq_len=256, segments=4, heads=4, kv_heads=4, latency=False)
        >>> for r in run_cp_bench(config):
        ...     print(r["strategy"], r["steps_fwd"], round(r["tile_imbalance"], 2))
        ring 3 1.0
        all_gather 1 1.0
        all_to_all 2 1.0
    """
    rng = np.random.default_rng(config.seed)
    ids, pos = synth.filled_segments(
        rng, batch=config.batch, seq_len=config.seq_len, segments=config.segments
    )
    records = []
    for cp in config.cps:
        callbacks.step(f"cp={cp}: counting")
        striped = [
            reorder.striped(x, cp=cp, stripe_size=config.stripe_size)
            for x in (ids, pos, document_lengths(ids))
        ]
        s = _shapes(config)
        not_timed = None if config.latency else "latency not requested"
        if config.latency and jax.device_count() < cp:
            not_timed = f"needs {cp} devices, found {jax.device_count()}; on CPU set "
            not_timed += f"XLA_FLAGS=--xla_force_host_platform_device_count={cp} before JAX starts"
        programs, latency = {}, {}
        if not_timed is None:
            callbacks.step(f"cp={cp}: compiling")
            programs = _programs(config, cp, striped)
            callbacks.step(f"cp={cp}: timing")
            latency = measure.interleaved_latency(
                {k: p for k, (p, _) in programs.items()},
                {k: a for k, (_, a) in programs.items()},
                config,
            )
        for strategy, chosen in STRATEGIES.items():
            record = {
                "cp": cp, "strategy": strategy, "seq_len": config.seq_len,
                "batch": config.batch, "segments": config.segments,
                "reorder": f"striped({config.stripe_size})", "heads": config.heads,
                "kv_heads": config.kv_heads, "head_dim": config.head_dim,
            }  # fmt: skip
            reason = _cannot_run(chosen, s, cp)
            if reason is not None:
                reason = f"{strategy} cannot run at cp={cp}: {reason}"
                records.append(record | dict.fromkeys(_MEASURED) | {"skip_reason": reason})
                continue
            cost = {}
            if chosen.traffic is not None:
                traffic = chosen.traffic(s, cp)
                cost |= {
                    "bytes_fwd": traffic.forward, "bytes_bwd": traffic.backward,
                    "bytes_total": traffic.forward + traffic.backward,
                    "steps_fwd": traffic.steps_forward, "steps_bwd": traffic.steps_backward,
                }  # fmt: skip
            if chosen.work is not None:
                tiles = _tiles_per_rank(chosen, cp, config.heads, striped, config.segments)
                tiles = np.array(tiles)
                cost |= {
                    "tiles_per_rank": tiles.tolist(), "tiles_max": int(tiles.max()),
                    "tile_imbalance": float(tiles.max() / tiles.mean()) if tiles.any() else None,
                }  # fmt: skip
            missing = [x for x in ("traffic", "work") if getattr(chosen, x) is None]
            no_cost = missing and f"{strategy}: no cost model (no {' or '.join(missing)})"
            compiled = programs.get(strategy)
            memory = compiled[0].memory_analysis() if compiled else None
            records.append(record | dict.fromkeys(_MEASURED) | cost | {
                "temp_bytes": None if memory is None else int(memory.temp_size_in_bytes),
                "latency_ms": latency.get(strategy),
                "skip_reason": "; ".join(filter(None, (no_cost, not_timed))) or None,
            })  # fmt: skip
        callbacks.cell_done()
    return records


def cp_table(records: Sequence[Mapping[str, Any]]) -> Table:
    """CONTEXT PARALLEL: bytes, steps, balance, scratch and latency per cp and strategy."""
    title = (
        "CONTEXT PARALLEL (T={seq_len}, B={batch}, H_q={heads}, H_kv={kv_heads}, D={head_dim}, "
        "{segments} documents, {reorder}, float32; bytes received per device)"
    ).format_map(records[0])
    ring = {r["cp"]: r["bytes_total"] for r in records if r["strategy"] == "ring"}
    mib, ratio = (lambda x: f"{x / 2**20:,.2f}"), "{:.3f}".format
    columns = [
        ("cp", "cp"), ("strategy", "strategy", str, "left"),
        ("MiB fwd", "bytes_fwd", mib),
        ("MiB fwd+bwd", "bytes_total", mib),
        ("vs ring", lambda r: r["bytes_total"] and ring.get(r["cp"]) and r["bytes_total"]
         / ring[r["cp"]], ratio),
        ("steps fwd/bwd", lambda r: r["steps_fwd"] and f"{r['steps_fwd']}/{r['steps_bwd']}"),
        ("tiles x heads max", "tiles_max", "{:,}".format),
        ("max / mean", "tile_imbalance", ratio),
        ("temp", "temp_bytes", measure.format_bytes), ("latency ms", median, "{:.3g}".format),
    ]  # fmt: skip
    reasons = sorted({r["skip_reason"] for r in records if r["skip_reason"]})
    caption = "; ".join(reasons) or None
    return measure.table(title, columns, records, section=lambda r: r["cp"], caption=caption)
