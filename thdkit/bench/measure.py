"""Measurement helpers shared by every benchmark: static plans, interleaved latency, memory budget.

A benchmark cell goes through three steps:

1. :func:`plan` lowers and compiles a jitted program ahead of time from shapes alone
   (``jax.ShapeDtypeStruct``), so even a cell far too big to run yields its static cost: argument,
   output and scratch ("temp") bytes from ``memory_analysis()`` and flops / bytes accessed from
   ``cost_analysis()``. A compile that fails or outlasts its time limit gives a skip reason.
2. :func:`fits_in_budget` decides whether the plan's bytes fit comfortably in the memory free now
   (:func:`memory_budget_bytes`: half of what is available unless a limit is given).
3. :func:`interleaved_latency` runs the programs that fit round-robin in one process, so that
   load from other processes and frequency changes spread evenly over all of them, and reports
   median / min / max wall time per program.
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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

__all__ = [
    "LatencyStats",
    "Plan",
    "available_memory_bytes",
    "environment",
    "fits_in_budget",
    "format_bytes",
    "interleaved_latency",
    "memory_budget_bytes",
    "pending_compiles",
    "plan",
    "total_memory_bytes",
    "write_report",
]


_COMPILE_THREAD = "thdkit-compile"


class Plan(NamedTuple):
    """What compilation alone says about one program.

    Attributes:
        executable: the compiled program (call it with arrays of the planned shapes), or None when
            it was not compiled.
        arg_bytes: bytes of the arguments.
        output_bytes: bytes of the outputs.
        temp_bytes: scratch bytes the program allocates while it runs.
        alias_bytes: output bytes that reuse argument buffers (counted once in ``total_bytes``).
        flops: floating-point (and, on XLA, integer) operations, None where not reported.
        bytes_accessed: bytes read and written, None where not reported.
        transcendentals: transcendental operations, None where not reported.
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
        if any(part is None for part in parts):
            return None
        return sum(parts) - (self.alias_bytes or 0)

    @classmethod
    def skipped(cls, reason: str, *, compile_s: float | None = None) -> Plan:
        """A plan that holds only a skip reason.

        Args:
            reason: why the program has no plan, e.g. ``"not compiled: needs ~1.0 TiB"``.
            compile_s: seconds spent before giving up, if any.

        Returns:
            :class:`Plan` with every measurement None.
        """
        return cls(None, None, None, None, None, None, None, None, compile_s, reason)


class LatencyStats(NamedTuple):
    """Wall time of one program over interleaved runs, in milliseconds.

    Attributes:
        median_ms: median over the timed runs (the figure to compare).
        min_ms: fastest run.
        max_ms: slowest run.
        samples: number of timed runs.
    """

    median_ms: float
    min_ms: float
    max_ms: float
    samples: int


def _as_spec(arg: Any) -> Any:
    """A ``ShapeDtypeStruct`` for an array (so lowering never needs the data), else ``arg``."""
    if isinstance(arg, jax.ShapeDtypeStruct):
        return arg
    if hasattr(arg, "shape") and hasattr(arg, "dtype"):
        return jax.ShapeDtypeStruct(np.shape(arg), arg.dtype)
    return arg


def _cost_entry(cost: Any) -> Mapping[str, float]:
    """``cost_analysis()`` is a dict in recent JAX and a list of per-module dicts in older ones."""
    if cost is None:
        return {}
    if isinstance(cost, Mapping):
        return cost
    if isinstance(cost, Sequence) and cost and isinstance(cost[0], Mapping):
        return cost[0]
    return {}


def _reported(costs: Mapping[str, float], key: str) -> float | None:
    value = costs.get(key)
    return None if value is None or value < 0 else float(value)


def _plan_from_executable(executable: Any, compile_s: float) -> Plan:
    memory = executable.memory_analysis()
    try:
        costs = _cost_entry(executable.cost_analysis())
    except Exception:  # Some backends do not implement cost analysis at all.
        costs = {}

    def size(name: str) -> int | None:
        value = getattr(memory, name, None) if memory is not None else None
        return None if value is None else int(value)

    return Plan(
        executable=executable,
        arg_bytes=size("argument_size_in_bytes"),
        output_bytes=size("output_size_in_bytes"),
        temp_bytes=size("temp_size_in_bytes"),
        alias_bytes=size("alias_size_in_bytes"),
        flops=_reported(costs, "flops"),
        bytes_accessed=_reported(costs, "bytes accessed"),
        transcendentals=_reported(costs, "transcendentals"),
        compile_s=compile_s,
        skip_reason=None,
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:200]


def plan(
    fn: Callable[..., Any],
    *args: Any,
    compile_timeout_s: float | None = 60.0,
    **static: Any,
) -> Plan:
    """Lowers and compiles ``jax.jit(fn)`` ahead of time and reads its static costs.

    Compilation runs in a daemon thread: when it outlasts ``compile_timeout_s`` the plan is
    skipped and the thread is abandoned (XLA compilation cannot be interrupted; the thread ends on
    its own or with the process), so a benchmark never hangs on one cell.

    Args:
        fn: the program; called as ``fn(*args, **static)``.
        *args: arrays or ``jax.ShapeDtypeStruct`` (arrays are replaced by their shape and dtype,
            so nothing is allocated to plan a huge cell).
        compile_timeout_s: seconds to wait for lowering + compilation; None waits forever.
        **static: keyword arguments bound as Python constants (static under jit).

    Returns:
        :class:`Plan`; its ``skip_reason`` says ``"compile exceeded ..."`` or
        ``"compile failed: ..."`` when there is no executable.

    Example:
        >>> import jax.numpy as jnp
        >>> p = plan(jnp.sum, jax.ShapeDtypeStruct((1024,), jnp.float32))
        >>> p.arg_bytes, p.skip_reason
        (4096, None)
    """
    specs = [_as_spec(arg) for arg in args]
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
        return Plan.skipped(f"compile failed: {_first_line(outcome['error'])}", compile_s=elapsed)
    return _plan_from_executable(outcome["executable"], elapsed)


