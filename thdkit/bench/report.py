"""The metadata benchmark's report, sized for an 80-column terminal: MEMORY, WORK and LATENCY
(a row per cell, a column per method), GROWTH OVER T, each with a legend under it, and one
closing line that states the result (:func:`result_line`). The JSON report holds every field.

Ratios compare each method with linear of the same cell.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from thdkit.bench.measure import median
from thdkit.bench.sweep import FLOOR, METHODS
from thdkit.bench.units import format_tokens

__all__: list[str] = []

_TAIL = 3  # The growth over the largest T only, where O(S) terms no longer hide it.
_Record = Mapping[str, Any]
_Cell = tuple[int, int, str]  # (T, S, mask type)
MASK_ABBREVIATIONS = {
    "no_mask": "none",
    "padding": "pad",
    "causal": "causal",
    "padding_causal": "pad+causal",
    "causal_bottom_right": "causal+BR",
    "padding_causal_bottom_right": "pad+causal+BR",
}
"""The mask types as the tables name them (their legends spell out those that appear)."""


def times(ratio: float) -> str:
    """A ratio as ``2.4x``, ``13x`` or ``11,600x`` (three significant digits at most)."""
    if ratio >= 10:
        return f"{float(f'{ratio:.3g}'):,.0f}x"
    return f"{ratio:.1f}x" if ratio >= 0.1 else f"{ratio:.2g}x"


def _per_token(value: float) -> str:
    return f"{value:,.0f}" if value >= 1000 else f"{value:.1f}"


def _ms(value: float) -> str:
    digits = 0 if value >= 100 else 1 if value >= 10 else 2 if value >= 1 else 3
    return f"{value:,.{digits}f}"


def _cells(records: Sequence[_Record]) -> dict[_Cell, dict[str, _Record]]:
    """The records by cell (in sweep order) and method."""
    cells: dict[_Cell, dict[str, _Record]] = {}
    for record in records:
        key = (record["seq_len"], record["max_segments"], record["mask_type"])
        cells.setdefault(key, {})[record["method"]] = record
    return cells


def _methods(records: Sequence[_Record]) -> list[str]:
    present = {r["method"] for r in records}
    return [m for m in (*METHODS, FLOOR) if m in present]


def _base(methods: Sequence[str]) -> str:
    """The method the others are compared with: linear where it ran, else the first."""
    return "linear" if "linear" in methods else methods[0]


def _scratch(record: _Record) -> tuple[float | None, bool]:
    """Temp bytes per token of the compiled program, else the estimate of a method too large to
    compile (True: estimated)."""
    if record["temp_bytes_per_token"] is not None:
        return record["temp_bytes_per_token"], False
    if record["estimated_bytes"] and (record["skip_reason"] or "").startswith(
        "not compiled: needs"
    ):
        return record["estimated_bytes"] / (record["batch"] * record["seq_len"]), True
    return None, False


def _bytes_accessed(record: _Record) -> tuple[float | None, bool]:
    accessed = record["bytes_accessed"]
    return (None if accessed is None else accessed / (record["batch"] * record["seq_len"])), False


def _latency(record: _Record) -> tuple[float | None, bool]:
    return median(record), False


def _grid() -> Table:
    """A table with a rule under its header and two spaces between columns."""
    return Table(box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), header_style="bold", show_edge=False)


def _table(
    records: Sequence[_Record],
    methods: Sequence[str],
    value: Callable[[_Record], tuple[float | None, bool]],
    fmt: Callable[[float], str],
    missing: Callable[[_Record], str],
) -> Table:
    """A row per cell, a column per method: the value, and (Nx) its ratio to the base method's."""
    cells = _cells(records)
    segments = len({s for _, s, _ in cells}) > 1
    masks = len({m for _, _, m in cells}) > 1
    base = _base(_methods(records))
    grid = _grid()
    grid.add_column("T", justify="right")
    if segments:
        grid.add_column("S", justify="right")
    if masks:
        grid.add_column("mask")
    for method in methods:
        grid.add_column(method, justify="right")
    previous = None
    for (seq_len, max_segments, mask_type), by_method in cells.items():
        if masks and previous is not None and (seq_len, max_segments) != previous:
            grid.add_section()  # The mask types of one (T, S) together.
        previous = (seq_len, max_segments)
        row = [format_tokens(seq_len)]
        row += [f"{max_segments:,}"] * segments + [MASK_ABBREVIATIONS[mask_type]] * masks
        theirs = value(by_method[base])[0] if base in by_method else None
        for method in methods:
            record = by_method.get(method)
            mine, estimated = value(record) if record else (None, False)
            if mine is None:
                row.append(missing(record) if record else "")
                continue
            shown = ("~" if estimated else "") + fmt(mine)
            if method not in (base, FLOOR) and theirs:
                shown += f" ({times(mine / theirs)})"
            row.append(shown)
        grid.add_row(*row)
    return grid


