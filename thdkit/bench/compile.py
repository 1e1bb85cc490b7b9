"""The compile benchmark: what each entry point compiles, and the host path of the metadata.

Axis legend: B batch, T tokens per row, S documents per row, H heads, D head dim, L layers.

Two tables. ENTRY POINTS: per entry point (``seqlens_and_offsets`` on JAX and on NumPy inputs,
``Segments.from_ids``, ``plan_attention``, ``attention`` forward and forward + grad, blockwise and
Pallas, and an L-layer ``jax.lax.scan`` training step planned once), called eagerly as a user
calls it: the XLA programs compiled by a call on a new shape and by a call repeating that shape
(counted with ``jax.monitoring``'s backend-compile events, whose durations sum to ``compile_s``),
the first call's wall time, the repeated call's latency, the instruction count of the main
program (the entry point traced as one ``jax.jit`` program; none for the host path) and the
memory mappings the new-shape call added (lines of ``/proc/self/maps``: Linux only, None
elsewhere), per program compiled. Before each entry point JAX's caches are dropped and one call
on a half-length shape warms what does not depend on the shape, so the counts are those of a
warm process meeting a new shape.

HOST VS DEVICE: ``seqlens_and_offsets`` per (T, S) on rows filled with S documents: NumPy inputs
(the host path, nothing compiled) against JAX inputs on a new shape (each timed call pads the rows
by one more token, so each compiles) and on a repeated shape, medians of interleaved runs.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import thdkit
from thdkit._src import synth
from thdkit._src.metadata import seqlens_and_offsets
from thdkit._src.segments import Segments
from thdkit.bench import measure
from thdkit.bench.measure import SILENT, BenchConfig, Callbacks, Options
from thdkit.kernels import attention, plan_attention

__all__ = [
    "ENTRIES",
    "CompileBench",
    "CompileCounter",
    "memory_maps",
    "run_compile_bench",
]

MASK_TYPE = "padding_causal"
ENTRIES = (
    "metadata",
    "metadata-host",
    "from_ids",
    "plan",
    "attention-fwd",
    "attention-grad",
    "pallas-fwd",
    "pallas-grad",
    "scan-step",
)
_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_HLO_INSTRUCTION = re.compile(r"^\s+\S+ = ", re.M)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CompileBench(BenchConfig):
    """What the compile benchmark measures: ``OPTIONS`` documents each option.

    Raises:
        ConfigError: a ``ValueError`` naming the option that is out of range.

    Example:
        >>> CompileBench(entries=("bogus",))
        Traceback (most recent call last):
        ...
        thdkit.bench.measure.ConfigError: entries: must be among metadata, ..., got 'bogus'
    """

    OPTIONS: ClassVar[Options] = {
        **BenchConfig.OPTIONS,
        "entries": (f"Entry points, any of {', '.join(ENTRIES)}.", ENTRIES),
        "entry_seq_len": ("T of the entry-point table.", 2),
        "entry_segments": ("Documents per row in the entry-point table.", 1),
        "pallas_seq_len": ("T of the pallas entries (interpreted off GPU and TPU: keep small).", 2),
        "layers": ("L, layers of the scanned step.", 1),
        "heads": ("H, query and key/value heads.", 1),
        "head_dim": ("D, head dim.", 1),
        "seq_lens": ("T values of the host-vs-device table, comma-separated; k/M suffixes ok.", 1),
        "segments": ("S values (documents per row) of the host-vs-device table.", 1),
        "compile_samples": ("New shapes timed per host-vs-device cell (each compiles).", 1),
    }
    entries: tuple[str, ...] = ENTRIES
    entry_seq_len: int = 1024
    entry_segments: int = 8
    pallas_seq_len: int = 64
    layers: int = 24
    heads: int = 2
    head_dim: int = 32
    seq_lens: tuple[int, ...] = (1024, 8192, 131072)
    segments: tuple[int, ...] = (16, 1024)
    compile_samples: int = 3

    def _relations(self) -> list[tuple[str, Callable[[Any], bool], str]]:
        entry, pallas = self.entry_seq_len // 2, self.pallas_seq_len // 2
        return [
            ("entry_segments", lambda s: s <= entry, f"at most entry_seq_len // 2 = {entry}"),
            ("entry_segments", lambda s: s <= pallas, f"at most pallas_seq_len // 2 = {pallas}"),
        ]


class CompileCounter:
    """Counts the XLA programs compiled inside a ``with`` block (``jax.monitoring`` events).

    Attributes:
        programs: the name of each program compiled (``jit(name)``), in order.
        seconds: the backend compile seconds, summed.

    Example:
        >>> x = jnp.ones(7)
        >>> with CompileCounter() as counter:
        ...     _ = jax.jit(lambda x: x * 3)(x)
        >>> len(counter.programs), counter.seconds > 0
        (1, True)
    """

    def __init__(self) -> None:
        self.programs: list[str] = []
        self.seconds = 0.0

    def _listen(self, event: str, duration: float, **kwargs: Any) -> None:
        if event == _BACKEND_COMPILE:
            self.programs.append(str(kwargs.get("fun_name", "?")))
            self.seconds += duration

    def __enter__(self) -> CompileCounter:
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *_: object) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listen)


def memory_maps() -> int | None:
    """The process's memory mappings now: lines of ``/proc/self/maps`` (Linux only, else None).

    Example:
        >>> count = memory_maps()
        >>> count is None or count > 0
        True
    """
    try:
        with open("/proc/self/maps", "rb") as maps:
            return sum(1 for _ in maps)
    except OSError:
        return None


class _Entry(NamedTuple):
    """One entry point at one shape: the eager call, and its main program with arguments."""

    call: Callable[[], Any]
    main: Callable[..., Any] | None
    args: tuple[Any, ...]


def _attention_inputs(
    config: CompileBench, rng: np.random.Generator, seq_len: int
) -> tuple[jax.Array, ...]:
    """``(q, k, v, ct)`` float32[B, T, H, D] and ``(ids, pos)`` int32[B, T] on the device."""
    ids, pos = synth.filled_segments(
        rng, batch=config.batch, seq_len=seq_len, segments=config.entry_segments
    )
    shape = (config.batch, seq_len, config.heads, config.head_dim)
    floats = [jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(4)]
    return jax.block_until_ready((*floats, jnp.asarray(ids), jnp.asarray(pos)))


def _metadata_entry(on_host: bool) -> Callable[..., _Entry]:
    def build(config: CompileBench, rng: np.random.Generator, seq_len: int) -> _Entry:
        *_, ids, pos = _attention_inputs(config, rng, seq_len)
        options = dict(mask_type=MASK_TYPE, max_segments_per_seq=config.entry_segments)
        metadata = functools.partial(seqlens_and_offsets, **options)
        if on_host:
            ids, pos = np.asarray(ids), np.asarray(pos)
            return _Entry(lambda: metadata(segment_ids_q=ids, segment_pos_q=pos), None, ())
        main = lambda i, p: metadata(segment_ids_q=i, segment_pos_q=p)  # noqa: E731
        return _Entry(lambda: main(ids, pos), main, (ids, pos))

    return build


def _from_ids_entry(config: CompileBench, rng: np.random.Generator, seq_len: int) -> _Entry:
    *_, ids, pos = _attention_inputs(config, rng, seq_len)
    return _Entry(lambda: Segments.from_ids(ids, pos), Segments.from_ids, (ids, pos))


def _plan_entry(config: CompileBench, rng: np.random.Generator, seq_len: int) -> _Entry:
    *_, ids, pos = _attention_inputs(config, rng, seq_len)
    segments = jax.block_until_ready(Segments.from_ids(ids, pos))
    plan = functools.partial(
        plan_attention,
        mask_type=MASK_TYPE,
        max_segments_per_seq=config.entry_segments,
        implementation="blockwise",
    )
    return _Entry(lambda: plan(segments), plan, (segments,))


def _attention_entry(implementation: str, grad: bool) -> Callable[..., _Entry]:
    def build(config: CompileBench, rng: np.random.Generator, seq_len: int) -> _Entry:
        q, k, v, ct, ids, pos = _attention_inputs(config, rng, seq_len)
        options = dict(max_segments_per_seq=config.entry_segments, implementation=implementation)

        def main(q, k, v, ct, ids, pos):
            def forward(q, k, v):
                return attention(q, k, v, segment_ids_q=ids, segment_pos_q=pos, **options)

            if not grad:
                return forward(q, k, v)
            out, pullback = jax.vjp(forward, q, k, v)
            return out, pullback(ct)

        args = (q, k, v, ct, ids, pos)
        return _Entry(lambda: main(*args), main, args)

    return build


@functools.cache
def _scan_step(segments: int) -> Callable[..., Any]:
    """A jitted training step: the gradient over the weights of L scanned attention layers,
    planned once (``x + attention(x @ w_l)`` per layer)."""

    def loss(w, x, ids, pos):
        plan = plan_attention(
            Segments.from_ids(ids, pos), mask_type=MASK_TYPE, max_segments_per_seq=segments
        )

        def layer(x, w_l):
            h = x @ w_l
            return x + attention(h, h, h, plan=plan), None

        return jnp.sum(jax.lax.scan(layer, x, w)[0] ** 2)

    return jax.jit(jax.grad(loss))


def _scan_entry(config: CompileBench, rng: np.random.Generator, seq_len: int) -> _Entry:
    q, *_, ids, pos = _attention_inputs(config, rng, seq_len)
    w = rng.standard_normal((config.layers, config.head_dim, config.head_dim))
    w = jnp.asarray(w / np.sqrt(config.head_dim), jnp.float32)
    step = _scan_step(config.entry_segments)
    args = (w, q, ids, pos)
    return _Entry(lambda: step(*args), step, args)


_BUILDERS: dict[str, tuple[str, Callable[..., _Entry]]] = {
    "metadata": ("seqlens_and_offsets, jax", _metadata_entry(on_host=False)),
    "metadata-host": ("seqlens_and_offsets, numpy", _metadata_entry(on_host=True)),
    "from_ids": ("Segments.from_ids", _from_ids_entry),
    "plan": ("plan_attention", _plan_entry),
    "attention-fwd": ("attention fwd", _attention_entry("blockwise", grad=False)),
    "attention-grad": ("attention fwd+vjp", _attention_entry("blockwise", grad=True)),
    "pallas-fwd": ("attention fwd (pallas)", _attention_entry("pallas", grad=False)),
    "pallas-grad": ("attention fwd+vjp (pallas)", _attention_entry("pallas", grad=True)),
    "scan-step": ("scan step, L layers", _scan_entry),
}
"""Entry name: (what the table calls it, the builder of one shape's call). ``attention`` is
blockwise unless named; the plan is blockwise's; the scan step is ``jit(grad)`` of L layers
``x + attention(x @ w_l)`` planned once."""


def _hlo_instructions(entry: _Entry) -> int | None:
    """Instructions of the optimised HLO of the entry point traced as one jitted program."""
    if entry.main is None:
        return None
    text = jax.jit(entry.main).lower(*entry.args).compile().as_text()
    return len(_HLO_INSTRUCTION.findall(text)) or None


def _versions() -> dict[str, str]:
    return {"thdkit_version": thdkit.__version__, "jax_version": jax.__version__}


_ENTRY_FIELDS = (
    "programs_new_shape",
    "programs_repeated_shape",
    "compile_s",
    "first_call_s",
    "hlo_instructions",
    "maps_added",
    "maps_per_program",
    "programs",
    "latency_ms",
)


def _measure_entry(name: str, config: CompileBench, rng: np.random.Generator) -> dict[str, Any]:
    """One ENTRY POINTS record: warm on a half-length shape, then a new shape, then again."""
    call, build = _BUILDERS[name]
    seq_len = config.pallas_seq_len if name.startswith("pallas") else config.entry_seq_len
    record: dict[str, Any] = {"table": "entry", "entry": name, "call": call}
    record |= {"seq_len": seq_len, "batch": config.batch, "segments": config.entry_segments}
    record |= {"layers": config.layers if name == "scan-step" else None} | _versions()
    empty = dict.fromkeys(_ENTRY_FIELDS)
    try:
        jax.clear_caches()
        jax.block_until_ready(build(config, rng, seq_len // 2).call())
        entry = build(config, rng, seq_len)
        maps_before = memory_maps()
        with CompileCounter() as first:
            start = time.perf_counter()
            jax.block_until_ready(entry.call())
            first_call_s = time.perf_counter() - start
        maps_after = memory_maps()
        with CompileCounter() as repeated:
            jax.block_until_ready(entry.call())
        latency = measure.interleaved_latency({name: entry.call}, {name: ()}, config)[name]
        hlo = _hlo_instructions(entry)
    except Exception as error:  # Reported as a skip reason, never raised.
        first_line = (str(error).strip().splitlines() or [""])[0]
        return record | empty | {"skip_reason": f"{type(error).__name__}: {first_line}"[:200]}
    added = None if None in (maps_before, maps_after) else maps_after - maps_before
    programs = len(first.programs)
    return record | {
        "programs_new_shape": programs,
        "programs_repeated_shape": len(repeated.programs),
        "compile_s": first.seconds,
        "first_call_s": first_call_s,
        "hlo_instructions": hlo,
        "maps_added": added,
        "maps_per_program": None if added is None or not programs else added / programs,
        "programs": first.programs,
        "latency_ms": latency,
        "skip_reason": None,
    }


def _host_vs_device(
    config: CompileBench, rng: np.random.Generator, seq_len: int, segments: int
) -> dict[str, Any]:
    """One HOST VS DEVICE record: the metadata of NumPy inputs against the device program a
    caller's ``jit`` compiles for them (concrete JAX arrays take the host path too), new and
    warm."""
    ids, pos = synth.filled_segments(rng, batch=config.batch, seq_len=seq_len, segments=segments)

    def metadata(ids: Any, pos: Any) -> Any:
        return seqlens_and_offsets(
            segment_ids_q=ids, segment_pos_q=pos, mask_type=MASK_TYPE, max_segments_per_seq=segments
        )

    on_device_path = jax.jit(metadata)

    firsts, programs = [], []
    for extra in range(1, config.compile_samples + 1):  # One more padding token: a new shape.
        padded = [np.pad(a, ((0, 0), (0, extra))) for a in (ids, pos)]
        on_device = jax.block_until_ready(jax.device_put(padded))
        with CompileCounter() as counter:
            start = time.perf_counter()
            device_meta = jax.block_until_ready(on_device_path(*on_device))
            firsts.append((time.perf_counter() - start) * 1e3)
        programs.append(len(counter.programs))
    with CompileCounter() as host_counter:
        host_meta = metadata(*padded)
    matches = all(np.array_equal(h, d) for h, d in zip(host_meta, device_meta, strict=True))
    fns = {"host": lambda: metadata(*padded), "device": lambda: on_device_path(*on_device)}
    latency = measure.interleaved_latency(fns, dict.fromkeys(fns, ()), config)
    first = {
        "median": float(np.median(firsts)),
        "min": min(firsts),
        "max": max(firsts),
        "samples": len(firsts),
    }
    host_ms, warm_ms = latency["host"]["median"], latency["device"]["median"]
    return {
        "table": "host",
        "seq_len": seq_len,
        "segments": segments,
        "batch": config.batch,
        "mask_type": MASK_TYPE,
        **_versions(),
        "host_ms": latency["host"],
        "device_first_ms": first,
        "device_warm_ms": latency["device"],
        "first_over_host": first["median"] / host_ms,
        "warm_over_host": warm_ms / host_ms,
        "programs_first_call": max(programs),
        "programs_host": len(host_counter.programs),
        "matches_device": matches,
    }


def run_compile_bench(
    config: CompileBench, *, callbacks: Callbacks = SILENT
) -> list[dict[str, Any]]:
    """Measures each entry point's compilations, then the host path against the device path.

    Args:
        config: the options.
        callbacks: progress reports (:class:`thdkit.bench.measure.Callbacks`); a cell is one
            entry point or one (T, S) of the host-vs-device table.

    Returns:
        JSON-ready records. ``table == "entry"``: ``entry``, ``call``, ``seq_len``,
        ``programs_new_shape``, ``programs_repeated_shape``, ``compile_s``, ``first_call_s``,
        ``latency_ms``, ``hlo_instructions``, ``maps_added``, ``maps_per_program``, ``programs``
        (the names compiled on the new shape) and ``skip_reason``. ``table == "host"``:
        ``seq_len``, ``segments``, ``host_ms``, ``device_first_ms``, ``device_warm_ms``
        (``{median, min, max, samples}``, ms), ``first_over_host``, ``warm_over_host``,
        ``programs_first_call``, ``programs_host`` and ``matches_device``. Every record holds
        ``thdkit_version`` and ``jax_version``.

    Example:
        >>> config = CompileBench(entries=("metadata", "metadata-host"), entry_seq_len=64,
        ...                       entry_segments=4, seq_lens=(64,), segments=(4,),
        ...                       compile_samples=1, repeats=1, warmup=0)
        >>> [(r["table"], r.get("entry"), r.get("programs_repeated_shape"), r.get("programs_host"))
        ...  for r in run_compile_bench(config)]  # doctest: +NORMALIZE_WHITESPACE
        [('entry', 'metadata', 0, None), ('entry', 'metadata-host', 0, None),
         ('host', None, None, 0)]
    """
    rng = np.random.default_rng(config.seed)
    records: list[dict[str, Any]] = []
    for name in config.entries:
        callbacks.step(f"compile: {name}")
        records.append(_measure_entry(name, config, rng))
        callbacks.cell_done()
    for seq_len in config.seq_lens:
        for segments in config.segments:
            if segments <= seq_len:
                callbacks.step(f"compile: host vs device, T={seq_len}, S={segments}")
                records.append(_host_vs_device(config, rng, seq_len, segments))
            callbacks.cell_done()
    return records
