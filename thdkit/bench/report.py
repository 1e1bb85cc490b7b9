"""The metadata benchmark's report: MEMORY / WORK / LATENCY SUMMARY and GROWTH tables, plot.

Every table is built by :func:`thdkit.bench.measure.table` from the records of
:func:`thdkit.bench.run.run_sweep`; ratios compare each method with linear (and the floor) of the
same cell. The JSON file is :func:`thdkit.bench.measure.write_json` with ``summary =
{"growth": growth_exponents(records)}``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from thdkit.bench.measure import Column, format_bytes, table
from thdkit.bench.sweep import FLOOR

__all__ = ["GROWTH_TAIL", "growth_exponents", "growth_table", "metadata_tables", "plot_records"]

GROWTH_TAIL = 3
_CELL = ("layout", "batch", "seq_len", "max_segments", "mask_type")


def _cell_key(record: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(record[key] for key in _CELL)


def _with_peers(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each record with ``peers``: its cell's records by method (for the ratio columns)."""
    cells: dict[tuple[Any, ...], dict[str, Any]] = {}
    for record in records:
        cells.setdefault(_cell_key(record), {})[record["method"]] = record
    return [{**record, "peers": cells[_cell_key(record)]} for record in records]


def _median(record: Mapping[str, Any] | None) -> float | None:
    return (record or {}).get("latency_ms", None) and record["latency_ms"]["median"]


def _ratio(key: str | None, method: str) -> Any:
    """A column value: the record's ``key`` (latency median if None) over its cell's method's."""

    def value(record: Mapping[str, Any]) -> float | None:
        peer = record["peers"].get(method)
        mine, theirs = (
            (_median(record), _median(peer)) if key is None else (record[key], peer and peer[key])
        )
        return mine / theirs if mine is not None and theirs else None

    return value


def _fmt_ratio(ratio: float) -> str:
    return f"{ratio:.3g}" if ratio < 10 else f"{ratio:,.0f}"


def _fmt_number(value: float) -> str:
    return f"{value:.3g}" if value >= 1e4 else f"{value:,.0f}"


def _fmt_ms(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:,.0f}"


def _status(record: Mapping[str, Any]) -> str:
    if record["skip_reason"]:
        return record["skip_reason"]
    verdict = {True: ", = linear", False: ", DIFFERS from linear", None: ""}
    return "ran" + verdict[record["matches_linear"]]


def _needed(record: Mapping[str, Any]) -> str | None:
    if record["total_bytes"] is not None:
        return format_bytes(record["total_bytes"])
    estimate = record["estimated_bytes"]
    return estimate and "~" + format_bytes(estimate)


def metadata_tables(records: Sequence[Mapping[str, Any]]) -> list[Table]:
    """MEMORY SUMMARY, WORK SUMMARY, LATENCY SUMMARY and, over two or more T, GROWTH OVER T.

    Args:
        records: as returned by :func:`thdkit.bench.run.run_sweep`.

    Returns:
        rich tables, in print order.
    """
    rows = _with_peers(records)
    cell = [
        Column("T", "seq_len"),
        Column("S", "max_segments"),
        Column("mask", "mask_type", justify="left"),
        Column("method", "method", justify="left"),
    ]
    status = Column("status", _status, justify="left")
    memory = [
        Column("args", "arg_bytes", format_bytes),
        Column("output", "output_bytes", format_bytes),
        Column("temp", "temp_bytes", format_bytes),
        Column("temp B/token", "temp_bytes_per_token", "{:,.1f}".format),
        Column("temp x linear", _ratio("temp_bytes", "linear"), _fmt_ratio),
        Column("total", _needed),
        status,
    ]
    work = [
        Column("flops", "flops", _fmt_number),
        Column("flops x linear", _ratio("flops", "linear"), _fmt_ratio),
        Column("bytes accessed", "bytes_accessed", format_bytes),
        Column("bytes x linear", _ratio("bytes_accessed", "linear"), _fmt_ratio),
        Column("transcendentals", "transcendentals", _fmt_number),
        Column("compile s", "compile_s", "{:.2f}".format),
    ]
    latency = [
        Column(header, lambda r, key=key: (r["latency_ms"] or {}).get(key), fmt)
        for header, key, fmt in (
            ("median", "median", _fmt_ms),
            ("min", "min", _fmt_ms),
            ("max", "max", _fmt_ms),
            ("runs", "samples", str),
        )
    ] + [
        Column("x linear", _ratio(None, "linear"), _fmt_ratio),
        Column("x floor", _ratio(None, FLOOR), _fmt_ratio),
        status,
    ]
    tables = [
        table(title, cell + columns, rows, section=_cell_key)
        for title, columns in (
            ("MEMORY SUMMARY (static, from compilation)", memory),
            ("WORK SUMMARY (static, XLA cost analysis)", work),
            ("LATENCY SUMMARY (interleaved, after warm-up; ms)", latency),
        )
    ]
    if len({r["seq_len"] for r in records}) > 1:
        tables.append(growth_table(records))
    return tables


