"""The tables of ``thdkit bench compile`` (:mod:`thdkit.bench.compile`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.table import Table

from thdkit.bench import measure
from thdkit.bench.compile import MASK_TYPE
from thdkit.bench.measure import median

__all__ = ["compile_table", "host_table"]


def compile_table(records: Sequence[Mapping[str, Any]]) -> Table:
    """ENTRY POINTS: programs compiled per eager call, compile time, HLO size, memory mappings."""
    rows = [r for r in records if r["table"] == "entry"]
    columns = [
        ("entry", "call", str, "left"), ("T", "seq_len"),
        ("programs, new shape", "programs_new_shape"),
        ("programs, repeated", "programs_repeated_shape"),
        ("compile s", "compile_s", "{:.2f}".format),
        ("first call s", "first_call_s", "{:.2f}".format),
        ("repeat ms", median, "{:.2f}".format), ("HLO instructions", "hlo_instructions"),
        ("maps added", "maps_added"), ("maps / program", "maps_per_program", "{:.0f}".format),
        ("status", lambda r: r["skip_reason"] or "", str, "left"),
    ]  # fmt: skip
    caption = (
        "programs: XLA compilations of one eager call (jax.monitoring); compile s: their backend "
        "compile time; HLO instructions: the entry point as one jit program; maps: lines of "
        "/proc/self/maps added by the new-shape call (Linux only)"
    )
    title = "ENTRY POINTS: compilations per eager call, on a new shape and on a repeated one"
    return measure.table(title, columns, rows, caption=caption)


def host_table(records: Sequence[Mapping[str, Any]]) -> Table:
    """HOST VS DEVICE: seqlens_and_offsets on NumPy inputs vs the same call under ``jax.jit`` on
    device arrays (a new shape and a warm one)."""
    rows = [r for r in records if r["table"] == "host"]
    ms = lambda key: lambda r: r[key]["median"]  # noqa: E731
    columns = [
        ("T", "seq_len"), ("S", "segments"), ("host ms", ms("host_ms"), "{:.3f}".format),
        ("jit, new shape ms", ms("device_first_ms"), "{:.1f}".format),
        ("jit, warm ms", ms("device_warm_ms"), "{:.3f}".format),
        ("new shape / host", "first_over_host", "{:.0f}x".format),
        ("warm / host", "warm_over_host", "{:.2f}x".format),
        ("programs per new shape", "programs_first_call"), ("host programs", "programs_host"),
        ("equal", "matches_device", str),
    ]  # fmt: skip
    title = f"HOST VS DEVICE: seqlens_and_offsets (NumPy) vs jit(seqlens_and_offsets), {MASK_TYPE}"
    section = lambda r: r["seq_len"]  # noqa: E731
    return measure.table(title, columns, rows, section=section)
