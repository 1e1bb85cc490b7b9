"""What every benchmark shares: its options, static plans, interleaved latency, memory budget.

A benchmark program goes through three steps:

1. :func:`plan` lowers and compiles a jitted program ahead of time from shapes alone
   (``jax.ShapeDtypeStruct``), so even a program far too big to run yields its static cost:
   argument, output and scratch ("temp") bytes from ``memory_analysis()`` and flops / bytes
   accessed from ``cost_analysis()``. A compile that fails or outlasts its time limit gives a skip
   reason.
2. :func:`run_plans` runs the plans whose bytes fit comfortably in the memory free now
   (:func:`memory_budget_bytes`: half of what is available unless a limit is given) ...
3. ... round-robin in one process (:func:`interleaved_latency`), so that load from other
   processes and frequency changes spread evenly over all of them.

Every record of every benchmark holds ``latency_ms`` (:class:`LatencyStats` as a dict, or None)
and ``skip_reason`` (None when it ran).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from rich.table import Table

__all__ = [
    "BenchConfig",
    "Column",
    "ConfigError",
    "LatencyStats",
    "Plan",
    "environment",
    "format_bytes",
    "interleaved_latency",
    "memory_budget_bytes",
    "memory_bytes",
    "pending_compiles",
    "plan",
    "run_plans",
    "table",
    "write_json",
]

_COMPILE_THREAD = "thdkit-compile"


class ConfigError(ValueError):
    """A benchmark option out of range; ``field`` names the option.

    Example:
        >>> ConfigError("seed", "must be >= 0, got -1")
        ConfigError('seed must be >= 0, got -1')
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field} {message}")
        self.field = field


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """The options every benchmark has.

    Attributes:
        batch: B, rows per batch.
        seed: seed of the random layouts and inputs.
        warmup: untimed runs per program.
        repeats: most timed runs per program.
        time_per_program_s: rough seconds of timed runs per program; slow programs stop early
            (after three runs at least).
    """

    batch: int = 1
    seed: int = 0
    warmup: int = 1
    repeats: int = 10
    time_per_program_s: float = 1.0

    def __post_init__(self) -> None:
        self._at_least(1, "batch", "repeats")
        self._at_least(0, "seed", "warmup")
        self._positive("time_per_program_s")

    def _at_least(self, low: int, *fields: str) -> None:
        """Raises ConfigError unless each field (each item of a tuple) is an int >= low; None
        passes."""
        for field in fields:
            values = getattr(self, field)
            many = isinstance(values, tuple)
            for item in values if many else () if values is None else (values,):
                if isinstance(item, bool) or not isinstance(item, (int, np.integer)) or item < low:
                    kind = "integers" if many else "an integer"
                    raise ConfigError(field, f"must be {kind} >= {low}, got {values!r}")
            if values == ():
                raise ConfigError(field, "must hold at least one value, got none")

    def _positive(self, *fields: str) -> None:
        """Raises ConfigError unless each field is a number > 0."""
        for field in fields:
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(field, f"must be a number > 0, got {value!r}")

    def _among(self, field: str, valid: Sequence[str]) -> None:
        """Raises ConfigError unless ``field`` is a non-empty tuple of names from ``valid``."""
        names = getattr(self, field)
        unknown = [name for name in names if name not in valid]
        if unknown or not names:
            raise ConfigError(field, f"must be among {', '.join(valid)}, got {list(names)}")