def _section(title: str, grid: Table, legend: Sequence[str], *, first: bool = False) -> Group:
    """The title, the table and its legend, after a blank line unless it comes first."""
    lines = [Text(line, style="dim") for line in legend]
    return Group(*[Text("")] * (not first), Text(title, style="bold"), grid, *lines)


def _common(records: Sequence[_Record]) -> str:
    """What every cell shares (S and mask type when the sweep has one of each), for a title."""
    segments = sorted({r["max_segments"] for r in records})
    masks = list(dict.fromkeys(r["mask_type"] for r in records))
    shared = [f"S={segments[0]:,}"] * (len(segments) == 1) + masks * (len(masks) == 1)
    return f" ({', '.join(shared)})" if shared else ""


def _keys(records: Sequence[_Record], methods: Sequence[str]) -> list[str]:
    """The legend lines every table shares: what T, S, the masks and the ratios mean."""
    lines = ["T: tokens per row (k = 1,024, M = 1,048,576)"]
    if len({r["max_segments"] for r in records}) > 1:
        lines[0] += "; S: max_segments_per_seq"
    masks = list(dict.fromkeys(r["mask_type"] for r in records))
    if len(masks) > 1:
        lines.append("mask: " + ", ".join(f"{MASK_ABBREVIATIONS[m]} = {m}" for m in masks))
    if len(methods) > 1:
        lines.append(f"(Nx): N times {_base(methods)}'s value in the same row")
    return lines


def _skips(records: Sequence[_Record]) -> list[str]:
    """Why a method did not run: a line per method, T and reason (the budget, half the memory
    free at the time, as the range over the cells), naming the cells unless it is all of T's."""
    everywhere = {(r["max_segments"], r["mask_type"]) for r in records}
    grouped: dict[tuple[str, int, str], tuple[list[tuple[int, str]], list[str]]] = {}
    for r in records:
        if r["skip_reason"]:
            reason, _, budget = r["skip_reason"].partition(" (budget ")
            cells, budgets = grouped.setdefault((r["method"], r["seq_len"], reason), ([], []))
            cells.append((r["max_segments"], r["mask_type"]))
            budgets += [budget.removesuffix(")")] * bool(budget)
    lines = []
    for (method, seq_len, reason), (cells, budgets) in grouped.items():
        where = f"T={format_tokens(seq_len)}"
        if set(cells) != everywhere:
            where += f" ({_which(cells, everywhere)})"
        lines.append(f"{method} at {where}: {reason}{_budget(budgets)}")
    return lines


def _which(cells: Sequence[tuple[int, str]], everywhere: set[tuple[int, str]]) -> str:
    """Cells (S, mask type) in as few words as say them: ``S=1,024`` for all of an S's masks."""
    parts = []
    for max_segments in dict.fromkeys(s for s, _ in cells):
        mine = [m for s, m in cells if s == max_segments]
        if set(mine) == {m for s, m in everywhere if s == max_segments}:
            parts.append(f"S={max_segments:,}")
        else:
            parts.append(f"S={max_segments:,}: {', '.join(MASK_ABBREVIATIONS[m] for m in mine)}")
    return "; ".join(parts)


def _budget(budgets: Sequence[str]) -> str:
    """`` (budget 10.8-11.2 GiB)``: the run budgets of a skip's cells (each half the memory free
    at its time), as a range; empty where the reason names none."""
    if not budgets:
        return ""
    ordered = sorted(set(budgets), key=lambda b: (b.split()[-1], float(b.split()[0])))
    low, high = ordered[0].split(), ordered[-1].split()
    if low == high or low[-1] != high[-1]:
        return f" (budget {' to '.join(dict.fromkeys([ordered[0], ordered[-1]]))})"
    return f" (budget {low[0]}-{high[0]} {low[-1]})"


def _check(records: Sequence[_Record]) -> list[str]:
    """Whether the methods that ran agreed with linear (nothing to say if none was compared)."""
    compared = [r for r in records if r["matches_linear"] is not None and r["method"] != "linear"]
    differs = [r for r in compared if not r["matches_linear"]]
    if not compared:
        return []
    if not differs:
        return ["Every method that ran returned exactly linear's metadata."]
    where = [
        f"{r['method']} at T={format_tokens(r['seq_len'])}, S={r['max_segments']}, {r['mask_type']}"
        for r in differs
    ]
    return ["DIFFERS from linear: " + "; ".join(where)]


