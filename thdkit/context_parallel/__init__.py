"""Context-parallel attention over packed rows: ring, all-gather and all-to-all strategies."""

# ruff: noqa: I001  (one re-export per line, as in thdkit/__init__.py)

from thdkit.context_parallel.api import STRATEGIES
from thdkit.context_parallel.api import StrategyName
from thdkit.context_parallel.api import context_parallel_attention
from thdkit.context_parallel.api import ring_attention
from thdkit.context_parallel.ring import ring_schedule

__all__ = [
    "STRATEGIES",
    "StrategyName",
    "context_parallel_attention",
    "ring_attention",
    "ring_schedule",
]
