"""The metadata benchmark's report: MEMORY / WORK / LATENCY SUMMARY and GROWTH tables, the plot.

Ratios compare each method with linear (and the floor) of the same cell.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from thdkit.bench.measure import format_bytes, median, table
from thdkit.bench.sweep import FLOOR

__all__: list[str] = []

_TAIL = 3  # The growth over the largest T only, where O(S) terms no longer hide it.
_Record = Mapping[str, Any]


def _cell(record: _Record) -> tuple[Any, ...]:
    return tuple(record[key] for key in ("layout", "batch", "seq_len", "max_segments", "mask_type"))


def _ratio(key: str, method: str) -> Any:
    """A column: the record's ``key`` over that of the same cell's ``method``."""

    def value(record: _Record) -> float | None:
        theirs = record["peers"].get(method, {}).get(key)
        return record[key] / theirs if record[key] is not None and theirs else None

    return value


def _status(record: _Record) -> str:
    verdict = {True: ", = linear", False: ", DIFFERS from linear", None: ""}
    return record["skip_reason"] or "ran" + verdict[record["matches_linear"]]


def _needed(record: _Record) -> str | None:
    estimate = record["total_bytes"] is None and record["estimated_bytes"]
    return "~" + format_bytes(estimate) if estimate else format_bytes(record["total_bytes"])


def metadata_tables(records: Sequence[_Record]) -> list[Table]:
    """MEMORY, WORK and LATENCY SUMMARY and, over two or more T, GROWTH OVER T."""
    rows = [{**record, "median": median(record)} for record in records]
    cells: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in rows:
        cells.setdefault(_cell(row), {})[row["method"]] = row
    rows = [row | {"peers": cells[_cell(row)]} for row in rows]
    ratio = lambda v: f"{v:.3g}" if v < 10 else f"{v:,.0f}"  # noqa: E731
    number = lambda v: f"{v:.3g}" if v >= 1e4 else f"{v:,.0f}"  # noqa: E731
    ms = lambda v: f"{v:.3g}" if v < 100 else f"{v:,.0f}"  # noqa: E731
    latency = lambda key: lambda r: (r["latency_ms"] or {}).get(key)  # noqa: E731
    status = ("status", _status, str, "left")
    columns = {
        "MEMORY SUMMARY (static, from compilation)": [
            ("args", "arg_bytes", format_bytes), ("output", "output_bytes", format_bytes),
            ("temp", "temp_bytes", format_bytes),
            ("temp B/token", "temp_bytes_per_token", "{:,.1f}".format),
            ("temp x linear", _ratio("temp_bytes", "linear"), ratio), ("total", _needed), status,
        ],
        "WORK SUMMARY (static, XLA cost analysis)": [
            ("flops", "flops", number), ("flops x linear", _ratio("flops", "linear"), ratio),
            ("bytes accessed", "bytes_accessed", format_bytes),
            ("bytes x linear", _ratio("bytes_accessed", "linear"), ratio),
            ("transcendentals", "transcendentals", number),
            ("compile s", "compile_s", "{:.2f}".format),
        ],
        "LATENCY SUMMARY (interleaved, after warm-up; ms)": [
            ("median", "median", ms), ("min", latency("min"), ms), ("max", latency("max"), ms),
            ("runs", latency("samples")), ("x linear", _ratio("median", "linear"), ratio),
            ("x floor", _ratio("median", FLOOR), ratio), status,
        ],
    }  # fmt: skip
    cell = [("T", "seq_len"), ("S", "max_segments")]
    cell += [("mask", "mask_type", str, "left"), ("method", "method", str, "left")]
    tables = [table(title, cell + more, rows, section=_cell) for title, more in columns.items()]
    growth = [
        r for r in growth_exponents(records) if r["method"] != FLOOR and len(r["seq_lens"]) > 1
    ]
    exponent = "{:.2f}".format
    growth_columns = [
        ("mask", "mask_type", str, "left"), ("S", "max_segments"),
        ("method", "method", str, "left"), ("temp k", "temp_exponent", exponent),
        (f"temp k, top {_TAIL} T", "temp_exponent_tail", exponent),
        ("latency k", "latency_exponent", exponent),
        ("T range", lambda r: f"{r['seq_lens'][0]}..{r['seq_lens'][-1]}", str, "left"),
    ]  # fmt: skip
    title = "GROWTH OVER T (log-log least-squares slope k: cost ∝ T^k)"
    return [*tables, table(title, growth_columns, growth)] if growth else tables


def _slope(points: Sequence[tuple[float, float | None]]) -> float | None:
    """Least-squares slope of log y over log x; None with fewer than two distinct x."""
    logs = [(math.log(x), math.log(y)) for x, y in points if y and y > 0]
    return float(np.polyfit(*np.array(logs).T, 1)[0]) if len({x for x, _ in logs}) > 1 else None


def growth_exponents(records: Sequence[_Record]) -> list[dict[str, Any]]:
    """Per (mask type, S, method): k of ``temp bytes ∝ T^k`` (over all T, and over the largest
    three) and of ``latency ∝ T^k``, fitted on log-log over the T that compiled or ran."""
    groups: dict[tuple[str, int, str], list[_Record]] = {}
    for r in records:
        groups.setdefault((r["mask_type"], r["max_segments"], r["method"]), []).append(r)
    rows = []
    for (mask_type, max_segments, method), group in groups.items():
        temp = sorted((r["seq_len"], r["temp_bytes"]) for r in group if r["temp_bytes"])
        rows.append(
            {"mask_type": mask_type, "max_segments": max_segments, "method": method}
            | {"temp_exponent": _slope(temp), "temp_exponent_tail": _slope(temp[-_TAIL:])}
            | {"latency_exponent": _slope([(r["seq_len"], median(r)) for r in group])}
            | {"seq_lens": sorted({r["seq_len"] for r in group})}
        )
    return rows


def plot_records(records: Sequence[_Record], path: Path | str, environment: _Record) -> str:
    """Writes a PNG of temp bytes and median latency against T (log-log, a line per method and
    S) for padding_causal if measured, else the first mask type; returns the mask type."""
    # The object API with the Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    masks = [r["mask_type"] for r in records]
    chosen = "padding_causal" if "padding_causal" in masks else masks[0]
    mine = [r | {"median": median(r)} for r in records if r["mask_type"] == chosen]
    figure = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = dict(zip(("temp_bytes", "median"), figure.subplots(1, 2), strict=True))
    colors = {"linear": "tab:blue", "one_hot": "tab:orange", "dense": "tab:red", FLOOR: "0.45"}
    for method in dict.fromkeys(r["method"] for r in mine):
        for index, max_segments in enumerate(sorted({r["max_segments"] for r in mine})):
            line = [r for r in mine if r["method"] == method and r["max_segments"] == max_segments]
            style = {"color": colors.get(method), "marker": "os^DvP"[index % 6]}
            style |= {
                "linestyle": "--" if method == FLOOR else "-",
                "label": f"{method} S={max_segments}",
            }
            for key, ax in axes.items():
                points = sorted((r["seq_len"], r[key]) for r in line if r[key])
                if points and not (key == "temp_bytes" and method == FLOOR):
                    ax.plot(*zip(*points, strict=True), **style)
    for ax, label in zip(
        axes.values(), ("temp bytes (compiled plan)", "median latency, ms"), strict=True
    ):
        ax.set(yscale="log", xlabel="T (tokens per row)", ylabel=label)
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    figure.suptitle(
        f"seqlens_and_offsets, {mine[0]['layout']} layout, {chosen}, B={mine[0]['batch']} — "
        f"{environment['backend']} ({environment['device_kind']}), jax {environment['jax']}"
    )
    figure.savefig(path, dpi=110)
    return chosen
