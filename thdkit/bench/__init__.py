"""Benchmarks of thdkit: shared measurement helpers and the metadata benchmark."""

# ruff: noqa: I001  (one re-export per line, as in thdkit/__init__.py)

from thdkit.bench.measure import LatencyStats
from thdkit.bench.measure import Plan
from thdkit.bench.measure import environment
from thdkit.bench.measure import fits_in_budget
from thdkit.bench.measure import interleaved_latency
from thdkit.bench.measure import memory_budget_bytes
from thdkit.bench.measure import plan
from thdkit.bench.metadata import MetadataSweep
from thdkit.bench.metadata import run_sweep

__all__ = [
    "LatencyStats",
    "MetadataSweep",
    "Plan",
    "environment",
    "fits_in_budget",
    "interleaved_latency",
    "memory_budget_bytes",
    "plan",
    "run_sweep",
]
