"""What every benchmark shares: options and their checks, static plans, interleaved latency, tables.

A program is planned (compiled ahead of time from shapes alone, so even one far too big to run
reports its bytes and XLA's cost analysis), then run only if it fits the memory budget,
round-robin with the other programs of its cell so that load from other processes lands on all
alike. Every record holds ``latency_ms`` (``{median, min, max, samples}``, ms) and
``skip_reason`` (None when it ran).
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import math
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import numpy as np
from rich.table import Table

from thdkit._src.limits import MAX_SEGMENTS, MAX_SEQ_LEN
from thdkit._src.mask_types import MaskType
from thdkit.bench.units import format_bytes

__all__ = ["LIMITS", "MAX_RANKS", "BenchConfig", "Callbacks"]

Options = dict[str, tuple[str | None, Any]]
Plan = tuple[Any, dict[str, Any]]  # The compiled program (None if skipped), its record fields.
_COMPILE_THREAD = "thdkit-compile"
_PLAN_FIELDS = ("arg_bytes", "output_bytes", "temp_bytes", "flops", "bytes_accessed")
_PLAN_FIELDS += ("transcendentals", "compile_s", "total_bytes")


class Callbacks(NamedTuple):
    """What a benchmark's ``run_*`` function reports as it goes (the CLI draws its progress bar).

    Attributes:
        step: called with a short progress line before each stage.
        cell_done: called after each cell of the benchmark's grid (its unit of progress).
    """

    step: Callable[[str], None] = lambda _: None
    cell_done: Callable[[], None] = lambda: None


SILENT = Callbacks()
"""Callbacks that report nothing: the default of every ``run_*`` function."""

MAX_RANKS = 256
"""The most context-parallel ranks a benchmark takes: the ring and cp benchmarks count the work of
every (rank, ring step) pair on the host (cp² counts) and simulate cp devices on a CPU."""

LIMITS: dict[str, tuple[float, str]] = {
    "seq_lens": (MAX_SEQ_LEN, "thdkit.MAX_SEQ_LEN"),
    "seq_len": (MAX_SEQ_LEN, "thdkit.MAX_SEQ_LEN"),
    "max_segments": (MAX_SEGMENTS, "thdkit.MAX_SEGMENTS"),
    "segments": (MAX_SEGMENTS, "thdkit.MAX_SEGMENTS"),
    "block_q": (MAX_SEQ_LEN, "thdkit.MAX_SEQ_LEN"),
    "block_kv": (MAX_SEQ_LEN, "thdkit.MAX_SEQ_LEN"),
    "stripe_sizes": (MAX_SEQ_LEN, "thdkit.MAX_SEQ_LEN"),
    "stripe_size": (MAX_SEQ_LEN, "thdkit.MAX_SEQ_LEN"),
    "cp": (MAX_RANKS, "thdkit.bench.measure.MAX_RANKS"),
    "cps": (MAX_RANKS, "thdkit.bench.measure.MAX_RANKS"),
    "time_per_program_s": (threading.TIMEOUT_MAX, "threading.TIMEOUT_MAX"),
    "compile_timeout_s": (threading.TIMEOUT_MAX, "threading.TIMEOUT_MAX"),
}
"""The largest value of each option that has one (the library's limits: a row holds at most
``thdkit.MAX_SEQ_LEN`` tokens and ``thdkit.MAX_SEGMENTS`` documents; a wait at most
``threading.TIMEOUT_MAX`` seconds), by field name: every config checks those of its fields."""

# What a benchmark holds on the host for its largest cell, roughly and from above: the layout
# (ids, positions, lengths and their temporaries) per token, and q, k, v (drawn, then converted)
# per token and feature (H * D).
_HOST_BYTES_PER_TOKEN = 64
_HOST_BYTES_PER_FEATURE = 24


def checked(value: Any, rule: Any) -> Any:
    """``value`` (made canonical) if it keeps ``rule``, else ValueError. An int n wants ints >= n
    or None, a float finite numbers > 0, a tuple of names one of them; a function checks and
    returns the value. A tuple ``value`` must be non-empty, each item keeping the rule; the error
    shows the first item that does not, not the tuple."""
    many = isinstance(value, tuple)
    items = value if many else (value,)
    if many and not value:
        raise ValueError("must hold at least one value, got none")
    if callable(rule):
        return rule(value)
    whole = lambda v: isinstance(v, int | np.integer) and not isinstance(v, bool)  # noqa: E731
    number = lambda v: whole(v) or isinstance(v, float | np.floating)  # noqa: E731
    if value is None and isinstance(rule, int):
        return value
    if isinstance(rule, tuple):
        keeps, want = (lambda v: v in rule), f"among {', '.join(rule)}"
    elif isinstance(rule, float):
        keeps = lambda v: number(v) and math.isfinite(v) and v > 0  # noqa: E731
        want = "a finite number > 0"
    else:
        keeps = lambda v: whole(v) and v >= rule  # noqa: E731
        want = f"{'integers' if many else 'an integer'} >= {rule}"
    bad = [v for v in items if not keeps(v)]
    if bad:
        raise ValueError(f"must be {want}, got {bad[0]!r}")
    return value


def mask_names(value: Any) -> Any:
    """A rule: a mask type name (or a tuple of them), made canonical."""
    if isinstance(value, tuple):
        return tuple(MaskType.parse(name).value for name in value)
    return MaskType.parse(value).value


def _items(value: Any) -> tuple[Any, ...]:
    """The values of an option: its items if it takes a list, else itself."""
    return value if isinstance(value, tuple) else (value,)


class ConfigError(ValueError):
    """A benchmark option out of range; ``field`` names the option, ``message`` says why."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """The options every benchmark has.

    ``OPTIONS`` documents each option (its help text; None: not on the command line) and gives
    its rule (see :func:`checked`); every value is checked when the config is made.

    Raises:
        ConfigError: a ``ValueError`` naming the option that is out of range.

    Example:
        >>> BenchConfig(seed=-1)
        Traceback (most recent call last):
        ...
        thdkit.bench.measure.ConfigError: seed: must be an integer >= 0, got -1
    """

    OPTIONS: ClassVar[Options] = {
        "batch": ("B, rows per batch.", 1),
        "seed": ("Seed of the random layouts and inputs.", 0),
        "warmup": ("Untimed runs per program.", 0),
        "repeats": ("Most timed runs per program.", 1),
        "time_per_program_s": ("Seconds of timed runs per program (at least 3 runs).", 0.0),
    }
    batch: int = 1
    seed: int = 0
    warmup: int = 1
    repeats: int = 10
    time_per_program_s: float = 1.0

    def __post_init__(self) -> None:
        for name, (_, rule) in self.OPTIONS.items():
            try:
                if rule is not None:
                    object.__setattr__(self, name, checked(getattr(self, name), rule))
            except (ValueError, TypeError) as error:
                raise ConfigError(name, str(error)) from None
        for name, (limit, source) in LIMITS.items():
            bad = [v for v in _items(getattr(self, name, None)) if v is not None and v > limit]
            if bad:
                shown = f"{limit:g}" if isinstance(limit, float) else f"{limit:,}"
                raise ConfigError(name, f"must be at most {shown} ({source}), got {bad[0]!r}")
        for name, keeps, rule in self._relations():
            bad = [v for v in _items(getattr(self, name)) if not keeps(v)]
            if bad:
                raise ConfigError(name, f"must be {rule}, got {bad[0]!r}")
        self._check_host_memory()

    def _relations(self) -> list[tuple[str, Callable[[Any], bool], str]]:
        """Checks between options: (option, whether one of its values keeps the rule, the rule);
        an error names the first value of the option that does not."""
        return []

    def host_input_bytes(self) -> int | None:
        """Roughly (from above) the bytes of the inputs a run holds on the host for its largest
        cell: B rows of the longest T, a layout per token and, with heads and a head dim, q, k
        and v. None for a config without a token axis."""
        lengths = getattr(self, "seq_lens", None) or (getattr(self, "seq_len", None),)
        if lengths[0] is None:
            return None
        features = getattr(self, "heads", 0) * getattr(self, "head_dim", 0)
        tokens = self.batch * max(lengths)
        return tokens * (_HOST_BYTES_PER_TOKEN + _HOST_BYTES_PER_FEATURE * features)

    def _check_host_memory(self) -> None:
        """ConfigError where the inputs cannot fit in host memory (the process would be killed
        drawing them, before any plan could say so), on the factor furthest above its default."""
        needed, total = self.host_input_bytes(), host_memory_bytes(total=True)
        if needed is None or needed <= total:
            return
        tokens = "seq_lens" if hasattr(self, "seq_lens") else "seq_len"
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        factors = {
            key: (max(value) if isinstance(value, tuple) else value)
            for key in (tokens, "batch", "heads", "head_dim")
            if (value := getattr(self, key, None)) is not None
        }

        def growth(key: str) -> float:
            default = defaults.get(key)
            default = max(default) if isinstance(default, tuple) and default else default
            return factors[key] / max(default if isinstance(default, int) else 1, 1)

        shape = ", ".join(f"{key}={value}" for key, value in factors.items())
        grown = [key for key in factors if growth(key) > 1]  # Else blame the token axis.
        raise ConfigError(
            max(grown, key=growth) if grown else tokens,
            f"the inputs ({shape}) need about {format_bytes(needed)} of host memory, more than "
            f"this machine has ({format_bytes(total)}); lower seq_len, batch, heads or head_dim",
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlanConfig(BenchConfig):
    """The options of the benchmarks that plan programs over several T."""

    OPTIONS: ClassVar[Options] = {
        **BenchConfig.OPTIONS,
        "seq_lens": ("T, tokens per row: one or more, comma-separated; k/M suffixes ok.", 1),
        "compile_timeout_s": ("Seconds a compile may take before it is skipped.", 0.0),
        "memory_limit_bytes": (
            "Run budget in bytes, e.g. 10GiB; plans above it are 'not run'. "
            "\\[default: half the free memory]",
            1,
        ),
    }
    seq_lens: tuple[int, ...] = ()
    compile_timeout_s: float = 60.0
    memory_limit_bytes: int | None = None


SHAPE_OPTIONS: Options = {
    "segments": ("Documents per row n (ids 1..n, S = n): one or more, comma-separated.", 1),
    "heads": ("H, query and key/value heads.", 1),
    "head_dim": ("D, head dim.", 1),
}


def skipped(reason: str, compile_s: float | None = None) -> Plan:
    """A plan that holds only why there is no program."""
    return None, dict.fromkeys(_PLAN_FIELDS) | {"compile_s": compile_s, "skip_reason": reason}


def plan(fn: Callable[..., Any], *args: Any, compile_timeout_s: float, **static: Any) -> Plan:
    """Compiles ``jax.jit(fn)`` for the shapes of ``args`` in a thread abandoned at the timeout."""
    specs = [jax.ShapeDtypeStruct(np.shape(a), a.dtype) for a in args]
    jitted = jax.jit(lambda *xs: fn(*xs, **static))
    outcome: dict[str, Any] = {}
    x64 = bool(jax.config.jax_enable_x64)  # A jax.enable_x64 context is this thread's only.

    def compile_now() -> None:
        try:
            with jax.enable_x64(x64):
                outcome["executable"] = jitted.lower(*specs).compile()
        except BaseException as error:  # Reported as a skip reason, never raised.
            outcome["error"] = error

    start = time.perf_counter()
    worker = threading.Thread(target=compile_now, name=_COMPILE_THREAD, daemon=True)
    worker.start()
    worker.join(compile_timeout_s)
    elapsed = time.perf_counter() - start
    if worker.is_alive():  # XLA compiles cannot be interrupted; the thread ends on its own.
        return skipped(f"not compiled: compile exceeded {compile_timeout_s:g} s", elapsed)
    if "error" in outcome:
        error = outcome["error"]
        kind = "not supported" if isinstance(error, NotImplementedError) else "compile failed"
        first = (str(error).strip().splitlines() or [""])[0]
        return skipped(f"{kind}: {type(error).__name__}: {first}"[:200], elapsed)
    executable = outcome["executable"]
    memory = executable.memory_analysis()
    try:
        costs = executable.cost_analysis() or {}
    except Exception:  # Some backends have no cost analysis.
        costs = {}
    costs = costs if isinstance(costs, Mapping) else costs[0]  # A list in older JAX.
    sizes = [getattr(memory, f"{k}_size_in_bytes", None) for k in ("argument", "output", "temp")]
    fields = dict(zip(_PLAN_FIELDS, [None if s is None else int(s) for s in sizes], strict=False))
    for key in ("flops", "bytes accessed", "transcendentals"):
        value = costs.get(key)
        fields[key.replace(" ", "_")] = None if value is None or value < 0 else float(value)
    aliased = getattr(memory, "alias_size_in_bytes", 0) or 0  # Outputs reusing argument buffers.
    total = None if None in sizes else sum(sizes) - aliased
    return executable, fields | {"compile_s": elapsed, "total_bytes": total, "skip_reason": None}


def pending_compiles() -> int:
    """Compiles abandoned by :func:`plan` still running (XLA aborts the shutdown under one)."""
    return sum(t.name == _COMPILE_THREAD and t.is_alive() for t in threading.enumerate())


def interleaved_latency(
    fns: Mapping[Any, Callable[..., Any]], args: Mapping[Any, Sequence[Any]], config: BenchConfig
) -> dict[Any, dict[str, float]]:
    """Times programs round-robin (the order rotating every round) after warm-up, each up to
    ``config.repeats`` times or about ``config.time_per_program_s`` seconds, at least 3 times."""

    def once(name: Any) -> float:
        start = time.perf_counter()
        jax.block_until_ready(fns[name](*args[name]))
        return (time.perf_counter() - start) * 1e3

    names, budget_ms, repeats = list(fns), config.time_per_program_s * 1e3, config.repeats
    last = {name: once(name) for name in names}
    for _ in range(config.warmup - 1):  # A program slower than its budget is warm after one call.
        last |= {name: once(name) for name in names if last[name] < budget_ms}
    affordable = {name: int(budget_ms / max(last[name], 1e-3)) for name in names}
    wanted = {name: max(min(3, repeats), min(repeats, affordable[name])) for name in names}
    times: dict[Any, list[float]] = {name: [] for name in names}
    for round_index in range(max(wanted.values(), default=0)):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            if len(times[name]) < wanted[name]:
                times[name].append(once(name))
    return {
        name: {"median": statistics.median(t), "min": min(t), "max": max(t), "samples": len(t)}
        for name, t in times.items()
    }


def run_plans(
    plans: Mapping[Any, Plan], args: Sequence[Any], config: BenchConfig, limit: int | None
) -> dict[Any, dict[str, Any]]:
    """Each plan's record fields with ``latency_ms``: the plans that compiled and fit the budget
    (``limit`` bytes, else half the memory free now) are timed together on ``args``."""
    budget = limit or memory_bytes() // 2
    records = {name: dict(fields) for name, (_, fields) in plans.items()}
    for record in records.values():
        needs = record["total_bytes"]
        if record["skip_reason"] is None and (needs is None or needs > budget):
            too_big = f"needs {format_bytes(needs)} (budget {format_bytes(budget)})"
            record["skip_reason"] = f"not run: {too_big}"
    runnable = {n: plans[n][0] for n, record in records.items() if record["skip_reason"] is None}
    latency = interleaved_latency(runnable, dict.fromkeys(runnable, args), config)
    return {name: record | {"latency_ms": latency.get(name)} for name, record in records.items()}


def memory_bytes(*, total: bool = False) -> int:
    """Memory free now (or all of it): the accelerator's if it says, else the host's."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # CPU devices and some plugins report nothing.
        stats = {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - (0 if total else int(stats.get("bytes_in_use", 0)))
    return host_memory_bytes(total=total)


def host_memory_bytes(*, total: bool = False) -> int:
    """The host's memory free now (or all of it); never starts JAX's backends (the ring and cp
    commands set the simulated device count after checking their options)."""
    key = "MemTotal:" if total else "MemAvailable:"
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith(key))
    except (OSError, StopIteration):
        pages = os.sysconf("SC_PHYS_PAGES" if total else "SC_AVPHYS_PAGES")
        return pages * os.sysconf("SC_PAGE_SIZE")


