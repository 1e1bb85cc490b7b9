"""The metadata benchmark's plot (``thdkit bench --plot``): scratch bytes and median latency
against T, a line per method and S, and a mark where a method did not compile or run."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from thdkit.bench.measure import median
from thdkit.bench.sweep import FLOOR
from thdkit.bench.units import device_name, format_tokens

__all__ = ["plot_records"]

_Record = Mapping[str, Any]
_COLORS = {"linear": "tab:blue", "one_hot": "tab:orange", "dense": "tab:red", FLOOR: "0.45"}
_PANELS = {  # record key: (panel title, y label)
    "temp_bytes": ("Scratch memory (XLA temp bytes of the compiled program)", "bytes"),
    "median": ("Latency (median of interleaved runs)", "ms per call"),
}
MEMORY, OTHER = "not run (memory)", "not run (other reason: see --json)"
"""The legend entries of the marks at the bottom of a panel, by why the cell is missing."""


def _why(record: _Record) -> str:
    """Why a record has no value: too big (the memory budget or the compile limit), or else."""
    reason = record["skip_reason"] or ""
    return MEMORY if reason.startswith(("not run: needs", "not compiled: needs")) else OTHER


def plot_records(records: Sequence[_Record], path: Path | str, environment: _Record) -> str:
    """Writes a PNG of scratch bytes and median latency against T (log-log, a line per method
    and S) for padding_causal if measured, else the first mask type; a method that did not
    compile or run at some T gets a mark there on the panel's T axis, in its colour.

    Args:
        records: the metadata benchmark's records (:func:`thdkit.bench.run_sweep`).
        path: the PNG file to write.
        environment: where they were measured (``backend``, ``device_kind``, ``jax``).

    Returns:
        The mask type drawn.

    Example:
        >>> import tempfile
        >>> cell = {"mask_type": "padding", "layout": "self", "batch": 1, "max_segments": 4,
        ...         "skip_reason": None, "latency_ms": {"median": 0.1}}
        >>> records = [cell | {"method": "linear", "seq_len": t, "temp_bytes": 12 * t}
        ...            for t in (1024, 4096)]
        >>> environment = {"backend": "cpu", "device_kind": "cpu", "jax": "0.10.2"}
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     plot_records(records, f"{folder}/bench.png", environment)
        'padding'
    """
    figure, chosen = metadata_figure(records, environment)
    figure.savefig(path, dpi=110)
    return chosen


def metadata_figure(records: Sequence[_Record], environment: _Record) -> tuple[Any, str]:
    """The figure :func:`plot_records` writes (a ``matplotlib.figure.Figure``), and its mask
    type."""
    # The object API with the Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullLocator
    from matplotlib.transforms import blended_transform_factory

    masks = [r["mask_type"] for r in records]
    chosen = "padding_causal" if "padding_causal" in masks else masks[0]
    mine = [r | {"median": median(r)} for r in records if r["mask_type"] == chosen]
    seq_lens = sorted({r["seq_len"] for r in mine})
    segments = sorted({r["max_segments"] for r in mine})
    figure = Figure(figsize=(12, 5.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = dict(zip(_PANELS, figure.subplots(1, 2), strict=True))
    handles, reasons = [], set()
    stacked: dict[tuple[str, int], int] = {}  # Marks already at (panel, T): the next goes above.
    for method in dict.fromkeys(r["method"] for r in mine):
        for number, max_segments in enumerate(segments):
            line = [r for r in mine if r["method"] == method and r["max_segments"] == max_segments]
            style = {"color": _COLORS.get(method), "marker": "os^DvP"[number % 6]}
            style["linestyle"] = "--" if method == FLOOR else "-"
            label = f"{method} S={max_segments:,}" if len(segments) > 1 else method
            handles.append(Line2D([], [], label=label, **style))
            for key, ax in axes.items():
                if key == "temp_bytes" and method == FLOOR:
                    continue
                points = sorted((r["seq_len"], r[key]) for r in line if r[key])
                if points:
                    ax.plot(*zip(*points, strict=True), **style)
                missing = [r for r in line if not r[key]]
                at_axis = blended_transform_factory(ax.transData, ax.transAxes)
                for record in missing:
                    marker = "x" if _why(record) == MEMORY else "+"
                    reasons.add(_why(record))
                    height = stacked.get((key, record["seq_len"]), 0)
                    stacked[key, record["seq_len"]] = height + 1
                    ax.plot(
                        record["seq_len"], 0.045 * height, marker=marker, markersize=9,
                        markeredgewidth=2, color=style["color"], transform=at_axis,
                        clip_on=False, linestyle="none", zorder=5,
                    )  # fmt: skip
    for reason in (MEMORY, OTHER):
        if reason in reasons:
            marker = "x" if reason == MEMORY else "+"
            handles.append(
                Line2D([], [], color="0.2", marker=marker, markersize=9, markeredgewidth=2,
                       linestyle="none", label=reason)
            )  # fmt: skip
    for key, ax in axes.items():
        title, ylabel = _PANELS[key]
        ax.set(yscale="log", xscale="log", title=title, xlabel="T (tokens per row)", ylabel=ylabel)
        ax.set_xticks(seq_lens, labels=[format_tokens(t) for t in seq_lens])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.grid(True, which="both", alpha=0.3)
    figure.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6))
    first = mine[0]
    figure.suptitle(
        f"seqlens_and_offsets: {chosen}, {first['layout']} layout, B={first['batch']}, "
        f"S={', '.join(f'{s:,}' for s in segments)}; {device_name(environment)}, "
        f"jax {environment['jax']}"
    )
    return figure, chosen
