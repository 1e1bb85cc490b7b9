"""The table of ``thdkit bench attention`` (:mod:`thdkit.bench.attention`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.table import Table

from thdkit.bench import measure
from thdkit.bench.attention_work import MATMUL_SIZE, matmul_rate
from thdkit.bench.measure import median

__all__ = ["attention_table", "feature_of"]


def feature_of(record: Mapping[str, Any]) -> str:
    """The record's feature (``"plain"`` in records written before features were timed)."""
    return record.get("feature", "plain")


def attention_table(records: Sequence[Mapping[str, Any]]) -> Table:
    """ATTENTION: scratch bytes, latency, × blockwise, efficiency and blockwise's factors of it
    (:mod:`thdkit.bench.attention_work`), pairs visited and allowed;
    with features timed, the feature of each row and its latency over plain attention's."""
    percent = "{:.1%}".format
    features = any(feature_of(r) != "plain" for r in records)
    columns = [
        ("T", "seq_len"), ("S", "segments"), ("impl", "implementation", str, "left"),
        ("pass", "pass", str, "left"), *[("feature", feature_of, str, "left")] * features,
        ("temp", "temp_bytes", measure.format_bytes), ("median ms", median, "{:.1f}".format),
        *[("× plain", lambda r: r.get("vs_plain"), "{:.2f}".format)] * features,
        ("× blockwise", "vs_blockwise", "{:.2f}".format),
        ("efficiency", "efficiency", percent),
        ("tile rate", lambda r: r.get("tile_rate"), percent),
        ("in matmuls", lambda r: r.get("in_matmuls"), percent),
        ("visited", "visited_pair_fraction", percent),
        ("allowed", "allowed_pair_fraction", percent),
        ("status", lambda r: r["skip_reason"] or "", str, "left"),
    ]  # fmt: skip
    caption = (
        "× blockwise: latency / blockwise's"
        + " (same feature); × plain: latency / the same implementation's plain one" * features
        + "; efficiency: the allowed pairs' matmul flops per "
        f"second / those of a {MATMUL_SIZE}^3 matmul timed with them (median "
        f"{(matmul_rate(records) or 0) / 1e9:.1f} GFLOP/s); tile rate: blockwise's tile matmuls "
        "alone, their FLOP rate over the matmul's; in matmuls: their time / the latency; "
        "pairs visited, allowed / B·T^2"
    )
    title = "ATTENTION: thdkit and peers (median of interleaved runs)"
    section = lambda r: (r["seq_len"], r["segments"])  # noqa: E731
    return measure.table(title, columns, records, section=section, caption=caption)
