"""The benchmarks of thdkit and the ``thdkit`` command (the optional extra ``thdkit[bench]``).

- :mod:`thdkit.bench.measure`: what every benchmark shares (options, plans, interleaved latency,
  memory budget, the table builder, the JSON report).
- :mod:`thdkit.bench.sweep` / :mod:`~thdkit.bench.run` / :mod:`~thdkit.bench.report`: the
  metadata benchmark: what to run, how it is measured, its tables and plot.
- :mod:`thdkit.bench.attention`, :mod:`thdkit.bench.ring`: the attention and ring benchmarks.
- :mod:`thdkit.bench.commands`: the command line.
"""

# ruff: noqa: I001  (one re-export per line, as in thdkit/__init__.py)

from thdkit.bench.attention import AttentionBench
from thdkit.bench.measure import BenchConfig
from thdkit.bench.measure import LatencyStats
from thdkit.bench.measure import Plan
from thdkit.bench.measure import plan
from thdkit.bench.ring import RingBench
from thdkit.bench.run import run_sweep
from thdkit.bench.sweep import MetadataSweep

__all__ = [
    "AttentionBench",
    "BenchConfig",
    "LatencyStats",
    "MetadataSweep",
    "Plan",
    "RingBench",
    "plan",
    "run_sweep",
]