def _slope(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of log y over log x; None with fewer than two distinct x."""
    logs = [(math.log(x), math.log(y)) for x, y in points if y and y > 0]
    if len({x for x, _ in logs}) < 2:
        return None
    log_x, log_y = np.array(logs).T
    return float(np.polyfit(log_x, log_y, 1)[0])


def growth_exponents(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per (mask type, S, method): k in ``temp bytes ∝ T^k`` and ``latency ∝ T^k``.

    Fitted by least squares on log-log over the T values that compiled (temp) or ran (latency);
    ``temp_exponent_tail`` over the largest ``GROWTH_TAIL`` of them only, where O(S) terms no
    longer hide the growth in T.

    Args:
        records: as returned by :func:`thdkit.bench.run.run_sweep`.

    Returns:
        dicts with mask_type, max_segments, method, temp_exponent, temp_exponent_tail,
        latency_exponent, seq_lens.

    Example:
        >>> records = [{"mask_type": "padding", "max_segments": 4, "method": "dense", "seq_len": t,
        ...             "temp_bytes": t * t, "latency_ms": None} for t in (64, 128, 256)]
        >>> round(growth_exponents(records)[0]["temp_exponent"], 6)
        2.0
    """
    groups: dict[tuple[str, int, str], list[Mapping[str, Any]]] = {}
    for record in records:
        key = (record["mask_type"], record["max_segments"], record["method"])
        groups.setdefault(key, []).append(record)
    rows = []
    for (mask_type, max_segments, method), group in groups.items():
        temp = sorted((r["seq_len"], r["temp_bytes"]) for r in group if r["temp_bytes"])
        rows.append(
            {
                "mask_type": mask_type,
                "max_segments": max_segments,
                "method": method,
                "temp_exponent": _slope(temp),
                "temp_exponent_tail": _slope(temp[-GROWTH_TAIL:]),
                "latency_exponent": _slope([(r["seq_len"], _median(r)) for r in group]),
                "seq_lens": sorted({r["seq_len"] for r in group}),
            }
        )
    return rows


def growth_table(records: Sequence[Mapping[str, Any]]) -> Table:
    """GROWTH OVER T: the exponents of :func:`growth_exponents` (the floor and single T left out).

    Args:
        records: as returned by :func:`thdkit.bench.run.run_sweep`.

    Returns:
        a rich table.
    """
    exponent = "{:.2f}".format
    columns = [
        Column("mask", "mask_type", justify="left"),
        Column("S", "max_segments"),
        Column("method", "method", justify="left"),
        Column("temp k", "temp_exponent", exponent),
        Column(f"temp k, top {GROWTH_TAIL} T", "temp_exponent_tail", exponent),
        Column("latency k", "latency_exponent", exponent),
        Column("T range", lambda r: f"{min(r['seq_lens'])}..{max(r['seq_lens'])}", justify="left"),
    ]
    rows = [r for r in growth_exponents(records) if r["method"] != FLOOR and len(r["seq_lens"]) > 1]
    title = "GROWTH OVER T (log-log least-squares slope k: cost ∝ T^k)"
    return table(title, columns, rows)


_MARKERS = ("o", "s", "^", "D", "v", "P")
_COLORS = {"linear": "tab:blue", "one_hot": "tab:orange", "dense": "tab:red", FLOOR: "0.45"}


def plot_records(
    records: Sequence[Mapping[str, Any]],
    path: Path | str,
    *,
    environment: Mapping[str, Any],
    mask_type: str | None = None,
) -> str:
    """Writes a PNG: temp bytes and median latency against T, log-log, one line per method and S.

    Args:
        records: as returned by :func:`thdkit.bench.run.run_sweep`.
        path: the PNG to write.
        environment: names the backend and device in the title.
        mask_type: the mask type plotted; None picks padding_causal if present, else the first.

    Returns:
        the mask type plotted.
    """
    # The object API with the Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    masks = list(dict.fromkeys(r["mask_type"] for r in records))
    chosen = mask_type or ("padding_causal" if "padding_causal" in masks else masks[0])
    mine = [r for r in records if r["mask_type"] == chosen]
    figure = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    temp_axes, latency_axes = figure.subplots(1, 2)
    for method in dict.fromkeys(r["method"] for r in mine):
        for index, max_segments in enumerate(sorted({r["max_segments"] for r in mine})):
            line = sorted(
                (r for r in mine if r["method"] == method and r["max_segments"] == max_segments),
                key=lambda r: r["seq_len"],
            )
            style = {
                "color": _COLORS.get(method),
                "marker": _MARKERS[index % len(_MARKERS)],
                "linestyle": "--" if method == FLOOR else "-",
                "label": f"{method} S={max_segments}",
            }
            for axes, key in ((temp_axes, "temp_bytes"), (latency_axes, None)):
                points = [(r["seq_len"], _median(r) if key is None else r[key]) for r in line]
                points = [(x, y) for x, y in points if y]
                if points and not (key and method == FLOOR):
                    axes.plot(*zip(*points, strict=True), **style)
    for axes, label in (
        (temp_axes, "temp bytes (compiled plan)"),
        (latency_axes, "median latency, ms"),
    ):
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        axes.set_xlabel("T (tokens per row)")
        axes.set_ylabel(label)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize="small")
    figure.suptitle(
        f"seqlens_and_offsets, {mine[0]['layout']} layout, {chosen}, B={mine[0]['batch']} — "
        f"{environment.get('backend')} ({environment.get('device_kind')}), "
        f"jax {environment.get('jax')}"
    )
    figure.savefig(path, dpi=110)
    return chosen