class Plan(NamedTuple):
    """What compilation alone says about one program.

    Attributes:
        executable: the compiled program (call it with arrays of the planned shapes), or None.
        arg_bytes, output_bytes, temp_bytes: bytes of the arguments, outputs and scratch.
        alias_bytes: output bytes that reuse argument buffers (counted once in ``total_bytes``).
        flops, bytes_accessed, transcendentals: XLA's cost analysis (XLA counts integer operations
            as flops), None where not reported.
        compile_s: seconds spent lowering and compiling.
        skip_reason: None if compiled, else why not (time limit, compile error).
    """

    executable: Any
    arg_bytes: int | None
    output_bytes: int | None
    temp_bytes: int | None
    alias_bytes: int | None
    flops: float | None
    bytes_accessed: float | None
    transcendentals: float | None
    compile_s: float | None
    skip_reason: str | None

    @property
    def total_bytes(self) -> int | None:
        """Arguments + outputs + scratch (aliased bytes once): what running the program needs."""
        parts = (self.arg_bytes, self.output_bytes, self.temp_bytes)
        return None if None in parts else sum(parts) - (self.alias_bytes or 0)

    @classmethod
    def skipped(cls, reason: str, *, compile_s: float | None = None) -> Plan:
        """A plan holding only a skip reason, e.g. ``"not compiled: needs ~1.0 TiB"``."""
        return cls(None, None, None, None, None, None, None, None, compile_s, reason)

    def fields(self) -> dict[str, Any]:
        """The record fields of the plan: sizes, costs and compile seconds (JSON-ready).

        Example:
            >>> sorted(Plan.skipped("no").fields())[:3]
            ['arg_bytes', 'bytes_accessed', 'compile_s']
        """
        fields = self._asdict()
        del fields["executable"], fields["alias_bytes"], fields["skip_reason"]
        return fields | {"total_bytes": self.total_bytes}


class LatencyStats(NamedTuple):
    """Wall time of one program over interleaved runs, in milliseconds: a record's ``latency_ms``.

    Attributes:
        median: median over the timed runs (the figure to compare).
        min: fastest run.
        max: slowest run.
        samples: number of timed runs.
    """

    median: float
    min: float
    max: float
    samples: int


def _cost_entry(cost: Any) -> Mapping[str, float]:
    """``cost_analysis()`` is a dict in recent JAX and a list of per-module dicts in older ones."""
    if isinstance(cost, Mapping):
        return cost
    if isinstance(cost, Sequence) and cost and isinstance(cost[0], Mapping):
        return cost[0]
    return {}


def _plan_from_executable(executable: Any, compile_s: float) -> Plan:
    memory = executable.memory_analysis()
    try:
        costs = _cost_entry(executable.cost_analysis())
    except Exception:  # Some backends do not implement cost analysis at all.
        costs = {}

    def size(name: str) -> int | None:
        value = getattr(memory, f"{name}_size_in_bytes", None)
        return None if value is None else int(value)

    def cost(key: str) -> float | None:
        value = costs.get(key)
        return None if value is None or value < 0 else float(value)

    return Plan(
        executable,
        *map(size, ("argument", "output", "temp", "alias")),
        *map(cost, ("flops", "bytes accessed", "transcendentals")),
        compile_s,
        None,
    )


