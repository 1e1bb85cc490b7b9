"""The attention benchmark: thdkit's implementations and peers, interleaved in one process.

The implementations are the kernel registry's (:func:`thdkit.kernels.names`, one registered at
run time included), plus ``blockwise-serial`` (blockwise with its serial schedule) and the peers;
where one runs, and which pairs it visits, is read from the implementation itself.

B batch, T tokens per row (self-attention), H heads, D head dim, S documents per row. Per cell
(T, S), rows filled with S documents of random lengths, every implementation and pass (forward,
forward + backward) is planned and, where it fits, timed round-robin with the others, with a
2048³ matmul and blockwise's tile matmuls alone (:mod:`thdkit.bench.attention_work`: what its
efficiency is measured against, and the factors of that efficiency). The peers
(:mod:`thdkit.bench.peers`): ``jax-nn-xla`` (jax.nn on the dense mask from ids and positions),
``ejkernel-xla`` (extra ``thdkit[peers]``), ``tokamax-xla``, ``tokamax-xla-chunked`` (tokamax
on that dense mask) and ``tokamax-xla-range`` (tokamax on per-query key ranges; extra
``thdkit[tokamax]``), and ``jax-nn-cudnn`` (plain causal over whole rows: the speed of light).

With ``logits_soft_cap`` and ``sinks`` each of thdkit's implementations is also timed with that
feature (:data:`FEATURES`; soft-capped logits, learned attention sinks), in the same rounds as
plain attention: a record's ``feature`` says which, and ``vs_plain`` its latency over plain's.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from thdkit import kernels
from thdkit._src import synth
from thdkit._src.kernels.blockwise import Blockwise, blockwise_attention, step_tiles
from thdkit._src.kernels.config import AttentionConfig, check_soft_cap
from thdkit._src.kernels.dense import Dense
from thdkit._src.mask_types import MaskType, check_window
from thdkit._src.segments import Segments
from thdkit.bench import measure
from thdkit.bench.attention_work import (
    MATMUL_SIZE,
    NEEDED_FLOPS_PER_PAIR,
    TILE_FLOPS_PER_PAIR,
    cell_work,
    matmul_program,
    tile_matmuls,
)
from thdkit.bench.measure import SHAPE_OPTIONS, SILENT, Callbacks, Options, PlanConfig, median
from thdkit.bench.peers import (
    PEERS,
    install_hint,
    peer_backend_reason,
    peer_program,
    peer_visited_fraction,
)
from thdkit.kernels import attach_sinks, attention, plan_attention

__all__ = [
    "FEATURES",
    "PEERS",
    "AttentionBench",
    "attention_program",
    "bench_sinks",
    "implementation_names",
    "run_attention_bench",
]

_VARIANTS = {"blockwise-serial": "blockwise"}  # A schedule of a registered implementation.
FEATURES = ("plain", "soft_cap", "sinks")
"""What a record's ``feature`` may be: plain attention, soft-capped logits
(``AttentionBench.logits_soft_cap``), learned attention sinks (``AttentionBench.sinks``)."""


def implementation_names() -> tuple[str, ...]:
    """Every name the benchmark takes: the kernel registry's, in registration order (each
    followed by its schedule variants, ``blockwise-serial``), then the peers.

    Example:
        >>> names = implementation_names()
        >>> names[-len(PEERS) :] == PEERS, set(kernels.names()) < set(names)
        (True, True)
        >>> "blockwise-serial" in names, "tokamax-xla-range" in names
        (True, True)
    """
    found: list[str] = []
    for name in kernels.names():
        found += [name, *(v for v, of in _VARIANTS.items() if of == name)]
    return (*found, *PEERS)


def _implementation_names(value: Any) -> tuple[str, ...]:
    """A rule: names of :func:`implementation_names` (one or a tuple)."""
    valid = implementation_names()
    items = value if isinstance(value, tuple) else (value,)
    bad = [v for v in items if v not in valid]
    if bad:
        raise ValueError(f"must be among {', '.join(valid)}, got {bad[0]!r}")
    return value


def _registered(name: str) -> kernels.Implementation:
    return kernels.get(_VARIANTS.get(name, name))


def _cannot_run_here(name: str, mask: Any = "padding_causal", window: Any = None) -> str | None:
    """Why the implementation cannot run on this backend with this mask (its ``check_config``;
    a peer's backends), or None."""
    backend = jax.default_backend()
    if name in PEERS:
        return peer_backend_reason(name, backend)
    config = AttentionConfig.parse(mask_type=mask, window_size=window, max_segments_per_seq=None)
    try:
        _registered(name).check_config(config)
    except NotImplementedError as error:
        return str(error)
    return None


def _by_default(name: str) -> bool:
    """Timed unless named: it runs here compiled, and is not a dense reference (O(T^2))."""
    if name in PEERS:
        return _cannot_run_here(name) is None
    implementation = _registered(name)
    interpreted = jax.default_backend() in implementation.interpreted_on
    return not interpreted and not isinstance(implementation, Dense) and not _cannot_run_here(name)


def _visited_fraction(name: str, work: Mapping[str, Any]) -> float | None:
    """Pairs the implementation visits over B T^2: its plan's tiles (a tiled implementation:
    its auxiliary data is the tile ranges), every pair (dense), or None (not known)."""
    if name in PEERS:
        return peer_visited_fraction(name)
    if name not in implementation_names():
        return None
    implementation = _registered(name)
    if isinstance(implementation, Dense):
        return 1.0
    return work["tile_pair_fraction"] if isinstance(implementation, Blockwise) else None


def dtype_names() -> tuple[str, ...]:
    """The input dtypes the benchmark runs: float64 only with x64 enabled (``JAX_ENABLE_X64=1``;
    without it JAX computes a float64 request in float32).

    Reads JAX's configuration only; starts no backend.

    Returns:
        The canonical dtype names, e.g. ``("bfloat16", "float16", "float32")``.

    Example:
        >>> dtype_names()
        ('bfloat16', 'float16', 'float32')
    """
    names = ("bfloat16", "float16", "float32")
    return (*names, "float64") if jax.config.jax_enable_x64 else names


def _floating(name: Any) -> str | None:
    """A check: None, or the name (or an alias: ``half``, ``f4``) of a dtype in
    :func:`dtype_names`, made canonical."""
    if name is None:
        return None
    valid = dtype_names()
    try:
        canonical = jnp.dtype(name).name
    except TypeError:
        canonical = None
    if canonical not in valid:
        needs_x64 = canonical == "float64"
        why = ": float64 needs x64 (set JAX_ENABLE_X64=1)" if needs_x64 else ""
        raise ValueError(f"must be one of {', '.join(valid)}, got {name!r}{why}")
    return canonical


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionBench(PlanConfig):
    """What the attention benchmark measures: ``OPTIONS`` documents each option.

    Raises:
        ConfigError: a ``ValueError`` naming the option that is out of range.

    Example:
        >>> AttentionBench(dtype="int32")
        Traceback (most recent call last):
        ...
        thdkit.bench.measure.ConfigError: dtype: must be one of bfloat16, ..., got 'int32'
    """

    OPTIONS: ClassVar[Options] = {
        **PlanConfig.OPTIONS,
        **SHAPE_OPTIONS,
        "mask_type": ("Mask type name.", measure.mask_names),
        "window_size": (None, check_window),  # (left, right) or None; not on the command line.
        "implementations": (
            "Names of the kernel registry (thdkit.kernels.names()), blockwise-serial, or the "
            f"peers {', '.join(PEERS)}. \\[default: those the backend runs compiled, but the "
            "dense reference]",
            _implementation_names,
        ),
        "dtype": (
            "Input dtype: bfloat16, float16, float32, float64 (with JAX_ENABLE_X64=1). "
            "\\[default: bfloat16 on a GPU, else float32]",
            _floating,
        ),
        "block_q": ("Query tile size. \\[default: from the mean document length]", 1),
        "block_kv": ("Key tile size. \\[default: from the mean document length]", 1),
        "logits_soft_cap": (
            "Also time thdkit's implementations with the logits soft-capped at this value "
            "(cap * tanh(logit / cap)), interleaved with plain attention. \\[default: none]",
            check_soft_cap,
        ),
        "sinks": (
            "Also time thdkit's implementations with learned attention sinks (random, one per "
            "head; fwd+bwd includes their gradient), interleaved with plain attention.",
            None,
        ),
    }
    seq_lens: tuple[int, ...] = (8192, 32768)
    segments: tuple[int, ...] = (1, 16, 256)
    heads: int = 8
    head_dim: int = 64
    mask_type: str = "padding_causal"
    window_size: tuple[int | None, int | None] | None = None
    implementations: tuple[str, ...] = dataclasses.field(
        default_factory=lambda: tuple(filter(_by_default, implementation_names()))
    )
    dtype: str | None = None
    block_q: int | None = None
    block_kv: int | None = None
    logits_soft_cap: float | None = None
    sinks: bool = False
    time_per_program_s: float = 2.0
    compile_timeout_s: float = 120.0

    def _relations(self) -> list[tuple[str, Callable[[Any], bool], str]]:
        shortest = min(self.seq_lens)
        return [("segments", lambda s: s <= shortest, f"at most min(seq_lens) = {shortest}")]

    @property
    def features(self) -> tuple[str, ...]:
        """The features timed: ``"plain"``, then ``"soft_cap"`` and ``"sinks"`` where asked.

        Example:
            >>> AttentionBench(logits_soft_cap=30.0, sinks=True).features
            ('plain', 'soft_cap', 'sinks')
        """
        asked = {"soft_cap": self.logits_soft_cap is not None, "sinks": bool(self.sinks)}
        return ("plain", *(feature for feature, on in asked.items() if on))


def bench_sinks(config: AttentionBench) -> np.ndarray:
    """The sinks the benchmark times: float32[H], standard normal draws of ``config.seed``.

    Example:
        >>> bench_sinks(AttentionBench(heads=2)).shape
        (2,)
    """
    return np.random.default_rng(config.seed).standard_normal(config.heads).astype(np.float32)


def attention_program(
    config: AttentionBench,
    implementation: str,
    segments: int,
    passes: str,
    *,
    feature: str = "plain",
) -> Callable[..., Any]:
    """``fn(q, k, v, ids, pos)``: one pass (``"fwd"``: out, ``"fwd+bwd"``: out and the pullback
    of out) of one implementation on float[B, T, H, D] inputs and int32[B, T] ids and positions.
    Where it cannot run here (backend, mask type, a feature it lacks; a peer with any feature but
    ``"plain"``) ``fn`` raises NotImplementedError when traced.

    ``feature`` (:data:`FEATURES`): ``"soft_cap"`` caps the logits at ``config.logits_soft_cap``;
    ``"sinks"`` joins :func:`bench_sinks` (the pullback then includes the sinks' gradient).

    Raises:
        ImportError: a peer that is not installed.
        ValueError: a ``feature`` not in :data:`FEATURES`, or ``"soft_cap"`` without
            ``config.logits_soft_cap``.

    Example:
        >>> fn = attention_program(AttentionBench(), "jax-nn-xla", 2, "fwd")
        >>> ids, pos = jnp.array([[1, 1, 2, 2]]), jnp.array([[0, 1, 0, 1]])
        >>> x = jnp.zeros((1, 4, 1, 1))
        >>> fn(x, x, jnp.arange(4.0).reshape(1, 4, 1, 1), ids, pos)[0, :, 0, 0]
        Array([0. , 0.5, 2. , 2.5], dtype=float32)
    """
    mask, window = MaskType.parse(config.mask_type), config.window_size
    layout = {"mask_type": mask, "window_size": window}
    blocks = {"block_q": config.block_q, "block_kv": config.block_kv}
    if feature not in FEATURES:
        raise ValueError(f"feature must be one of {', '.join(FEATURES)}, got {feature!r}")
    peer = peer_program(implementation, mask, window) if implementation in PEERS else None
    cap = config.logits_soft_cap if feature == "soft_cap" else None
    if feature == "soft_cap" and cap is None:
        raise ValueError('feature="soft_cap" needs config.logits_soft_cap')
    sinks = bench_sinks(config) if feature == "sinks" else None

    def forward(q, k, v, ids, pos, sinks):
        reason = _cannot_run_here(implementation, mask, window)
        if reason is not None:
            raise NotImplementedError(reason)
        if peer is not None:
            if feature != "plain":
                raise NotImplementedError(f"the peers are timed without features, not {feature}")
            return peer(q, k, v, ids, pos)
        if implementation in ("blockwise", *_VARIANTS):
            side = Segments.from_ids(ids, pos)
            plan = plan_attention(
                side, **layout, max_segments_per_seq=segments, implementation="blockwise",
                logits_soft_cap=cap, **blocks,
            )  # fmt: skip
            out, lse = blockwise_attention(
                q, k, v, side, side, plan.aux["blockwise"], **layout, scale=q.shape[-1] ** -0.5,
                logits_soft_cap=cap,
                schedule="serial" if implementation.endswith("serial") else "parallel",
            )  # fmt: skip
            if sinks is not None:
                out, _ = attach_sinks(out, lse, sinks)
            return out.astype(q.dtype)
        return attention(
            q, k, v, segment_ids_q=ids, segment_pos_q=pos, max_segments_per_seq=segments,
            implementation=implementation, logits_soft_cap=cap, sinks=sinks, **layout, **blocks,
        )  # fmt: skip

    def forward_only(q, k, v, ids, pos):
        return forward(q, k, v, ids, pos, None if sinks is None else jnp.asarray(sinks))

    def forward_backward(q, k, v, ids, pos):
        if sinks is None:
            out, pullback = jax.vjp(lambda q, k, v: forward(q, k, v, ids, pos, None), q, k, v)
        else:  # The sinks are learned: their gradient is part of the pass.
            call = lambda q, k, v, s: forward(q, k, v, ids, pos, s)  # noqa: E731
            out, pullback = jax.vjp(call, q, k, v, jnp.asarray(sinks))
        return out, pullback(out)

    return forward_only if passes == "fwd" else forward_backward


def run_attention_bench(
    config: AttentionBench, *, callbacks: Callbacks = SILENT
) -> list[dict[str, Any]]:
    """Plans, work and (where they fit) latency of every cell x implementation x pass.

    Args:
        config: the options.
        callbacks: progress reports (:class:`thdkit.bench.measure.Callbacks`); a cell is one
            (T, S) cell.

    Returns:
        JSON-ready records, one per (seq_len, segments, implementation, pass, feature), with the
        fields docs/benchmarks.md describes (efficiency, vs_blockwise, pairs visited and
        allowed, and for blockwise the factors of its efficiency, ``tile_matmul_ms``,
        ``tile_rate`` and ``in_matmuls``: :mod:`thdkit.bench.attention_work`...);
        ``feature`` is one of ``config.features`` (the peers: ``"plain"`` only) and
        ``vs_plain`` the latency over the same implementation's and pass's plain one.

    Example:
        >>> config = AttentionBench(seq_lens=(256,), segments=(4,), heads=1, head_dim=8,
        ...                         implementations=("blockwise",), repeats=1, warmup=0)
        >>> [(r["pass"], r["skip_reason"], r["vs_blockwise"]) for r in run_attention_bench(config)]
        [('fwd', None, 1.0), ('fwd+bwd', None, 1.0)]
    """
    rng = np.random.default_rng(config.seed)
    dtype = config.dtype or ("bfloat16" if jax.default_backend() == "gpu" else "float32")
    keys = ("batch", "heads", "head_dim", "mask_type", "window_size")
    same = {k: getattr(config, k) for k in keys}
    flops_per_pair = config.heads * config.head_dim
    records: list[dict[str, Any]] = []
    for seq_len, segments in itertools.product(config.seq_lens, config.segments):
        label = f"attention T={seq_len} S={segments}"
        ids, pos = synth.filled_segments(
            rng, batch=config.batch, seq_len=seq_len, segments=segments
        )
        callbacks.step(f"{label}: work")
        work = cell_work(
            ids, pos, mask_type=config.mask_type, window_size=config.window_size,
            block_q=config.block_q, block_kv=config.block_kv,
        )  # fmt: skip
        shape = (config.batch, seq_len, config.heads, config.head_dim)
        qkv = [jnp.asarray(rng.standard_normal(shape, np.float32), dtype) for _ in range(3)]
        same["dtype"] = qkv[0].dtype.name  # The dtype that runs (JAX may narrow a request).
        args = (*qkv, jnp.asarray(ids), jnp.asarray(pos))
        plans = {}
        for implementation, passes, feature in itertools.product(
            config.implementations, ("fwd", "fwd+bwd"), config.features
        ):
            if implementation in PEERS and feature != "plain":
                continue  # The peers are called without features.
            shown = "" if feature == "plain" else f" {feature}"
            callbacks.step(f"{label}: compile {implementation} {passes}{shown}")
            try:
                program = attention_program(
                    config, implementation, segments, passes, feature=feature
                )
                plan = measure.plan(program, *args, compile_timeout_s=config.compile_timeout_s)
            except ImportError:
                plan = measure.skipped(f"not installed: {install_hint(implementation)}")
            plans[implementation, passes, feature] = plan
        timeout = config.compile_timeout_s
        plans["matmul"] = measure.plan(matmul_program, *args, compile_timeout_s=timeout)
        tiled = [n for n in config.implementations if _VARIANTS.get(n, n) == "blockwise"]
        for passes in ("fwd", "fwd+bwd") if tiled else ():
            plans["tiles", passes] = measure.plan(
                tile_matmuls, *args, compile_timeout_s=timeout, block_q=work["block_q"],
                block_kv=work["block_kv"], tiles=work["tiles_visited"], passes=passes,
                chunk=step_tiles(work["block_q"], work["block_kv"], most=work["tiles_total"]),
            )  # fmt: skip
        callbacks.step(f"{label}: timing")
        outcome = measure.run_plans(plans, args, config, config.memory_limit_bytes)
        matmul_ms = median(outcome.pop("matmul"))
        rate = matmul_ms and 2e3 * MATMUL_SIZE**3 / matmul_ms
        tile_ms = {p: median(outcome.pop(("tiles", p))) for p in ("fwd", "fwd+bwd") if tiled}
        for (implementation, passes, feature), fields in outcome.items():
            needed = work["allowed_pairs"] * NEEDED_FLOPS_PER_PAIR[passes] * flops_per_pair
            mine = median(fields)
            floor = tile_ms.get(passes) if implementation in tiled else None
            tile_flops = (
                work["tiles_visited"] * work["block_q"] * work["block_kv"]
                * TILE_FLOPS_PER_PAIR[passes] * flops_per_pair
            )  # fmt: skip
            blockwise = median(outcome.get(("blockwise", passes, feature), {}))
            plain = median(outcome.get((implementation, passes, "plain"), {}))
            records.append(
                {"seq_len": seq_len, "segments": segments, **same}
                | {"implementation": implementation, "pass": passes, "feature": feature}
                | {**fields, **work}
                | {"visited_pair_fraction": _visited_fraction(implementation, work)}
                | {"needed_flops": float(needed), "matmul_flop_rate": rate}
                | {"efficiency": mine and rate and needed / (mine / 1e3) / rate}
                | {"tile_matmul_ms": floor}
                | {"tile_rate": floor and rate and tile_flops / (floor / 1e3) / rate}
                | {"in_matmuls": floor and mine and floor / mine}
                | {"vs_blockwise": mine / blockwise if blockwise and mine else None}
                | {"vs_plain": mine / plain if plain and mine else None}
            )
        callbacks.cell_done()
    return records
