"""The benchmarks and the ``thdkit`` command: the optional extra ``thdkit[bench]``.

:mod:`~thdkit.bench.measure` holds what they share; the metadata benchmark is ``sweep`` (what),
``run`` (how), ``report`` (the tables and the closing line) and ``plot``, written with ``units``;
then ``attention`` (with ``attention_work``, the work and the matmuls its efficiency is measured
against, and ``attention_report``), ``plan``, ``ring``, ``cp``, ``compile`` and ``commands`` (the
command line).
"""


# ruff: noqa: I001  (one re-export per line, as in thdkit/__init__.py)

from thdkit.bench.attention import AttentionBench
from thdkit.bench.attention import run_attention_bench
from thdkit.bench.compile import CompileBench
from thdkit.bench.compile import run_compile_bench
from thdkit.bench.cp import CPBench
from thdkit.bench.cp import run_cp_bench
from thdkit.bench.plan import PlanBench
from thdkit.bench.plan import run_plan_bench
from thdkit.bench.ring import RingBench
from thdkit.bench.ring import run_ring_bench
from thdkit.bench.run import run_sweep
from thdkit.bench.sweep import MetadataSweep

__all__ = [
    "AttentionBench",
    "CPBench",
    "CompileBench",
    "MetadataSweep",
    "PlanBench",
    "RingBench",
    "run_attention_bench",
    "run_compile_bench",
    "run_cp_bench",
    "run_plan_bench",
    "run_ring_bench",
    "run_sweep",
]