def metadata_tables(records: Sequence[_Record]) -> list[RenderableType]:
    """MEMORY, WORK and LATENCY and, over two or more T, GROWTH OVER T: each a title, a table
    (at most 80 columns wide for the presets) and its legend."""
    methods = _methods(records)
    compared = [m for m in methods if m != FLOOR]
    keys, common = _keys(records, methods), _common(records)
    estimated = any(_scratch(r)[1] for r in records)
    not_compiled = lambda r: "not compiled" if r["temp_bytes"] is None else "-"  # noqa: E731
    not_run = lambda r: "not run" if r["skip_reason"] else "-"  # noqa: E731
    sections = [
        _section(
            f"MEMORY: scratch bytes per token{common}",
            _table(records, compared, _scratch, _per_token, not_compiled),
            [
                "scratch: XLA temp bytes of each compiled program / (B·T), known even where it "
                "did not run; linear: thdkit, O(T + S); one_hot: O(T·S); dense: O(T²) "
                "reference" + ("; ~N: estimated (too big to compile)" * estimated),
                *keys,
            ],
            first=True,
        ),
        _section(
            f"WORK: bytes accessed per token{common}",
            _table(records, methods, _bytes_accessed, _per_token, not_compiled),
            [
                "bytes read + written per token, from XLA's cost analysis (static); floor: a "
                "program that only reads the inputs once; flops and compile times: see --json",
            ],
        ),
        _section(
            f"LATENCY: median ms{common}",
            _table(records, methods, _latency, _ms, not_run),
            [
                "median ms per call; a row's programs run interleaved after warm-up (min, max, "
                "runs: see --json); floor: reads the inputs once, the least any method pays",
                *_skips(records),
                *_check(records),
            ],
        ),
    ]
    growth = [
        r for r in growth_exponents(records) if r["method"] != FLOOR and len(r["seq_lens"]) > 1
    ]
    if growth:
        sections.append(_section(f"GROWTH OVER T{common}", _growth_table(growth), _GROWTH_LEGEND))
    return sections


_GROWTH_LEGEND = [
    "k: least-squares slope of log cost over log T, cost ∝ T^k (1: linear, 2: quadratic); "
    f"scratch k over all T, then over the {_TAIL} largest (where O(S) terms no longer hide "
    "T); latency k over the T that ran",
]


def _growth_table(growth: Sequence[_Record]) -> Table:
    segments = len({r["max_segments"] for r in growth}) > 1
    masks = len({r["mask_type"] for r in growth}) > 1
    grid = _grid()
    headers = ["mask"] * masks + ["S"] * segments + ["method", "scratch k", f"top {_TAIL} T"]
    headers.append("latency k")
    for header in [*headers, "T range"]:
        grid.add_column(header, justify="left" if header in ("mask", "method") else "right")
    exponent = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for r in growth:
        row = [MASK_ABBREVIATIONS[r["mask_type"]]] * masks + [f"{r['max_segments']:,}"] * segments
        row += [r["method"], exponent(r["temp_exponent"]), exponent(r["temp_exponent_tail"])]
        row += [exponent(r["latency_exponent"])]
        row.append(f"{format_tokens(r['seq_lens'][0])}..{format_tokens(r['seq_lens'][-1])}")
        grid.add_row(*row)
    return grid


def result_line(records: Sequence[_Record]) -> str:
    """The result in one line, from the run's own numbers: linear's scratch bytes per token at
    the largest T it compiled, and how many times more the other methods need there (over
    several cells at that T: linear's largest, the others' smallest ratio, marked ≤ and ≥).

    Example:
        >>> row = {"max_segments": 16, "mask_type": "padding", "batch": 1, "seq_len": 1024}
        >>> records = [row | {"method": m, "temp_bytes_per_token": b, "skip_reason": None}
        ...            for m, b in (("linear", 12.0), ("one_hot", 158.0), ("dense", 1100.0))]
        >>> result_line(records)
        'linear: 12.0 B scratch/token at T=1k; one_hot 13x, dense 92x more'
    """
    methods = [m for m in _methods(records) if m != FLOOR]
    if not methods:
        return "No method ran."
    base = _base(methods)
    compiled = [r for r in records if r["method"] == base and r["temp_bytes_per_token"]]
    if not compiled:
        return f"{base} compiled at no T: no result to state."
    seq_len = max(r["seq_len"] for r in compiled)
    cells = [c for key, c in _cells(records).items() if key[0] == seq_len and base in c]
    cells = [c for c in cells if c[base]["temp_bytes_per_token"]]
    several = len(cells) > 1
    mine = max(c[base]["temp_bytes_per_token"] for c in cells)
    ratios = []
    for method in methods:
        if method == base:
            continue
        found = [(_scratch(c[method]), c[base]) for c in cells if method in c]
        found = [(v / b["temp_bytes_per_token"], e) for (v, e), b in found if v is not None]
        if found:
            ratio, estimated = min(found)
            mark = ("≥" if several else "") + ("~" if estimated else "")
            ratios.append(f"{method} {mark}{times(ratio)}")
    line = f"{base}: {'≤' if several else ''}{_per_token(mine)} B scratch/token"
    line += f" at T={format_tokens(seq_len)}"
    return line + (f"; {', '.join(ratios)} more" if ratios else "")


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
