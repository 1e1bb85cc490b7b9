"""The built-in context-parallel strategies, one line each.

Importing this module fills :data:`thdkit.context_parallel.STRATEGIES` (the package
imports it). A new strategy is one module defining a
:class:`thdkit.context_parallel.Strategy` and one line here (or one
:func:`thdkit.context_parallel.register` call in user code).
"""

from __future__ import annotations

from thdkit._src.context_parallel.all_gather import ALL_GATHER
from thdkit._src.context_parallel.all_to_all import ALL_TO_ALL
from thdkit._src.context_parallel.base import register
from thdkit._src.context_parallel.ring import RING

__all__: list[str] = []

register(RING)
register(ALL_GATHER)
register(ALL_TO_ALL)