def median(record: Mapping[str, Any]) -> float | None:
    """A record's median latency in ms, or None."""
    return (record.get("latency_ms") or {}).get("median")


PEERS = ("ejkernel", "tokamax")
"""The peer libraries a benchmark may time next to thdkit (imported only when they run)."""


def peer_versions() -> dict[str, str]:
    """The versions of the peers imported in this process, i.e. of those that ran.

    Returns:
        ``{name: version}``, empty when no peer was imported.
    """
    versions = {}
    for name in PEERS:
        if sys.modules.get(name) is not None:  # None: an import blocked (or failed) on purpose
            try:
                versions[name] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                versions[name] = str(getattr(sys.modules[name], "__version__", "unknown"))
    return versions


def environment() -> dict[str, Any]:
    """Where the numbers were measured: versions (thdkit, jax, jaxlib, the peers imported so
    far), backend, device, CPUs, memory, date."""
    import jaxlib  # Only the report needs jaxlib's own version.

    from thdkit import __version__

    return {
        "thdkit": __version__,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "memory_total_bytes": memory_bytes(total=True),
        "memory_available_bytes": memory_bytes(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "peers": peer_versions(),
    }


def table(
    title: str,
    columns: Sequence[tuple[Any, ...]],
    records: Iterable[Mapping[str, Any]],
    *,
    section: Callable[[Mapping[str, Any]], Any] = lambda _: None,
    caption: str | None = None,
) -> Table:
    """The one table builder: a row per record, a column per ``(header, record key or function,
    format = str, justify = "right")`` (None shows as ``-``), a new section where ``section``
    changes."""
    columns = [(*column, *(str, "right")[len(column) - 2 :]) for column in columns]
    rich_table = Table(title=title, title_justify="left", header_style="bold", caption=caption)
    for header, _, _, justify in columns:
        rich_table.add_column(header, justify=justify)
    previous = None
    for index, record in enumerate(records):
        if index and section(record) != previous:
            rich_table.add_section()
        previous = section(record)
        values = [(v(record) if callable(v) else record[v], fmt) for _, v, fmt, _ in columns]
        rich_table.add_row(*("-" if value is None else fmt(value) for value, fmt in values))
    return rich_table