def plan(
    fn: Callable[..., Any], *args: Any, compile_timeout_s: float | None = 60.0, **static: Any
) -> Plan:
    """Lowers and compiles ``jax.jit(fn)`` ahead of time and reads its static costs.

    Compilation runs in a daemon thread: when it outlasts ``compile_timeout_s`` the plan is
    skipped and the thread is abandoned (XLA compilation cannot be interrupted; the thread ends on
    its own or with the process), so a benchmark never hangs on one program.

    Args:
        fn: the program; called as ``fn(*args, **static)``.
        *args: arrays or ``jax.ShapeDtypeStruct`` (arrays are replaced by their shape and dtype,
            so nothing is allocated to plan a huge program).
        compile_timeout_s: seconds to wait for lowering + compilation; None waits forever.
        **static: keyword arguments bound as Python constants (static under jit).

    Returns:
        :class:`Plan`; its ``skip_reason`` says ``"not compiled: compile exceeded ..."``,
        ``"not supported: ..."`` (the program raised NotImplementedError) or
        ``"compile failed: ..."`` when there is no executable.

    Example:
        >>> import jax.numpy as jnp
        >>> p = plan(jnp.sum, jax.ShapeDtypeStruct((1024,), jnp.float32))
        >>> p.arg_bytes, p.skip_reason
        (4096, None)
    """
    specs = [jax.ShapeDtypeStruct(np.shape(a), a.dtype) if hasattr(a, "dtype") else a for a in args]
    jitted = jax.jit(lambda *xs: fn(*xs, **static))
    outcome: dict[str, Any] = {}

    def compile_now() -> None:
        try:
            outcome["executable"] = jitted.lower(*specs).compile()
        except BaseException as error:  # Reported as a skip reason, never raised.
            outcome["error"] = error

    start = time.perf_counter()
    worker = threading.Thread(target=compile_now, name=_COMPILE_THREAD, daemon=True)
    worker.start()
    worker.join(compile_timeout_s)
    elapsed = time.perf_counter() - start
    if worker.is_alive():
        return Plan.skipped(
            f"not compiled: compile exceeded {compile_timeout_s:g} s", compile_s=elapsed
        )
    if "error" in outcome:
        error = outcome["error"]
        lines = str(error).strip().splitlines()
        first = f"{type(error).__name__}: {lines[0] if lines else ''}"[:200]
        kind = "not supported" if isinstance(error, NotImplementedError) else "compile failed"
        return Plan.skipped(f"{kind}: {first}", compile_s=elapsed)
    return _plan_from_executable(outcome["executable"], elapsed)


def pending_compiles() -> int:
    """How many compilations abandoned by :func:`plan` are still running.

    XLA aborts the process when the interpreter shuts down under a compile in flight, so a command
    line that saw a compile time out ends with ``os._exit`` while this is non-zero.

    Returns:
        the number of live compile threads.
    """
    return sum(t.name == _COMPILE_THREAD and t.is_alive() for t in threading.enumerate())


