"""The built-in context-parallel strategies, one line each.

Importing this module fills :data:`thdkit.context_parallel.base.STRATEGIES` (the package imports
it). A new strategy is one module defining a :class:`thdkit.context_parallel.base.Strategy` and
one line here (or one :func:`thdkit.context_parallel.base.register_strategy` call in user code).
"""

from __future__ import annotations

from thdkit.context_parallel.all_gather import ALL_GATHER
from thdkit.context_parallel.all_to_all import ALL_TO_ALL
from thdkit.context_parallel.base import register_strategy
from thdkit.context_parallel.ring import RING

__all__: list[str] = []

register_strategy("ring", RING)
register_strategy("all_gather", ALL_GATHER)
register_strategy("all_to_all", ALL_TO_ALL)