def pending_compiles() -> int:
    """How many compilations abandoned by :func:`plan` are still running.

    XLA aborts the process when the interpreter shuts down under a compile in flight, so a command
    line that saw a compile time out should end with ``os._exit`` while this is non-zero.

    Returns:
        the number of live compile threads.
    """
    return sum(
        thread.name == _COMPILE_THREAD and thread.is_alive() for thread in threading.enumerate()
    )


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
        >>> x = jnp.ones(8)
        >>> stats = interleaved_latency({"sum": jax.jit(jnp.sum)}, {"sum": (x,)}, repeats=3)
        >>> stats["sum"].samples
        3
    """
    names = list(fns)
    last_warm_ms = {name: _time_once(fns[name], args_per_fn[name]) for name in names}
    for _ in range(warmup - 1):
        for name in names:
            # A program slower than its whole budget is warm after one call; more would only
            # spend the time its timed runs need.
            if budget_s is None or last_warm_ms[name] < budget_s * 1e3:
                last_warm_ms[name] = _time_once(fns[name], args_per_fn[name])
    wanted = {}
    for name in names:
        if budget_s is None:
            wanted[name] = repeats
        else:
            affordable = int(budget_s * 1e3 / max(last_warm_ms[name], 1e-3))
            wanted[name] = max(min(min_repeats, repeats), min(repeats, affordable))
    samples: dict[str, list[float]] = {name: [] for name in names}
    round_index = 0
    while any(len(samples[name]) < wanted[name] for name in names):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            if len(samples[name]) < wanted[name]:
                samples[name].append(_time_once(fns[name], args_per_fn[name]))
        round_index += 1
    return {
        name: LatencyStats(
            median_ms=statistics.median(times),
            min_ms=min(times),
            max_ms=max(times),
            samples=len(times),
        )
        for name, times in samples.items()
    }


def _meminfo_bytes(field: str) -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _device_memory_stats(device: Any) -> Mapping[str, int] | None:
    try:
        return device.memory_stats()
    except Exception:  # CPU devices and some plugins do not report memory stats.
        return None


def available_memory_bytes(device: Any | None = None) -> int:
    """Memory free for a new program now: the accelerator's free bytes, else the host's.

    Args:
        device: a JAX device; None means ``jax.devices()[0]``.

    Returns:
        bytes; from ``device.memory_stats()`` (bytes_limit - bytes_in_use) when the device reports
        it, else ``MemAvailable`` of ``/proc/meminfo``, else the free physical pages.
    """
    stats = _device_memory_stats(device if device is not None else jax.devices()[0])
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    available = _meminfo_bytes("MemAvailable")
    if available is not None:
        return available
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def total_memory_bytes(device: Any | None = None) -> int:
    """Total memory of the device (accelerator limit, else the host's physical memory).

    Args:
        device: a JAX device; None means ``jax.devices()[0]``.

    Returns:
        bytes.
    """
    stats = _device_memory_stats(device if device is not None else jax.devices()[0])
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    total = _meminfo_bytes("MemTotal")
    if total is not None:
        return total
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def memory_budget_bytes(
    *, limit_bytes: int | None = None, fraction: float = 0.5, device: Any | None = None
) -> int:
    """The bytes a program may need and still run comfortably.

    Args:
        limit_bytes: an explicit budget (wins when given; tests pass 1 to force "not run").
        fraction: share of the memory available now, leaving headroom for the inputs, the other
            programs of the cell and everything else on the machine.
        device: the device the programs run on; None means the default device.

    Returns:
        bytes.
    """
    if limit_bytes is not None:
        return int(limit_bytes)
    return int(fraction * available_memory_bytes(device))


def fits_in_budget(required_bytes: int | None, budget_bytes: int) -> bool:
    """Whether a plan needing ``required_bytes`` (None: unknown) may run under the budget.

    Example:
        >>> fits_in_budget(2**20, 2**30), fits_in_budget(2**31, 2**30)
        (True, False)
    """
    return required_bytes is not None and required_bytes <= budget_bytes


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

    device = jax.devices()[0]
    try:
        usable_cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # Not on Linux.
        usable_cpus = os.cpu_count()
    return {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "memory_total_bytes": total_memory_bytes(device),
        "memory_available_bytes": available_memory_bytes(device),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def write_report(
    path: Path | str,
    *,
    benchmark: str,
    environment: Mapping[str, Any],
    options: Any,
    records: Sequence[Mapping[str, Any]],
    **sections: Any,
) -> None:
    """Writes one benchmark's results as indented JSON.

    Args:
        path: where to write.
        benchmark: its name, e.g. ``"metadata"``.
        environment: :func:`environment`.
        options: the dataclass of options the records came from.
        records: one JSON-ready dict per measured cell.
        **sections: further top-level entries (e.g. derived summaries).
    """
    document = {
        "benchmark": benchmark,
        "environment": dict(environment),
        "options": dataclasses.asdict(options),
        **sections,
        "records": list(records),
    }
    Path(path).write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