def _time_once(fn: Callable[..., Any], args: Sequence[Any]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return (time.perf_counter() - start) * 1e3


def interleaved_latency(
    fns: Mapping[str, Callable[..., Any]],
    args_per_fn: Mapping[str, Sequence[Any]],
    *,
    warmup: int = 2,
    repeats: int = 20,
    min_repeats: int = 3,
    budget_s: float | None = None,
) -> dict[str, LatencyStats]:
    """Times several programs round-robin, in one process, after warm-up.

    Each round runs every program that still needs samples once, in an order rotated from round to
    round, so drift (other processes, clock changes) lands on all of them alike. With a budget,
    a slow program stops after ``max(min_repeats, budget_s / its warm-up time)`` samples while the
    fast ones keep going up to ``repeats``.

    Args:
        fns: name -> callable (e.g. a :attr:`Plan.executable`).
        args_per_fn: name -> positional arguments for that callable (device arrays).
        warmup: untimed calls per program first (at least one; one only for a program slower
            than ``budget_s``).
        repeats: most timed calls per program.
        min_repeats: fewest timed calls per program when a budget cuts it short.
        budget_s: seconds of timed calls per program, roughly; None means always ``repeats``.

    Returns:
        name -> :class:`LatencyStats`, in milliseconds, for every name of ``fns``.

    Example:
        >>> import jax.numpy as jnp
        >>> fns, args = {"sum": jax.jit(jnp.sum)}, {"sum": (jnp.ones(8),)}
        >>> stats = interleaved_latency(fns, args, repeats=3)
        >>> stats["sum"].samples
        3
    """
    names = list(fns)
    last_ms = {name: _time_once(fns[name], args_per_fn[name]) for name in names}
    for _ in range(warmup - 1):
        for name in names:
            # A program slower than its whole budget is warm after one call.
            if budget_s is None or last_ms[name] < budget_s * 1e3:
                last_ms[name] = _time_once(fns[name], args_per_fn[name])
    wanted = dict.fromkeys(names, repeats)
    if budget_s is not None:
        for name in names:
            affordable = int(budget_s * 1e3 / max(last_ms[name], 1e-3))
            wanted[name] = max(min(min_repeats, repeats), min(repeats, affordable))
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(max(wanted.values(), default=0)):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            if len(samples[name]) < wanted[name]:
                samples[name].append(_time_once(fns[name], args_per_fn[name]))
    return {
        name: LatencyStats(statistics.median(times), min(times), max(times), len(times))
        for name, times in samples.items()
    }


def run_plans(
    plans: Mapping[str, Plan],
    args_per_plan: Mapping[str, Sequence[Any]],
    config: BenchConfig,
    *,
    budget_bytes: int,
) -> dict[str, tuple[str | None, dict[str, Any] | None]]:
    """Times the plans that compiled and fit the budget, interleaved; says why the others did not.

    Args:
        plans: name -> :class:`Plan`.
        args_per_plan: name -> the device arrays to call its executable with.
        config: warm-up, repeats and time per program.
        budget_bytes: a plan needing more (``total_bytes``) is ``"not run"``.

    Returns:
        name -> ``(skip_reason, latency_ms)``: ``(None, LatencyStats as a dict)`` for a program
        that ran, else ``(reason, None)``.

    Example:
        >>> import jax.numpy as jnp
        >>> spec = jax.ShapeDtypeStruct((256,), jnp.float32)
        >>> out = run_plans({"sum": plan(jnp.sum, spec)}, {"sum": (jnp.ones(256),)},
        ...                 BenchConfig(repeats=2), budget_bytes=16)
        >>> out["sum"]
        ('not run: needs 1.0 KiB (budget 16 B)', None)
    """
    reasons = {}
    for name, planned in plans.items():
        needs = planned.total_bytes
        reasons[name] = planned.skip_reason or (
            None
            if needs is not None and needs <= budget_bytes
            else f"not run: needs {format_bytes(needs)} (budget {format_bytes(budget_bytes)})"
        )
    runnable = [name for name in plans if reasons[name] is None]
    stats = {}
    if runnable:
        stats = interleaved_latency(
            {name: plans[name].executable for name in runnable},
            args_per_plan,
            warmup=config.warmup,
            repeats=config.repeats,
            budget_s=config.time_per_program_s,
        )
    return {
        name: (reasons[name], stats[name]._asdict() if name in stats else None) for name in plans
    }


def _meminfo_bytes(field: str) -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_bytes(*, total: bool = False, device: Any | None = None) -> int:
    """Memory free for a new program now (or all of it): the accelerator's, else the host's.

    Args:
        total: the device's whole memory instead of what is free now.
        device: a JAX device; None means ``jax.devices()[0]``.

    Returns:
        bytes; from ``device.memory_stats()`` when the device reports it, else ``MemAvailable``
        (``MemTotal``) of ``/proc/meminfo``, else the free (all) physical pages.

    Example:
        >>> 0 < memory_bytes() <= memory_bytes(total=True)
        True
    """
    try:
        stats = (device or jax.devices()[0]).memory_stats()
    except Exception:  # CPU devices and some plugins do not report memory stats.
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - (0 if total else int(stats.get("bytes_in_use", 0)))
    from_meminfo = _meminfo_bytes("MemTotal" if total else "MemAvailable")
    if from_meminfo is not None:
        return from_meminfo
    pages = os.sysconf("SC_PHYS_PAGES" if total else "SC_AVPHYS_PAGES")
    return pages * os.sysconf("SC_PAGE_SIZE")


def memory_budget_bytes(*, limit_bytes: int | None = None, fraction: float = 0.5) -> int:
    """The bytes a program may need and still run comfortably.

    Args:
        limit_bytes: an explicit budget (wins when given; tests pass 1 to force "not run").
        fraction: share of the memory available now, leaving headroom for the inputs, the other
            programs and everything else on the machine.

    Returns:
        bytes.

    Example:
        >>> memory_budget_bytes(limit_bytes=2**30)
        1073741824
    """
    return int(limit_bytes) if limit_bytes is not None else int(fraction * memory_bytes())


def format_bytes(num_bytes: float | None) -> str:
    """Human-readable binary size, e.g. ``"16.0 GiB"``; ``"-"`` for None.

    Example:
        >>> format_bytes(3 * 2**30), format_bytes(512), format_bytes(None)
        ('3.0 GiB', '512 B', '-')
    """
    if num_bytes is None:
        return "-"
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    exponent = 0 if num_bytes < 1024 else min(int(math.log(num_bytes, 1024)), len(units) - 1)
    if exponent == 0:
        return f"{num_bytes:.0f} B"
    return f"{num_bytes / 1024**exponent:.1f} {units[exponent]}"


def environment() -> dict[str, Any]:
    """Where the numbers were measured: versions, backend, device, CPUs, memory, date.

    Returns:
        a JSON-ready dict.
    """
    import jaxlib  # Imported here: only the report needs jaxlib's own version.

    try:
        usable_cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # Not on Linux.
        usable_cpus = os.cpu_count()
    return {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "memory_total_bytes": memory_bytes(total=True),
        "memory_available_bytes": memory_bytes(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


class Column(NamedTuple):
    """One column of a report table.

    Attributes:
        header: the column's title.
        value: a record key, or a function of the record.
        fmt: shows a value that is not None (None shows as ``-``).
        justify: "right" or "left".
    """

    header: str
    value: str | Callable[[Mapping[str, Any]], Any]
    fmt: Callable[[Any], str] = str
    justify: str = "right"


def table(
    title: str,
    columns: Sequence[Column],
    records: Iterable[Mapping[str, Any]],
    *,
    section: Callable[[Mapping[str, Any]], Any] | None = None,
    caption: str | None = None,
) -> Table:
    """The one table builder of the benchmarks: a row per record, a column per :class:`Column`.

    Args:
        title: shown above the table.
        columns: what each column shows.
        records: one row each, in order.
        section: a new section starts where this key of the record changes.
        caption: shown below the table.

    Returns:
        a rich table.

    Example:
        >>> t = table("T", [Column("n", "n"), Column("x", "x", "{:.1f}".format)],
        ...           [{"n": 1, "x": 0.25}, {"n": 2, "x": None}])
        >>> t.row_count, list(t.columns[1].cells)
        (2, ['0.2', '-'])
    """
    rich_table = Table(title=title, title_justify="left", header_style="bold", caption=caption)
    for column in columns:
        rich_table.add_column(column.header, justify=column.justify)  # type: ignore[arg-type]
    previous = None
    for index, record in enumerate(records):
        key = section(record) if section is not None else None
        if index and key != previous:
            rich_table.add_section()
        previous = key
        values = [c.value(record) if callable(c.value) else record[c.value] for c in columns]
        cells = ["-" if v is None else c.fmt(v) for c, v in zip(columns, values, strict=True)]
        rich_table.add_row(*cells)
    return rich_table


def write_json(
    path: Path | str,
    *,
    benchmark: str,
    config: BenchConfig,
    environment: Mapping[str, Any],
    records: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any] | None = None,
) -> None:
    """Writes one benchmark's report as indented JSON, the same top-level keys for every benchmark.

    Args:
        path: where to write.
        benchmark: "metadata", "attention" or "ring".
        config: the options the records came from.
        environment: :func:`environment`.
        records: one JSON-ready dict per measured program, each with ``latency_ms`` and
            ``skip_reason``.
        summary: figures derived from the records (e.g. the metadata benchmark's growth).
    """
    document = {
        "benchmark": benchmark,
        "config": dataclasses.asdict(config),
        "environment": dict(environment),
        "summary": dict(summary or {}),
        "records": list(records),
    }
    Path(path).write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
